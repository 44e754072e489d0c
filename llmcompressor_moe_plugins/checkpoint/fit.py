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

from collections import OrderedDict
from collections.abc import Iterable
from typing import Literal

import torch
from compressed_tensors.quantization import (
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.utils import (
    match_named_modules,
    match_targets,
)
from loguru import logger

from ..upstream.quantization import reset_resolved_config
from .fit_awq import fit_awq
from .schemes import (
    FIT_GROUP_PREFIX,
    REGROUP_SIZES,
    FitChange,
    describe_scheme,
    fits,
    fusion_key,
)

__all__ = ["FitChange", "FitPolicy", "fit_schemes_to_model", "unfit_linears"]

FitPolicy = Literal["ignore", "regroup", "raise"]


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
        if not fits(module.in_features, scheme)
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
        if not fits(module.in_features, scheme)
    }
    if not unfit:
        return []
    expert_names = [name for name in linears if fusion_key(name)[0] == "experts"]
    experts_fit = policy != "raise" and any(name in unfit for name in expert_names)
    if experts_fit:
        unfit -= set(expert_names)
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
        groups.setdefault(fusion_key(name), []).append(name)

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
    if len(to_ignore) == len(linears):
        raise ValueError(
            f"{modifier_name}: scheme_fit '{policy}' keeps every Linear it targets "
            f"unquantized ({len(linears)} do not fit {describe_scheme(scheme)}), so "
            "there is nothing to quantize; use scheme_fit: regroup or a recipe "
            "whose scheme fits these widths"
        )
    reset_resolved_config(modifier)  # re-resolve scheme/config_groups with ignore
    config = modifier.resolved_config
    taken = sum(key.startswith(FIT_GROUP_PREFIX) for key in config.config_groups)
    for offset, (scheme, size, members) in enumerate(regrouped):
        fitted = scheme.model_copy(deep=True)
        fitted.targets = list(members)
        fitted.weights.group_size = size
        config.config_groups[f"{FIT_GROUP_PREFIX}{taken + offset}"] = fitted
    if experts_fit:
        changes.append(_fit_experts(modifier, linears, expert_names))
    return changes


# every routed expert Linear (linearized names; the saved config is extended to
# the family's checkpoint names when they differ)
EXPERTS_TARGET = r"re:.*\.experts\.\d+\.(?:gate_proj|up_proj|down_proj)$"
EXPERTS_GROUP = f"{FIT_GROUP_PREFIX}experts"


def _fit_experts(modifier, linears, expert_names: list[str]) -> FitChange:
    """One scheme for every routed expert of the model, with a group size that
    divides all their widths: vLLM takes one scheme per fused MoE layer (expert
    0's), and transformers decompresses all experts with the one config group
    whose ``re:`` targets name experts (``get_experts_scheme``). Keeping them
    unquantized instead is no choice: a quantized checkpoint's experts reload only
    from packed tensors."""
    modifier_name = type(modifier).__name__
    schemes = {id(linears[n][1]): linears[n][1] for n in expert_names}
    scheme = next(iter(schemes.values()))
    widths = tuple(sorted({linears[n][0].in_features for n in expert_names}))
    weights = scheme.weights
    if (
        len(schemes) != 1
        or weights.type != QuantizationType.INT
        or weights.strategy != QuantizationStrategy.GROUP
        or scheme.input_activations is not None
    ):
        raise ValueError(
            f"{modifier_name}: expert input widths {list(widths)} do not fit "
            f"{describe_scheme(scheme)} and vLLM's MoE kernels take no other group "
            "size for it, while experts kept unquantized in a quantized checkpoint "
            "do not reload in transformers; scheme_fit cannot fit them: use a recipe "
            "whose scheme fits the experts (W4A16 regroups to 64, 32 or per "
            "channel; W8A8 is per channel)"
        )
    size = next(
        (
            s
            for s in REGROUP_SIZES
            if s < weights.group_size and all(w % s == 0 for w in widths)
        ),
        None,
    )
    fitted = scheme.model_copy(deep=True)
    fitted.targets = [EXPERTS_TARGET]
    if size is not None:
        fitted.weights.group_size = size
        action = f"all experts quantized with group_size {size}"
    else:
        fitted.weights.strategy = QuantizationStrategy.CHANNEL
        fitted.weights.group_size = None
        action = "all experts quantized per channel"
    config = modifier.resolved_config
    only_experts = set()
    for key, group in config.config_groups.items():
        members = _group_members(linears, group)
        if members and all(fusion_key(n)[0] == "experts" for n in members):
            only_experts.add(key)
    # first, so that transformers' get_experts_scheme finds it; a group that held
    # experts only is replaced by it
    config.config_groups = {
        EXPERTS_GROUP: fitted,
        **{k: g for k, g in config.config_groups.items() if k not in only_experts},
    }
    return FitChange(
        modifier_name,
        tuple(expert_names),
        tuple(linears[n][0].in_features for n in expert_names),
        describe_scheme(scheme),
        f"{action} (one scheme for every expert, as vLLM's fused MoE and "
        "transformers' reload take)",
    )


def _group_members(linears, group) -> list[str]:
    return [
        name
        for name, (module, _) in linears.items()
        if match_targets(name, module, list(group.targets))
    ]


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
                changes.extend(fit_awq(model, modifier, quantized, set(ignored)))
    for change in changes:
        logger.warning(change.describe())
    return changes
