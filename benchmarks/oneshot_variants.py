"""oneshot cost of MoE calibration: upstream llmcompressor alone vs ours, per mode.

Same model, same data (unshuffled), same process for every variant. Each variant
runs ``--repeats`` times, round-robin over the variants, after one warm-up; medians
are reported with ratios to upstream's own runs.

Model families (``--model-family``):

- ``glm4``: GLM4-MoE (``Glm4MoeMoE``), which has a registered calibration module
  (``CalibrationGlm4MoeMoE`` replaces the whole block);
- ``qwen3_moe``: Qwen3-MoE (``Qwen3MoeSparseMoeBlock``), calibrated through the
  generic path (only the block's linearized ``experts`` container is replaced by
  ``CalibrationExperts``; the block's own forward routes). Its ``medium`` size has
  Qwen3-30B-A3B's layer shapes: hidden 2048, 128 experts top-8 of width 768, 32
  query / 4 key-value heads of 128, ``norm_topk_prob``; 3 layers, all MoE.

Figures per variant:

- oneshot wall time, and time spent inside MoE block forwards (GPU synchronized)
- calibration passes: MoE block forwards with quantization hooks listening, divided
  by (MoE blocks x batches); propagation forwards are counted apart
- peak memory: CPU RSS (sampled, above the level before the run) and, on GPU,
  ``torch.cuda.max_memory_allocated`` above what was allocated before the run (the
  model is loaded onto the GPU first, so this is calibration's own memory)
- tokens per routed expert during calibration (min / max, and how many got none):
  upstream from forward pre-hooks on every expert's ``gate_proj``, ours from the
  coverage report (``last_coverage_report()``; hooks on the expert Linears would
  make our weight-computed forwards fall back)

    python benchmarks/oneshot_variants.py                     # tiny, CPU, < 1 min
    python benchmarks/oneshot_variants.py --model-family qwen3_moe --repeats 1
    python benchmarks/oneshot_variants.py --size medium --repeats 1   # GPU
    python benchmarks/oneshot_variants.py --size medium --model-family qwen3_moe \
        --repeats 1 --out qwen3_medium.json                         # GPU

Variants: ``upstream all`` / ``upstream routed`` (GPTQModifier alone,
``moe_calibrate_all_experts`` True / False), ``ours default``
(``MoECalibrationModifier()`` + GPTQModifier: mode ``affinity:0.1``, floor 64),
``ours routed``, ``ours all+shared`` (mode ``all`` + SharedHessianGPTQModifier) and
more (``VARIANTS``); each family has its default list (``DEFAULT_VARIANTS``).

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
from real_shapes import random_init_model  # benchmarks/ is the script's folder
from transformers import AutoModelForCausalLM
from transformers.models.glm4_moe import modeling_glm4_moe
from transformers.models.qwen3_moe import modeling_qwen3_moe

from llmcompressor_moe_plugins import (
    MoECalibrationModifier,
    SharedHessianGPTQModifier,
    last_coverage_report,
)
from llmcompressor_moe_plugins.calibration.architectures.glm4_moe import (
    CalibrationGlm4MoeMoE,
)
from llmcompressor_moe_plugins.tiny import (
    build_tiny_glm4_moe,
    stdlib_texts,
    tokenize_for_calibration,
    train_tokenizer,
)

GLM4_SIZES = {
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
SIZES = GLM4_SIZES  # the name this table had before --model-family

# Qwen3-MoE in miniature (widths multiples of 128, the W4A16 group size)
QWEN3_TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=16,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
QWEN3_SIZES = {
    "tiny": dict(config={}, samples=16, seq_len=128, dtype=torch.float32),
    # Qwen3-30B-A3B's layer shapes (config.json of Qwen/Qwen3-30B-A3B), 3 layers
    "medium": dict(
        config=dict(
            hidden_size=2048,
            intermediate_size=6144,  # unused: every layer is MoE
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            norm_topk_prob=True,
            num_hidden_layers=3,
            max_position_embeddings=4096,
        ),
        samples=128,
        seq_len=512,
        dtype=torch.bfloat16,
    ),
}


def build_qwen3_moe(
    directory: str | Path,
    seed: int = 0,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> Path:
    """Random-init ``Qwen3MoeForCausalLM`` plus tokenizer, saved to ``directory``
    (meta init, filled in chunks on all cores: the medium size builds in seconds)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = tokenizer or train_tokenizer()
    config = Qwen3MoeConfig(
        **{**QWEN3_TINY, **config_overrides},
        vocab_size=len(tokenizer),
        pad_token_id=0,
        eos_token_id=1,
        dtype=dtype,
    )
    model = random_init_model(Qwen3MoeForCausalLM, config, dtype, seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


FAMILIES = {
    "glm4": dict(
        sizes=GLM4_SIZES,
        build=build_tiny_glm4_moe,
        block_class=modeling_glm4_moe.Glm4MoeMoE,
        # the registered calibration module replaces the whole block
        timed_classes=[modeling_glm4_moe.Glm4MoeMoE, CalibrationGlm4MoeMoE],
        default_top_k=2,
    ),
    "qwen3_moe": dict(
        sizes=QWEN3_SIZES,
        build=build_qwen3_moe,
        block_class=modeling_qwen3_moe.Qwen3MoeSparseMoeBlock,
        # the generic path keeps the block (its forward is timed either way)
        timed_classes=[modeling_qwen3_moe.Qwen3MoeSparseMoeBlock],
        default_top_k=QWEN3_TINY["num_experts_per_tok"],
    ),
}

AUTO, ONE_CALL = "auto", 1 << 30
DEFAULT = "default"  # MoECalibrationModifier() with every field at its default
CALLS = {"batched_expert_statistics": False}
# name -> (our mode, DEFAULT, or None for upstream alone; upstream flag; GPTQ class;
# chunk; GPTQ fields)
VARIANTS = {
    "upstream all": (None, True, GPTQModifier, AUTO, {}),
    "upstream routed": (None, False, GPTQModifier, AUTO, {}),
    "ours routed": ("routed", False, GPTQModifier, AUTO, {}),
    # MoECalibrationModifier() with plain GPTQModifier: the default mode's token
    # choice, unweighted (sessions before 6: affinity:0.1 with a floor); the
    # shipped recipes' default is "ours weighted:2+shared"
    "ours default": (DEFAULT, True, GPTQModifier, AUTO, {}),
    "ours all": ("all", True, GPTQModifier, AUTO, {}),
    # experts computed from their weights, down_proj inputs handed over
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
    # routing-weighted Hessians per expert (gate/up shared within an expert)
    "ours weighted:2+shared": (
        "weighted:2",
        True,
        SharedHessianGPTQModifier,
        AUTO,
        {},
    ),
    "ours top_k:2x": ("top_k:{2k}", False, GPTQModifier, AUTO, {}),
    "ours min_tokens:64": ("min_tokens:64", False, GPTQModifier, AUTO, {}),
    "ours affinity": ("affinity", False, GPTQModifier, AUTO, {}),
}
DEFAULT_VARIANTS = {
    "glm4": list(VARIANTS),
    "qwen3_moe": [
        "upstream all",
        "upstream routed",
        "ours routed",
        "ours all+shared",
        "ours default",
        "ours weighted:2+shared",
    ],
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


def make_recipe(variant: str, top_k: int) -> tuple[list, bool]:
    """The recipe for ``variant`` and oneshot's ``moe_calibrate_all_experts``."""
    mode, upstream_flag, gptq_cls, chunk_size, gptq_fields = VARIANTS[variant]
    recipe = [
        gptq_cls(targets=["Linear"], scheme="W4A16", ignore=["lm_head"], **gptq_fields)
    ]
    if mode == DEFAULT:
        recipe.insert(0, MoECalibrationModifier())
    elif mode is not None:
        mode = mode.replace("{2k}", str(2 * top_k))
        recipe.insert(
            0,
            MoECalibrationModifier(mode=mode, chunk_size=chunk_size, rtn_fallback=True),
        )
    return recipe, upstream_flag


def run_variant(model_dir, tokenizer, data, size, family, variant, timer, top_k):
    mode = VARIANTS[variant][0]
    recipe, upstream_flag = make_recipe(variant, top_k)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=size["dtype"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    rows: dict[str, int] = {}

    def counter(name):
        def hook(_module, args):
            if not HooksMixin._HOOKS_DISABLED:
                rows[name] += args[0].reshape(-1, args[0].shape[-1]).shape[0]

        return hook

    # linearized here (oneshot would do it first thing) so rows can be counted.
    # Ours report them (tested equal to what the Linears see); hooks would also
    # stop our weight-computed forwards, which bypass only unobserved Linears.
    linearize_moe(model)
    if mode is None:
        for name, module in model.named_modules():
            if ".experts." in name and name.endswith(".gate_proj"):
                rows[name] = 0  # experts never called count as 0
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
    routed = None
    if mode is not None:
        report = last_coverage_report()
        blocks = report.blocks if report is not None else []
        rows = {
            f"{block.name}.{expert}": count
            for block in blocks
            for expert, count in enumerate(block.calibrated)
        }
        routed = [count for block in blocks for count in block.routed]
    elif not upstream_flag:
        routed = list(rows.values())
    block_class = FAMILIES[family]["block_class"]
    moe_blocks = sum(isinstance(m, block_class) for m in model.modules())
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
    batches = max(moe_blocks * len(data), 1)
    return {
        "seconds": seconds,
        "moe_forward_seconds": timer.seconds,
        "calibration_passes": timer.calibration_calls / batches,
        "propagation_passes": timer.propagation_calls / batches,
        "peak_gpu_bytes": peak_gpu,
        "peak_rss_above_start_bytes": rss.peak_above_start,
        "expert_rows_min": min(rows.values(), default=0),
        "expert_rows_max": max(rows.values(), default=0),
        "experts_with_rows": sum(1 for count in rows.values() if count),
        "experts_without_rows": sum(1 for count in rows.values() if not count),
        "experts_without_routed_tokens": (
            None if routed is None else sum(1 for count in routed if not count)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-family", choices=FAMILIES, default="glm4")
    parser.add_argument("--size", choices=["tiny", "medium"], default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variants", nargs="+", default=None, help="default: the family's list"
    )
    parser.add_argument(
        "--warmup-samples",
        type=int,
        default=8,
        help="samples of the 'ours all' warm-up run (0: none)",
    )
    parser.add_argument("--out", default="benchmarks/oneshot_variants.json")
    args = parser.parse_args()
    family = FAMILIES[args.model_family]
    size = family["sizes"][args.size]
    variants = args.variants or DEFAULT_VARIANTS[args.model_family]
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")

    tokenizer = train_tokenizer()
    data = tokenize_for_calibration(
        tokenizer, stdlib_texts(skip_files=40), size["samples"], size["seq_len"]
    )
    timer = BlockTimer(family["timed_classes"])
    top_k = size["config"].get("num_experts_per_tok", family["default_top_k"])
    results = {}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = family["build"](
            Path(scratch) / "model",
            tokenizer=tokenizer,
            dtype=size["dtype"],
            **size["config"],
        )
        print(f"model built in {time.perf_counter() - began:.1f} s", flush=True)
        if args.warmup_samples:
            warmup = data.select(range(min(args.warmup_samples, len(data))))
            run_variant(
                model_dir,
                tokenizer,
                warmup,
                size,
                args.model_family,
                "ours all",
                timer,
                top_k,
            )
        # round-robin repeats, so drift of the machine hits every variant alike
        runs = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name in variants:
                run = run_variant(
                    model_dir,
                    tokenizer,
                    data,
                    size,
                    args.model_family,
                    name,
                    timer,
                    top_k,
                )
                runs[name].append(run)
                print(name, json.dumps(run), flush=True)
        for name, variant_runs in runs.items():
            results[name] = summarize(variant_runs)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"\nfamily={args.model_family} size={args.size} device={device} "
        f"repeats={args.repeats} total {time.perf_counter() - began:.0f} s"
    )
    print_table(results)
    Path(args.out).write_text(
        json.dumps(
            {
                "family": args.model_family,
                "size": args.size,
                "device": device,
                "repeats": args.repeats,
                "results": results,
            },
            indent=2,
        )
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
        f"{'variant':<23} {'oneshot s':>9} {'x up-rt':>7} {'x up-all':>8} "
        f"{'MoE fwd s':>9} {'passes':>6} {'prop':>5} {'GPU GiB':>8} "
        f"{'x up-rt':>7} {'x up-all':>8} {'RSS+ GiB':>8} {'rows min':>8} "
        f"{'rows max':>8} {'0-row':>5}"
    )
    for name, r in results.items():
        gib = (r["peak_gpu_bytes"] or 0) / 2**30
        print(
            f"{name:<23} {r['seconds']:>9.2f} "
            f"{_ratio(r['seconds'], up_routed, 'seconds'):>7} "
            f"{_ratio(r['seconds'], up_all, 'seconds'):>8} "
            f"{r['moe_forward_seconds']:>9.2f} {r['calibration_passes']:>6.2f} "
            f"{r['propagation_passes']:>5.2f} {gib:>8.2f} "
            f"{_ratio(r['peak_gpu_bytes'], up_routed, 'peak_gpu_bytes'):>7} "
            f"{_ratio(r['peak_gpu_bytes'], up_all, 'peak_gpu_bytes'):>8} "
            f"{r['peak_rss_above_start_bytes'] / 2**30:>8.2f} "
            f"{r['expert_rows_min']:>8} {r['expert_rows_max']:>8} "
            f"{r['experts_without_rows']:>5}"
        )


def _ratio(value, baseline: dict | None, key: str) -> str:
    if not baseline or not value or not baseline.get(key):
        return "-"
    return f"{value / baseline[key]:.2f}"


if __name__ == "__main__":
    main()
