"""oneshot on GLM-4.5-Air's real layer shapes: upstream llmcompressor vs ours.

Model: ``Glm4MoeForCausalLM`` with GLM-4.5-Air's layer shapes (hidden 4096, 96
query / 8 key-value heads of 128, partial rotary 0.5, qkv bias, no q/k norm; layer
0 dense with MLP width 10944; then ``--moe-layers`` MoE layers of 128 routed experts
top-8 (moe_intermediate 1408, n_group 1, topk_group 1, norm_topk_prob, routed
scaling 1.0) plus 1 shared expert), bf16, random weights, and the package's tiny
byte-level BPE tokenizer (vocab 512: the embedding and ``lm_head`` are the only
shapes that are not real). Each router's ``e_score_correction_bias`` is uneven, as
trained GLM routers' are: normal(0, ``--bias-std``), and ``--dead-experts`` experts
per layer at -1 (below every other expert's choice score), so routed-only
calibration leaves several experts with no token at any budget. Router weights have
std 1/sqrt(hidden) (unit-scale logits); everything else std 0.02.

The model is built once (meta init, then filled in bf16 chunks on all cores) and
saved to ``--model-dir`` (reused when its settings match). Each variant run is a
fresh subprocess that loads it on the CPU as users do
(``AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)``, no
``device_map``) and calls ``oneshot``; GPTQ gets llmcompressor's sequential pipeline,
which onloads one decoder layer at a time to the GPU. A run that outlasts
``--timeout-s`` is killed and recorded as ``timeout``.

Variants (GPTQ W4A16, group 128, same for all):

- ``upstream routed``: GPTQModifier, ``moe_calibrate_all_experts=False``
- ``upstream all``: GPTQModifier, ``moe_calibrate_all_experts=True``
- ``ours default``: ``MoECalibrationModifier()`` + GPTQModifier (mode
  ``affinity:0.1``, floor 64 tokens per expert)
- ``ours all+shared``: ``MoECalibrationModifier(mode="all")`` +
  ``SharedHessianGPTQModifier``
- ``ours routed`` (not run unless named): ``mode="routed"``, ``rtn_fallback``

Every variant's GPTQ recipe ignores ``lm_head``, the routers
(``re:.*mlp\\.gate$``) and ``model.layers.0.mlp.down_proj``: that Linear's input
width, GLM-4.5-Air's dense MLP width 10944 = 85 x 128 + 64, is not a multiple of
W4A16's group size 128, and upstream's W4A16 fails on it. Ignoring it in every
variant keeps them comparable (and leaves nothing for our automatic fit to do).

Figures per run: load, linearize and oneshot wall time (oneshot alone is compared);
peak GPU memory (``torch.cuda.max_memory_allocated``, reset before oneshot; the
model starts on the CPU, so this is all of calibration's GPU memory); peak host RSS
(sampled every 50 ms); tokens per expert (min / max over every expert of every MoE
layer, and how many experts got none): ours from the coverage report, upstream from
forward pre-hooks on each expert's ``gate_proj`` counting rows while llmcompressor's
hooks are enabled (calibrating forwards only).

    python benchmarks/real_shapes.py --tiny --out /tmp/real_tiny.json   # CPU smoke
    python benchmarks/real_shapes.py --samples 32 --seq-len 512 --out real.json

Prints a table with ratios to ``upstream all``, ``upstream routed`` and ``ours
routed`` (where one of them failed, its status: ``oom``, ``timeout``, ``error``),
writes JSON (``--out``) and the children's logs (``--out`` with ``.log``).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# GLM-4.5-Air (zai-org/GLM-4.5-Air config.json; also
# llmcompressor_moe_plugins/real_configs/GLM-4.5-Air.json)
GLM45_AIR = dict(
    hidden_size=4096,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    n_routed_experts=128,
    n_shared_experts=1,
    num_experts_per_tok=8,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=1.0,
    num_attention_heads=96,
    num_key_value_heads=8,
    head_dim=128,
    partial_rotary_factor=0.5,
    use_qk_norm=False,
    attention_bias=True,
    first_k_dense_replace=1,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    num_mtp_layers=0,
)
# DeepSeek-V3/R1's MoE shapes (deepseek-ai/DeepSeek-V3 config.json: hidden 7168,
# dense MLP 18432, 256 routed experts of width 2048 top-8 in 8 groups, top-4
# groups, 1 shared expert, routed scaling 2.5) on GLM4-MoE's architecture: its
# attention is GQA (128 heads of 128, 8 key-value heads) instead of DeepSeek's MLA,
# which only the attention Linears' shapes see; the MoE layer is DeepSeek-V3's
DEEPSEEK_V3 = dict(
    GLM45_AIR,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    n_routed_experts=256,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    num_attention_heads=128,
    num_key_value_heads=8,
    partial_rotary_factor=1.0,
    attention_bias=False,
    rms_norm_eps=1e-6,
)
# GLM-4.5 / 4.6 / 4.7 (real_configs/GLM-4.5.json)
GLM45 = dict(
    GLM45_AIR,
    hidden_size=5120,
    intermediate_size=12288,
    moe_intermediate_size=1536,
    n_routed_experts=160,
    routed_scaling_factor=2.5,
    use_qk_norm=True,
)
SHAPES = {"glm4_5_air": GLM45_AIR, "glm4_5": GLM45, "deepseek_v3": DEEPSEEK_V3}
SHAPE_NAMES = {
    "glm4_5_air": "GLM-4.5-Air shapes",
    "glm4_5": "GLM-4.5 shapes",
    "deepseek_v3": "DeepSeek-V3 MoE shapes",
}
# --tiny: the same structure in miniature; the dense MLP width keeps 10944's
# residue modulo 128 (192 = 128 + 64), so layer 0's down_proj still misfits
TINY = dict(
    GLM45_AIR,
    hidden_size=256,
    intermediate_size=192,
    moe_intermediate_size=128,
    n_routed_experts=16,
    num_experts_per_tok=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
)
TINY_DEAD_EXPERTS = 2
# --tiny-widths: Air's expert count and top-k at the miniature's widths, so that on a
# CPU the time goes where a GPU's goes at real widths when it is launch-bound: into
# per-expert Python and kernel-call overhead, not arithmetic
TINY_WIDTHS = dict(
    TINY, n_routed_experts=128, num_experts_per_tok=8, max_position_embeddings=4096
)

IGNORE = ["lm_head", "re:.*mlp\\.gate$", "model.layers.0.mlp.down_proj"]

# name -> (MoECalibrationModifier fields or None for upstream alone,
#          oneshot's moe_calibrate_all_experts, GPTQ modifier class name)
VARIANTS = {
    "upstream routed": (None, False, "GPTQModifier"),
    "upstream all": (None, True, "GPTQModifier"),
    # the shipped GPTQ recipes' modifier: the default's routing weights need it
    "ours default": ({}, True, "SharedHessianGPTQModifier"),
    "ours all+shared": ({"mode": "all"}, True, "SharedHessianGPTQModifier"),
    "ours routed": ({"mode": "routed", "rtn_fallback": True}, False, "GPTQModifier"),
}
DEFAULT_VARIANTS = [
    "upstream routed",
    "upstream all",
    "ours default",
    "ours all+shared",
]
# the denominators of the table's ratios (issue 22's time target is ours routed)
BASELINES = ("upstream all", "upstream routed", "ours routed")


# -- building the model ---------------------------------------------------------


def _init_kind(module: torch.nn.Module, param_name: str) -> str:
    if param_name == "bias":
        return "zeros"
    class_name = type(module).__name__
    if class_name.endswith("RMSNorm") or class_name.endswith("LayerNorm"):
        return "ones"
    if "router" in class_name.lower() or hasattr(module, "e_score_correction_bias"):
        return "router"
    return "normal"


def random_init_model(
    model_cls,
    config,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    *,
    std: float = 0.02,
    router_std: float | None = None,
    threads: int | None = None,
    chunk: int = 1 << 24,
):
    """``model_cls(config)`` with random weights in ``dtype``, fast: parameters are
    created on the meta device (buffers, e.g. rotary frequencies, for real), then
    allocated in ``dtype`` and filled in chunks of ``chunk`` elements on
    ``threads`` threads (one seeded generator per chunk, so the weights do not
    depend on the thread count). Norm weights 1, biases 0, router weights
    normal(0, ``router_std`` or 1/sqrt(hidden)), everything else normal(0, ``std``).
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = model_cls(config)
    router_std = router_std or config.hidden_size**-0.5
    jobs = []
    for module in model.modules():
        for param_name, param in list(module._parameters.items()):
            if param is None:
                continue
            tensor = torch.empty(param.shape, dtype=dtype)
            module._parameters[param_name] = torch.nn.Parameter(
                tensor, requires_grad=False
            )
            kind = _init_kind(module, param_name)
            if kind == "zeros":
                tensor.zero_()
            elif kind == "ones":
                tensor.fill_(1.0)
            else:
                scale = router_std if kind == "router" else std
                for piece in tensor.view(-1).split(chunk):
                    jobs.append((piece, scale))
    base = seed * 1_000_003

    def fill(index_job):
        index, (piece, scale) = index_job
        generator = torch.Generator().manual_seed(base + index)
        piece.normal_(0.0, scale, generator=generator)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over chunks instead
    try:
        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            list(pool.map(fill, enumerate(jobs)))
    finally:
        torch.set_num_threads(previous)
    for name, param in model.named_parameters():
        if param.is_meta:
            raise RuntimeError(f"{name} was left on the meta device")
    model.config.dtype = dtype  # linearize_moe builds experts in the config dtype
    return model


