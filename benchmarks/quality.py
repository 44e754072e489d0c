"""Calibration-mode quality: held-out perplexity after W4A16 quantization of a small
GLM4-MoE trained here on the Python standard library's source.

Three steps, one command each (``--help`` on each for options):

    python benchmarks/quality.py train --model-dir /tmp/glm4-trained
    python benchmarks/quality.py sweep --model-dir /tmp/glm4-trained \\
        --out benchmarks/quality.jsonl --jobs 8
    python benchmarks/quality.py report benchmarks/quality.jsonl [--timing T.jsonl]

``train`` fits a 32-expert top-4 GLM4-MoE (group-limited sigmoid router, shared
expert) with DeepSeek-V3-style bias balancing, so the router is balanced the way real
GLM4 checkpoints are. Files are split three ways: training, calibration (never
trained on) and held-out evaluation. ``sweep`` quantizes the trained model for every
(algorithm, calibration budget, seed, mode) with the shipped recipes, appending one
JSON line per run (perplexity, oneshot seconds, expert coverage); it resumes where a
file left off. ``report`` prints the table and checks the recommended-default rule of
issue 5 (no worse than the better of routed and all at every budget within one seed
spread, strictly better than both somewhere, at most 1.2x routed's oneshot time).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

# of every 10 standard-library files (sorted by path): 7 train, 2 calibrate, 1 eval
SPLIT = {"train": range(0, 7), "calibration": range(7, 9), "eval": range(9, 10)}
SEQ_LEN = 64
EVAL_WINDOWS = 128
BUDGETS = (128, 512, 2048, 16384)
MODES = ("routed", "all", "top_k:8", "min_tokens:64", "affinity:0.1", "affinity:0.25")
ALGORITHMS = ("gptq", "awq")
RECIPES = {"gptq": "glm4_moe_w4a16_gptq", "awq": "glm4_moe_w4a16_awq"}


def model_config(vocab_size: int):
    from llmcompressor_moe_plugins.tiny import tiny_glm4_moe_config

    return tiny_glm4_moe_config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
    )


def files(part: str) -> list[str]:
    """Standard-library source (packages included, tests and GUI code left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip")
    paths = sorted(
        p
        for p in root.rglob("*.py")
        if p.stat().st_size > 4000
        and not any(
            d.startswith("test") or d in skip for d in p.relative_to(root).parts[:-1]
        )
    )
    if len(paths) < 100:
        sys.exit(f"need 100 standard-library files, found {len(paths)} under {root}")
    return [
        p.read_text(encoding="utf-8", errors="replace")
        for i, p in enumerate(paths)
        if i % 10 in SPLIT[part]
    ]


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    return torch.tensor(ids)


# -- train -------------------------------------------------------------------------


def train(args) -> None:
    from transformers import Glm4MoeForCausalLM

    from llmcompressor_moe_plugins.tiny import train_tokenizer

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = train_tokenizer(vocab_size=1024, max_files=60)
    stream = token_stream(tokenizer, files("train"))
    model = Glm4MoeForCausalLM(model_config(len(tokenizer))).to(device)
    routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    loads: list[torch.Tensor] = []
    for router in routers:
        router.register_forward_hook(
            lambda _m, _a, out: loads.append(
                torch.bincount(out[2].flatten(), minlength=_m.num_experts)
            )
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05
    )
    window = args.seq_len
    start = time.perf_counter()
    for step in range(args.steps):
        offsets = torch.randint(0, len(stream) - window, (args.batch,))
        batch = torch.stack([stream[o : o + window] for o in offsets]).to(device)
        loads.clear()
        # transformers shifts the labels itself
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        # auxiliary-loss-free balancing: nudge under-used experts up
        with torch.no_grad():
            for router, load in zip(routers, loads[-len(routers) :], strict=True):
                load = load.float()
                router.e_score_correction_bias += args.bias_rate * torch.sign(
                    load.mean() - load
                )
        if step % 100 == 0 or step == args.steps - 1:
            seconds = time.perf_counter() - start
            print(f"step {step} loss {loss.item():.3f} {seconds:.0f}s", flush=True)
    model.eval()
    out = Path(args.model_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved to {out}")


# -- sweep -------------------------------------------------------------------------


@functools.cache
def part_stream(model_dir: str, part: str) -> torch.Tensor:
    """The model's tokens for one file split; a sweep worker reuses it across runs."""
    from transformers import AutoTokenizer

    return token_stream(AutoTokenizer.from_pretrained(model_dir), files(part))


def eval_windows(model_dir: str) -> torch.Tensor:
    stream = part_stream(model_dir, "eval")
    step = (len(stream) - SEQ_LEN * 2) // EVAL_WINDOWS
    return torch.stack(
        [stream[i * step : i * step + SEQ_LEN * 2] for i in range(EVAL_WINDOWS)]
    )


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    device = next(model.parameters()).device
    losses = []
    for batch in windows.split(32):
        batch = batch.to(device)
        losses.append(model(input_ids=batch, labels=batch).loss.float().item())
    return math.exp(statistics.fmean(losses))


def calibration_dataset(model_dir: str, budget: int, seed: int):
    from datasets import Dataset

    stream = part_stream(model_dir, "calibration")
    generator = torch.Generator().manual_seed(seed)
    count = budget // SEQ_LEN
    offsets = torch.randint(0, len(stream) - SEQ_LEN, (count,), generator=generator)
    windows = [stream[o : o + SEQ_LEN].tolist() for o in offsets]
    return Dataset.from_dict(
        {"input_ids": windows, "attention_mask": [[1] * SEQ_LEN] * count}
    )


def mode_settings(mode: str) -> dict:
    """``default``: the plugin's default (affinity:0.1 with its floor); ``M+floor:K``:
    mode M with a floor of K tokens per expert; else the mode alone (no floor)."""
    if mode == "default":
        return {}
    spec, _, floor = mode.partition("+floor:")
    return {"mode": spec, **({"floor": int(floor)} if floor else {})}


def recipe_file(algorithm: str, mode: str, directory: str) -> str:
    import yaml

    from llmcompressor_moe_plugins import recipes

    recipe = yaml.safe_load(recipes.get(RECIPES[algorithm]))
    modifiers = recipe["default_stage"]["default_modifiers"]
    # starved experts under routed calibration: quantize them round-to-nearest and
    # report it, as a user would, instead of failing the run
    modifiers["MoECalibrationModifier"] = {**mode_settings(mode), "rtn_fallback": True}
    path = Path(directory) / f"{algorithm}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _quiet_worker() -> None:
    # oneshot re-configures its logger on every call; silence the process instead
    os.environ["TQDM_DISABLE"] = "1"
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


def run_one(job: dict) -> dict:
    try:
        return _run_one(job)
    except Exception as error:  # one failed setting must not end the sweep
        keys = ("algorithm", "budget", "seed", "mode")
        return {**{k: job[k] for k in keys}, "error": repr(error)}


def _run_one(job: dict) -> dict:
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor_moe_plugins import last_coverage_report
    from llmcompressor_moe_plugins.compat import cpu_only_calibration

    torch.set_num_threads(job["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    data = calibration_dataset(job["model_dir"], job["budget"], job["seed"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    model.to(device)
    with tempfile.TemporaryDirectory() as scratch, cpu_only_calibration():
        start = time.perf_counter()
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=data,
            recipe=recipe_file(job["algorithm"], job["mode"], scratch),
            num_calibration_samples=len(data),
            max_seq_length=SEQ_LEN,
            log_dir=None,
        )
        seconds = time.perf_counter() - start
    report = last_coverage_report()
    calibrated = [n for block in report.blocks for n in block.calibrated]
    return {
        **{k: job[k] for k in ("algorithm", "budget", "seed", "mode")},
        "ppl": perplexity(model.to(device), eval_windows(job["model_dir"])),
        "oneshot_s": seconds,
        "tokens_min": min(calibrated),
        "tokens_median": statistics.median(calibrated),
        "experts_below_16": sum(n < 16 for n in calibrated),
        "rtn_fallback_experts": len(report.rtn_fallback),
    }


def sweep(args) -> None:
    from multiprocessing import get_context

    from transformers import AutoModelForCausalLM

    out = Path(args.out)
    done = set()
    for line in _lines(out):
        r = json.loads(line)
        if not r.get("baseline"):
            done.add((r["algorithm"], r["budget"], r["seed"], r["mode"]))
    if not any(json.loads(line).get("baseline") for line in _lines(out)):
        model = AutoModelForCausalLM.from_pretrained(args.model_dir)
        ppl = perplexity(model, eval_windows(args.model_dir))
        _append(out, {"baseline": True, "ppl": ppl})
        print(f"unquantized held-out perplexity {ppl:.3f}")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [
        dict(
            algorithm=a,
            budget=b,
            seed=s,
            mode=m,
            model_dir=args.model_dir,
            threads=threads,
        )
        for a, b, s, m in itertools.product(
            args.algorithms, args.budgets, range(args.seeds), args.modes
        )
        if (a, b, s, m) not in done
    ]
    print(f"{len(jobs)} runs to do, {args.jobs} at a time")
    with get_context("spawn").Pool(args.jobs, initializer=_quiet_worker) as pool:
        for result in pool.imap_unordered(run_one, jobs):
            if "error" not in result:
                _append(out, result)
            print(json.dumps(result), flush=True)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _append(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


# -- report ------------------------------------------------------------------------


def report(args) -> None:
    records = [json.loads(line) for line in _lines(Path(args.results))]
    if args.timing:
        # times from a separate uncontended sweep (--jobs 1) replace the main
        # sweep's, which ran settings side by side
        timed = {}
        for line in _lines(Path(args.timing)):
            r = json.loads(line)
            if not r.get("baseline"):
                timed[r["algorithm"], r["budget"], r["mode"]] = r["oneshot_s"]
        for r in records:
            if not r.get("baseline"):
                key = (r["algorithm"], r["budget"], r["mode"])
                r["oneshot_s"] = timed.get(key, float("nan"))
    baseline = next(r["ppl"] for r in records if r.get("baseline"))
    runs = [r for r in records if not r.get("baseline")]
    print(f"unquantized held-out perplexity: {baseline:.3f}")
    for algorithm in sorted({r["algorithm"] for r in runs}):
        subset = [r for r in runs if r["algorithm"] == algorithm]
        budgets = sorted({r["budget"] for r in subset})
        modes = [m for m in MODES if any(r["mode"] == m for r in subset)]
        modes += sorted({r["mode"] for r in subset} - set(modes))
        cell: dict[tuple, dict] = {}
        for mode, budget in itertools.product(modes, budgets):
            rs = [r for r in subset if r["mode"] == mode and r["budget"] == budget]
            if not rs:
                continue
            increase = [100 * (r["ppl"] / baseline - 1) for r in rs]
            cell[mode, budget] = {
                "mean": statistics.fmean(increase),
                "min": min(increase),
                "max": max(increase),
                "spread": max(increase) - min(increase),
                "seconds": statistics.fmean(r["oneshot_s"] for r in rs),
                "min_tokens": min(r["tokens_min"] for r in rs),
                "seeds": len(rs),
            }
        print(f"\n{algorithm.upper()} W4A16: perplexity increase over unquantized, %")
        print("mean [min..max over seeds]; time = mean oneshot s / routed's")
        header = f"{'mode':<15}" + "".join(f"{b:>26}" for b in budgets)
        print(header)
        for mode in modes:
            row = f"{mode:<15}"
            for budget in budgets:
                c = cell.get((mode, budget))
                if c is None:
                    row += f"{'-':>26}"
                    continue
                routed = cell.get(("routed", budget))
                ratio = c["seconds"] / routed["seconds"] if routed else float("nan")
                row += (
                    f"{c['mean']:>+7.2f} [{c['min']:+.2f}..{c['max']:+.2f}] "
                    f"{ratio:>4.2f}x"
                )
            print(row)
        print("min tokens per expert (over seeds):")
        for mode in modes:
            print(
                f"{mode:<15}"
                + "".join(
                    f"{cell[mode, b]['min_tokens']:>26}" if (mode, b) in cell else ""
                    for b in budgets
                )
            )
        _verdict(cell, modes, budgets)


def _verdict(cell, modes, budgets) -> None:
    """Issue 5's rule for a recommended default."""
    for mode in modes:
        if mode in ("routed", "all"):
            continue
        ok_everywhere, better_somewhere, slowest = True, False, 0.0
        timed_budgets = 0
        for budget in budgets:
            c = cell.get((mode, budget))
            routed, all_ = cell.get(("routed", budget)), cell.get(("all", budget))
            if not (c and routed and all_):
                ok_everywhere = False
                continue
            best = min(routed, all_, key=lambda x: x["mean"])
            if c["mean"] > best["mean"] + max(c["spread"], best["spread"]):
                ok_everywhere = False
            if c["mean"] < routed["mean"] and c["mean"] < all_["mean"]:
                better_somewhere = True
            ratio = c["seconds"] / routed["seconds"]
            if not math.isnan(ratio):
                slowest = max(slowest, ratio)
                timed_budgets += 1
        verdict = ok_everywhere and better_somewhere and slowest <= 1.2
        print(
            f"  {mode:<15} no worse than best everywhere: {ok_everywhere}; "
            f"better than both somewhere: {better_somewhere}; "
            f"time <= 1.2x routed: {slowest <= 1.2} ({slowest:.2f}x at worst of "
            f"{timed_budgets} timed budgets) -> "
            f"{'MEETS' if verdict else 'fails'} the default rule"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train the benchmark model")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bias-rate", type=float, default=1e-3)
    p = commands.add_parser("sweep", help="quantize in every setting")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", default="benchmarks/quality.jsonl")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    p = commands.add_parser("report", help="print the table from a sweep's results")
    p.add_argument("results")
    p.add_argument("--timing", help="uncontended sweep whose times to use instead")
    args = parser.parse_args()
    {"train": train, "sweep": sweep, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
