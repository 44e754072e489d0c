"""Save the experts under the names of the family's own checkpoints.

llmcompressor linearizes fused experts into per-expert ``gate_proj``/``up_proj``/
``down_proj`` Linears and saves them under those names. transformers 5 reloads a
family's experts only from the per-expert names its conversion mapping merges
(``WeightConverter``: ``MergeModulelist`` + ``Concatenate`` into the fused 3-D
parameter). For Qwen-, DeepSeek- and GLM-style families those are the linearized
names; for Mixtral, MiniMax(-M2), PhiMoE and LFM2-MoE they are ``w1``/``w3``/``w2``,
so upstream's checkpoint reloads with every expert uninitialized, and vLLM's
loaders for the last three do not read it either. Some families' checkpoints store
the experts fused (gpt-oss, interleaved and biased; the GraniteMoE family;
Qwen3-VL-MoE transposed): no per-expert checkpoint of them reloads at all.

:func:`plan_save_layout` derives, from transformers' own mapping for the model, the
original name of each linearized expert Linear, or refuses the family before any
calibration (:class:`UnsavableLayoutError`). :func:`apply_save_layout` makes
``save_pretrained`` write those names (per-expert renamings in place of the fused
converters, the mechanism of llmcompressor's ``set_save_conversion_mapping``).
:func:`align_config_targets` then extends the saved ``quantization_config``'s
targets to the written names: vLLM resolves each MoE layer's scheme under the
checkpoint names (``experts.0.w1``), and compressed-tensors maps only ``ignore``.

The names written are the ones vLLM's loaders read (vLLM 0.34,
``vllm/model_executor/models/``; read, not run: vLLM does not install here):
``mixtral.py`` (``ckpt_gate_proj_name="w1"``, ``"w2"``, ``"w3"`` under
``block_sparse_moe``, l. 131; its mapper also takes ``gate_proj``), ``minimax_m2.py``
(w1/w2/w3, l. 107; no ``gate_proj`` mapper, so upstream's names are not read),
``phimoe.py`` (l. 285) and ``lfm2_moe.py`` (l. 157) likewise; ``qwen3_moe.py``
(l. 203), ``qwen2_moe.py`` (l. 171), ``qwen3_next.py`` (l. 231), ``deepseek_v2.py``
(l. 374), ``glm4_moe.py`` (l. 183), ``ernie45_moe.py`` (l. 184) and ``jamba.py``
(l. 83) take ``FusedMoE.make_expert_params_mapping``'s defaults ``gate_proj``/
``down_proj``/``up_proj`` (``layers/fused_moe/layer.py``, l. 127); OLMoE, FlexOlmo
and Hunyuan-V1-MoE load through the Transformers backend (``transformers/moe.py``,
l. 168-206: per-expert ``gate/up/down_proj`` or ``w1/w2/w3``). ``gpt_oss.py``'s
compressed-tensors path (l. 1147-1257) skips per-expert ``gate_proj`` tensors: one
more reason gpt-oss is refused.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from ..upstream.conversions import (
    conversions_for_save,
    set_save_conversions,
    written_patterns,
)
from .errors import UnsavableLayoutError

__all__ = [
    "ExpertSaveLayout",
    "UnsavableLayoutError",
    "plan_save_layout",
    "apply_save_layout",
    "align_config_targets",
    "linearized_experts",
    "applied_layout",
]

# fused runtime parameter -> the linearized leaves it holds, in concatenation order
FUSED_LEAVES = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_PER_EXPERT_SOURCE = re.compile(r"^(?P<prefix>.*)\.\*\.(?P<leaf>\w+)\.weight$")


@dataclass(frozen=True)
class ExpertSaveLayout:
    """How a model's linearized experts are written: ``renamed_leaves`` maps each
    linearized leaf to the family's checkpoint leaf (``{'gate_proj': 'w1', ...}``;
    empty when the names already agree); ``transforms`` is what ``save_pretrained``
    reverts."""

    family: str
    containers: tuple[str, ...]
    renamed_leaves: dict[str, str]
    transforms: tuple

    def __post_init__(self):
        # reverted once: checkpoint_name runs for every expert Linear
        object.__setattr__(self, "_reverted", _reverted(self.transforms))

    def checkpoint_name(self, module_name: str) -> str:
        """The name ``save_pretrained`` writes for a module's tensors."""
        key = _revert(f"{module_name}.weight", self._reverted)
        return key[: -len(".weight")]

    def describe(self) -> str:
        if not self.renamed_leaves:
            return f"{self.family}: experts saved per expert under their own names"
        renames = ", ".join(f"{a} -> {b}" for a, b in self.renamed_leaves.items())
        example = self.checkpoint_name(f"{self.containers[0]}.0.gate_proj")
        return (
            f"{self.family}: experts saved in the family's checkpoint names "
            f"({renames}; e.g. {example})"
        )


