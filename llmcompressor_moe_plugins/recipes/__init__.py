"""Recipes shipped with the plugin, by name (file stem) or by path."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["names", "path", "get", "describe", "resolve"]


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
    """First comment line of a recipe: what it is for."""
    for line in get(name).splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


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