def uneven_router_bias(
    model: torch.nn.Module, std: float, dead: int, seed: int
) -> list[list[int]]:
    """Every ``e_score_correction_bias`` := normal(0, ``std``), with ``dead``
    experts per router at -1: sigmoid scores lie in (0, 1), so their choice score
    stays below 0 and below every other expert's unless the others' biases are
    below -0.5. Returns the dead experts per router."""
    generator = torch.Generator().manual_seed(seed + 7)
    dead_lists = []
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is None:
                continue
            values = torch.randn(bias.numel(), generator=generator) * std
            chosen = torch.randperm(bias.numel(), generator=generator)[:dead]
            values[chosen] = -1.0
            bias.copy_(values.to(bias.dtype))
            dead_lists.append(sorted(chosen.tolist()))
    return dead_lists


def build_settings(args) -> dict:
    if args.tiny_widths:
        config = dict(TINY_WIDTHS)
    else:
        config = dict(TINY if args.tiny else SHAPES[args.shape])
    config["num_hidden_layers"] = config["first_k_dense_replace"] + args.moe_layers
    return {
        "config": config,
        "seed": args.seed,
        "bias_std": args.bias_std,
        "dead_experts": args.dead_experts,
        "tokenizer_vocab": 512,
    }


def ensure_model(directory: Path, settings: dict, threads: int | None) -> Path:
    """Build and save the model unless ``directory`` already holds this one."""
    marker = directory / "build_settings.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        print(f"model: reusing {directory}", flush=True)
        return directory
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    from llmcompressor_moe_plugins.tiny import train_tokenizer

    start = time.perf_counter()
    tokenizer = train_tokenizer(vocab_size=settings["tokenizer_vocab"])
    config = Glm4MoeConfig(
        **settings["config"],
        vocab_size=len(tokenizer),
        pad_token_id=0,
        eos_token_id=1,
        dtype=torch.bfloat16,
    )
    model = random_init_model(
        Glm4MoeForCausalLM, config, torch.bfloat16, settings["seed"], threads=threads
    )
    dead = uneven_router_bias(
        model, settings["bias_std"], settings["dead_experts"], settings["seed"]
    )
    built = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    (directory / "dead_experts.json").write_text(json.dumps(dead))
    marker.write_text(json.dumps(settings))
    print(
        f"model: {params / 1e9:.2f} B parameters built in {built - start:.1f} s, "
        f"saved in {time.perf_counter() - built:.1f} s to {directory}; "
        f"dead experts per MoE layer: {dead}",
        flush=True,
    )
    return directory