def linearized_experts(model: torch.nn.Module) -> list[str]:
    """Names of the experts containers llmcompressor linearized."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    return [n for n, m in model.named_modules() if isinstance(m, LinearExperts2D)]


def _split(transforms) -> tuple[list, list]:
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def _reverted(transforms) -> tuple[list, list]:
    """The reversed transforms ``save_pretrained`` applies, as (renamings,
    converters): ``revert_weight_conversion``'s order."""
    return _split([t.reverse_transform() for t in list(transforms)[::-1]])


def _revert(key: str, reverted: tuple[list, list]) -> str:
    from transformers.core_model_loading import rename_source_key

    renamings, converters = reverted
    return rename_source_key(key, renamings, converters, reverse=True)[0]


def checkpoint_key(key: str, transforms) -> str:
    """``key`` as ``save_pretrained`` writes it (``revert_weight_conversion``'s
    renaming, without the tensors)."""
    return _revert(key, _reverted(transforms))


def _ops(converter) -> list[tuple[str, int | None]]:
    return [
        (type(op).__name__, getattr(op, "dim", None)) for op in converter.operations
    ]


def _converter_for(fused_key: str, converters) -> object | None:
    for converter in converters:
        _, targets = written_patterns(converter)
        if len(targets) != 1:
            continue
        pattern = re.escape(targets[0]).replace(r"\*", r"\d+") + "$"
        if re.search(pattern, fused_key):
            return converter
    return None


def _refuse(family: str, what: str) -> UnsavableLayoutError:
    return UnsavableLayoutError(
        f"{family}: {what}; a per-expert quantized checkpoint of it would reload "
        "in transformers with uninitialized experts, so this plugin refuses it "
        "before calibrating (README, 'Architectures')"
    )


def _has_bias(container: torch.nn.Module) -> bool:
    linear_biases = (
        m.bias for m in container.modules() if isinstance(m, torch.nn.Linear)
    )
    fused_biases = (
        getattr(container, name, None)
        for name in ("gate_up_proj_bias", "down_proj_bias")
    )
    return any(b is not None for b in (*linear_biases, *fused_biases))


