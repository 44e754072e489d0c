"""Calibration modes: which tokens each expert is calibrated on.

A mode never changes a block's output (outputs always combine the real top-k), only
the set of tokens each expert sees while quantization hooks are listening. Every mode
starts from the routed tokens and may add more, so one expert call yields both the
routed outputs and the calibration statistics.

Spelled in recipes, Python and on the CLI as ``"routed"``, ``"all"``,
``"top_k:N"`` / ``{"top_k": N}``, ``"min_tokens:K"`` / ``{"min_tokens": K}`` or
``"affinity"`` / ``"affinity:S"`` / ``{"affinity": S}`` or ``"weighted:P"`` /
``"weighted:P,prior:L,shrink:S"`` / ``{"weighted": P, "prior": L, "shrink": S}``
(options optional).

A mode object is stateless and may be shared by many blocks; the state it needs
(tokens calibrated so far, a random generator) belongs to each block's dispatcher.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .floor import apply_floor

__all__ = [
    "CalibrationMode",
    "RoutedMode",
    "AllExpertsMode",
    "WidenedTopKMode",
    "MinTokensMode",
    "AffinitySampledMode",
    "WeightedMode",
    "any_weighted",
    "parse_mode",
    "apply_floor",
    "MODE_NAMES",
]


class CalibrationMode(ABC):
    """Chooses, per expert, the tokens it is calibrated on (a superset of routed)."""

    name: ClassVar[str]
    # Modes that rank unrouted tokens need router affinities [tokens, experts].
    needs_affinity: ClassVar[bool] = False

    @abstractmethod
    def select(
        self,
        routed: torch.Tensor,
        affinity: torch.Tensor | None,
        calibrated_so_far: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """
        :param routed: bool [tokens, experts], True where the router sent the token
        :param affinity: float [tokens, experts], higher = more preferred by the router
        :param calibrated_so_far: long [experts], tokens each expert was calibrated
            on in earlier forwards of this calibration pass
        :param generator: the block's own seeded CPU generator
        :return: bool [tokens, experts], a superset of ``routed``
        """

    def spec(self) -> str:
        return self.name


class RoutedMode(CalibrationMode):
    """Normal routing only; experts without tokens are not called at all."""

    name = "routed"

    def select(self, routed, affinity, calibrated_so_far, generator):
        return routed


class AllExpertsMode(CalibrationMode):
    """Every token through every expert."""

    name = "all"

    def select(self, routed, affinity, calibrated_so_far, generator):
        return torch.ones_like(routed)


@dataclass(frozen=True)
class WidenedTopKMode(CalibrationMode):
    """Statistics from a widened routing of ``top_k`` experts per token."""

    top_k: int
    name: ClassVar[str] = "top_k"
    needs_affinity: ClassVar[bool] = True

    def select(self, routed, affinity, calibrated_so_far, generator):
        k = min(self.top_k, routed.shape[1])
        widened = torch.zeros_like(routed)
        widened.scatter_(1, affinity.topk(k, dim=1).indices, True)
        return routed | widened

    def spec(self) -> str:
        return f"top_k:{self.top_k}"


@dataclass(frozen=True)
class MinTokensMode(CalibrationMode):
    """Routed tokens, topped up to ``min_tokens`` with each starved expert's
    highest-affinity unrouted tokens. Counts carry across forwards, so an expert
    that reached the minimum in an earlier batch gets no extra tokens later."""

    min_tokens: int
    name: ClassVar[str] = "min_tokens"
    needs_affinity: ClassVar[bool] = True

    def select(self, routed, affinity, calibrated_so_far, generator):
        return apply_floor(routed, affinity, calibrated_so_far, self.min_tokens)

    def spec(self) -> str:
        return f"min_tokens:{self.min_tokens}"


DEFAULT_AFFINITY_STRENGTH = 0.1


@dataclass(frozen=True)
class AffinitySampledMode(CalibrationMode):
    """Routed tokens, plus each unrouted token with probability
    ``strength * min(1, affinity / routing threshold)``, where the threshold is the
    token's lowest affinity among the experts it was routed to.

    Why: all-expert calibration fits every expert to the global token distribution
    (hurts with ample data), routed calibration leaves starved experts with almost no
    statistics (hurts with little data). MoEQuant and EAQuant weight each token's
    contribution to an expert's statistics by its router affinity; sampling with that
    probability gives the same statistics in expectation (E[sum x x^T] = sum p x x^T)
    while staying a plain token choice: it works unchanged for GPTQ Hessians, AWQ
    means and range observers, costs a fraction of ``all``, and cannot change
    outputs. Near-miss tokens (close to being routed here) are likely picked, far
    ones rarely. Each block draws from its own generator, seeded from the recipe's
    seed and the block's name, so a block's choice does not depend on the others.
    """

    strength: float = DEFAULT_AFFINITY_STRENGTH
    name: ClassVar[str] = "affinity"
    needs_affinity: ClassVar[bool] = True

    def __post_init__(self):
        if not 0 < self.strength <= 1:
            raise ValueError(
                f"Calibration mode 'affinity:{self.strength}': the strength must be "
                "in (0, 1] (e.g. 'affinity:0.25'); 1 samples near-miss tokens "
                "almost surely, small values approach 'routed'."
            )

    def inclusion_probability(
        self, routed: torch.Tensor, affinity: torch.Tensor
    ) -> torch.Tensor:
        """float [tokens, experts]: 1 where routed, else the sampling probability."""
        affinity = affinity.float().clamp(min=0)
        threshold = affinity.masked_fill(~routed, torch.inf).min(dim=1).values
        threshold = threshold.clamp(min=torch.finfo(torch.float32).tiny)
        ratio = (affinity / threshold[:, None]).clamp(max=1)
        return torch.where(routed, 1.0, self.strength * ratio)

    def select(self, routed, affinity, calibrated_so_far, generator):
        probability = self.inclusion_probability(routed, affinity)
        draws = torch.rand(probability.shape, generator=generator)
        return routed | (draws.to(probability.device) < probability)

    def spec(self) -> str:
        return f"affinity:{self.strength:g}"


DEFAULT_PRIOR = 0.1
# The prior's strength in tokens per input column: an expert's statistics weigh as
# much as the block's all-token statistics where its effective token count equals
# its input width, the fewest tokens that can give a full-rank Hessian.
DEFAULT_SHRINK = 1.0
MAX_SHRINK = 1e6


@dataclass(frozen=True)
class WeightedMode(CalibrationMode):
    """Routing-weighted statistics: each token counts in an expert's GPTQ Hessian
    with its routing weight to the power ``power``; the floor's near-miss top-ups
    (unrouted tokens of starved experts) count ``prior`` times the mean of
    ``|c| ** power`` over the forward's routed (token, expert) pairs.

    Why: an expert's quantization error reaches the block output scaled by the
    token's routing weight ``c``: output error ``c * dE(x)``. The layer-wise
    objective for ``down_proj`` is therefore the input-weighted one with ``c**2``
    (``weighted:2``, exact for ``down_proj``, approximately so for
    ``gate_proj``/``up_proj``); MoEQuant's affinity-guided GPTQ weights by ``c``
    (``weighted:1``). Unrouted tokens carry no weight in that objective, so a
    starved expert's Hessian comes from a prior: its highest-affinity unrouted
    tokens (the floor, on by default for this mode) at a small weight.

    Shrinkage (``shrink``, on by default): an expert with few effective tokens
    against a Linear's input width ``d`` has a rank-deficient Hessian, and GPTQ then
    fits the few tokens it saw (issue 22: ``all`` beat routed-style statistics where
    experts saw fewer tokens than their width). Each expert's Hessian is therefore
    mixed, per expert and per Linear, with the block's all-token statistics (what
    ``all`` mode would give that Linear): ``(1 - a) H_w / sum(w) + a H_all / N``
    with ``a = S d / (S d + n_eff)`` and ``n_eff = sum(w)^2 / sum(w^2)`` the
    expert's effective token count. Few tokens: close to ``all``; many: its own
    (``statistics/shrinkage.py``). ``shrink:0`` turns it off.

    Weights exist only in Hessians that ``SharedHessianGPTQModifier`` accumulates
    itself; anything else (AWQ, range observers, plain ``GPTQModifier``) sees the
    mode's token choice, routed tokens plus the floor, unweighted.
    """

    power: float
    prior: float = DEFAULT_PRIOR
    shrink: float = DEFAULT_SHRINK
    name: ClassVar[str] = "weighted"

    def __post_init__(self):
        if not 0 < self.power <= 4:
            raise ValueError(
                f"Calibration mode 'weighted:{self.power:g}': the power must be in "
                "(0, 4] (1: MoEQuant's routing-weighted GPTQ, 2: the output error)."
            )
        if not 0 < self.prior <= 1:
            raise ValueError(
                f"Calibration mode {self.spec()!r}: the prior must be in (0, 1] "
                "(the weight of a near-miss token relative to a routed one, e.g. "
                "'weighted:2,prior:0.1')."
            )
        if not 0 <= self.shrink <= MAX_SHRINK:
            raise ValueError(
                f"Calibration mode {self.spec()!r}: shrink must be in "
                f"[0, {MAX_SHRINK:g}] (tokens of the all-token prior per input "
                "column; 0 turns shrinkage off, e.g. 'weighted:2,shrink:0')."
            )

    def select(self, routed, affinity, calibrated_so_far, generator):
        return routed

    def token_weights(
        self, routing_weights: torch.Tensor, routed: torch.Tensor
    ) -> torch.Tensor:
        """float32 [tokens, experts]: ``|c| ** power`` where routed, elsewhere the
        prior's weight (used only where the floor adds the token).

        :param routing_weights: [tokens, experts], the applied routing weights,
            zero where not routed
        """
        weights = routing_weights.float().abs().pow(self.power)
        routed_mean = weights.sum() / routed.sum().clamp(min=1)
        prior = self.prior * routed_mean
        return torch.where(routed, weights, prior)

    def spec(self) -> str:
        text = f"weighted:{self.power:g}"
        if self.prior != DEFAULT_PRIOR:
            text += f",prior:{self.prior:g}"
        if self.shrink != DEFAULT_SHRINK:
            text += f",shrink:{self.shrink:g}"
        return text


def any_weighted(specs) -> bool:
    """Whether any of these mode spellings (None: unset) is a weighted mode."""
    return any(
        spec is not None and isinstance(parse_mode(spec), WeightedMode)
        for spec in specs
    )


MODE_NAMES = (
    "routed",
    "all",
    "top_k:N",
    "min_tokens:K",
    "affinity[:S]",
    "weighted:P[,prior:L][,shrink:S]",
)
_PARAMETRIZED = {"top_k": WidenedTopKMode, "min_tokens": MinTokensMode}


def parse_mode(spec: Any) -> CalibrationMode:
    """Turn a recipe/CLI/Python spelling into a mode (ValueError names the fix)."""
    if isinstance(spec, CalibrationMode):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if text == RoutedMode.name:
            return RoutedMode()
        if text == AllExpertsMode.name:
            return AllExpertsMode()
        if text == AffinitySampledMode.name:
            return AffinitySampledMode()
        if text.startswith(WeightedMode.name + ":"):
            return _weighted(text, spec)
        if ":" in text:
            key, _, value = text.partition(":")
            return _parametrized(key.strip(), value.strip(), spec)
    elif isinstance(spec, dict) and WeightedMode.name in spec:
        return _weighted_from_dict(spec)
    elif isinstance(spec, dict) and len(spec) == 1:
        ((key, value),) = spec.items()
        return _parametrized(str(key), value, spec)
    raise ValueError(
        f"Unknown calibration mode {spec!r}. Use one of {', '.join(MODE_NAMES)} "
        "(e.g. 'all', 'top_k:8', {'min_tokens': 64} or 'affinity:0.25')."
    )


def _parametrized(key: str, value: Any, spec: Any) -> CalibrationMode:
    if key == AffinitySampledMode.name:
        try:
            if isinstance(value, bool):
                raise ValueError
            strength = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"Calibration mode {spec!r}: affinity needs a strength in (0, 1], "
                f"got {value!r} (e.g. 'affinity:0.25')."
            ) from None
        return AffinitySampledMode(strength)
    if key not in _PARAMETRIZED:
        raise ValueError(
            f"Unknown calibration mode {spec!r}: {key!r} is not a mode. "
            f"Use one of {', '.join(MODE_NAMES)}."
        )
    try:
        number = int(value)
        if isinstance(value, float | bool) or str(number) != str(value).strip():
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(
            f"Calibration mode {spec!r}: {key} needs a positive whole number, "
            f"got {value!r} (e.g. '{key}:8')."
        ) from None
    if number < 1:
        raise ValueError(
            f"Calibration mode {spec!r}: {key} must be at least 1, got {number}."
        )
    return _PARAMETRIZED[key](number)


def _number(value: Any, what: str, spec: Any) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Calibration mode {spec!r}: {what} must be a number, got {value!r} "
            "(e.g. 'weighted:2' or 'weighted:2,prior:0.1')."
        ) from None


_WEIGHTED_OPTIONS = ("prior", "shrink")


def _weighted(text: str, spec: Any) -> WeightedMode:
    power_text, *options = text[len(WeightedMode.name) + 1 :].split(",")
    fields = {"power": _number(power_text.strip(), "the power", spec)}
    for option in options:
        key, _, value = option.partition(":")
        key = key.strip()
        if key not in _WEIGHTED_OPTIONS:
            raise ValueError(
                f"Calibration mode {spec!r}: unknown option {key!r}; weighted "
                "modes take 'prior' and 'shrink' (e.g. 'weighted:2,prior:0.1')."
            )
        fields[key] = _number(value.strip(), f"the {key}", spec)
    return WeightedMode(**fields)


def _weighted_from_dict(spec: dict) -> WeightedMode:
    unknown = set(spec) - {WeightedMode.name, *_WEIGHTED_OPTIONS}
    if unknown:
        raise ValueError(
            f"Calibration mode {spec!r}: unknown key(s) {sorted(unknown)}; a weighted "
            "mode is {'weighted': P} with optional 'prior' and 'shrink' keys."
        )
    fields = {"power": _number(spec[WeightedMode.name], "the power", spec)}
    for key in _WEIGHTED_OPTIONS:
        if key in spec:
            fields[key] = _number(spec[key], f"the {key}", spec)
    return WeightedMode(**fields)
