"""Shared by the end-to-end tests."""

import json
import textwrap
from pathlib import Path

from safetensors import safe_open

from llmcompressor_moe_plugins.calibration.registry import ENTRY_POINT_GROUP


def calibrate(model, tokenizer, data, recipe, max_seq_length: int, **settings) -> None:
    """``oneshot`` on the CPU over every sample of ``data``, in order (the same
    order in every run, so runs compare)."""
    from llmcompressor import oneshot

    from llmcompressor_moe_plugins.upstream.compat import cpu_only_calibration

    with cpu_only_calibration():
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=data,
            recipe=recipe,
            num_calibration_samples=len(data),
            max_seq_length=max_seq_length,
            shuffle_calibration_samples=False,
            **settings,
        )


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


def calibration_module(cls, block, config, mode="all", name="block", **settings):
    """A calibration module for ``block``, configured as the context does."""
    from llmcompressor_moe_plugins.calibration.modes import parse_mode

    module = cls(block, config)
    module.configure(name, parse_mode(mode), **settings)
    return module


def install_fake_distribution(root, dist_name, entries, modules):
    """A distribution on sys.path: dist-info with entry points, plus modules."""
    info = root / f"{dist_name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n"
    )
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [
        f"{name} = {target}" for name, target in entries.items()
    ]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module_name, source in modules.items():
        (root / f"{module_name}.py").write_text(textwrap.dedent(source))
