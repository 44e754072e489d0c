"""Qparams for experts that got no calibration statistics.

An expert that is never called during calibration is never compressed by GPTQ and
its observers never run: its ``weight_scale`` stays uninitialized, and so do its
activation qparams where the scheme calibrates them (NVFP4's ``input_global_scale``,
static FP8/INT8 ``input_scale``). compressed-tensors allocates them with
``torch.empty``: the saved checkpoint would hold garbage for that expert.

- :func:`quantize_round_to_nearest` computes weight qparams from the weights alone,
  with the observer the scheme names (gate/up share one NVFP4 global scale, as
  calibrated experts' do and vLLM expects);
- :func:`fill_starved_activation_qparams` sets the activation qparams of those
  experts from their calibrated peers in the same MoE block: the widest range any
  peer saw (AutoRound does the same for experts without data). For a static
  ``input_scale`` that is the largest scale; for NVFP4's ``input_global_scale``,
  which compressed-tensors computes as ``448 * 6 / amax`` (FP8 max x FP4 max over
  the absolute maximum, ``generate_gparam``), the widest range is the *smallest*
  global scale.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from compressed_tensors.quantization import DynamicType
from compressed_tensors.quantization.utils import calculate_qparams, calculate_range
from compressed_tensors.utils import getattr_chain, update_offload_parameter
from llmcompressor.modifiers.quantization.calibration import (
    freeze_module_quantization,
    initialize_observer,
    observe,
    update_qparams,
)
from llmcompressor.observers import fuse_weight_observers
from loguru import logger

__all__ = [
    "apply_rtn_fallback",
    "quantize_round_to_nearest",
    "fill_activation_qparams",
    "fill_starved_activation_qparams",
]

_OBSERVERS = ("input", "weight", "output", "q", "k", "v")


def quantize_round_to_nearest(blocks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Set weight qparams from the weights of every quantized Linear in ``blocks``.

    :return: the Linears that were given qparams (those without a weight
        quantization scheme are left alone)
    """
    done = []
    for block in blocks:
        linears = [
            module
            for module in block.modules()
            if getattr_chain(module, "quantization_scheme.weights", None) is not None
        ]
        for module in linears:
            initialize_observer(module, base_name="weight")
        # NVFP4: gate/up (and q/k/v) get one global scale from their joint range
        fuse_weight_observers(block)
        for module in linears:
            observe(module, base_name="weight")
        for module in linears:
            update_qparams(module, base_name="weight")
        for module in linears:
            freeze_module_quantization(module)
            _remove_observers(module)  # freezing skips modules already frozen
        done.extend(linears)
    return done


def _remove_observers(module: torch.nn.Module) -> None:
    for base_name in _OBSERVERS:
        observer = getattr(module, f"{base_name}_observer", None)
        if observer is not None:
            observer.detach(module)
            delattr(module, f"{base_name}_observer")


def _usable(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all() and (value > 0).all())


def fill_activation_qparams(
    module: torch.nn.Module, peers: Sequence[torch.nn.Module]
) -> list[str]:
    """Give ``module`` the activation qparams covering every peer's range.

    ``peers`` are Linears of the same role (e.g. every calibrated expert's
    ``down_proj`` in the block). Only qparams the scheme calibrates from data are
    set: ``{input,output}_global_scale`` (the smallest peer value: widest range),
    static ``{input,output}_scale`` (the largest; with an asymmetric zero point, the
    qparams of the union of the peers' ranges). Dynamic activations have none.

    :return: the qparam names set on ``module`` (e.g. ``["input_global_scale"]``)
    """
    done = []
    for base_name, args_name in (
        ("input", "input_activations"),
        ("output", "output_activations"),
    ):
        args = getattr_chain(module, f"quantization_scheme.{args_name}", None)
        if args is None or args.dynamic is True:
            continue

        global_name = f"{base_name}_global_scale"
        global_scale = None
        if hasattr(module, global_name):
            values = [
                getattr(peer, global_name).detach()
                for peer in peers
                if hasattr(peer, global_name) and _usable(getattr(peer, global_name))
            ]
            if values:
                global_scale = torch.stack(values).amin(dim=0)
                update_offload_parameter(module, global_name, global_scale)
                done.append(global_name)

        scale_name, zp_name = f"{base_name}_scale", f"{base_name}_zero_point"
        if args.dynamic == DynamicType.LOCAL or not hasattr(module, scale_name):
            continue
        usable = [
            peer
            for peer in peers
            if hasattr(peer, scale_name) and _usable(getattr(peer, scale_name))
        ]
        if not usable:
            continue
        scales = torch.stack([getattr(p, scale_name).detach() for p in usable])
        if args.symmetric or not hasattr(module, zp_name):
            update_offload_parameter(module, scale_name, scales.amax(dim=0))
            done.append(scale_name)
            continue
        # asymmetric: qparams of the union of what each peer can represent
        q_min, q_max = calculate_range(args, scales.device)
        zero_points = torch.stack(
            [getattr(p, zp_name).detach().to(scales.dtype) for p in usable]
        )
        low = ((q_min - zero_points) * scales).amin(dim=0)
        high = ((q_max - zero_points) * scales).amax(dim=0)
        scale, zero_point = calculate_qparams(low, high, args, global_scale)
        update_offload_parameter(module, scale_name, scale)
        update_offload_parameter(module, zp_name, zero_point)
        done += [scale_name, zp_name]
    return done


