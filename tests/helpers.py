"""Shared by the end-to-end tests."""

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

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


def linearized_expert(model_dir: Path) -> SimpleNamespace:
    """One expert's Linears of the model in ``model_dir``, as the plugin
    linearizes its experts (no weights of interest: shapes and dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    hidden, width = model.config.hidden_size, model.config.moe_intermediate_size
    dtype = model.model.embed_tokens.weight.dtype
    return SimpleNamespace(
        gate_proj=torch.nn.Linear(hidden, width, bias=False, dtype=dtype),
        down_proj=torch.nn.Linear(width, hidden, bias=False, dtype=dtype),
    )


def group_budget(expert, experts: int) -> tuple[int, int, int]:
    """A statistics budget with room for ``experts`` experts' statistics besides
    the block's all-token statistics and one GPTQ W4A16 solve (so the planner makes
    groups of ``experts - 1``), in bytes; with the all-token statistics' bytes and
    one expert's. ``expert`` has the plugin's ``gate_proj`` and ``down_proj``."""
    from llmcompressor_moe_plugins.calibration.modes import DEFAULT_SHRINK
    from llmcompressor_moe_plugins.statistics.expert_budget import (
        expert_statistics_bytes,
    )
    from llmcompressor_moe_plugins.statistics.shrinkage import target_bytes
    from llmcompressor_moe_plugins.upstream import gptq

    hidden = expert.gate_proj.weight.shape[1]
    width = expert.down_proj.weight.shape[1]
    reserved = target_bytes([expert], DEFAULT_SHRINK)
    solve = gptq.solve_bytes(2 * width, hidden, 128)  # gate/up stacked, group 128
    expert_bytes = expert_statistics_bytes(hidden, width)
    return reserved + solve + experts * expert_bytes, reserved, expert_bytes