def ensure_data(directory: Path, samples: int, seq_len: int) -> Path:
    path = directory / f"calibration_{samples}x{seq_len}.pt"
    if path.is_file():
        return path
    from transformers import AutoTokenizer

    from llmcompressor_moe_plugins.tiny import stdlib_texts, tokenize_for_calibration

    tokenizer = AutoTokenizer.from_pretrained(directory)
    # the standard library's source gives ~1M tokens; go round again if needed
    texts = (text for _ in range(8) for text in stdlib_texts(skip_files=40))
    data = tokenize_for_calibration(tokenizer, texts, samples, seq_len)
    torch.save(torch.tensor(data["input_ids"], dtype=torch.int32), path)
    return path


# -- one variant run (child process) -----------------------------------------------


class PeakRSS:
    """Samples this process's RSS every 50 ms."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def current(self) -> int:
        return self.process.memory_info().rss

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.current())
            time.sleep(0.05)

    def reset(self) -> None:
        self.peak = self.current()

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, self.current())


def _warm_up_cuda() -> None:
    # CUDA context, cuBLAS and cuSOLVER handles: set up before timing, like a
    # process that already used the GPU
    x = torch.randn(256, 256, device="cuda")
    (x @ x).sum().item()
    (x.bfloat16() @ x.bfloat16()).sum().item()
    torch.linalg.cholesky(x @ x.T + 256 * torch.eye(256, device="cuda")).sum().item()
    torch.cuda.synchronize()


def run_child(spec: dict) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.utils.hooks import HooksMixin
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor_moe_plugins import (
        MoECalibrationModifier,
        SharedHessianGPTQModifier,
        last_coverage_report,
    )

    ours, upstream_flag, gptq_name = VARIANTS[spec["variant"]]
    gptq_cls = {
        "GPTQModifier": GPTQModifier,
        "SharedHessianGPTQModifier": SharedHessianGPTQModifier,
    }[gptq_name]
    cuda = torch.cuda.is_available()
    ballast = 0
    if cuda:
        _warm_up_cuda()
        if spec.get("card_gib"):  # a smaller card's memory on a larger one
            _free, total = torch.cuda.mem_get_info()
            ballast = max(0, total - int(spec["card_gib"] * 2**30))
            held = torch.empty(ballast, dtype=torch.uint8, device="cuda")  # noqa: F841
    rss = PeakRSS()
    model_dir = spec["model_dir"]

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.load(spec["data"]).tolist()
    dataset = Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}
    )

    # oneshot would linearize the fused experts itself, first thing; done here so
    # upstream runs can hook each expert's gate_proj (same cost for every variant)
    start = time.perf_counter()
    linearize_moe(model)
    linearize_s = time.perf_counter() - start

    rows: dict[str, int] = {}
    if ours is None:

        def counter(name):
            def hook(_module, args):
                if not HooksMixin._HOOKS_DISABLED:
                    rows[name] += args[0].reshape(-1, args[0].shape[-1]).shape[0]

            return hook

        for name, module in model.named_modules():
            if ".experts." in name and name.endswith(".gate_proj"):
                rows[name] = 0
                module.register_forward_pre_hook(counter(name))

    fields = {}
    if gptq_cls is SharedHessianGPTQModifier and spec.get("statistics_budget_gib"):
        fields["statistics_budget_gib"] = spec["statistics_budget_gib"]
    recipe = [
        gptq_cls(targets=["Linear"], scheme="W4A16", ignore=list(IGNORE), **fields)
    ]
    if ours is not None:
        recipe.insert(0, MoECalibrationModifier(**ours))

    timers = None
    if spec.get("profile"):
        from phase_timers import PhaseTimers

        timers = PhaseTimers(count_ops=spec.get("count_ops", False))
        timers.install(model)
    gc.collect()
    rss.reset()
    rss_before = rss.current()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=len(ids),
        max_seq_length=len(ids[0]),
        moe_calibrate_all_experts=upstream_flag,
        shuffle_calibration_samples=False,
    )
    if cuda:
        torch.cuda.synchronize()
    oneshot_s = time.perf_counter() - start
    peak_rss = rss.stop()

    routed: list[int] | None = None
    if ours is not None:
        report = last_coverage_report()
        blocks = report.blocks if report is not None else []
        calibrated = [count for block in blocks for count in block.calibrated]
        routed = [count for block in blocks for count in block.routed]
        # e.g. {"CalibrationGlm4MoeMoE: affinity:0.1"}: the path each block took
        modes = sorted(
            {f"{block.calibration_module}: {block.mode}" for block in blocks}
        )
    else:
        calibrated = list(rows.values())
        if not upstream_flag:
            routed = calibrated
        modes = ["upstream " + ("all" if upstream_flag else "routed")]
    return {
        "status": "ok",
        "variant": spec["variant"],
        "modes": modes,
        "load_s": load_s,
        "linearize_s": linearize_s,
        "oneshot_s": oneshot_s,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() - ballast if cuda else None,
        "peak_gpu_reserved_bytes": (
            torch.cuda.max_memory_reserved() - ballast if cuda else None
        ),
        "card_gib": spec.get("card_gib"),
        "rss_before_oneshot_bytes": rss_before,
        "peak_rss_bytes": peak_rss,
        "experts": len(calibrated),
        "tokens_min": min(calibrated, default=0),
        "tokens_max": max(calibrated, default=0),
        "experts_without_tokens": sum(1 for c in calibrated if c == 0),
        "routed_min": min(routed, default=0) if routed is not None else None,
        "experts_without_routed_tokens": (
            sum(1 for c in routed if c == 0) if routed is not None else None
        ),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "phases": timers.report() if timers is not None else None,
    }


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run_child(spec)
    except BaseException as err:
        import traceback

        traceback.print_exc()
        status = "oom" if isinstance(err, torch.OutOfMemoryError) else "error"
        result = {"status": status, "error": f"{type(err).__name__}: {err}"[:2000]}
        Path(spec["result"]).write_text(json.dumps(result))
        sys.exit(1)
    Path(spec["result"]).write_text(json.dumps(result))


# -- the parent: round-robin runs, table, JSON ------------------------------------


def launch(spec: dict, timeout_s: float, log) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        spec = dict(spec, result=str(Path(scratch) / "result.json"))
        spec_path = Path(scratch) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("TQDM_DISABLE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if not torch.cuda.is_available():
            # CPU smoke test: one thread per process; OpenMP's spinning threads
            # make a shared or small CPU several times slower
            env.setdefault("OMP_NUM_THREADS", "1")
        log.write(f"\n===== {spec['variant']} (round {spec['round']}) =====\n")
        log.flush()
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, killed on timeout
        )
        try:
            process.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return {"status": "timeout", "wall_s": time.perf_counter() - start}
        wall = time.perf_counter() - start
        result_path = Path(spec["result"])
        if result_path.is_file():
            result = json.loads(result_path.read_text())
        else:
            result = {
                "status": "error",
                "error": f"exit code {process.returncode}, no result",
            }
        result["wall_s"] = wall
        return result


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return {"status": runs[0]["status"] if runs else "skipped", "runs": len(runs)}
    result = dict(ok[-1])
    for key in ("load_s", "linearize_s", "oneshot_s"):
        result[key] = statistics.median(r[key] for r in ok)
    result["oneshot_s_all"] = [r["oneshot_s"] for r in ok]
    for key in ("peak_gpu_bytes", "peak_gpu_reserved_bytes", "peak_rss_bytes"):
        values = [r[key] for r in ok if r.get(key) is not None]
        result[key] = max(values) if values else None
    result["runs"] = len(runs)
    result["runs_ok"] = len(ok)
    return result


def _ratio(value, baseline: dict | None, key: str) -> str:
    """``value`` over the baseline's; a baseline that failed gives its status
    (an out-of-memory is a result: "oom")."""
    if not baseline or not value:
        return "-"
    if baseline.get("status") != "ok":
        return baseline.get("status", "-")
    if not baseline.get(key):
        return "-"
    return f"{value / baseline[key]:.2f}"


def print_table(results: dict) -> None:
    up_all, up_routed, ours_routed = (results.get(name) for name in BASELINES)
    print(
        f"{'variant':<16} {'status':>7} {'oneshot s':>9} {'x up-all':>8} "
        f"{'x up-rt':>7} {'x our-rt':>8} {'GPU GiB':>8} {'x up-all':>8} "
        f"{'x up-rt':>7} {'RSS GiB':>8} {'tok min':>8} {'tok max':>8} {'0-tok':>5} "
        f"{'0-rt':>5} {'load s':>6}"
    )
    for name, r in results.items():
        if r.get("status") != "ok":
            print(f"{name:<16} {r.get('status', '?'):>7}")
            continue
        gpu = r["peak_gpu_bytes"]
        zero_routed = r["experts_without_routed_tokens"]
        print(
            f"{name:<16} {'ok':>7} {r['oneshot_s']:>9.1f} "
            f"{_ratio(r['oneshot_s'], up_all, 'oneshot_s'):>8} "
            f"{_ratio(r['oneshot_s'], up_routed, 'oneshot_s'):>7} "
            f"{_ratio(r['oneshot_s'], ours_routed, 'oneshot_s'):>8} "
            f"{(gpu or 0) / 2**30:>8.2f} "
            f"{_ratio(gpu, up_all, 'peak_gpu_bytes'):>8} "
            f"{_ratio(gpu, up_routed, 'peak_gpu_bytes'):>7} "
            f"{r['peak_rss_bytes'] / 2**30:>8.2f} {r['tokens_min']:>8} "
            f"{r['tokens_max']:>8} {r['experts_without_tokens']:>5} "
            f"{'-' if zero_routed is None else zero_routed:>5} {r['load_s']:>6.1f}"
        )


def print_phases(results: dict) -> None:
    """Each variant's phases (``--profile``), seconds of the last ok run."""
    from phase_timers import ORDER, TOP_LEVEL

    phases = {n: dict(r.get("phases") or {}) for n, r in results.items()}
    for name, ps in phases.items():
        if ps:  # what no phase covers: onloading, data, pipeline and hook overhead
            timed = sum(ps[p][0] for p in TOP_LEVEL if p in ps)
            ps["rest of oneshot"] = [results[name]["oneshot_s"] - timed, 1]
    names = [
        p for p in (*ORDER, "rest of oneshot") if any(p in x for x in phases.values())
    ]
    print(f"\n{'phase (s, inclusive)':<36}" + "".join(f"{n:>18}" for n in phases))
    for name in names:
        cells = [
            f"{ps[name][0]:>10.1f} ({ps[name][1]:>4})" if name in ps else f"{'-':>18}"
            for ps in phases.values()
        ]
        print(f"{name:<36}" + "".join(f"{c:>18}" for c in cells))


