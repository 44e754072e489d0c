"""``--model``: where it is, its config, its MoE blocks (from a model built on
the meta device), its tokenizer and its weights; the built-in tiny model."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from loguru import logger

from .args import CliError, one_line
from .hub import ModelSource, looks_like_path, resolve_model

__all__ = [
    "check_model_path",
    "model_config",
    "meta_model",
    "moe_block_classes",
    "check_moe_blocks",
    "model_source",
    "load_tokenizer",
    "load_model",
]

REMOTE_CODE_HINT = "pass --trust-remote-code if you trust the code in its directory"


def check_model_path(args: argparse.Namespace, output: Path) -> None:
    """The path errors ``--model`` can have, without importing anything heavy
    (a hub ID is looked up later, with the other network checks)."""
    if args.model is None:
        return
    path = Path(args.model).expanduser()
    if path.exists() or looks_like_path(args.model):
        source = resolve_model(args.model, args.revision)  # local: path checks only
        _check_not_in_output(source, args, output)


def _check_not_in_output(source: ModelSource, args, output: Path) -> None:
    if not source.on_hub and Path(source.reference).resolve().is_relative_to(output):
        raise CliError(
            f"--output {args.output} holds the model directory {args.model}; "
            "pass another --output"
        )


def model_config(source: ModelSource):
    import transformers
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            source.reference, **source.pretrained_kwargs()
        )
    except (OSError, ValueError, KeyError, ImportError) as err:
        why = one_line(str(err))
        fix = "pass a model this transformers version supports"
        if not source.trust_remote_code and _has_own_code(source):
            fix = REMOTE_CODE_HINT
        raise CliError(
            f"--model {source.reference}: transformers {transformers.__version__} "
            f"cannot read its config.json ({why}); {fix}"
        ) from None


def _has_own_code(source: ModelSource) -> bool:
    """The model's config.json names its own classes (``auto_map``)."""
    import json

    if source.on_hub:
        return False
    try:
        config = json.loads((Path(source.reference) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "auto_map" in config


def meta_model(config, label: str, trust_remote_code: bool = False):
    """The model's modules on the meta device: structure without weights."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **kwargs)
    except ValueError as err:
        raise CliError(
            f"--model {label}: not a causal language model transformers can build "
            f"({one_line(str(err))}); pass a *ForCausalLM model"
        ) from None


def moe_block_classes(model) -> list[str]:
    """The class name of every MoE block the plugin calibrates, in model order.

    Asks ``context.plan_calibration`` (registered and generic paths); without it,
    modules with ``experts`` and a ``gate`` or ``router``.
    """
    try:
        from ..calibration.context import plan_calibration
    except ImportError:
        return [
            type(module).__name__
            for module in model.modules()
            if hasattr(module, "experts")
            and (hasattr(module, "gate") or hasattr(module, "router"))
        ]
    return [plan.block_class for plan in plan_calibration(model)]


def check_moe_blocks(blocks: list[str], args: argparse.Namespace, label: str) -> None:
    classes = list(dict.fromkeys(blocks))
    if not blocks and not args.allow_dense:
        raise CliError(
            f"--model {label} has no MoE block this plugin can calibrate (no module "
            "with experts and a router, and no calibration module registered for "
            "its blocks), so it would do nothing; register one (README, 'Adding an "
            "architecture') or pass --allow-dense to quantize it anyway"
        )
    for pair in args.block_mode:
        class_name = pair.partition("=")[0]
        if class_name not in classes:
            has = (
                f"its MoE block classes: {', '.join(classes)}"
                if classes
                else "it has no MoE blocks"
            )
            raise CliError(
                f"--block-mode {pair}: the model has no block of class {class_name}; "
                f"{has}"
            )


def model_source(
    args: argparse.Namespace, output: Path, scratch: Path, build: bool = True
) -> tuple[ModelSource | None, list[str]]:
    """The model to load and its MoE block classes, checked from its config
    alone (modules built on the meta device); the embedded tiny model is built
    in ``scratch`` once the checks pass (unless ``build`` is False: then the
    source is None)."""
    if args.model is None:
        from ..tiny import build_tiny_glm4_moe, tiny_glm4_moe_config, train_tokenizer

        blocks = moe_block_classes(meta_model(tiny_glm4_moe_config(), "tiny"))
        check_moe_blocks(blocks, args, "tiny")
        if not build:
            return None, blocks
        logger.info("No --model: building a tiny GLM4-MoE and its tokenizer")
        tiny = build_tiny_glm4_moe(
            scratch / "tiny-glm4-moe", tokenizer=train_tokenizer()
        )
        return ModelSource(str(tiny)), blocks

    source = dataclasses.replace(
        resolve_model(args.model, args.revision),
        trust_remote_code=args.trust_remote_code,
    )
    _check_not_in_output(source, args, output)
    config = model_config(source)
    model = meta_model(config, args.model, args.trust_remote_code)
    blocks = moe_block_classes(model)
    check_moe_blocks(blocks, args, args.model)
    check_save_layout(model, args.model)
    return source, blocks


def check_save_layout(model, label: str) -> None:
    """Refuse a family whose checkpoints cannot hold per-expert tensors now, from
    the meta model, rather than after its weights are loaded."""
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes

    from ..calibration.context import plan_calibration
    from ..checkpoint.layout import UnsavableLayoutError, plan_save_layout

    # the experts llmcompressor will linearize and the plugin calibrates
    linearized = {name for name, _ in get_non_linearized_moes(model)}
    containers = [
        f"{plan.name}.experts"
        for plan in plan_calibration(model)
        if f"{plan.name}.experts" in linearized
    ]
    try:
        plan_save_layout(model, containers)
    except UnsavableLayoutError as err:
        raise CliError(f"--model {label}: {err}") from None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            source.reference, **source.pretrained_kwargs()
        )
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise CliError(
            f"--model {source.reference}: no tokenizer could be loaded "
            f"({one_line(str(err))}); save one beside the model "
            "(tokenizer.save_pretrained)"
        ) from None


def load_model(source: ModelSource, blocks: list[str], label: str, world_size: int = 1):
    from transformers import AutoModelForCausalLM

    if source.on_hub:
        label = source.describe()
    classes = ", ".join(dict.fromkeys(blocks)) or "none"
    logger.info(f"Loading {label} ({len(blocks)} MoE block(s) of class {classes})")
    if world_size == 1:
        return AutoModelForCausalLM.from_pretrained(
            source.reference, **source.pretrained_kwargs()
        )
    from compressed_tensors.offload import load_offloaded_model

    # rank 0 reads the checkpoint into shared CPU memory, the others map it: one
    # copy of the weights in RAM however many processes
    with load_offloaded_model():
        return AutoModelForCausalLM.from_pretrained(
            source.reference, device_map="auto_offload", **source.pretrained_kwargs()
        )
