"""oneshot cost of MoE calibration: upstream llmcompressor alone vs ours, per mode.

Same model, same data (unshuffled), same process for every variant. Each variant
runs ``--repeats`` times, round-robin over the variants, after one warm-up; medians
are reported with ratios to upstream's own runs. Figures per variant:

- oneshot wall time, and time spent inside MoE block forwards (GPU synchronized)
- calibration passes: MoE block forwards with quantization hooks listening, divided
  by (MoE blocks x batches); propagation forwards are counted apart
- peak memory: CPU RSS (sampled, above the level before the run) and, on GPU,
  ``torch.cuda.max_memory_allocated`` above what was allocated before the run (the
  model is loaded onto the GPU first, so this is calibration's own memory)
- tokens per routed expert's ``gate_proj`` during calibration (min / max)

    python benchmarks/oneshot_variants.py                     # tiny, CPU, < 1 min
    python benchmarks/oneshot_variants.py --size medium --repeats 1   # GPU

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from llmcompressor import oneshot
from llmcompressor.core import active_session
from llmcompressor.modeling.moe.linearize import linearize_moe
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from transformers import AutoModelForCausalLM
from transformers.models.glm4_moe import modeling_glm4_moe

from llmcompressor_moe_plugins import (
    MoECalibrationModifier,
    SharedHessianGPTQModifier,
    last_coverage_report,
)
from llmcompressor_moe_plugins.modules.glm4_moe import CalibrationGlm4MoeMoE
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

AUTO, ONE_CALL = "auto", 1 << 30
CALLS = {"batched_expert_statistics": False}
# name -> (our mode or None for upstream alone, upstream flag, GPTQ class, chunk,
# GPTQ fields)
VARIANTS = {
    "upstream all": (None, True, GPTQModifier, AUTO, {}),
    "upstream routed": (None, False, GPTQModifier, AUTO, {}),
    "ours routed": ("routed", False, GPTQModifier, AUTO, {}),
    "ours all": ("all", True, GPTQModifier, AUTO, {}),
    # default: experts computed from their weights, down_proj inputs handed over
    "ours all+shared": ("all", True, SharedHessianGPTQModifier, AUTO, {}),
    # the same over all of a batch's tokens at once: fewer kernels, more memory
    "ours all+shared 1chunk": ("all", True, SharedHessianGPTQModifier, ONE_CALL, {}),
    # the same with every expert called as a module (chunked extra calls)
    "ours all+shared calls": ("all", True, SharedHessianGPTQModifier, AUTO, CALLS),
    # one extra call per expert: fewer calls, more activation memory
    "ours all+shared 1call": (
        "all",
        True,
        SharedHessianGPTQModifier,
        ONE_CALL,
        CALLS,
    ),
    "ours top_k:2x": ("top_k:{2k}", False, GPTQModifier, AUTO, {}),
    "ours min_tokens:64": ("min_tokens:64", False, GPTQModifier, AUTO, {}),
    "ours affinity": ("affinity", False, GPTQModifier, AUTO, {}),
}


class BlockTimer:
    """Wraps the MoE blocks' forward at class level (no per-module hooks, which
    would tax every variant): seconds inside, calls with and without hooks."""

    def __init__(self, classes):
        self.classes = classes
        self.originals = {cls: cls.forward for cls in classes}
        self.reset()
        for cls in classes:
            cls.forward = self._wrap(self.originals[cls])

    def reset(self):
        self.seconds = 0.0
        self.calibration_calls = 0
        self.propagation_calls = 0

    def _wrap(self, forward):
        def timed(module, *args, **kwargs):
            sync = torch.cuda.synchronize if torch.cuda.is_available() else None
            if sync:
                sync()
            start = time.perf_counter()
            out = forward(module, *args, **kwargs)
            if sync:
                sync()
            self.seconds += time.perf_counter() - start
            if HooksMixin._HOOKS_DISABLED:
                self.propagation_calls += 1
            else:
                self.calibration_calls += 1
            return out

        return timed


class PeakRSS:
    """Samples this process's RSS every 20 ms; the peak above the starting level."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak_above_start = self.peak - self.start


