"""Shared by the end-to-end tests."""

import json
from pathlib import Path

from safetensors import safe_open


def saved_tensor_names(directory: Path) -> set[str]:
    names = set()
    for path in Path(directory).glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            names |= set(handle.keys())
    return names


def quantization_config(directory: Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())[
        "quantization_config"
    ]


def relative_error(actual, expected) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())
