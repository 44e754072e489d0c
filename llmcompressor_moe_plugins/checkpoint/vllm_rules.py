"""What vLLM's MoE loaders require of a quantized checkpoint, checked on the files.

From vLLM 0.34's ``compressed_tensors_moe.py`` (read, not run: vLLM does not
install here):

- one fused MoE layer takes **one scheme**, looked up for expert 0's gate, up and
  down; projections that differ raise "All MoE projections need to have same
  quantization scheme", and an ignored expert 0 loads the whole layer unquantized.
  We require every expert of a layer to resolve to one scheme and to hold that
  scheme's tensors;
- NVFP4: gate and up of an expert are fused (w13) and share one
  ``weight_global_scale`` (vLLM warns and takes gate's when they differ);
- W8A8 int8 experts: per-token dynamic activations only (a static ``input_scale``
  is rejected);
- MTP layers (``model.layers.{num_hidden_layers + i}``) stored unquantized and
  named in ``quantization_config.ignore`` (vLLM #41994: missing from ignore
  crashes loading);
- every scale finite and > 0 (``check_values``; reads every scale tensor).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .checks import qparam_problem
from .files import (
    EXPERT_TENSOR,
    linear_tensors,
    read_config,
    read_tensors,
    resolve_scheme,
    tensor_names,
)
from .mtp import mtp_linear_names

__all__ = ["vllm_layout_violations", "GATE_UP_LEAVES"]

# checkpoint leaves of an expert's gate and up projections (Qwen/DeepSeek/GLM style
# and Mixtral style)
GATE_UP_LEAVES = {"gate_proj", "up_proj", "w1", "w3"}
SCALE_SUFFIXES = ("_scale", "global_scale")


def _experts(names) -> dict[str, dict[tuple[int, str], set[str]]]:
    """container -> (expert index, leaf) -> tensor suffixes."""
    experts: dict[str, dict[tuple[int, str], set[str]]] = defaultdict(
        lambda: defaultdict(set)
    )
    for name in names:
        match = EXPERT_TENSOR.match(name)
        if match:
            key = (int(match["index"]), match["leaf"])
            experts[match["container"]][key].add(match["tensor"])
    return experts


def _mtp_prefixes(config: dict) -> list[str]:
    text = config.get("text_config", config)
    layers = text.get("num_hidden_layers")
    extra = text.get("num_nextn_predict_layers") or 0
    if layers is None:
        return []
    return [f"model.layers.{layers + i}." for i in range(extra)]


def vllm_layout_violations(
    directory: str | Path, check_values: bool = False
) -> list[str]:
    """One line per rule the checkpoint in ``directory`` breaks (empty: none)."""
    config = read_config(directory)
    quantization = config.get("quantization_config")
    if not quantization:
        return []
    names = tensor_names(directory)
    groups = quantization.get("config_groups") or {}
    problems: list[str] = []
    for container, members in sorted(_experts(names).items()):
        schemes = {
            (index, leaf): resolve_scheme(f"{container}.{index}.{leaf}", quantization)
            for index, leaf in members
        }
        distinct = set(schemes.values())
        if len(distinct) > 1:
            shown = sorted(distinct, key=str)
            problems.append(
                f"{container}: its experts resolve to {len(distinct)} schemes "
                f"({', '.join(map(str, shown))}); vLLM takes one per MoE layer"
            )
            continue
        scheme = distinct.pop()
        packed = {"weight_packed", "weight_scale"} if scheme else {"weight"}
        for (index, leaf), suffixes in sorted(members.items()):
            if not (
                packed <= suffixes
                or (scheme and {"weight", "weight_scale"} <= suffixes)
            ):
                problems.append(
                    f"{container}.{index}.{leaf}: holds {sorted(suffixes)}, not the "
                    f"tensors of scheme {scheme or 'unquantized'}"
                )
                break
        if scheme is None:
            continue
        inputs = groups[scheme].get("input_activations") or {}
        weights = groups[scheme].get("weights") or {}
        if inputs.get("type") == "int" and not inputs.get("dynamic", False):
            problems.append(
                f"{container}: int8 expert activations are static; vLLM's W8A8 int8 "
                "MoE takes dynamic per-token activations only"
            )
        if (
            any("input_scale" in s for s in members.values())
            and weights.get("type") == "int"
        ):
            problems.append(
                f"{container}: experts hold a static input_scale, which vLLM's int8 "
                "MoE rejects"
            )
        global_scales = [
            f"{container}.{index}.{leaf}.weight_global_scale"
            for (index, leaf), suffixes in members.items()
            if leaf in GATE_UP_LEAVES and "weight_global_scale" in suffixes
        ]
        if global_scales:
            values = read_tensors(names, global_scales)
            per_expert: dict[int, set[float]] = defaultdict(set)
            for name, value in values.items():
                per_expert[int(EXPERT_TENSOR.match(name)["index"])].add(
                    float(value.float().reshape(-1)[0])
                )
            split = sorted(i for i, v in per_expert.items() if len(v) > 1)
            if split:
                problems.append(
                    f"{container}: experts {split[:8]} have different gate and up "
                    "weight_global_scale; vLLM fuses them and keeps gate's"
                )
    problems += _mtp_violations(config, quantization, names)
    if check_values:
        problems += _bad_scales(names)
    return problems


def _mtp_violations(config: dict, quantization: dict, names) -> list[str]:
    problems = []
    for prefix in _mtp_prefixes(config):
        # the MTP layer's Linears as mtp.py lists them in ignore (no norms, no
        # embedding), quantized ones too
        linears = set(mtp_linear_names(n for n in names if n.startswith(prefix)))
        linears |= {
            m
            for m, s in linear_tensors(names).items()
            if m.startswith(prefix) and "weight_packed" in s
        }
        modules = {m: s for m, s in linear_tensors(names).items() if m in linears}
        quantized = sorted(m for m, s in modules.items() if "weight" not in s)
        if quantized:
            problems.append(
                f"{quantized[0]}: the MTP layer is stored quantized; vLLM's MTP "
                "loaders take it unquantized"
            )
        unlisted = sorted(
            m for m in modules if resolve_scheme(m, quantization) is not None
        )
        if unlisted:
            problems.append(
                f"{unlisted[0]} (and {len(unlisted) - 1} more): MTP Linears not in "
                "quantization_config.ignore; vLLM would create them quantized"
            )
    return problems


def _bad_scales(names) -> list[str]:
    scales = [n for n in names if n.rsplit(".", 1)[-1].endswith(SCALE_SUFFIXES)]
    problems = []
    for name, value in read_tensors(names, scales).items():
        # the in-memory check's own rule (checks.py), on the saved tensors
        if qparam_problem(name.rsplit(".", 1)[-1], value) is not None:
            problems.append(f"{name}: a scale that is not finite and > 0")
    return problems
