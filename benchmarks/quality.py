"""Calibration-mode quality: held-out perplexity and top-1 agreement with the
unquantized model after W4A16 (or W3A16, ``--algorithms gptq_w3``) quantization of
small GLM4-MoEs trained here.

Two models (``--kind``), so modes are not tuned to one model or one distribution:

- ``code``: 32 experts top-4, 4 layers, group-limited router balanced by
  DeepSeek-V3-style bias updates, trained on the Python standard library's source;
- ``text``: GLM-4.5-Air's ratios in miniature (64 experts top-8, one group, one
  shared expert, expert width a third of hidden, a dense first layer), 6 layers,
  a weakly balanced and so skewed router, trained on English text: the docstrings
  of the installed ``transformers`` package, up to 2048-token windows.

Three steps, one command each (``--help`` on each for options):

    python benchmarks/quality.py train --kind text --model-dir /tmp/text-moe
    python benchmarks/quality.py sweep --model-dir /tmp/text-moe \\
        --out benchmarks/quality.jsonl --jobs 8 --budgets 16x512 256x2048
    python benchmarks/quality.py report benchmarks/quality.jsonl [--timing T.jsonl]

Files are split three ways: training, calibration (never trained on) and
held-out evaluation. A budget is ``SAMPLESxTOKENS`` (a bare number of tokens means
windows of 64 tokens, as the first sweeps used).

``sweep`` quantizes the trained model for every (algorithm, budget, seed, mode) with
the shipped recipes (GPTQ as ``SharedHessianGPTQModifier``, which weighted modes
need), appending one JSON line per run (perplexity, top-1 agreement, oneshot
seconds, expert coverage); it resumes where a file left off. ``report`` prints the
tables of every model and checks issue 14's rule for the default.
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
SEQ_LEN = 64  # windows of a bare-number budget
EVAL_WINDOWS = 128
BUDGETS = ("2x64", "32x64", "64x256", "256x256")
MODES = ("routed", "all", "affinity:0.1+floor:16", "weighted:1", "weighted:2")
ALGORITHMS = ("gptq", "awq")
RECIPES = {
    "gptq": "glm4_moe_w4a16_gptq",
    "awq": "glm4_moe_w4a16_awq",
    "gptq_w3": "glm4_moe_w4a16_gptq",  # the same recipe with 3-bit weights
}
SCHEME_LABELS = {
    "gptq": "GPTQ W4A16 g128",
    "awq": "AWQ W4A16 g128",
    "gptq_w3": "GPTQ W3A16 g128",
}
# a harsher scheme, where calibration matters more (issue 22)
W3A16_GROUPS = {
    "group_0": {
        "targets": ["Linear"],
        "weights": {
            "num_bits": 3,
            "type": "int",
            "symmetric": True,
            "strategy": "group",
            "group_size": 128,
        },
    }
}


def model_config(kind: str, vocab_size: int):
    from llmcompressor_moe_plugins.tiny import tiny_glm4_moe_config

    if kind == "code":
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
    # GLM-4.5-Air: 128 experts top-8, n_group 1, moe width 1408 of hidden 4096,
    # routed_scaling_factor 1.0 (real_configs/glm-4.5-air.json)
    return tiny_glm4_moe_config(
        vocab_size=vocab_size,
        hidden_size=384,
        intermediate_size=1024,
        moe_intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        n_routed_experts=64,
        num_experts_per_tok=8,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        max_position_embeddings=2048,
    )


def parse_budget(budget: str | int) -> tuple[int, int]:
    """``"256x2048"`` -> (256, 2048); a bare token count -> windows of SEQ_LEN."""
    text = str(budget)
    if "x" in text:
        samples, _, length = text.partition("x")
        return int(samples), int(length)
    return int(text) // SEQ_LEN, SEQ_LEN


def model_kind(model_dir: str) -> str:
    marker = Path(model_dir) / "quality_kind.txt"
    return marker.read_text().strip() if marker.exists() else "code"


def texts(kind: str, part: str) -> list[str]:
    return files(part) if kind == "code" else docstrings(part)


def docstrings(part: str) -> list[str]:
    """English text: the docstrings of the installed ``transformers`` package, one
    text per source file, split by file like ``files``."""
    import ast

    import transformers

    root = Path(transformers.__file__).parent
    out = []
    for i, path in enumerate(sorted(root.rglob("*.py"))):
        if i % 10 not in SPLIT[part]:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        nodes = [tree] + [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
        ]
        found = [d for n in nodes if (d := ast.get_docstring(n)) and len(d) > 80]
        if found:
            out.append("\n\n".join(found))
    if len(out) < 50:
        sys.exit(f"need docstrings of 50 transformers files, found {len(out)}")
    return out


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

    from llmcompressor_moe_plugins.tiny import train_bpe_tokenizer, train_tokenizer

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    corpus = texts(args.kind, "train")
    if args.kind == "code":
        tokenizer = train_tokenizer(vocab_size=1024, max_files=60)
    else:
        tokenizer = train_bpe_tokenizer(corpus, vocab_size=2048)
    stream = token_stream(tokenizer, corpus)
    print(f"{args.kind}: {len(stream)} training tokens", flush=True)
    model = Glm4MoeForCausalLM(model_config(args.kind, len(tokenizer))).to(device)
    routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    loads: list[torch.Tensor] = []
    loads_history: list[list[torch.Tensor]] = [[] for _ in routers]
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
            for index, (router, load) in enumerate(
                zip(routers, loads[-len(routers) :], strict=True)
            ):
                if step >= args.steps - 50:
                    loads_history[index].append(load.cpu())
                load = load.float()
                router.e_score_correction_bias += args.bias_rate * torch.sign(
                    load.mean() - load
                )
        if step % 100 == 0 or step == args.steps - 1:
            seconds = time.perf_counter() - start
            print(f"step {step} loss {loss.item():.3f} {seconds:.0f}s", flush=True)
    model.eval()
    # how skewed the trained routers are over the last 50 steps' loads
    skew = []
    for index, history in enumerate(loads_history):
        share = torch.stack(history).sum(0).float()
        share = share / share.sum()
        top_tenth = share.sort(descending=True).values[: max(1, len(share) // 10)]
        skew.append(
            f"router {index}: top-10% experts take {top_tenth.sum():.0%} of tokens, "
            f"least-used expert {share.min() * len(share):.2f}x the mean"
        )
    print("\n".join(skew))
    out = Path(args.model_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "quality_kind.txt").write_text(args.kind)
    print(f"saved to {out}")


# -- sweep -------------------------------------------------------------------------


@functools.cache
def part_stream(model_dir: str, part: str) -> torch.Tensor:
    """The model's tokens for one file split; a sweep worker reuses it across runs."""
    from transformers import AutoTokenizer

    cached = Path(model_dir) / f"stream_{part}.pt"
    if cached.exists():
        return torch.load(cached)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = token_stream(tokenizer, texts(model_kind(model_dir), part))
    partial = cached.with_suffix(f".{os.getpid()}.tmp")
    torch.save(stream, partial)
    os.replace(partial, cached)  # workers racing here write the same tensor
    return stream


