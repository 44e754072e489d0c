"""One rank of a distributed oneshot on CPU, for tests/test_distributed.py.

Run under ``python -m torch.distributed.run --nproc_per_node=N`` (each rank writes
``rank{R}.pt`` and ``rank{R}.json`` into ``--out``), or as plain ``python`` for the
single-process reference run. Not collected by pytest (no ``test_`` prefix).

Each rank writes, on success or failure, so the parent sees what happened where:
``rank{R}.json``: status, error, the coverage report (the modifier sums it over
ranks itself) and this rank's own counts; ``rank{R}.pt``: the quantized Linears'
``weight``, ``weight_scale`` and ``weight_zero_point``.

The plugin as shipped: ``MoECalibrationModifier`` and ``SharedHessianGPTQModifier``
do everything distributed themselves (aligned GPTQ Hessians, barriers, counts summed
over ranks); the worker adds nothing but observation.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import torch

QPARAMS = ("weight", "weight_scale", "weight_zero_point")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="JSON lines of input_ids")
    parser.add_argument("--num-samples", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="all")
    parser.add_argument("--min-tokens", type=int, default=None)
    parser.add_argument("--floor", type=int, default=None, help="default: the mode's")
    parser.add_argument("--rtn-fallback", action="store_true")
    parser.add_argument("--modifier", choices=["gptq", "shared"], default="gptq")
    parser.add_argument("--statistics-budget-gib", type=float, default=None)
    parser.add_argument(
        "--load", choices=["plain", "offloaded"], default="plain", help="model loading"
    )
    parser.add_argument(
        "--no-propagate",
        action="store_true",
        help="propagate_error=False: every layer sees the unquantized model's "
        "activations, so routing does not depend on earlier layers' GPTQ noise",
    )
    parser.add_argument("--timeout", type=float, default=45.0)
    return parser.parse_args(argv)


def build_recipe(args):
    from llmcompressor.modifiers.gptq import GPTQModifier

    from llmcompressor_moe_plugins import MoECalibrationModifier
    from llmcompressor_moe_plugins.statistics.shared_hessian_gptq import (
        SharedHessianGPTQModifier,
    )

    kwargs = dict(
        targets=["Linear"], scheme="W4A16", ignore=["lm_head", r"re:.*mlp\.gate$"]
    )
    if args.modifier == "gptq":
        gptq = GPTQModifier(**kwargs)
    else:
        budget = args.statistics_budget_gib
        gptq = SharedHessianGPTQModifier(**kwargs, statistics_budget_gib=budget)
    floor = {} if args.floor is None else {"floor": args.floor}
    ours = MoECalibrationModifier(
        mode=args.mode,
        min_tokens=args.min_tokens,
        rtn_fallback=args.rtn_fallback,
        **floor,
    )
    return [ours, gptq]


@contextlib.contextmanager
def rank_counts(local: dict):
    """This rank's own per-block counts, as the modifier hands them to
    ``distributed.all_reduce_blocks`` (the last call per block: the pass's
    totals), before they are summed."""
    from llmcompressor_moe_plugins import distributed

    original = distributed.all_reduce_blocks

    def all_reduce_blocks(blocks):
        for block in blocks:
            if getattr(block, "world_size", 1) == 1:
                local[block.name] = {
                    "routed": list(block.routed),
                    "calibrated": list(block.calibrated),
                }
        return original(blocks)

    distributed.all_reduce_blocks = all_reduce_blocks
    try:
        yield
    finally:
        distributed.all_reduce_blocks = original


def load_model(args):
    from transformers import AutoModelForCausalLM

    if args.load == "plain":
        return AutoModelForCausalLM.from_pretrained(args.model)
    from compressed_tensors.offload import load_offloaded_model

    with load_offloaded_model():
        return AutoModelForCausalLM.from_pretrained(
            args.model, device_map="auto_offload"
        )


def load_partition(args):
    from datasets import load_dataset

    from llmcompressor_moe_plugins import distributed

    split = distributed.rank_partition("train", args.num_samples)
    with distributed.fail_together("loading the calibration data"):
        dataset = load_dataset("json", data_files=args.data, split=split)
    distributed.require_data_on_every_rank(len(dataset))
    return dataset


@contextlib.contextmanager
def count_hessian_reductions(record: dict):
    """Count ``dist.reduce`` calls on matrices (Hessians; sample counts are
    scalars), upstream's and ours alike (both call ``dist.reduce`` by attribute)."""
    import torch.distributed as dist

    original = dist.reduce
    record["hessian_reductions"] = 0

    def reduce(tensor, *args, **kwargs):
        if tensor.dim() == 2:
            record["hessian_reductions"] += 1
        return original(tensor, *args, **kwargs)

    dist.reduce = reduce
    try:
        yield
    finally:
        dist.reduce = original


