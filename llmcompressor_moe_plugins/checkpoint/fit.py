"""Fit a recipe's quantization schemes to the model's layer widths.

Group quantization needs each Linear's input width (its weight's column count) to
be a multiple of the group size: int4 W4A16 uses groups of 128, NVFP4 groups of 16.
GLM-4.5-Air's dense MLP is 10944 wide (85 x 128 + 64), so the shipped group-128
recipes stop before calibration with llmcompressor's "weight column counts not
divisible by group_size ... model.layers.0.mlp.down_proj". :func:`fit_schemes_to_model`
finds such Linears and changes the recipe's modifiers *before they initialize*, so
every shipped recipe runs on every real layout without a hand-written ignore list,
and logs one line per change.

What the fit does, and why (vLLM is the runtime the checkpoints are for):

- **Default (``policy="ignore"``): keep the Linear unquantized** by adding its exact
  name to the modifier's ``ignore``. compressed-tensors then lists it in
  ``quantization_config.ignore`` and vLLM loads it with ``UnquantizedLinearMethod``:
  this works with every vLLM version, GPU and tensor-parallel size. A group size
  that divides the width would not: vLLM's Marlin int4 kernel needs the input
  width (per tensor-parallel rank) to be a multiple of 128 whatever the group size
  (``GPTQ_MARLIN_MIN_THREAD_K``), Machete (Hopper only) takes group sizes -1 and
  128 only, Exllama runs fp16 only, so a 10944-wide int4 layer can only run on the
  newer Triton W4A16 kernel, and only while 10944 / TP stays a multiple of the
  group (TP=2 gives 5472, not a multiple of 64). On GLM-4.5-Air this keeps one
  Linear of 10944 x 4096 (45M parameters, 0.04% of the model) in bf16.
- ``policy="regroup"``: for int weight-only group schemes (W4A16, W8A16), use the
  largest smaller group size of Marlin's (64, 32) that divides the width, in an
  extra config group that targets the Linears by exact name (compressed-tensors
  and vLLM both let an exact-name target win over the ``Linear`` class target, so
  one checkpoint carries both schemes). Smaller, but served only as described
  above. NVFP4 has no other group size in vLLM, so there it falls back to ignore.
- ``policy="raise"``: stop with a ``ValueError`` naming every Linear, its width,
  the scheme and these choices.

vLLM fuses some Linears and requires one scheme for all their parts: q/k/v
(``qkv_proj``), gate/up (``gate_up_proj``) and *all* routed experts of a block
(one ``FusedMoE``: ``get_moe_method`` rejects mixed schemes and takes the
scheme of expert 0). When one part does not fit, the whole group gets the same
treatment; a down_proj outside the experts stands alone.

A width that fits no shipped recipe (e.g. not a multiple of 16 under NVFP4) is
treated the same way: kept unquantized with a log line naming it and the choices
(``policy="raise"`` makes it an error instead).

AWQ: a smoothing pair whose balance Linears all stay unquantized cannot be
balanced (upstream divides by the number of quantized balance layers: zero), so
the fit takes such pairs out of the AWQModifier's mappings (by exact name, with a
negative look-ahead on the smooth and balance patterns): with the shipped recipe
on GLM-4.5-Air that is ``model.layers.0.mlp.up_proj -> down_proj``.

Call it after the model is linearized and before the quantization modifiers'
``on_initialize``: that is where QuantizationMixin applies ``resolved_config`` to the
model and ``validate_group_size_divisibility`` raises the divisibility error. The
resolved config (``scheme``/``config_groups``/``ignore``) is computed and cached when
the modifier is constructed (a validator reads it), so the fit extends ``ignore``,
drops the cache (``_resolved_config``) and adds its config groups to the re-resolved
config. A modifier with ``bypass_divisibility_checks=True`` is left as it is.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from compressed_tensors.quantization import (
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.utils import (
    match_modules_set,
    match_named_modules,
    match_targets,
)
from loguru import logger

from ..upstream.quantization import reset_resolved_config

__all__ = ["FitChange", "FitPolicy", "fit_schemes_to_model", "unfit_linears"]

FitPolicy = Literal["ignore", "regroup", "raise"]

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


def _fits(width: int, scheme: QuantizationScheme) -> bool:
    weights = scheme.weights
    if weights is None or weights.strategy not in GROUPED or not weights.group_size:
        return True
    return width % int(weights.group_size) == 0


def _fusion_key(name: str) -> tuple[str, str]:
    for kind, pattern in (("experts", _EXPERT), ("qkv", _QKV), ("gate_up", _GATE_UP)):
        match = pattern.match(name)
        if match:
            return kind, match["key"]
    return "single", name


def _targeted_linears(
    model: torch.nn.Module, modifier
) -> OrderedDict[str, tuple[torch.nn.Linear, QuantizationScheme]]:
    """Each Linear the modifier would quantize, with the scheme it would get (the
    same resolution as compressed-tensors' ``apply_quantization_config``)."""
    config = modifier.resolved_config
    target_to_scheme: OrderedDict[str, QuantizationScheme] = OrderedDict()
    for scheme in config.config_groups.values():
        for target in scheme.targets:
            target_to_scheme[target] = scheme
    linears = OrderedDict()
    for name, module in match_named_modules(
        model, list(target_to_scheme), modifier.ignore
    ):
        if not isinstance(module, torch.nn.Linear):
            continue
        matched = match_targets(name, module, list(target_to_scheme))
        if matched:
            linears[name] = (module, target_to_scheme[matched[0]])
    return linears


def unfit_linears(model: torch.nn.Module, modifier) -> list[tuple[str, int, str]]:
    """``(name, in_features, scheme)`` of each Linear ``modifier`` targets whose
    input width is not a multiple of its scheme's group size."""
    return [
        (name, module.in_features, describe_scheme(scheme))
        for name, (module, scheme) in _targeted_linears(model, modifier).items()
        if not _fits(module.in_features, scheme)
    ]


def _regroup_size(scheme: QuantizationScheme, widths: Iterable[int]) -> int | None:
    weights = scheme.weights
    if (
        weights is None
        or weights.strategy != QuantizationStrategy.GROUP
        or weights.type != QuantizationType.INT
        or scheme.input_activations is not None
    ):
        return None
    widths = list(widths)
    for size in REGROUP_SIZES:
        if size < weights.group_size and all(w % size == 0 for w in widths):
            return size
    return None


def _choices_message(unfit: list[tuple[str, int, str]]) -> str:
    lines = "\n".join(f"  - {name} (in_features={w}, {s})" for name, w, s in unfit)
    return (
        "These Linears' input widths do not fit their quantization scheme's group "
        f"size:\n{lines}\nChoices: keep them unquantized (fit policy 'ignore', the "
        "default: vLLM serves them as plain weights), use a smaller group size "
        "that divides the width for int weight-only schemes (policy 'regroup': "
        "64 or 32, served by vLLM's Triton W4A16 kernel, not Marlin), or use a "
        "recipe whose scheme fits (W8A8 is per channel and fits any width; NVFP4 "
        "needs multiples of 16)."
    )


def _fit_modifier(
    model: torch.nn.Module, modifier, policy: FitPolicy, ignored: list[str]
) -> list[FitChange]:
    linears = _targeted_linears(model, modifier)
    unfit = {
        name
        for name, (module, scheme) in linears.items()
        if not _fits(module.in_features, scheme)
    }
    if not unfit:
        return []
    if policy == "raise":
        raise ValueError(
            f"{type(modifier).__name__}: "
            + _choices_message(
                [
                    (n, linears[n][0].in_features, describe_scheme(linears[n][1]))
                    for n in sorted(unfit)
                ]
            )
        )

    groups: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
    for name in linears:
        groups.setdefault(_fusion_key(name), []).append(name)

    modifier_name = type(modifier).__name__
    changes: list[FitChange] = []
    to_ignore: list[str] = []
    regrouped: list[tuple[QuantizationScheme, int, list[str]]] = []
    for members in groups.values():
        if not any(name in unfit for name in members):
            continue
        widths = tuple(linears[name][0].in_features for name in members)
        schemes = {id(linears[name][1]): linears[name][1] for name in members}
        scheme = next(iter(schemes.values()))
        size = None
        if policy == "regroup" and len(schemes) == 1:
            size = _regroup_size(scheme, widths)
        if size is None:
            to_ignore.extend(members)
            action = (
                "kept unquantized (added to ignore; vLLM loads it as plain weights)"
            )
        else:
            regrouped.append((scheme, size, members))
            action = (
                f"quantized with group_size {size} instead (own config group, "
                "served by vLLM's Triton W4A16 kernel, not Marlin)"
            )
        changes.append(
            FitChange(
                modifier_name, tuple(members), widths, describe_scheme(scheme), action
            )
        )

    modifier.ignore.extend(name for name in to_ignore if name not in modifier.ignore)
    ignored.extend(to_ignore)
    reset_resolved_config(modifier)  # re-resolve scheme/config_groups with ignore
    config = modifier.resolved_config
    taken = sum(key.startswith(FIT_GROUP_PREFIX) for key in config.config_groups)
    for offset, (scheme, size, members) in enumerate(regrouped):
        fitted = scheme.model_copy(deep=True)
        fitted.targets = list(members)
        fitted.weights.group_size = size
        config.config_groups[f"{FIT_GROUP_PREFIX}{taken + offset}"] = fitted
    return changes


def _excluding(target: str, names: Iterable[str]) -> str:
    """``target`` (a name or ``re:`` pattern) that no longer matches ``names``."""
    alternatives = "|".join(re.escape(name) for name in sorted(set(names)))
    pattern = target[3:] if target.startswith("re:") else re.escape(target) + "$"
    return f"re:(?!(?:{alternatives})$){pattern}"


def _fit_awq(
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


def fit_schemes_to_model(
    model: torch.nn.Module, modifiers: Iterable, policy: FitPolicy = "ignore"
) -> list[FitChange]:
    """Change ``modifiers`` so that every Linear they quantize fits its scheme.

    :param model: the model as the modifiers will see it (MoE experts already
        linearized, as ``oneshot`` does before any modifier initializes)
    :param modifiers: a recipe's modifiers: quantization modifiers
        (``QuantizationMixin``: GPTQModifier, QuantizationModifier, ...) get their
        ``ignore``/config groups fitted (unless ``bypass_divisibility_checks``
        is set on them), AWQModifier its mappings (see the module docstring);
        others are left alone
    :param policy: ``"ignore"`` (default), ``"regroup"`` or ``"raise"``; see the
        module docstring
    :return: one :class:`FitChange` per changed group of Linears (each also
        logged as a warning); empty when everything fits
    """
    from llmcompressor.modifiers.quantization import QuantizationMixin
    from llmcompressor.modifiers.transform.awq import AWQModifier

    if policy not in ("ignore", "regroup", "raise"):
        raise ValueError(
            f"fit policy must be 'ignore', 'regroup' or 'raise', got {policy!r}"
        )
    modifiers = list(modifiers)
    # bypass_divisibility_checks: the user takes non-divisible widths as they are
    quantizers = [
        m
        for m in modifiers
        if isinstance(m, QuantizationMixin) and not m.bypass_divisibility_checks
    ]
    changes: list[FitChange] = []
    ignored: list[str] = []
    for modifier in quantizers:
        changes.extend(_fit_modifier(model, modifier, policy, ignored))
    if ignored:
        quantized = {n for m in quantizers for n in _targeted_linears(model, m)}
        for modifier in modifiers:
            if isinstance(modifier, AWQModifier):
                changes.extend(_fit_awq(model, modifier, quantized, set(ignored)))
    for change in changes:
        logger.warning(change.describe())
    return changes
