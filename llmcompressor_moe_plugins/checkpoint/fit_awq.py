"""AWQ smoothing pairs the fit cannot keep: see :mod:`.fit`'s docstring."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from compressed_tensors.utils import match_modules_set

from .schemes import FitChange

__all__ = ["fit_awq"]


def _excluding(target: str, names: Iterable[str]) -> str:
    """``target`` (a name or ``re:`` pattern) that no longer matches ``names``."""
    alternatives = "|".join(re.escape(name) for name in sorted(set(names)))
    pattern = target[3:] if target.startswith("re:") else re.escape(target) + "$"
    return f"re:(?!(?:{alternatives})$){pattern}"


def fit_awq(
    model: torch.nn.Module, awq, quantized: set[str], ignored: set[str]
) -> list[FitChange]:
    """Drop the AWQ smoothing pairs whose balance Linears the fit left unquantized
    and that have no quantized balance Linear left."""
    from llmcompressor.modifiers.transform.awq.mappings import AWQMapping

    if not awq.mappings or not ignored:
        return []
    module_names = {module: name for name, module in model.named_modules()}
    changes = []
    mappings = []
    for mapping in awq.mappings:
        targets = (mapping.smooth_layer, *mapping.balance_layers)
        smooth_dropped: list[str] = []
        balance_dropped: list[str] = []
        for smooth_layers, *balance_groups in match_modules_set(model, targets):
            balance = [module_names[m] for group in balance_groups for m in group]
            if any(n in ignored for n in balance) and not any(
                n in quantized for n in balance
            ):
                smooth_dropped += [module_names[m] for m in smooth_layers]
                balance_dropped += balance
        if smooth_dropped:
            mapping = AWQMapping(
                smooth_layer=_excluding(mapping.smooth_layer, smooth_dropped),
                balance_layers=[
                    _excluding(target, balance_dropped)
                    for target in mapping.balance_layers
                ],
                activation_hook_target=mapping.activation_hook_target,
            )
            modules = dict(model.named_modules())
            changes.append(
                FitChange(
                    type(awq).__name__,
                    tuple(balance_dropped),
                    tuple(modules[n].in_features for n in balance_dropped),
                    "the quantization scheme",
                    "not smoothed from "
                    + ", ".join(smooth_dropped)
                    + " (AWQ balances only quantized Linears)",
                )
            )
        mappings.append(mapping)
    awq.mappings = mappings
    return changes