def run_variant(model_dir, tokenizer, data, size, variant, timer, top_k):
    mode, upstream_flag, gptq_cls, chunk_size, gptq_fields = VARIANTS[variant]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=size["dtype"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    rows: dict[str, int] = {}

    def counter(name):
        def hook(_module, args):
            if not HooksMixin._HOOKS_DISABLED:
                tokens = args[0].reshape(-1, args[0].shape[-1]).shape[0]
                rows[name] = rows.get(name, 0) + tokens

        return hook

    recipe = [
        gptq_cls(targets=["Linear"], scheme="W4A16", ignore=["lm_head"], **gptq_fields)
    ]
    if mode is not None:
        mode = mode.replace("{2k}", str(2 * top_k))
        recipe.insert(
            0,
            MoECalibrationModifier(mode=mode, chunk_size=chunk_size, rtn_fallback=True),
        )
    # linearized here (oneshot would do it first thing) so rows can be counted.
    # Ours report them (tested equal to what the Linears see); hooks would also
    # stop our weight-computed forwards, which bypass only unobserved Linears.
    linearize_moe(model)
    for name, module in model.named_modules():
        if mode is None and ".experts." in name and name.endswith("gate_proj"):
            module.register_forward_pre_hook(counter(name))
    timer.reset()
    gpu_start = 0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_start = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        start = time.perf_counter()
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=data,
            recipe=recipe,
            num_calibration_samples=len(data),
            max_seq_length=size["seq_len"],
            moe_calibrate_all_experts=upstream_flag,
            shuffle_calibration_samples=False,
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    if mode is not None:
        report = last_coverage_report()
        rows = {
            f"{block.name}.{expert}": count
            for block in report.blocks
            for expert, count in enumerate(block.calibrated)
        }
    moe_blocks = sum(1 for m in model.modules() if type(m).__name__ == "Glm4MoeMoE")
    peak_gpu = (
        torch.cuda.max_memory_allocated() - gpu_start
        if torch.cuda.is_available()
        else None
    )
    # free this run's model before the next variant measures its peak
    del model
    active_session().reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "seconds": seconds,
        "moe_forward_seconds": timer.seconds,
        "calibration_passes": timer.calibration_calls / (moe_blocks * len(data)),
        "propagation_passes": timer.propagation_calls / (moe_blocks * len(data)),
        "peak_gpu_bytes": peak_gpu,
        "peak_rss_above_start_bytes": rss.peak_above_start,
        "expert_rows_min": min(rows.values(), default=0),
        "expert_rows_max": max(rows.values(), default=0),
        "experts_with_rows": len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--out", default="benchmarks/oneshot_variants.json")
    args = parser.parse_args()
    size = SIZES[args.size]

    tokenizer = train_tokenizer()
    data = tokenize_for_calibration(
        tokenizer, stdlib_texts(skip_files=40), size["samples"], size["seq_len"]
    )
    timer = BlockTimer([modeling_glm4_moe.Glm4MoeMoE, CalibrationGlm4MoeMoE])
    top_k = size["config"].get("num_experts_per_tok", 2)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build_tiny_glm4_moe(
            Path(scratch) / "model",
            tokenizer=tokenizer,
            dtype=size["dtype"],
            **size["config"],
        )
        warmup = data.select(range(min(8, len(data))))
        run_variant(model_dir, tokenizer, warmup, size, "ours all", timer, top_k)
        # round-robin repeats, so drift of the machine hits every variant alike
        runs = {name: [] for name in args.variants}
        for _ in range(args.repeats):
            for name in args.variants:
                run = run_variant(model_dir, tokenizer, data, size, name, timer, top_k)
                runs[name].append(run)
                print(name, json.dumps(run), flush=True)
        for name, variant_runs in runs.items():
            results[name] = summarize(variant_runs)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nsize={args.size} device={device} repeats={args.repeats}")
    print_table(results)
    Path(args.out).write_text(
        json.dumps({"size": args.size, "device": device, "results": results}, indent=2)
    )


def summarize(runs: list[dict]) -> dict:
    """Medians over repeats; peaks are the highest seen."""
    result = {
        key: statistics.median(r[key] for r in runs)
        if isinstance(runs[0][key], float)
        else runs[0][key]
        for key in runs[0]
    }
    result["seconds_all"] = [r["seconds"] for r in runs]
    result["peak_gpu_bytes"] = runs[0]["peak_gpu_bytes"] and max(
        r["peak_gpu_bytes"] for r in runs
    )
    result["peak_rss_above_start_bytes"] = max(
        r["peak_rss_above_start_bytes"] for r in runs
    )
    return result


def print_table(results: dict) -> None:
    up_all = results.get("upstream all")
    up_routed = results.get("upstream routed")
    print(
        f"{'variant':<20} {'oneshot s':>9} {'x up-rt':>7} {'x up-all':>8} "
        f"{'MoE fwd s':>9} {'passes':>6} {'prop':>5} {'GPU GiB':>8} "
        f"{'x up-all':>8} {'RSS+ GiB':>8} {'rows min':>8} {'rows max':>8}"
    )
    for name, r in results.items():
        gib = (r["peak_gpu_bytes"] or 0) / 2**30
        print(
            f"{name:<20} {r['seconds']:>9.2f} "
            f"{_ratio(r['seconds'], up_routed, 'seconds'):>7} "
            f"{_ratio(r['seconds'], up_all, 'seconds'):>8} "
            f"{r['moe_forward_seconds']:>9.2f} {r['calibration_passes']:>6.2f} "
            f"{r['propagation_passes']:>5.2f} {gib:>8.2f} "
            f"{_ratio(r['peak_gpu_bytes'], up_all, 'peak_gpu_bytes'):>8} "
            f"{r['peak_rss_above_start_bytes'] / 2**30:>8.2f} "
            f"{r['expert_rows_min']:>8} {r['expert_rows_max']:>8}"
        )


def _ratio(value, baseline: dict | None, key: str) -> str:
    if not baseline or not value or not baseline.get(key):
        return "-"
    return f"{value / baseline[key]:.2f}"


if __name__ == "__main__":
    main()
