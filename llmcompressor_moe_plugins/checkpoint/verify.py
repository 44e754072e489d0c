"""Check a saved checkpoint against what loads it, before it counts as written.

Three checks, none of which reads weight data:

- **transformers**: the model class loads the directory on the meta device
  (``from_pretrained(device_map="meta")``: every key renamed, converted and matched
  as in a real load); any missing, unexpected or mismatched key, or a failed
  conversion (an expert left out of a fused stack), is a failure;
- **per Linear**: every quantized Linear holds the same quantization tensors as the
  others of its scheme (``weight_packed``, ``weight_scale``, ``weight_shape``, ...);
  every expert of a layer is present;
- **vLLM**: :mod:`.vllm_rules`.

:func:`finish_checkpoint` is what both ``oneshot``'s save (through the modifier)
and the CLI call on the written directory: align the config's targets to the
family's checkpoint names, then verify.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import torch
from loguru import logger

from ..upstream.conversions import load_report_on_meta
from .errors import CheckpointMismatchError
from .files import (
    EXPERT_TENSOR,
    linear_tensors,
    read_config,
    resolve_scheme,
    tensor_names,
)
from .layout import align_config_targets, applied_layout
from .vllm_rules import vllm_layout_violations

__all__ = [
    "CheckpointMismatchError",
    "checkpoint_problems",
    "verify_checkpoint",
    "finish_checkpoint",
]

SHOWN = 5
QPARAM_PREFIXES = ("weight_", "input_", "output_")


def _model_class(config: dict):
    import transformers

    for name in config.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def _first(label: str, keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return f"{label}: {', '.join(keys[:SHOWN])}{more}"


# formats whose fused experts transformers 5.17 decompresses on load
# (``CompressedTensorsHfQuantizer.update_weight_conversions``: packed and FP8)
RELOADED_EXPERT_FORMATS = {"pack-quantized", "nvfp4-pack-quantized", "float-quantized"}
NVFP4_GLOBAL_SCALES = (".weight_global_scale", ".input_global_scale")


def _formats(config: dict) -> set[str]:
    quantization = config.get("quantization_config") or {}
    groups = (quantization.get("config_groups") or {}).values()
    formats = {quantization.get("format")} | {g.get("format") for g in groups}
    formats.discard(None)
    return formats


def _transformers_gaps(config: dict, report: dict) -> tuple[dict, str | None]:
    """``report`` without what transformers 5.17 cannot read of a correct
    checkpoint, and a line saying what was set aside. Two gaps, both in formats
    vLLM reads as written: int8 experts (``int-quantized``, W8A8), which it cannot
    merge into its fused experts (it stops loading with an error, never
    silently), and NVFP4 experts' global scales, which it leaves unread."""
    formats = _formats(config)
    keys = [
        *report.get("missing_keys", []),
        *report.get("unexpected_keys", []),
        *(report.get("conversion_errors") or {}),
    ]
    if keys and formats and not formats & RELOADED_EXPERT_FORMATS:
        if all(".experts." in key for key in keys):
            return {}, (
                "transformers 5.17 cannot reload int8 experts (its quantizer "
                "decompresses packed and FP8 experts only) and stops with an error "
                "if asked to; vLLM reads them as written"
            )
    if "nvfp4-pack-quantized" in formats:
        unread = [
            key
            for key in report.get("unexpected_keys", [])
            if ".experts." in key and key.endswith(NVFP4_GLOBAL_SCALES)
        ]
        if unread:
            rest = [k for k in report["unexpected_keys"] if k not in set(unread)]
            return {**report, "unexpected_keys": rest}, (
                f"transformers 5.17 leaves {len(unread)} NVFP4 expert global scales "
                "unread when it fuses the experts; vLLM reads them as written"
            )
    return report, None


