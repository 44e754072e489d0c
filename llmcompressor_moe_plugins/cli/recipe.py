"""``--recipe``: which recipe, checked as YAML before anything heavy, then its
modifiers with ours first and configured from the flags."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import recipes
from .args import DEFAULT_RECIPE, CliError, one_line

__all__ = [
    "choose_recipe",
    "recipe_choice_line",
    "check_recipe",
    "load_recipe_modifiers",
]

_OUR_FIELDS = (
    "calibrate_all_experts",
    "mode",
    "block_modes",
    "chunk_size",
    "min_tokens",
    "rtn_fallback",
    "floor",
    "seed",
    "scheme_fit",
)


def choose_recipe(args: argparse.Namespace) -> str:
    """The recipe name or path a run uses: ``--recipe``; else the shipped recipe
    of the model's family (its GPTQ W4A16), read from ``config.json`` without
    importing anything heavy; else (no recipe for the family, or a hub model not
    cached yet) the GLM recipe, which targets ``Linear`` and fits other families.
    (The one place that decides it.)"""
    if args.recipe:
        return args.recipe
    model_type = _model_type(args)
    return (model_type and recipes.default_for(model_type)) or DEFAULT_RECIPE


def recipe_choice_line(args: argparse.Namespace) -> str | None:
    """What to tell the user about a recipe they did not name (None if named)."""
    if args.recipe:
        return None
    model_type = _model_type(args) or "the built-in model"
    chosen = choose_recipe(args)
    whose = (
        f"the shipped recipe for {model_type}"
        if recipes.default_for(str(model_type)) == chosen or args.model is None
        else f"no recipe is shipped for {model_type}; the GLM recipe targets Linear"
    )
    return f"No --recipe: using {chosen} ({whose}; --recipe picks another)"


def _model_type(args: argparse.Namespace) -> str | None:
    """``model_type`` of ``--model`` (of its text model for a VLM) from its local
    or cached ``config.json``; the built-in model is GLM4-MoE."""
    import json

    if args.model is None:
        return "glm4_moe"
    config_path = Path(args.model).expanduser() / "config.json"
    if not config_path.is_file():
        config_path = _cached_hub_config(args)
    if config_path is None:
        return None
    try:
        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    text = config.get("text_config") or {}
    return text.get("model_type") or config.get("model_type")


def _cached_hub_config(args: argparse.Namespace) -> Path | None:
    """A hub model's ``config.json`` if the hub cache has it (a path that does
    not exist is not a hub ID: the path checks name that error)."""
    from .hub import looks_like_path

    if looks_like_path(args.model):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(
            args.model, "config.json", revision=getattr(args, "revision", None)
        )
    except (ImportError, ValueError):  # not a valid repo id either
        return None
    return Path(found) if isinstance(found, str) else None


def _bare_modifier_entries(node: Any, parent: str = "") -> Iterator[str]:
    """Modifier names written with no value (``GPTQModifier:``), which YAML reads
    as null and llmcompressor fails on with an AttributeError."""
    if isinstance(node, dict):
        for key, value in node.items():
            name = str(key)
            is_modifier = name.endswith("Modifier") or parent.endswith("modifiers")
            if value is None and is_modifier:
                yield name
            else:
                yield from _bare_modifier_entries(value, name)
    elif isinstance(node, list):
        for item in node:
            yield from _bare_modifier_entries(item, parent)


def check_recipe(recipe: str) -> str:
    """The recipe's path, once it exists and is YAML llmcompressor can parse
    (cheap: no llmcompressor import)."""
    import yaml

    try:
        path = recipes.resolve(recipe)
    except (FileNotFoundError, KeyError) as err:
        raise CliError(str(err).strip("'\"")) from None
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise CliError(
            f"recipe {path} is not valid YAML{where} ({problem}); fix the recipe"
        ) from None
    for name in _bare_modifier_entries(data):
        raise CliError(
            f"recipe {path}: modifier `{name}` has no arguments written as a bare "
            f"`{name}:` (YAML null); write `{name}: {{}}`"
        )
    return path


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The modifier's arguments the flags set."""
    from ..calibration.modes import parse_mode

    settings: dict[str, Any] = {}
    if args.routed_only:
        settings["mode"] = "routed"
    elif args.mode:
        try:
            parse_mode(args.mode)
        except ValueError as err:
            raise CliError(f"--mode {args.mode}: {one_line(str(err))}") from None
        settings["mode"] = args.mode
    if args.block_mode:
        modes = {}
        for pair in args.block_mode:
            class_name, _, spec = pair.partition("=")
            try:
                parse_mode(spec)
            except ValueError as err:
                raise CliError(f"--block-mode {pair!r}: {one_line(str(err))}") from None
            modes[class_name] = spec
        settings["block_modes"] = modes
    if args.min_tokens is not None:
        settings["min_tokens"] = args.min_tokens
    if args.rtn_fallback:
        settings["rtn_fallback"] = True
    for name in ("floor", "seed", "scheme_fit"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    return settings


def load_recipe_modifiers(path: str, args: argparse.Namespace) -> list:
    """The recipe's modifiers with ours first, configured from the flags.

    A weighted mode you chose with a plain ``GPTQModifier`` in the recipe stops
    here, as the same recipe does in Python (at calibration start): the CLI
    never swaps modifiers behind your back."""
    from llmcompressor.modifiers.quantization import QuantizationMixin
    from llmcompressor.recipe import Recipe

    from ..modifier import MoECalibrationModifier
    from ..statistics.recipe_checks import require_weighting_gptq

    try:
        modifiers = list(Recipe.create_instance(path).modifiers)
    except Exception as err:
        raise CliError(f"recipe {path} is invalid: {one_line(str(err))}") from None
    if not any(isinstance(m, QuantizationMixin) for m in modifiers):
        raise CliError(
            f"recipe {path} has no quantization modifier (GPTQModifier, "
            "QuantizationModifier, ...); add one, or pick a shipped recipe "
            "(llmcompressor-moe recipes)"
        )
    ours = [m for m in modifiers if isinstance(m, MoECalibrationModifier)]
    settings = _settings(args)
    try:
        if ours:
            kept = {name: getattr(ours[0], name) for name in _OUR_FIELDS}
            if "block_modes" in settings:
                settings["block_modes"] = {
                    **kept["block_modes"],
                    **settings["block_modes"],
                }
            configured = MoECalibrationModifier(**{**kept, **settings})
            modifiers = [configured] + [m for m in modifiers if m is not ours[0]]
        else:
            modifiers = [MoECalibrationModifier(**settings)] + modifiers
    except ValueError as err:
        raise CliError(f"calibration mode: {one_line(str(err))}") from None
    ours = modifiers[0]
    try:
        # the check the modifier makes at calibration start, made before loading
        require_weighting_gptq([ours.mode, *ours.block_modes.values()], modifiers)
    except ValueError as err:
        raise CliError(f"recipe {path}: {one_line(str(err))}") from None
    return _with_statistics_budget(modifiers, path, args)


def _with_statistics_budget(modifiers: list, path: str, args) -> list:
    budget = getattr(args, "statistics_budget_gib", None)
    if budget is None:
        return modifiers
    # SharedHessianGPTQModifier's field (no import: cli/ stays off statistics/)
    takers = [m for m in modifiers if "statistics_budget_gib" in type(m).model_fields]
    if budget <= 0 or not takers:
        raise CliError(
            f"--statistics-budget-gib {budget}: needs a positive number and a "
            f"SharedHessianGPTQModifier in recipe {path} (the shipped GPTQ recipes)"
        )
    for modifier in takers:
        modifier.statistics_budget_gib = budget
    return modifiers