def eval_windows(model_dir: str) -> torch.Tensor:
    stream = part_stream(model_dir, "eval")
    length = SEQ_LEN * 2 if model_kind(model_dir) == "code" else 512
    step = (len(stream) - length) // EVAL_WINDOWS
    return torch.stack(
        [stream[i * step : i * step + length] for i in range(EVAL_WINDOWS)]
    )


@torch.no_grad()
def evaluate(model, windows: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Held-out perplexity and the next-token predictions (argmax) on every
    position of the evaluation windows."""
    device = next(model.parameters()).device
    losses, predictions = [], []
    for batch in windows.split(16):
        batch = batch.to(device)
        output = model(input_ids=batch, labels=batch)
        losses.append(output.loss.float().item())
        predictions.append(output.logits.argmax(dim=-1).cpu())
    return math.exp(statistics.fmean(losses)), torch.cat(predictions)


def baseline_predictions_path(model_dir: str) -> Path:
    return Path(model_dir) / "baseline_top1.pt"


def baseline_ppl(model_dir: str) -> float:
    """The unquantized model's held-out perplexity: every run records it, so the
    report pairs each run with the model it quantized, even across retrainings."""
    return float((Path(model_dir) / "baseline_ppl.txt").read_text())


def calibration_dataset(model_dir: str, budget: str, seed: int):
    from datasets import Dataset

    samples, length = parse_budget(budget)
    stream = part_stream(model_dir, "calibration")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(stream) - length, (samples,), generator=generator)
    windows = [stream[o : o + length].tolist() for o in offsets]
    return Dataset.from_dict(
        {"input_ids": windows, "attention_mask": [[1] * length] * samples}
    )


def mode_settings(mode: str) -> dict:
    """``default``: the plugin's default mode with its floor; ``M+floor:K``: mode M
    with a floor of K tokens per expert; else the mode with its own default floor
    (16 for weighted modes, none for the others)."""
    if mode == "default":
        return {}
    spec, _, floor = mode.partition("+floor:")
    return {"mode": spec, **({"floor": int(floor)} if floor else {})}


def recipe_file(algorithm: str, mode: str, directory: str) -> str:
    import yaml

    from llmcompressor_moe_plugins import recipes

    recipe = yaml.safe_load(recipes.get(RECIPES[algorithm]))
    modifiers = recipe["default_stage"]["default_modifiers"]
    if "GPTQModifier" in modifiers:
        # the same GPTQ, with the Hessians weighted modes need (and shared ones in
        # mode all: the same statistics up to rounding)
        modifiers["SharedHessianGPTQModifier"] = modifiers.pop("GPTQModifier")
    if algorithm == "gptq_w3":
        gptq = modifiers["SharedHessianGPTQModifier"]
        del gptq["scheme"]
        gptq["config_groups"] = W3A16_GROUPS
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
    from llmcompressor_moe_plugins.upstream.compat import cpu_only_calibration

    torch.set_num_threads(job["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    data = calibration_dataset(job["model_dir"], job["budget"], job["seed"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    model.to(device)
    _, length = parse_budget(job["budget"])
    with tempfile.TemporaryDirectory() as scratch, cpu_only_calibration():
        start = time.perf_counter()
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=data,
            recipe=recipe_file(job["algorithm"], job["mode"], scratch),
            num_calibration_samples=len(data),
            max_seq_length=length,
            log_dir=None,
        )
        seconds = time.perf_counter() - start
    report = last_coverage_report()
    calibrated = [n for block in report.blocks for n in block.calibrated]
    ppl, predictions = evaluate(model.to(device), eval_windows(job["model_dir"]))
    baseline = torch.load(baseline_predictions_path(job["model_dir"]))
    return {
        **{k: job[k] for k in ("algorithm", "budget", "seed", "mode")},
        "model": model_kind(job["model_dir"]),
        "base_ppl": baseline_ppl(job["model_dir"]),
        "ppl": ppl,
        "top1_agreement": float((predictions == baseline).float().mean()),
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
    kind = model_kind(args.model_dir)
    done = set()
    for line in _lines(out):
        r = json.loads(line)
        if not r.get("baseline") and r.get("model", "code") == kind:
            done.add((r["algorithm"], str(r["budget"]), r["seed"], r["mode"]))
    for part in ("calibration", "eval"):
        part_stream(args.model_dir, part)  # cached in the model directory once
    if not baseline_predictions_path(args.model_dir).exists():
        model = AutoModelForCausalLM.from_pretrained(args.model_dir)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ppl, predictions = evaluate(model.to(device), eval_windows(args.model_dir))
        torch.save(predictions, baseline_predictions_path(args.model_dir))
        (Path(args.model_dir) / "baseline_ppl.txt").write_text(repr(ppl))
        kind = model_kind(args.model_dir)
        _append(out, {"baseline": True, "model": kind, "ppl": ppl})
        print(f"{kind}: unquantized held-out perplexity {ppl:.3f}")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [
        dict(
            algorithm=a,
            budget=str(b),
            seed=s,
            mode=m,
            model_dir=args.model_dir,
            threads=threads,
        )
        for a, b, s, m in itertools.product(
            args.algorithms, args.budgets, range(args.seeds), args.modes
        )
        if (a, str(b), s, m) not in done
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
    baselines, runs = load_results(args.results)
    if args.timing:
        # times from a separate uncontended sweep (--jobs 1) replace the main
        # sweep's, which ran settings side by side
        timed = {}
        for line in _lines(Path(args.timing)):
            r = json.loads(line)
            if not r.get("baseline"):
                key = (r["algorithm"], _budget_label(r["budget"]), r["mode"])
                timed[key] = r["oneshot_s"]
        for r in runs:
            r["oneshot_s"] = timed.get(
                (r["algorithm"], r["budget"], r["mode"]), float("nan")
            )
    cells: dict[tuple, dict] = {}  # (algorithm, model, mode, budget) -> stats
    for kind, baseline in baselines.items():
        of_model = [r for r in runs if r["model"] == kind]
        print(f"\n## model {kind}: unquantized held-out perplexity {baseline:.3f}")
        for algorithm in sorted({r["algorithm"] for r in of_model}):
            subset = [r for r in of_model if r["algorithm"] == algorithm]
            budgets = sorted({r["budget"] for r in subset}, key=_budget_tokens)
            modes = [m for m in MODES if any(r["mode"] == m for r in subset)]
            modes += sorted({r["mode"] for r in subset} - set(modes))
            cell = {}
            for mode, budget in itertools.product(modes, budgets):
                rs = [r for r in subset if r["mode"] == mode and r["budget"] == budget]
                if rs:
                    cell[mode, budget] = _stats(rs, baseline)
                    cells[algorithm, kind, mode, budget] = cell[mode, budget]
            _table(algorithm, cell, modes, budgets)
    for algorithm in sorted({key[0] for key in cells}):
        _verdict(algorithm, cells)


def load_results(paths: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Every file's runs, each with the unquantized model it quantized.

    A run belongs to the model whose perplexity it records (``base_ppl``; older
    runs: the file's baseline line above it). A kind trained twice into different
    weights becomes two models (``text#1``, ``text#2``); trained into the same
    weights, one. A run found in several files (a cell finished by re-running its
    sweep) is counted once, and the report says whether it reproduced. Runs that
    record ``base_ppl`` need no baseline line in their file.
    """
    file_runs: list[tuple[float, dict]] = []
    for path in paths:
        file_baseline: dict[str, float] = {}
        for line in _lines(Path(path)):
            r = json.loads(line)
            kind = r.get("model", "code")
            if r.get("baseline"):
                file_baseline[kind] = r["ppl"]
                continue
            r["model"] = kind
            r["budget"] = _budget_label(r["budget"])
            base = r["base_ppl"] if "base_ppl" in r else file_baseline[kind]
            file_runs.append((base, r))
    trainings: dict[str, list[float]] = {}
    for base, r in file_runs:
        seen = trainings.setdefault(r["model"], [])
        if base not in seen:
            seen.append(base)
    names = {
        (kind, base): kind if len(bases) == 1 else f"{kind}#{index + 1}"
        for kind, bases in trainings.items()
        for index, base in enumerate(bases)
    }
    baselines = {names[key]: key[1] for key in sorted(names, key=names.get)}
    runs: dict[tuple, dict] = {}
    repeated, differing = 0, []
    for base, r in file_runs:
        r["model"] = names[r["model"], base]
        key = (r["model"], r["algorithm"], r["budget"], r["seed"], r["mode"])
        first = runs.setdefault(key, r)
        if first is not r:
            repeated += 1
            if (first["ppl"], first.get("top1_agreement")) != (
                r["ppl"],
                r.get("top1_agreement"),
            ):
                differing.append(f"{key}: ppl {first['ppl']:.4f} vs {r['ppl']:.4f}")
    if repeated:
        print(
            f"{repeated} runs appear more than once; "
            + (
                f"{len(differing)} did not reproduce (first kept): "
                + "; ".join(differing)
                if differing
                else "every repeat reproduced its perplexity and top-1 exactly"
            )
        )
    return baselines, list(runs.values())


def _budget_label(budget) -> str:
    samples, length = parse_budget(budget)
    return f"{samples}x{length}"


def _budget_tokens(label: str) -> int:
    samples, length = parse_budget(label)
    return samples * length


def _stats(rs: list[dict], baseline: float) -> dict:
    increase = [100 * (r["ppl"] / baseline - 1) for r in rs]
    agreement = [100 * r["top1_agreement"] for r in rs if "top1_agreement" in r]
    return {
        "mean": statistics.fmean(increase),
        "min": min(increase),
        "max": max(increase),
        "spread": max(increase) - min(increase),
        "agree": statistics.fmean(agreement) if agreement else float("nan"),
        "agree_spread": max(agreement) - min(agreement) if agreement else 0.0,
        "seconds": statistics.fmean(r["oneshot_s"] for r in rs),
        "min_tokens": min(r["tokens_min"] for r in rs),
        "seeds": len(rs),
    }


def _table(algorithm, cell, modes, budgets) -> None:
    label = SCHEME_LABELS.get(algorithm, algorithm)
    print(f"\n{label}: perplexity increase over unquantized, %")
    print("mean [min..max over seeds]; top-1 agreement with unquantized, %")
    print("(mean, spread); time = mean oneshot s / routed's")
    print(f"{'mode':<22}" + "".join(f"{b:>40}" for b in budgets) + f"{'mean':>8}")
    for mode in modes:
        row, means = f"{mode:<22}", []
        for budget in budgets:
            c = cell.get((mode, budget))
            if c is None:
                row += f"{'-':>40}"
                continue
            means.append(c["mean"])
            routed = cell.get(("routed", budget))
            ratio = c["seconds"] / routed["seconds"] if routed else float("nan")
            row += (
                f"{c['mean']:>+7.2f} [{c['min']:+.2f}..{c['max']:+.2f}] "
                f"{c['agree']:5.2f} ({c['agree_spread']:.2f}) {ratio:>4.2f}x"
            )
        mean = statistics.fmean(means) if len(means) == len(budgets) else float("nan")
        print(row + f"{mean:>8.2f}")
    print("min tokens per expert (over seeds):")
    for mode in modes:
        print(
            f"{mode:<22}"
            + "".join(
                f"{cell[mode, b]['min_tokens']:>40}" if (mode, b) in cell else ""
                for b in budgets
            )
        )


def _verdict(algorithm: str, cells: dict) -> None:
    """Issue 14's rule: the default is the mode with the lowest mean increase over
    both models and all budgets, provided it is never worse than the better of
    routed and all by more than one seed spread at any (model, budget)."""
    places = sorted(
        {(k[1], k[3]) for k in cells if k[0] == algorithm},
        key=lambda place: (place[0], _budget_tokens(place[1])),
    )
    modes = sorted({k[2] for k in cells if k[0] == algorithm})
    label = SCHEME_LABELS.get(algorithm, algorithm)
    print(f"\n{label}: the default rule over {len(places)} (model, budget)")
    ranked = []
    for mode in modes:
        here = [cells.get((algorithm, m, mode, b)) for m, b in places]
        if any(c is None for c in here):
            print(f"  {mode:<22} not run everywhere")
            continue
        worse_at = []
        for (kind, budget), c in zip(places, here, strict=True):
            candidates = [
                cells.get((algorithm, kind, base, budget)) for base in ("routed", "all")
            ]
            candidates = [x for x in candidates if x is not None]
            if not candidates:
                continue
            best = min(candidates, key=lambda x: x["mean"])
            if c["mean"] > best["mean"] + max(c["spread"], best["spread"]):
                worse_at.append(f"{kind} {budget} (+{c['mean'] - best['mean']:.2f})")
        mean = statistics.fmean(c["mean"] for c in here)
        agree = statistics.fmean(c["agree"] for c in here)
        ranked.append((mean, mode, not worse_at))
        print(
            f"  {mode:<22} mean increase {mean:+.3f}%, top-1 agreement {agree:.2f}%; "
            + (
                f"worse than best of routed/all at {', '.join(worse_at)}"
                if worse_at
                else "never worse than the best of routed/all beyond one spread"
            )
        )
    ranked.sort()
    if ranked:
        print(f"  lowest mean: {ranked[0][1]} ({ranked[0][0]:+.3f}%)")
    eligible = [mode for _, mode, never_worse in ranked if never_worse]
    print(
        f"  the default by the rule: {eligible[0]}"
        if eligible
        else "  no mode meets the whole rule"
    )
    print("  best mode per (model, budget), and its lead over the next:")
    for kind, budget in places:
        here = sorted(
            (c["mean"], m)
            for (a, k, m, b), c in cells.items()
            if (a, k, b) == (algorithm, kind, budget)
        )
        lead = here[1][0] - here[0][0] if len(here) > 1 else float("nan")
        print(
            f"    {kind} {budget}: {here[0][1]} ({here[0][0]:+.2f}), "
            f"{lead:.2f} ahead of {here[1][1] if len(here) > 1 else '-'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train the benchmark model")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--kind", choices=("code", "text"), default="code")
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
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument(
        "--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(RECIPES)
    )
    p = commands.add_parser("report", help="print the table from a sweep's results")
    p.add_argument("results", nargs="+")
    p.add_argument("--timing", help="uncontended sweep whose times to use instead")
    args = parser.parse_args()
    {"train": train, "sweep": sweep, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
