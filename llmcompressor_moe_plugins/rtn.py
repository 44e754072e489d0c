"""Round-to-nearest quantization of experts that got no calibration statistics.

An expert that is never called during calibration is never compressed by GPTQ and
its weight observer never runs, so its ``weight_scale`` stays uninitialized and the
saved checkpoint would hold garbage for it. This computes its weight qparams from
the weights alone, with the observer its quantization scheme names.
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import getattr_chain
from llmcompressor.modifiers.quantization.calibration import (
    freeze_module_quantization,
    initialize_observer,
    observe,
    update_qparams,
)

__all__ = ["quantize_round_to_nearest"]


def quantize_round_to_nearest(blocks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Set weight qparams from the weights of every quantized Linear in ``blocks``.

    :return: the Linears that were given qparams (those without a weight
        quantization scheme are left alone)
    """
    done = []
    for block in blocks:
        for module in block.modules():
            if getattr_chain(module, "quantization_scheme.weights", None) is None:
                continue
            initialize_observer(module, base_name="weight")
            observe(module, base_name="weight")
            update_qparams(module, base_name="weight")
            freeze_module_quantization(module)
            done.append(module)
    return done
