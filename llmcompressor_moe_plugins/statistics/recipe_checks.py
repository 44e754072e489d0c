"""Recipe checks for the statistics a calibration mode needs."""

from __future__ import annotations

from loguru import logger

from ..calibration.modes import any_weighted, parse_mode

__all__ = ["require_weighting_gptq"]


def require_weighting_gptq(specs: list, modifiers: list, default=None) -> None:
    """Weighted modes weight Hessians only SharedHessianGPTQModifier accumulates;
    under plain GPTQModifier a chosen one would silently be unweighted, so that
    stops the run. The default then calibrates its token choice (and says so)."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    plain = [m for m in modifiers if type(m) is GPTQModifier]
    if not plain:
        return
    weighted = [s for s in specs if any_weighted([s])]
    if not weighted and default is not None:
        if any_weighted([default]):
            logger.info(
                f"Default mode {default}: under GPTQModifier each expert is "
                "calibrated on its routed tokens plus the floor, unweighted; "
                "SharedHessianGPTQModifier (same fields) weights them by routing "
                "weight, which measured better (README, 'Which mode')"
            )
        return
    if weighted:
        raise ValueError(
            f"Calibration mode {parse_mode(weighted[0]).spec()!r} weights GPTQ "
            "Hessians by routing weight, which only SharedHessianGPTQModifier "
            "accumulates; this recipe has GPTQModifier. Rename it to "
            "SharedHessianGPTQModifier (same fields), or pick another mode."
        )
