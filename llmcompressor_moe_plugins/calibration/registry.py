"""Which calibration module replaces which MoE block class.

Modules are found through the entry-point group ``ENTRY_POINT_GROUP`` (entry name =
class name of the block to replace, value = ``module:Class``); our own modules are
registered there by our ``pyproject.toml`` exactly as a third party's would be.

- Lazy: entry points are indexed by name; a module is imported only when a model
  contains a block of that name.
- Isolated: a plugin that fails to import is logged with its name and error and
  skipped; every other plugin still works.
- Deterministic duplicates: ours first, then by distribution name, with a warning.
- ``LLMCOMPRESSOR_MOE_PLUGINS``: comma-separated allowlist of entry names.
- ``register(name, cls)``: for code that is not packaged; it wins over entry points.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

from loguru import logger

from .base import MoECalibrationModule

__all__ = [
    "ENTRY_POINT_GROUP",
    "ALLOWLIST_ENV",
    "PluginEntry",
    "register",
    "unregister",
    "get_calibration_module",
    "registered_names",
    "list_plugins",
    "reload_plugins",
]

ENTRY_POINT_GROUP = "llmcompressor_moe_plugins.calibration_modules"
ALLOWLIST_ENV = "LLMCOMPRESSOR_MOE_PLUGINS"
OUR_DISTRIBUTION = "llmcompressor-moe-plugins"


@dataclass
class PluginEntry:
    """One calibration module known to the registry (loaded or not)."""

    name: str
    target: str
    distribution: str
    entry_point: EntryPoint | None = None
    module_class: type | None = None
    error: str | None = None
    shadowed: list[str] = field(default_factory=list)

    @property
    def loaded(self) -> bool:
        return self.module_class is not None


_entries: dict[str, PluginEntry] | None = None
_programmatic: dict[str, PluginEntry] = {}


def _normalize(dist_name: str) -> str:
    return dist_name.lower().replace("_", "-")


def _allowlist() -> set[str] | None:
    raw = os.environ.get(ALLOWLIST_ENV)
    if raw is None or not raw.strip():
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _distribution_name(entry_point: EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return dist.metadata["Name"] if dist is not None else "<unknown>"


def _index_entry_points() -> dict[str, PluginEntry]:
    by_name: dict[str, list[PluginEntry]] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        entry = PluginEntry(
            name=entry_point.name,
            target=entry_point.value,
            distribution=_distribution_name(entry_point),
            entry_point=entry_point,
        )
        by_name.setdefault(entry.name, []).append(entry)

    allowed = _allowlist()
    index: dict[str, PluginEntry] = {}
    for name, candidates in sorted(by_name.items()):
        if allowed is not None and name not in allowed:
            logger.debug(f"MoE plugin {name!r} skipped: not in ${ALLOWLIST_ENV}")
            continue
        candidates.sort(
            key=lambda e: (
                _normalize(e.distribution) != OUR_DISTRIBUTION,
                _normalize(e.distribution),
                e.target,
            )
        )
        winner, losers = candidates[0], candidates[1:]
        # the same distribution seen twice (e.g. an editable and a stale install
        # on sys.path) with the same target is not a real conflict
        losers = [
            e
            for e in losers
            if (e.distribution, e.target)
            != (
                winner.distribution,
                winner.target,
            )
        ]
        if losers:
            winner.shadowed = [f"{e.target} ({e.distribution})" for e in losers]
            logger.warning(
                f"Several calibration modules are registered for {name!r}; using "
                f"{winner.target} from {winner.distribution}, ignoring "
                f"{', '.join(winner.shadowed)}"
            )
        index[name] = winner
    if index:
        logger.debug(f"Indexed MoE calibration plugins: {', '.join(sorted(index))}")
    return index


def _index() -> dict[str, PluginEntry]:
    global _entries
    for name, module_class in MoECalibrationModule.take_decorated():
        register(name, module_class)
    if _entries is None:
        _entries = _index_entry_points()
    return _entries


def _load(entry: PluginEntry) -> type | None:
    if entry.loaded or entry.error is not None:
        return entry.module_class
    try:
        module_class = entry.entry_point.load()
    except Exception as err:  # a broken plugin must not break the others
        entry.error = f"{type(err).__name__}: {err}"
        logger.error(
            f"MoE calibration plugin {entry.name!r} ({entry.target}, from "
            f"{entry.distribution}) failed to load and is skipped: {entry.error}"
        )
        return None
    if not (
        isinstance(module_class, type)
        and issubclass(module_class, MoECalibrationModule)
    ):
        entry.error = (
            f"{entry.target} is not a subclass of "
            "llmcompressor_moe_plugins.MoECalibrationModule"
        )
        logger.error(f"MoE calibration plugin {entry.name!r} skipped: {entry.error}")
        return None
    entry.module_class = module_class
    logger.info(
        f"Loaded MoE calibration plugin {entry.name!r}: {entry.target} "
        f"({entry.distribution})"
    )
    return module_class


def register(name: str, module_class: type) -> None:
    """Register ``module_class`` to replace blocks whose class is named ``name``.
    Takes precedence over entry points of the same name."""
    if not (
        isinstance(module_class, type)
        and issubclass(module_class, MoECalibrationModule)
    ):
        raise TypeError(
            f"register({name!r}, ...) needs a subclass of MoECalibrationModule, got "
            f"{module_class!r}"
        )
    previous = _programmatic.get(name) or _index().get(name)
    if previous is not None and previous.module_class is not module_class:
        logger.info(
            f"register({name!r}): {module_class.__qualname__} overrides "
            f"{previous.target}"
        )
    _programmatic[name] = PluginEntry(
        name=name,
        target=f"{module_class.__module__}:{module_class.__qualname__}",
        distribution="<register()>",
        module_class=module_class,
    )


def unregister(name: str) -> None:
    """Remove a programmatic registration (entry points stay)."""
    _programmatic.pop(name, None)


def registered_names() -> list[str]:
    """Block class names that have a calibration module (nothing is imported)."""
    return sorted(set(_index()) | set(_programmatic))


def get_calibration_module(name: str) -> type | None:
    """The calibration module class for a block class name, importing it on first
    use; None when there is none or it failed to load (the error is logged)."""
    _index()  # takes classes decorated with MoECalibrationModule.register
    if name in _programmatic:
        return _programmatic[name].module_class
    entry = _index().get(name)
    return _load(entry) if entry is not None else None


def list_plugins(load: bool = True) -> list[PluginEntry]:
    """Every known calibration module; with ``load``, imports each so that load
    errors show (for ``llmcompressor-moe plugins``)."""
    entries = dict(_index())
    entries.update(_programmatic)
    if load:
        for entry in entries.values():
            if entry.entry_point is not None:
                _load(entry)
    return [entries[name] for name in sorted(entries)]


def reload_plugins() -> None:
    """Forget the entry-point index (e.g. after installing a plugin or changing
    the allowlist); the next lookup re-reads it."""
    global _entries
    _entries = None
