"""Read a saved checkpoint's tensor names and config without loading its weights."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from compressed_tensors.utils import match_name

if TYPE_CHECKING:
    import torch

__all__ = [
    "INDEX_NAME",
    "shard_headers",
    "tensor_names",
    "read_tensors",
    "read_config",
    "linear_tensors",
    "resolve_scheme",
    "EXPERT_TENSOR",
]

# <container>.experts.<index>.<leaf>.<tensor>,
# e.g. model.layers.1.mlp.experts.3.w1.weight_scale
EXPERT_TENSOR = re.compile(
    r"^(?P<container>.+\.experts)\.(?P<index>\d+)\.(?P<leaf>[^.]+)\.(?P<tensor>[^.]+)$"
)


INDEX_NAME = "model.safetensors.index.json"


def shard_headers(directory: Path) -> dict[str, dict]:
    """``{shard file: safetensors header}`` of the shards a checkpoint uses: those
    its index names, else every ``*.safetensors`` file."""
    from compressed_tensors.utils.safetensors_load import get_safetensors_header

    index = directory / INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    headers = {}
    for name in files:
        header = get_safetensors_header(str(directory / name))
        header.pop("__metadata__", None)
        headers[name] = header
    return headers


def tensor_names(directory: str | Path) -> dict[str, Path]:
    """Every tensor name in the checkpoint's shards -> its file (only the headers
    are read)."""
    directory = Path(directory)
    return {
        name: directory / shard
        for shard, header in shard_headers(directory).items()
        for name in header
    }


def read_tensors(names: dict[str, Path], wanted: list[str]) -> dict[str, torch.Tensor]:
    """Load only ``wanted`` tensors (small ones: scales)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in wanted:
        by_file[names[name]].append(name)
    out = {}
    for shard, keys in by_file.items():
        with safe_open(str(shard), "pt") as handle:
            for key in keys:
                out[key] = handle.get_tensor(key)
    return out


def read_config(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())


def linear_tensors(names) -> dict[str, set[str]]:
    """Module prefix -> the tensor suffixes it holds (``weight``, ``weight_packed``,
    ``weight_scale``, ...), for every prefix holding a weight."""
    modules: dict[str, set[str]] = defaultdict(set)
    for name in names:
        prefix, _, suffix = name.rpartition(".")
        modules[prefix].add(suffix)
    return {
        prefix: suffixes
        for prefix, suffixes in modules.items()
        if suffixes & {"weight", "weight_packed"}
    }


def resolve_scheme(name: str, quantization_config: dict) -> str | None:
    """The config group vLLM resolves for a Linear named ``name`` in the checkpoint,
    or None when it is ignored or not targeted: ``ignore`` first, then a name or
    regex target, then a class target (a Linear matches ``Linear``);
    ``compressed_tensors.py``'s ``get_scheme_dict`` in vLLM 0.34."""
    if any(
        match_name(name, target) for target in quantization_config.get("ignore", [])
    ):
        return None
    groups = quantization_config.get("config_groups") or {}
    for key, group in groups.items():
        if any(
            match_name(name, t)
            for t in group.get("targets", [])
            if "." in t or t.startswith("re:")
        ):
            return key
    for key, group in groups.items():
        if "Linear" in group.get("targets", []):
            return key
    return None
