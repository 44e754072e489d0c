"""Peak activation memory of one MoE block's calibration forward, per mode (GPU).

One medium GLM4-MoE block (hidden 2048, 64 experts top-8, moe_intermediate 768,
bf16), linearized as oneshot does. For each mode: ``max_memory_allocated`` during
one forward above what was allocated before it (weights and input excluded), and
the ratio to routed mode; ``upstream all`` is llmcompressor's own all-expert path
(every expert called once on every token). Issue 6's bound: all-expert within
1.25x of routed with the default chunking.

    python benchmarks/block_memory.py --tokens 512 4096
"""

from __future__ import annotations

import argparse
import json

import torch
from llmcompressor.modeling.moe.context import (
    moe_calibration_context as upstream_calibrate_all,
)
from llmcompressor.modeling.moe.linearize import linearize_moe
from oneshot_variants import GLM4_SIZES  # benchmarks/ is the script's folder
from transformers import Glm4MoeForCausalLM

from llmcompressor_moe_plugins import parse_mode
from llmcompressor_moe_plugins.calibration.architectures.glm4_moe import (
    CalibrationGlm4MoeMoE,
)
from llmcompressor_moe_plugins.tiny import tiny_glm4_moe_config

# (mode, chunk_size): "auto", a token count, or a fraction of the forward's tokens
SETTINGS = [
    ("routed", "auto"),
    ("all", "auto"),
    ("all", 0.125),
    ("all", 0.25),
    ("all", 0.5),
    ("all", 1.0),
    ("top_k:16", "auto"),
    ("affinity", "auto"),
]


MEDIUM = GLM4_SIZES["medium"]["config"]  # the oneshot benchmark's medium model


def block(device, sizes):
    config = tiny_glm4_moe_config(**{**sizes, "num_hidden_layers": 2})
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    model.config.dtype = torch.bfloat16  # linearize_moe builds experts in it
    linearize_moe(model)
    model.to(device)
    return model, model.model.layers[1].mlp


@torch.no_grad()
def peak_bytes(module, x) -> int:
    if not torch.cuda.is_available():  # --check: exercise the code path only
        module(x)
        return 1
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    module(x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 32768])
    parser.add_argument("--out", default="benchmarks/block_memory.json")
    parser.add_argument("--check", action="store_true", help="tiny, on CPU")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.check:
        raise SystemExit("block_memory.py measures GPU memory; run it on a GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, original = block(device, {} if args.check else MEDIUM)
    hidden = model.config.hidden_size
    results = {}
    for tokens in args.tokens:
        x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, device=device)
        row = {}
        for mode, chunk in SETTINGS:
            if isinstance(chunk, float):
                chunk = int(chunk * tokens)
            calibration = CalibrationGlm4MoeMoE(original, model.config)
            # what swap_in_calibration_modules does for each block (floor 0)
            calibration.configure(
                "model.layers.1.mlp", parse_mode(mode), chunk_size=chunk
            )
            peak_bytes(calibration, x)  # warm-up (allocator, kernels)
            row[f"{mode} chunk={chunk}"] = peak_bytes(calibration, x)
        with upstream_calibrate_all():
            row["upstream all"] = peak_bytes(original, x)
        results[tokens] = row
        print(f"\ntokens={tokens}: peak activation MiB (x routed)")
        for mode, value in row.items():
            routed = row["routed chunk=auto"]
            print(f"  {mode:<22} {value / 2**20:8.1f}  {value / routed:5.2f}x")
    with open(args.out, "w") as handle:
        json.dump({"device": device, "peaks": results}, handle)


if __name__ == "__main__":
    main()