def fill_starved_activation_qparams(
    model: torch.nn.Module, starved: Iterable[str]
) -> list[str]:
    """Set the activation qparams of the starved experts' Linears from their
    calibrated peers (:func:`fill_activation_qparams`).

    :param model: the model after calibration (original MoE blocks restored)
    :param starved: expert module names, ``<block>.experts.<N>`` (as in
        ``CoverageReport.rtn_fallback``); peers are the Linears at the same path
        in the other children of the same ``experts`` container that are not
        starved
    :return: the qparams set, as ``<expert>.<linear>.<qparam>`` names (empty for
        schemes with dynamic activations only, such as W4A16 or W8A8)
    """
    modules = dict(model.named_modules())
    starved = list(starved)
    starved_set = set(starved)
    done: list[str] = []
    for name in starved:
        container_name = name.rpartition(".")[0]
        peers = [
            expert
            for child, expert in modules[container_name].named_children()
            if f"{container_name}.{child}" not in starved_set
        ]
        for relative, linear in modules[name].named_modules():
            if getattr(linear, "quantization_scheme", None) is None:
                continue
            peer_linears = [
                found
                for peer in peers
                if (found := _submodule(peer, relative)) is not None
                and type(found) is type(linear)
            ]
            set_names = fill_activation_qparams(linear, peer_linears)
            prefix = f"{name}.{relative}" if relative else name
            done += [f"{prefix}.{qparam}" for qparam in set_names]
            missing = _uncovered(linear, set_names)
            if missing:
                logger.warning(
                    f"{prefix}: no calibrated peer in {container_name} to take "
                    f"{', '.join(missing)} from; it keeps an uncalibrated value"
                )
    return done


def _submodule(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:  # a sibling that is not an expert (e.g. act_fn)
        return None


def _uncovered(module: torch.nn.Module, set_names: list[str]) -> list[str]:
    args = getattr_chain(module, "quantization_scheme.input_activations", None)
    if args is None or args.dynamic is True:
        return []
    expected = ["input_global_scale"] if hasattr(module, "input_global_scale") else []
    if args.dynamic != DynamicType.LOCAL and hasattr(module, "input_scale"):
        expected.append("input_scale")
    return [n for n in expected if n not in set_names]


def apply_rtn_fallback(
    model: torch.nn.Module, starved: list[str], min_tokens: int
) -> list[str]:
    """Quantize the ``starved`` experts (module names) round-to-nearest from their
    weights and give them their calibrated peers' activation scales; returns
    ``starved`` for the report, after one warning naming them."""
    modules = dict(model.named_modules())
    quantize_round_to_nearest([modules[name] for name in starved])
    filled = fill_starved_activation_qparams(model, starved)
    peers = (
        f"; {len(filled)} activation scale(s) taken from their calibrated peers"
        if filled
        else ""
    )
    logger.warning(
        f"{len(starved)} expert(s) had fewer than {min_tokens} calibration "
        "token(s) and were quantized round-to-nearest from their weights: "
        f"{', '.join(starved[:10])}{peers}"
    )
    return starved
