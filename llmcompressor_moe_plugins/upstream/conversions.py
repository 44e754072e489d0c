"""transformers' checkpoint conversion mappings, read and set for saving.

transformers 5 loads many MoE families from per-expert checkpoint tensors into fused
3-D parameters (``WeightConverter``: ``MergeModulelist`` + ``Concatenate``) and
renames modules (``WeightRenaming``: Mixtral's ``block_sparse_moe`` -> ``mlp``); on
``save_pretrained`` it reverts the transforms recorded on the model. The patterns
as written in the mapping are kept only in private attributes (the public ones are
rewritten into regexes), and the transforms a loaded model used live in
``model._weight_conversions``; llmcompressor's own ``set_save_conversion_mapping``
sets that attribute, and we read it here, so a transformers release that renames
them breaks this file only.
"""

from __future__ import annotations

import torch

__all__ = [
    "conversions_for_save",
    "written_patterns",
    "set_save_conversions",
    "load_report_on_meta",
]


def conversions_for_save(model: torch.nn.Module) -> list:
    """The transforms ``save_pretrained`` reverts for ``model``: the ones it was
    loaded with, else the family's mapping without prefix changes (what
    ``revert_weight_conversion`` does for a model built in memory)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    loaded = getattr(model, "_weight_conversions", None)
    if loaded is not None:
        return list(loaded)
    return [
        transform
        for transform in get_model_conversion_mapping(model, add_legacy=False)
        if not isinstance(transform, PrefixChange)
    ]


def written_patterns(transform) -> tuple[list[str], list[str]]:
    """``(sources, targets)`` of a transform as written in the mapping, e.g.
    ``(['mlp.experts.*.gate_proj.weight', ...], ['mlp.experts.gate_up_proj'])``."""
    return (
        list(transform._original_source_patterns),
        list(transform._original_target_patterns),
    )


def set_save_conversions(model: torch.nn.Module, transforms: list) -> None:
    """Make ``save_pretrained`` revert ``transforms`` (llmcompressor's public
    setter for the attribute transformers reads)."""
    from llmcompressor.modeling.moe.conversion_mappings import (
        set_save_conversion_mapping,
    )

    set_save_conversion_mapping(model, transforms)


def load_report_on_meta(directory: str, model_class, **kwargs) -> dict:
    """What ``model_class.from_pretrained(directory)`` would report, computed on
    the meta device (no tensor data is read): ``missing_keys``,
    ``unexpected_keys``, ``mismatched_keys``, ``conversion_errors``,
    ``error_msgs``. transformers logs these as a table and raises on some of them
    (``log_state_dict_report``); it is silenced here and the report returned."""
    import transformers.modeling_utils as modeling_utils

    captured: dict = {}
    original = modeling_utils.log_state_dict_report

    def capture(*args, loading_info=None, **other):
        captured["info"] = loading_info

    modeling_utils.log_state_dict_report = capture
    try:
        model_class.from_pretrained(directory, device_map="meta", **kwargs)
    finally:
        modeling_utils.log_state_dict_report = original
    info = captured.get("info")
    if info is None:
        return {}
    return {
        "missing_keys": sorted(info.missing_keys),
        "unexpected_keys": sorted(info.unexpected_keys),
        "mismatched_keys": sorted(str(k) for k in info.mismatched_keys),
        "conversion_errors": dict(info.conversion_errors),
        "error_msgs": list(info.error_msgs),
    }