@contextlib.contextmanager
def held_expert_statistics(record: dict):
    """Per compression: the weighted expert Hessians this rank holds once
    shrinkage has mixed them (zeros where it saw no token), before they are
    reduced; the workspace limit of the stacked solves and of GPTQ's batches."""
    from llmcompressor_moe_plugins.statistics import shared_reduction
    from llmcompressor_moe_plugins.statistics.shared_hessian_gptq import (
        SharedHessianGPTQModifier,
    )
    from llmcompressor_moe_plugins.upstream import gptq

    record["held"], record["limits"] = [], {"stacked": [], "upstream": []}
    originals = (
        SharedHessianGPTQModifier._merge_consumed_statistics,
        shared_reduction.compress_stacked_groups,
        gptq.batches_within,
    )
    merge_consumed, stacked, batches_within = originals

    def merge(self):
        record["held"].append(len(self._shared_hessians) + len(self._consumed_hessians))
        return merge_consumed(self)

    def compress_stacked_groups(modifier, groups, limit=None):
        record["limits"]["stacked"].append(limit)
        return stacked(modifier, groups, limit)

    def bounded(modifier, limit):
        record["limits"]["upstream"].append(limit)
        return batches_within(modifier, limit)

    SharedHessianGPTQModifier._merge_consumed_statistics = merge
    shared_reduction.compress_stacked_groups = compress_stacked_groups
    gptq.batches_within = bounded
    try:
        yield
    finally:
        (
            SharedHessianGPTQModifier._merge_consumed_statistics,
            shared_reduction.compress_stacked_groups,
            gptq.batches_within,
        ) = originals


def quantized_state(model) -> dict[str, torch.Tensor]:
    state = {}
    for name, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        for attr in QPARAMS:
            value = getattr(module, attr, None)
            if value is not None:
                state[f"{name}.{attr}"] = value.detach().to("cpu").clone()
    return state


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rank = int(os.environ.get("RANK", 0))
    record: dict = {"status": "started"}
    try:
        from llmcompressor_moe_plugins import distributed

        if distributed.torchrun_environment() is not None:
            distributed.init_distributed(
                timeout=datetime.timedelta(seconds=args.timeout)
            )
        rank, world_size = distributed.world()
        record.update(rank=rank, world_size=world_size)

        from llmcompressor import oneshot
        from transformers import AutoTokenizer

        from llmcompressor_moe_plugins import last_coverage_report
        from llmcompressor_moe_plugins.upstream.compat import cpu_only_calibration

        dataset = load_partition(args)
        record["local_samples"] = len(dataset)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = load_model(args)
        recipe = build_recipe(args)
        with contextlib.ExitStack() as stack:
            stack.enter_context(cpu_only_calibration())
            stack.enter_context(count_hessian_reductions(record))
            stack.enter_context(held_expert_statistics(record))
            record["coverage_rank"] = {}
            stack.enter_context(rank_counts(record["coverage_rank"]))
            oneshot(
                model=model,
                processor=tokenizer,
                dataset=dataset,
                recipe=recipe,
                num_calibration_samples=len(dataset),
                max_seq_length=len(dataset[0]["input_ids"]),
                batch_size=1,
                # a fixed order: the one-process reference is then reproducible
                shuffle_calibration_samples=False,
                propagate_error=not args.no_propagate,
            )
        report = last_coverage_report()
        record["coverage"] = report.to_dict()
        # summed by the modifier already: summing again must change nothing
        record["coverage_global"] = distributed.all_reduce_coverage(report).to_dict()
        torch.save(quantized_state(model), out / f"rank{rank}.pt")
        record["status"] = "ok"
        return 0
    except BaseException as err:
        record["status"] = "error"
        record["error_type"] = type(err).__name__
        record["error"] = str(err)[:2000]
        record["traceback"] = traceback.format_exc()[-6000:]
        return 1
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            if dist.is_initialized() and record["status"] == "ok":
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
