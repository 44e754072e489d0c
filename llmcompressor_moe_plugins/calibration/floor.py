"""The floor: every expert calibrated on at least a given number of tokens per
pass, topped up with the tokens its router ranks highest among those it did not get
(``MoECalibrationModifier(floor=...)``, and the ``min_tokens`` mode)."""

from __future__ import annotations

import torch

__all__ = ["apply_floor"]


def apply_floor(
    selected: torch.Tensor,
    affinity: torch.Tensor | None,
    calibrated_so_far: torch.Tensor,
    floor: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``selected`` topped up so every expert reaches ``floor`` tokens over the
    pass (counting earlier forwards), with its highest-affinity unselected tokens;
    where there is no affinity, with unselected tokens drawn uniformly from
    ``generator``. An expert whose forward has fewer candidates takes them all.

    :return: bool [tokens, experts], a superset of ``selected``
    """
    have = calibrated_so_far.to(selected.device) + selected.sum(dim=0)
    missing = (floor - have).clamp(min=0)
    starved = torch.nonzero(missing).flatten().tolist()
    if not starved:
        return selected
    selected = selected.clone()
    for expert in starved:
        if affinity is not None:
            ranking = affinity[:, expert].float()
        else:
            ranking = torch.rand(selected.shape[0], generator=generator).to(
                selected.device
            )
        candidates = ranking.masked_fill(selected[:, expert], -torch.inf)
        available = int((~selected[:, expert]).sum())
        take = min(int(missing[expert]), available)
        if take > 0:
            selected[candidates.topk(take).indices, expert] = True
    return selected
