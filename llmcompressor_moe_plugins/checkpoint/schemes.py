"""What a recipe's scheme is, to the fit: its description, whether a width fits it,
which Linears vLLM fuses, and the record of a change (:class:`FitChange`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy

__all__ = [
    "REGROUP_SIZES",
    "GROUPED",
    "FIT_GROUP_PREFIX",
    "FitChange",
    "describe_scheme",
    "fits",
    "fusion_key",
]

# group sizes vLLM's int W4A16/W8A16 kernels take (Marlin: -1, 32, 64, 128)
REGROUP_SIZES = (64, 32)
GROUPED = (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP)
FIT_GROUP_PREFIX = "fit_group_"

_EXPERT = re.compile(r"^(?P<key>.+\.experts)\.\d+\.(gate_proj|up_proj|down_proj)$")
_QKV = re.compile(r"^(?P<key>.+)\.(q_proj|k_proj|v_proj)$")
_GATE_UP = re.compile(r"^(?P<key>.+)\.(gate_proj|up_proj)$")


@dataclass(frozen=True)
class FitChange:
    """One change to a modifier: which Linears, why, and what they got."""

    modifier: str
    modules: tuple[str, ...]
    widths: tuple[int, ...]
    scheme: str
    action: str

    def describe(self) -> str:
        shown = ", ".join(
            f"{name} ({width})"
            for name, width in zip(self.modules[:4], self.widths[:4], strict=True)
        )
        more = f" and {len(self.modules) - 4} more" if len(self.modules) > 4 else ""
        return (
            f"{self.modifier}: input width of {shown}{more} does not fit "
            f"{self.scheme}; {self.action}"
        )


def describe_scheme(scheme: QuantizationScheme) -> str:
    weights = scheme.weights
    if weights is None:
        return "no weight quantization"
    kind = f"{weights.type}{weights.num_bits}"
    if weights.strategy == QuantizationStrategy.GROUP:
        return f"{kind} group_size {weights.group_size}"
    if weights.strategy == QuantizationStrategy.TENSOR_GROUP:
        return f"{kind} tensor_group group_size {weights.group_size}"
    return f"{kind} {weights.strategy}"


def fits(width: int, scheme: QuantizationScheme) -> bool:
    weights = scheme.weights
    if weights is None or weights.strategy not in GROUPED or not weights.group_size:
        return True
    return width % int(weights.group_size) == 0


def fusion_key(name: str) -> tuple[str, str]:
    for kind, pattern in (("experts", _EXPERT), ("qkv", _QKV), ("gate_up", _GATE_UP)):
        match = pattern.match(name)
        if match:
            return kind, match["key"]
    return "single", name
