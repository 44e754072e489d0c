"""The shipped real configs: names, fields, sources, transformers configs."""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

__all__ = ["ALIASES", "names", "real_config_dict", "real_config_source", "real_config"]

# released checkpoints with the architecture (and config.json) of a shipped one
ALIASES = {"DeepSeek-R1": "DeepSeek-V3"}


def _directory():
    return files(__package__)


def names(model_type: str | None = None) -> list[str]:
    """The real configs shipped, e.g. ``['DeepSeek-V3', 'GLM-4.5', ...]``; with
    ``model_type`` only that family's (``names("glm4_moe")``: the four GLMs)."""
    found = sorted(
        entry.name.removesuffix(".json")
        for entry in _directory().iterdir()
        if entry.name.endswith(".json")
    )
    if model_type is None:
        return found
    return [n for n in found if real_config_dict(n)["model_type"] == model_type]


def _load(name: str) -> dict[str, Any]:
    name = name.rsplit("/", 1)[-1]  # hub ids: zai-org/GLM-4.5, Qwen/Qwen3-30B-A3B
    name = ALIASES.get(name, name)
    entry = _directory() / f"{name}.json"
    if not entry.is_file():
        raise KeyError(f"No real config named {name!r}. Shipped: {', '.join(names())}.")
    return json.loads(entry.read_text())


def real_config_dict(name: str) -> dict[str, Any]:
    """The architecture fields of ``name``'s ``config.json`` (without ``_source``)."""
    data = _load(name)
    data.pop("_source")
    return data


def real_config_source(name: str) -> dict[str, Any]:
    """Where the values of ``name`` come from (URL, date, cross-checks)."""
    return _load(name)["_source"]


def real_config(name: str):
    """``name``'s real layout as its transformers config (``Glm4MoeConfig``,
    ``Qwen3MoeConfig``, ``DeepseekV3Config``, ``MixtralConfig``); a hub prefix such
    as ``zai-org/`` is optional."""
    from transformers import CONFIG_MAPPING

    data = real_config_dict(name)
    return CONFIG_MAPPING[data["model_type"]].from_dict(data)