def plan_save_layout(
    model: torch.nn.Module, containers: list[str] | None = None
) -> ExpertSaveLayout | None:
    """The save layout of ``model``'s linearized experts (None: it has none).

    ``containers``: the experts modules to plan for, when the model is not (yet)
    linearized, e.g. the CLI's check of a model built on the meta device.

    Raises :class:`UnsavableLayoutError` (one line naming the family and why) when
    the family's checkpoints store the experts in a form no per-expert checkpoint
    reloads as: fused, transposed, interleaved, or with expert biases."""
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    containers = linearized_experts(model) if containers is None else containers
    if not containers:
        return None
    family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    modules = dict(model.named_modules())
    transforms = conversions_for_save(model)
    renamings, converters = _split(transforms)
    per_expert: dict[tuple[str, str], str] = {}  # (prefix, checkpoint leaf) -> leaf
    expert_converters: set[int] = set()  # replaced by per-expert renamings
    for container in containers:
        for fused, leaves in FUSED_LEAVES.items():
            fused_key = f"{container}.{fused}"
            converter = _converter_for(fused_key, converters)
            if converter is None:
                raise _refuse(
                    family, f"its checkpoints store {fused_key} fused, not per expert"
                )
            sources, _ = written_patterns(converter)
            expected = [("MergeModulelist", 0)] + (
                [("Concatenate", 1)] if len(leaves) == 2 else []
            )
            parsed = [_PER_EXPERT_SOURCE.match(source) for source in sources]
            if _ops(converter) != expected or len(sources) != len(leaves):
                raise _refuse(
                    family,
                    f"its checkpoints hold {fused_key} in a form other than stacked "
                    f"per-expert matrices ({', '.join(n for n, _ in _ops(converter))})",
                )
            if not all(parsed):
                raise _refuse(family, f"{fused_key} has no per-expert source tensors")
            expert_converters.add(id(converter))
            for match, leaf in zip(parsed, leaves, strict=True):
                per_expert[(match["prefix"], match["leaf"])] = leaf
        if _has_bias(modules[container]):
            raise _refuse(family, f"{container} has expert biases")
    renamed = {
        leaf: original for (_, original), leaf in per_expert.items() if leaf != original
    }
    save_transforms = [t for t in transforms if id(t) not in expert_converters] + [
        WeightRenaming(
            re.escape(prefix) + r"\.(\d+)\." + re.escape(original) + r"\.",
            prefix + r".\1." + leaf + ".",
        )
        for (prefix, original), leaf in per_expert.items()
        if leaf != original
    ]
    layout = ExpertSaveLayout(
        family, tuple(containers), renamed, tuple(save_transforms)
    )
    # transformers' own load renaming must take each written name to the fused
    # parameter it came from, or the checkpoint would not reload
    for container in containers:
        for fused, leaves in FUSED_LEAVES.items():
            written = checkpoint_key(
                f"{container}.0.{leaves[0]}.weight", save_transforms
            )
            loaded, pattern = rename_source_key(written, renamings, converters)
            if pattern is None or loaded != f"{container}.{fused}":
                raise _refuse(
                    family,
                    f"{written} would load as {loaded}, not {container}.{fused}",
                )
    return layout


# the layout applied to each model: once applied, the model's own conversions are
# the save transforms, from which the layout can no longer be derived
_applied: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def apply_save_layout(model: torch.nn.Module, layout: ExpertSaveLayout | None) -> None:
    """Make ``model.save_pretrained`` write ``layout``'s names."""
    if layout is not None:
        set_save_conversions(model, list(layout.transforms))
        _applied[model] = layout


def applied_layout(model: torch.nn.Module) -> ExpertSaveLayout | None:
    """The layout :func:`apply_save_layout` gave ``model``, else its plan."""
    return _applied.get(model) or plan_save_layout(model)


def _expert_linears(model: torch.nn.Module, layout: ExpertSaveLayout) -> list[str]:
    return [
        name
        for container in layout.containers
        for name, module in model.get_submodule(container).named_modules(
            prefix=container
        )
        if isinstance(module, torch.nn.Linear)
    ]


def align_config_targets(
    directory: str | Path, model: torch.nn.Module, layout: ExpertSaveLayout | None
) -> list[str]:
    """Extend ``config.json``'s quantization targets that name experts by their
    linearized names so that they also match the names written; returns the
    targets added (each also logged)."""
    from compressed_tensors.utils import match_name

    if layout is None or not layout.renamed_leaves:
        return []
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    runtime = _expert_linears(model, layout)
    written = {name: layout.checkpoint_name(name) for name in runtime}
    added = []
    for group in groups.values():
        targets = group.get("targets") or []
        lost = [
            written[name]
            for name in runtime
            if any(match_name(name, t) for t in targets)
            and not any(match_name(written[name], t) for t in targets)
        ]
        if not lost:
            continue
        target = _target_for(lost, set(written.values()))
        targets.append(target)
        added.append(target)
    if added:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        logger.info(
            f"quantization_config targets extended to the checkpoint's expert names: "
            f"{', '.join(t[:80] for t in added)}"
        )
    return added


def _target_for(names: list[str], universe: set[str]) -> str:
    """A ``re:`` target matching exactly ``names`` among ``universe``: one pattern
    per (container, leaves) when that is exact, else the names themselves."""
    from compressed_tensors.utils import match_name

    containers = sorted({name.rsplit(".", 2)[0] for name in names})
    leaves = sorted({name.rsplit(".", 1)[1] for name in names})
    target = (
        "re:^(?:"
        + "|".join(re.escape(c) for c in containers)
        + r")\.\d+\.(?:"
        + "|".join(re.escape(leaf) for leaf in leaves)
        + ")$"
    )
    if {n for n in universe if match_name(n, target)} == set(names):
        return target
    return "re:^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"
