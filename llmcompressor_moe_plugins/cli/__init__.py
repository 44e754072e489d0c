"""``llmcompressor-moe``: quantize an MoE model, list plugins and recipes.

Thin: parses arguments and calls the library (``oneshot`` with our modifier).
What needs nothing heavy is checked first, before torch, transformers or
llmcompressor is imported (a usage error comes at once): arguments, the recipe's
YAML, the output directory, dataset and model paths. Then the rest, cheapest
first (``quantize``). Bad input ends with exit code 2 and one line on stderr;
Ctrl-C at any moment with one line and exit code 130, ``--output`` as it was.

Modules: ``args`` (argparse, light), ``recipe``, ``datasets``, ``models``,
``hub`` (model and dataset sources), ``quantize``, ``saving``, ``listing``
(recipes, plugins), ``logs`` (what the console shows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .args import PROG, CliError, build_parser, check_arguments, one_line

__all__ = ["main", "CliError", "build_parser"]


def _preflight(args: argparse.Namespace) -> tuple[str, Path]:
    """The checks that need no heavy import, in the order a run meets them:
    arguments, recipe, output directory, dataset, model. Returns the recipe's
    path and the output directory."""
    from ..checkpoint.output_dir import check_output_dir
    from .datasets import check_dataset_paths
    from .models import check_model_path
    from .recipe import check_recipe, choose_recipe

    check_arguments(args)
    recipe_path = check_recipe(choose_recipe(args))
    output = check_output_dir(args.output, args.overwrite)
    check_dataset_paths(args)
    check_model_path(args, output)
    return recipe_path, output


def _run(args: argparse.Namespace) -> int:
    if args.command == "recipes":
        from .listing import list_recipes_command

        return list_recipes_command()
    checked = _preflight(args) if args.command == "quantize" else None
    from .logs import cli_logging  # imports llmcompressor (quietly)

    with cli_logging(verbose=args.verbose):
        if args.command == "plugins":
            from .listing import list_plugins_command, plan_command

            return plan_command(args) if args.model else list_plugins_command()
        from .quantize import quantize_command

        return quantize_command(args, *checked)


def main(argv: list[str] | None = None) -> int:
    from ..checkpoint.errors import CheckpointMismatchError
    from ..checkpoint.output_dir import OutputDirError
    from .hub import SourceError

    try:
        return _run(build_parser().parse_args(argv))
    except (CliError, SourceError, OutputDirError) as err:
        print(f"{PROG}: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except CheckpointMismatchError as err:  # the output was left as it was
        print(f"{PROG}: error: {one_line(str(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
