"""Import-time cost of the package: nothing heavy until it is used.

``import llmcompressor_moe_plugins`` must stay cheap (the CLI answers a usage
error in well under 2 s, before torch or llmcompressor is imported) and must still
make our names known where upstream looks them up by name:

- llmcompressor's ``ModifierFactory`` (YAML recipes name ``MoECalibrationModifier``
  and ``SharedHessianGPTQModifier``): once llmcompressor's factory module is
  imported, its ``create`` imports our modifier modules (which register
  themselves) the first time a recipe names one of them;
- transformers' Auto classes (the textbook MoE model's ``model_type``): once
  transformers is imported, the module defining that model is imported too.

Both are post-import hooks: a finder on ``sys.meta_path`` that runs a callback
after the named module has executed (or at once if it already has), so they
cost nothing unless that library is used, and they never import one of our
modules while it is itself being imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType

__all__ = ["install_hooks", "OUR_MODIFIERS"]

# recipe name -> module whose import registers it with ModifierFactory
OUR_MODIFIERS = {
    "MoECalibrationModifier": "llmcompressor_moe_plugins.modifier",
    "SharedHessianGPTQModifier": (
        "llmcompressor_moe_plugins.statistics.shared_hessian_gptq"
    ),
}
TEXTBOOK_MODULE = "llmcompressor_moe_plugins.models.textbook_moe"


def _factory_imported(factory_module: ModuleType) -> None:
    factory = factory_module.ModifierFactory
    original = factory.create
    if getattr(original, "_moe_plugins_lazy", False):
        return

    def create(type_: str, *args, **kwargs):
        if type_ in OUR_MODIFIERS:
            from .upstream.factory import is_registered  # llmcompressor is loaded

            if not is_registered(factory, type_):
                importlib.import_module(OUR_MODIFIERS[type_])  # registers itself
        return original(type_, *args, **kwargs)

    create._moe_plugins_lazy = True  # type: ignore[attr-defined]
    factory.create = staticmethod(create)


def _transformers_imported(_module: ModuleType) -> None:
    # imported from one of our modules that needs transformers first, that
    # module registers the model itself once it gets that far
    if TEXTBOOK_MODULE not in sys.modules:
        importlib.import_module(TEXTBOOK_MODULE)


_CALLBACKS: dict[str, Callable[[ModuleType], None]] = {
    "llmcompressor.modifiers.factory": _factory_imported,
    "transformers": _transformers_imported,
}


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a hooked name, it asks the finders after it
    and makes the loader call the callback once the module has executed."""

    def find_spec(self, fullname, path, target=None):
        callback = _CALLBACKS.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            _CALLBACKS.pop(fullname, None)
            callback(module)

        loader.exec_module = exec_module  # this loader instance loads this module
        return spec


_finder = _PostImportFinder()


def install_hooks() -> None:
    """Run each callback now for a module imported already, else on its import."""
    for name, callback in list(_CALLBACKS.items()):
        module = sys.modules.get(name)
        if module is not None:
            _CALLBACKS.pop(name)
            callback(module)
    if _CALLBACKS and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
