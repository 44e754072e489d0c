"""Quantize a GLM4-MoE model (GLM-4.5, 4.6, 4.7) data-parallel with torchrun,
calibrating every expert.

llmcompressor's own distributed oneshot does the work: each rank calibrates on its
slice of the data, GPTQ reduces every Hessian onto one owning rank, which quantizes
and shares the result. The model is loaded offloaded (rank 0 reads the checkpoint
into shared CPU memory; the other ranks map it), so N ranks need one copy of the
weights in RAM, not N. One process per GPU::

    torchrun --nproc_per_node=8 examples/distributed_glm4.py \\
        --model zai-org/GLM-4.5 --output GLM-4.5-W4A16 --num-samples 512

Without a GPU (gloo backend), on a tiny GLM4-MoE built on the spot (no download)::

    torchrun --nproc_per_node=2 examples/distributed_glm4.py --tiny --output /tmp/tiny

Run without torchrun, it stops with an error naming the launch to use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import torch.distributed as dist
from compressed_tensors.offload import load_offloaded_model
from datasets import load_dataset
from llmcompressor import oneshot
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmcompressor_moe_plugins  # registers MoECalibrationModifier with recipes
from llmcompressor_moe_plugins import distributed, recipes
from llmcompressor_moe_plugins.upstream.compat import cpu_only_calibration


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model id or directory")
    source.add_argument(
        "--tiny", action="store_true", help="a tiny GLM4-MoE and stdlib text, no GPU"
    )
    parser.add_argument("--output", required=True, help="quantized model directory")
    parser.add_argument(
        "--recipe",
        default="glm4_moe_w4a16_gptq",
        help="shipped recipe name or YAML path (default: glm4_moe_w4a16_gptq)",
    )
    parser.add_argument("--dataset", default="HuggingFaceH4/ultrachat_200k")
    parser.add_argument("--split", default="train_sft")
    parser.add_argument(
        "--num-samples", type=int, default=512, help="over all ranks together"
    )
    parser.add_argument("--seq-len", type=int, default=2048)
    return parser.parse_args()


def tiny_inputs(args: argparse.Namespace, scratch: Path) -> tuple[str, str]:
    """Rank 0 builds the tiny model and writes the calibration text as token ids;
    every rank gets the paths (the files are on a disk all ranks see)."""
    paths = [None, None]
    if distributed.world()[0] == 0:
        from llmcompressor_moe_plugins.tiny import (
            build_tiny_glm4_moe,
            stdlib_texts,
            tokenize_for_calibration,
            train_tokenizer,
        )

        tokenizer = train_tokenizer()
        model_dir = build_tiny_glm4_moe(scratch / "tiny-glm4-moe", tokenizer=tokenizer)
        rows = tokenize_for_calibration(
            tokenizer, stdlib_texts(skip_files=100), args.num_samples, args.seq_len
        )
        data = scratch / "calibration.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths = [str(model_dir), str(data)]
    dist.broadcast_object_list(paths, src=0)
    return paths[0], paths[1]


def load_calibration_slice(args, tokenizer, data_files: str | None):
    """This rank's slice of the calibration data, tokenized."""
    split = distributed.rank_partition(args.split, args.num_samples)
    # a load error on one rank must stop every rank, not leave them waiting
    with distributed.fail_together("loading the calibration data"):
        if data_files is not None:  # --tiny: token ids already
            return load_dataset("json", data_files=data_files, split=split)
        dataset = load_dataset(args.dataset, split=split)

    def tokenize(example):
        if "messages" in example:
            text = tokenizer.apply_chat_template(example["messages"], tokenize=False)
        else:
            text = example["text"]
        return tokenizer(
            text, max_length=args.seq_len, truncation=True, add_special_tokens=False
        )

    return dataset.map(tokenize, remove_columns=dataset.column_names)


def main() -> None:
    args = parse_args()
    if args.tiny:
        args.num_samples, args.seq_len, args.split = (
            min(args.num_samples, 16),
            64,
            "train",
        )
    rank, world_size = distributed.init_distributed()  # clear error without torchrun
    logger.info(f"rank {rank} of {world_size}")

    with contextlib.ExitStack() as stack:
        data_files = None
        model_id = args.model
        if args.tiny:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            model_id, data_files = tiny_inputs(args, scratch)

        # offloaded: rank 0 loads into shared memory, the others point at it
        with load_offloaded_model():
            model = AutoModelForCausalLM.from_pretrained(
                model_id, dtype="auto", device_map="auto_offload"
            )
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        dataset = load_calibration_slice(args, tokenizer, data_files)
        distributed.require_data_on_every_rank(len(dataset))

        # Our recipe: MoECalibrationModifier + GPTQModifier. The plugin makes
        # every rank hand GPTQ the same experts' Hessians in the same order
        # (ranks route tokens to different experts) and sums its coverage counts
        # over ranks; cpu_only_calibration is a no-op on a GPU machine.
        stack.enter_context(cpu_only_calibration())
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=dataset,
            recipe=recipes.resolve(args.recipe),
            num_calibration_samples=len(dataset),
            max_seq_length=args.seq_len,
        )

        # every rank takes part in saving (rank 0 writes the files)
        model.save_pretrained(args.output, save_compressed=True)
        # counts of all ranks: the modifier summed them, on every rank
        report = llmcompressor_moe_plugins.last_coverage_report()
        if rank == 0:
            tokenizer.save_pretrained(args.output)
            report.save_json(Path(args.output) / "coverage.json")
            print(report.format_table())
            print(f"Quantized model and coverage.json written to {args.output}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