# what torchrun sets; a process without them is not part of the run's group
TORCHRUN_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def reload_problems(
    directory: str | Path, trust_remote_code: bool = False
) -> list[str]:
    """transformers' load report of ``directory``, made on the meta device. Under
    torchrun it is made in a fresh process: compressed-tensors spreads its
    model compression over the ranks of an initialized process group, and only
    the writing rank checks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _reload_problems_in_a_fresh_process(directory, trust_remote_code)
    return _reload_problems(directory, trust_remote_code)


def _reload_problems_in_a_fresh_process(
    directory: str | Path, trust_remote_code: bool
) -> list[str]:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    code = (
        "import json, sys\n"
        "from llmcompressor_moe_plugins.checkpoint.verify import _reload_problems\n"
        "print(json.dumps(_reload_problems(sys.argv[1], sys.argv[2] == '1')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(directory), "1" if trust_remote_code else "0"],
        capture_output=True,
        text=True,
        env=env,
    )
    if result.returncode != 0:
        return [f"load check failed: {result.stderr.strip().splitlines()[-1:]}"]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _reload_problems(
    directory: str | Path, trust_remote_code: bool = False
) -> list[str]:
    config = read_config(directory)
    report = load_report_on_meta(
        str(directory), _model_class(config), trust_remote_code=trust_remote_code
    )
    report, gap = _transformers_gaps(config, report)
    if gap:
        logger.warning(gap)
    problems = []
    for label, key in (
        ("missing on load", "missing_keys"),
        ("unexpected on load (would be dropped)", "unexpected_keys"),
        ("shape mismatch on load", "mismatched_keys"),
    ):
        if report.get(key):
            problems.append(_first(label, list(report[key])))
    errors = report.get("conversion_errors") or {}
    if errors:
        problems.append(_first("failed conversion on load", sorted(errors)))
    if report.get("error_msgs"):
        problems.append(_first("load errors", report["error_msgs"]))
    return problems


def qparam_problems(directory: str | Path) -> list[str]:
    """Quantized Linears missing a tensor their scheme's others hold, and experts
    missing from a layer."""
    config = read_config(directory)
    quantization = config.get("quantization_config") or {}
    names = tensor_names(directory)
    by_scheme: dict[str | None, dict[str, frozenset]] = defaultdict(dict)
    for module, suffixes in linear_tensors(names).items():
        # the quantization tensors (a bias or a plain weight is no qparam)
        qparams = {s for s in suffixes if s.startswith(QPARAM_PREFIXES)}
        if qparams & {"weight_scale", "weight_packed"}:
            scheme = resolve_scheme(module, quantization)
            by_scheme[scheme][module] = frozenset(qparams)
    problems = []
    for scheme, modules in by_scheme.items():
        expected, _ = Counter(modules.values()).most_common(1)[0]
        odd = sorted(m for m, s in modules.items() if s != expected)
        if odd:
            missing = sorted(expected - modules[odd[0]]) or sorted(modules[odd[0]])
            problems.append(
                _first(
                    f"quantized Linears of scheme {scheme} without "
                    f"{', '.join(missing)}",
                    odd,
                )
            )
    indices: dict[str, set[int]] = defaultdict(set)
    for name in names:
        match = EXPERT_TENSOR.match(name)
        if match:
            indices[match["container"]].add(int(match["index"]))
    count = max((max(i) + 1 for i in indices.values()), default=0)
    for container, present in sorted(indices.items()):
        absent = sorted(set(range(count)) - present)
        if absent:
            problems.append(
                f"{container}: experts {absent[:8]} absent (other layers have {count})"
            )
    return problems


def checkpoint_problems(
    directory: str | Path, trust_remote_code: bool = False
) -> list[str]:
    """Every problem found, transformers' reload first."""
    return (
        reload_problems(directory, trust_remote_code)
        + qparam_problems(directory)
        + vllm_layout_violations(directory)
    )


def verify_checkpoint(directory: str | Path, trust_remote_code: bool = False) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first problems."""
    problems = checkpoint_problems(directory, trust_remote_code)
    if problems:
        raise CheckpointMismatchError(
            f"The checkpoint written to {directory} would not load as saved: "
            + "; ".join(problems[:4])
            + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        )


def finish_checkpoint(
    directory: str | Path, model: torch.nn.Module, trust_remote_code: bool = False
) -> None:
    """After ``save_pretrained(directory)``: align the saved config's targets with
    the family's checkpoint names, then verify the directory."""
    align_config_targets(directory, model, applied_layout(model))
    verify_checkpoint(directory, trust_remote_code)
    logger.info(
        f"Checked {directory}: reloads in transformers, vLLM's MoE layout rules hold"
    )