def print_operator_counts(results: dict) -> None:
    """Each variant's ATen operators per phase call (``--count-ops``)."""
    from phase_timers import ORDER

    phases = {n: dict(r.get("phases") or {}) for n, r in results.items()}
    names = [p for p in ORDER if any(p in x for x in phases.values())]
    print(f"\n{'ATen operators per call':<36}" + "".join(f"{n:>18}" for n in phases))
    for name in names:
        cells = [
            f"{ps[name][2] / ps[name][1]:>10.0f} ({ps[name][1]:>4})"
            if name in ps
            else f"{'-':>18}"
            for ps in phases.values()
        ]
        print(f"{name:<36}" + "".join(f"{c:>18}" for c in cells))
    for variant, ps in phases.items():
        for name in names:
            if name in ps:
                top = ", ".join(f"{op} {n}" for op, n in ps[name][3])
                print(f"  {variant} / {name.strip()}: {top}")


def one_line(result: dict) -> str:
    if result["status"] != "ok":
        return f"{result['status']} after {result.get('wall_s', 0):.0f} s " + (
            result.get("error", "") or ""
        )
    gpu = result["peak_gpu_bytes"]
    return (
        f"oneshot {result['oneshot_s']:.1f} s, GPU "
        f"{'-' if gpu is None else f'{gpu / 2**30:.2f} GiB'}, RSS "
        f"{result['peak_rss_bytes'] / 2**30:.2f} GiB, tokens/expert "
        f"{result['tokens_min']}..{result['tokens_max']}, "
        f"{result['experts_without_tokens']} of {result['experts']} experts without "
        f"tokens (load {result['load_s']:.1f} s, linearize "
        f"{result['linearize_s']:.1f} s, process {result['wall_s']:.0f} s) "
        f"{result['modes']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="miniature, CPU smoke test")
    parser.add_argument(
        "--tiny-widths",
        action="store_true",
        help="Air's 128 experts top-8 at miniature widths (CPU overhead proxy)",
    )
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--moe-layers", type=int, default=1)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="glm4_5_air")
    parser.add_argument(
        "--statistics-budget-gib",
        type=float,
        default=None,
        help="SharedHessianGPTQModifier's statistics_budget_gib (default: auto)",
    )
    parser.add_argument(
        "--card-gib",
        type=float,
        help="occupy the GPU beyond this many GiB before each run, so a larger card "
        "plans and fails as this one would (79.18: an H100 80GB); peaks exclude it",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="time the phases of each run (benchmarks/phase_timers.py)",
    )
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="with --profile: count each phase's ATen operators (no timings then)",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--timeout-s", type=float, default=240)
    parser.add_argument(
        "--total-budget-s",
        type=float,
        default=None,
        help="stop the whole benchmark by then: later runs get what is left as "
        "their timeout, runs with under 30 s left are skipped",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bias-std", type=float, default=0.1)
    parser.add_argument("--dead-experts", type=int, default=None)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--build-threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/real_shapes.json")
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if args.tiny:
        args.samples, args.seq_len = min(args.samples, 8), min(args.seq_len, 128)
    if args.dead_experts is None:
        args.dead_experts = TINY_DEAD_EXPERTS if args.tiny else 4
    args.tiny = args.tiny or args.tiny_widths  # CPU, the tiny tokenizer
    began = time.perf_counter()

    settings = build_settings(args)
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    name = f"moe_real_shapes_{'tiny_' if args.tiny else ''}{tag}"
    model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / name)
    ensure_model(model_dir, settings, args.build_threads)
    data = ensure_data(model_dir, args.samples, args.seq_len)
    print(
        f"setup done in {time.perf_counter() - began:.1f} s: {args.samples} x "
        f"{args.seq_len} tokens, {args.moe_layers} MoE layer(s), variants "
        f"{args.variants}, {args.repeats} round(s)",
        flush=True,
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    runs: dict[str, list[dict]] = {name: [] for name in args.variants}
    total = args.repeats * len(args.variants)
    with open(log_path, "w") as log:
        count = 0
        for round_index in range(args.repeats):
            for name in args.variants:
                count += 1
                timeout = args.timeout_s
                if args.total_budget_s is not None:
                    left = args.total_budget_s - (time.perf_counter() - began)
                    if left < 30:
                        runs[name].append({"status": "skipped"})
                        print(f"[{count}/{total}] {name}: skipped (budget)", flush=True)
                        continue
                    timeout = min(timeout, left)
                spec = {
                    "variant": name,
                    "round": round_index,
                    "model_dir": str(model_dir),
                    "data": str(data),
                    "statistics_budget_gib": args.statistics_budget_gib,
                    "card_gib": args.card_gib,
                    "profile": args.profile or args.count_ops,
                    "count_ops": args.count_ops,
                }
                result = launch(spec, timeout, log)
                runs[name].append(result)
                print(f"[{count}/{total}] {name}: {one_line(result)}", flush=True)
                if result["status"] == "error":
                    tail = log_path.read_text().splitlines()[-25:]
                    print("    " + "\n    ".join(tail), flush=True)

    results = {name: summarize(variant_runs) for name, variant_runs in runs.items()}
    device = next(
        (r["device"] for rs in runs.values() for r in rs if r.get("device")), "?"
    )
    print(
        f"\n{SHAPE_NAMES[args.shape]}{' (tiny)' if args.tiny else ''}: "
        f"{args.moe_layers} MoE "
        f"layer(s), {args.samples} x {args.seq_len} tokens, device={device}, "
        f"repeats={args.repeats}, total {time.perf_counter() - began:.0f} s"
    )
    print_table(results)
    if args.count_ops:
        print_operator_counts(results)
    elif args.profile:
        print_phases(results)
    out.write_text(
        json.dumps(
            {
                "benchmark": "real_shapes",
                "model": SHAPE_NAMES[args.shape] + (" (tiny)" if args.tiny else ""),
                "statistics_budget_gib": args.statistics_budget_gib,
                "settings": settings,
                "samples": args.samples,
                "seq_len": args.seq_len,
                "device": device,
                "repeats": args.repeats,
                "ignore": IGNORE,
                "results": results,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"wrote {out} and {log_path}")


if __name__ == "__main__":
    main()
