"""Recipes shipped with the plugin, by name (file stem) or by path, and by model
family.

A recipe's name is ``<family>_<scheme>``: the family prefix is the ``model_type``
of the ``config.json`` it is written for (``glm4_moe``, ``qwen3_moe``,
``deepseek_v3``, ``mixtral``), or ``moe_layer`` for the textbook ``MoeLayer`` model
(``model_type`` ``textbook_moe``); the scheme starts at the first ``w<bits>a<bits>``
or ``nvfp4`` part (``w4a16_gptq``, ``w8a8_int8``, ``nvfp4``).
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

__all__ = [
    "names",
    "path",
    "get",
    "describe",
    "resolve",
    "family_of",
    "families",
    "default_for",
]

_NAME = re.compile(r"^(?P<family>[a-z0-9_]+?)_(?P<scheme>(?:w\d+a\d+|nvfp4)(?:_\w+)?)$")
# a file prefix that is not the model_type its config.json carries
_PREFIX_MODEL_TYPE = {"moe_layer": "textbook_moe"}
DEFAULT_SCHEME = "w4a16_gptq"


def _directory():
    return files(__name__)


def names() -> list[str]:
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in _directory().iterdir()
        if entry.name.endswith(".yaml")
    )


def path(name: str) -> str:
    """Filesystem path of a shipped recipe, as a ``str``: what
    ``oneshot(recipe=...)`` takes (it calls ``.lower()`` on a path argument, so a
    ``pathlib.Path`` fails there). Raises KeyError naming the choices."""
    name = name.removesuffix(".yaml")
    entry = _directory() / f"{name}.yaml"
    if not entry.is_file():
        raise KeyError(
            f"No shipped recipe named {name!r}. Shipped: {', '.join(names())}."
        )
    return str(entry)


def get(name: str) -> str:
    """YAML text of a shipped recipe, ready for ``oneshot(recipe=...)``."""
    return Path(path(name)).read_text()


def describe(name: str) -> str:
    """The first sentence of a recipe's leading comment: what it is for."""
    words = []
    for line in get(name).splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("# ").strip())
    text = " ".join(words)
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def resolve(name_or_path: str) -> str:
    """A recipe path for a shipped recipe's name or an existing YAML file's path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or len(candidate.parts) > 1:
        if not candidate.is_file():
            raise FileNotFoundError(
                f"Recipe file {name_or_path} does not exist. Pass an existing YAML "
                f"file or a shipped recipe name: {', '.join(names())}."
            )
        return str(candidate)
    return path(name_or_path)


def family_of(name: str) -> str:
    """The ``model_type`` a shipped recipe is written for, from its name:
    ``qwen3_moe_nvfp4`` -> ``qwen3_moe``, ``moe_layer_w4a16_gptq`` ->
    ``textbook_moe``. Raises ValueError for a name without a scheme suffix."""
    match = _NAME.match(name.removesuffix(".yaml"))
    if match is None:
        raise ValueError(
            f"Recipe name {name!r} is not <model_type>_<scheme> with a scheme such "
            "as w4a16_gptq or nvfp4; rename the file so its family can be read"
        )
    prefix = match.group("family")
    return _PREFIX_MODEL_TYPE.get(prefix, prefix)


def families() -> dict[str, list[str]]:
    """``{model_type: [recipe names]}`` of the shipped recipes, families and names
    sorted (``model_type`` as in a checkpoint's ``config.json``)."""
    grouped: dict[str, list[str]] = {}
    for name in names():
        grouped.setdefault(family_of(name), []).append(name)
    return dict(sorted(grouped.items()))


def default_for(model_type: str) -> str | None:
    """The recipe a model of ``model_type`` gets when none is named: its family's
    GPTQ W4A16 recipe (int4, group 128, the smallest checkpoint vLLM serves on
    every recent NVIDIA GPU); ``None`` when no recipe is shipped for the family."""
    for name in families().get(model_type, []):
        if _NAME.match(name).group("scheme") == DEFAULT_SCHEME:
            return name
    return None
