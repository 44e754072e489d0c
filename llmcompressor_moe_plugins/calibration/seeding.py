"""Seeding the calibration data order, so that two runs with the same inputs and
seed write byte-identical checkpoints.

The unseeded choice in a ``oneshot`` run is the order of the calibration samples.
llmcompressor 0.14 builds the calibration ``DataLoader`` with a ``RandomSampler``
(``shuffle_calibration_samples=True``, the default) that has no generator. Each
time the pipeline iterates it, the sampler takes a seed from torch's global CPU
generator, which torch seeds from the operating system in every new process. The
order decides which tokens share a forward (so affinity sampling draws differently)
and the order in which GPTQ sums its Hessians (so rounding differs).

A modifier cannot reach that ``DataLoader``: ``session.initialize(calib_data=...)``
keeps a deep copy in ``state.data.calib`` (``State.update``, ``copy_data=True``),
and the pipeline iterates the original. It first does so after every modifier has
initialized, so :func:`seed_calibration_order` called from ``on_initialize`` seeds
torch's global CPU generator (and the copy's sampler); :func:`restore_global_rng`
in ``on_finalize`` gives the caller's random state back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import RandomSampler

__all__ = ["seed_calibration_sampler", "seed_calibration_order", "restore_global_rng"]


def seed_calibration_sampler(dataloader: Any, seed: int) -> bool:
    """Give ``dataloader``'s ``RandomSampler`` a generator seeded with ``seed``.

    Leaves a sampler that already has a generator, any other sampler, and
    ``None`` alone.

    :return: whether a generator was set
    """
    sampler = getattr(dataloader, "sampler", None)
    if not isinstance(sampler, RandomSampler) or sampler.generator is not None:
        return False
    sampler.generator = torch.Generator().manual_seed(seed)
    return True


def seed_calibration_order(seed: int, dataloader: Any = None) -> torch.Tensor:
    """Make the order in which calibration samples are read a function of ``seed``.

    Call it before the calibration pipeline first iterates the data
    (``MoECalibrationModifier.on_initialize``). Seeds torch's global CPU generator,
    which a ``RandomSampler`` without a generator draws its seed from each time it
    is iterated, and, where given, ``dataloader``'s own sampler
    (:func:`seed_calibration_sampler`).

    :param dataloader: e.g. ``state.data.calib`` (in llmcompressor 0.14 a copy of
        the pipeline's loader, seeded in case a modifier iterates it)
    :return: the global CPU generator's previous state, for
        :func:`restore_global_rng`
    """
    previous = torch.get_rng_state()
    if dataloader is not None:
        seed_calibration_sampler(dataloader, seed)
    torch.default_generator.manual_seed(seed)
    return previous


def restore_global_rng(previous: torch.Tensor | None) -> None:
    """Put back the global CPU generator's state that
    :func:`seed_calibration_order` returned (``None``: nothing to do)."""
    if previous is not None:
        torch.set_rng_state(previous)
