"""Refuse to save a checkpoint whose quantization scales are not real numbers.

compressed-tensors allocates qparams with ``torch.empty`` and fills them when an
observer runs. An expert that never saw a calibration token keeps whatever memory
it got: zero, NaN, Inf, or a random value. vLLM multiplies by these scales (or, for
NVFP4 global scales, divides by them), so one such expert silently corrupts every
token routed to it. :func:`check_quantized_tensors` finds the detectable cases
before anything is written: a non-finite value, or a scale that is zero or negative.
"""

from __future__ import annotations

import torch

__all__ = [
    "QPARAM_NAMES",
    "qparam_problem",
    "check_quantized_tensors",
    "bad_quantized_tensors",
]

# float qparams; a float zero point may be any finite number, scales must be > 0
SCALES = (
    "weight_scale",
    "weight_global_scale",
    "input_scale",
    "input_global_scale",
    "output_scale",
    "output_global_scale",
)
ZERO_POINTS = ("weight_zero_point", "input_zero_point", "output_zero_point")
QPARAM_NAMES = SCALES + ZERO_POINTS


def qparam_problem(name: str, value: torch.Tensor) -> str | None:
    """What is wrong with qparam ``name`` (``weight_scale``, ...) holding
    ``value``: NaN, Inf, or for a scale a zero or negative value; None if nothing.
    Any ``*_scale`` counts as a scale."""
    if not value.is_floating_point():
        return None  # integer zero points are always representable
    value = value.detach()
    if value.is_meta:
        return None
    values = value.float()
    if torch.isnan(values).any():
        return "NaN"
    if torch.isinf(values).any():
        return "Inf"
    if name in SCALES or name.endswith("_scale"):
        if (values == 0).any():
            return "a zero scale"
        if (values < 0).any():
            return "a negative scale"
    return None


def bad_quantized_tensors(model: torch.nn.Module) -> list[tuple[str, str]]:
    """``(module.qparam, problem)`` for every qparam of a quantized module that
    holds a NaN, an Inf or a non-positive scale."""
    bad = []
    for name, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        for qparam in QPARAM_NAMES:
            value = getattr(module, qparam, None)
            if not isinstance(value, torch.Tensor):
                continue
            problem = qparam_problem(qparam, value)
            if problem is not None:
                bad.append((f"{name}.{qparam}", problem))
    return bad


def check_quantized_tensors(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` naming each qparam (``<module>.<qparam>``) that holds a
    NaN, an Inf, or a zero or negative scale; return quietly otherwise.

    Call it after calibration and before saving (``MoECalibrationModifier``'s
    ``on_finalize``, once round-to-nearest fallbacks are applied).
    """
    bad = bad_quantized_tensors(model)
    if not bad:
        return
    experts = [name for name, _ in bad if ".experts." in name]
    lines = "\n".join(f"  - {name}: {problem}" for name, problem in bad[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    hint = (
        "These experts were never calibrated (no token reached them): re-run with "
        "MoECalibrationModifier(rtn_fallback=True) (weights round-to-nearest, "
        "activation scales from the block's calibrated experts), or calibrate "
        "every expert (mode 'all' or 'min_tokens:K', or more calibration samples)."
        if experts
        else "Check the calibration data and the recipe's observers for these "
        "modules (an all-zero or non-finite input or weight), or add them to the "
        "recipe's ignore list."
    )
    raise ValueError(
        f"{len(bad)} quantization parameter(s) would be saved with values vLLM "
        f"cannot use:\n{lines}{more}\n{hint}"
    )
