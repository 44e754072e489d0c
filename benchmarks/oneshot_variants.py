"""oneshot wall time and expert coverage: upstream alone vs ours, all-expert vs routed.

Same model, same data, same process for every variant; each variant runs ``--repeats``
times after one warm-up and the median is reported with its ratio to upstream routed.
Prints a table and writes JSON.

    python benchmarks/oneshot_variants.py --out benchmarks/oneshot_variants.json

Tiny CPU size by default; ``--size medium`` is the GLM4-MoE of issue 6 (for a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.modeling.moe.linearize import linearize_moe
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from transformers import AutoModelForCausalLM

from llmcompressor_moe_plugins import MoECalibrationModifier
from llmcompressor_moe_plugins.tiny import (
    build_tiny_glm4_moe,
    stdlib_texts,
    tokenize_for_calibration,
    train_tokenizer,
)

SIZES = {
    "tiny": dict(config={}, samples=16, seq_len=128, dtype=torch.float32),
    "medium": dict(
        config=dict(
            hidden_size=2048,
            intermediate_size=8192,
            moe_intermediate_size=768,
            n_routed_experts=64,
            num_experts_per_tok=8,
            n_group=1,
            topk_group=1,
            num_hidden_layers=4,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=128,
        ),
        samples=128,
        seq_len=512,
        dtype=torch.bfloat16,
    ),
}

VARIANTS = {
    "upstream all": (False, True),
    "upstream routed": (False, False),
    "ours all": (True, True),
    "ours routed": (True, False),
}


def run_variant(model_dir, tokenizer, data, samples, seq_len, ours, all_experts):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    linearize_moe(model)
    # count calibration-pass token rows reaching each routed expert's gate_proj
    rows: dict[str, int] = {}

    def counter(name):
        def hook(_module, args):
            if not HooksMixin._HOOKS_DISABLED:
                rows[name] = (
                    rows.get(name, 0) + args[0].reshape(-1, args[0].shape[-1]).shape[0]
                )

        return hook

    for name, module in model.named_modules():
        if ".experts." in name and name.endswith("gate_proj"):
            module.register_forward_pre_hook(counter(name))
    recipe = [GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])]
    if ours:
        recipe.insert(0, MoECalibrationModifier(calibrate_all_experts=all_experts))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=data,
        recipe=recipe,
        num_calibration_samples=samples,
        max_seq_length=seq_len,
        moe_calibrate_all_experts=all_experts,
    )
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return seconds, peak, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/oneshot_variants.json")
    args = parser.parse_args()
    size = SIZES[args.size]

    tokenizer = train_tokenizer()
    data = tokenize_for_calibration(
        tokenizer, stdlib_texts(skip_files=100), size["samples"], size["seq_len"]
    )
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build_tiny_glm4_moe(
            Path(scratch) / "model",
            tokenizer=tokenizer,
            dtype=size["dtype"],
            **size["config"],
        )
        run_variant(
            model_dir, tokenizer, data, size["samples"], size["seq_len"], True, True
        )  # warm-up
        for name, (ours, all_experts) in VARIANTS.items():
            times, peaks = [], []
            for _ in range(args.repeats):
                seconds, peak, rows = run_variant(
                    model_dir,
                    tokenizer,
                    data,
                    size["samples"],
                    size["seq_len"],
                    ours,
                    all_experts,
                )
                times.append(seconds)
                peaks.append(peak)
            results[name] = {
                "seconds_median": statistics.median(times),
                "seconds": times,
                "peak_gpu_bytes": max(peaks) if peaks[0] is not None else None,
                "expert_rows_min": min(rows.values(), default=0),
                "expert_rows_max": max(rows.values(), default=0),
                "experts_with_rows": len(rows),
            }
    baseline = results["upstream routed"]["seconds_median"]
    print(f"size={args.size} device={'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(
        f"{'variant':<16} {'median s':>9} {'x up-routed':>11} {'rows min':>9} "
        f"{'rows max':>9} {'experts hit':>11}"
    )
    for name, r in results.items():
        print(
            f"{name:<16} {r['seconds_median']:>9.2f} "
            f"{r['seconds_median'] / baseline:>11.2f} {r['expert_rows_min']:>9} "
            f"{r['expert_rows_max']:>9} {r['experts_with_rows']:>11}"
        )
    Path(args.out).write_text(
        json.dumps({"size": args.size, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
