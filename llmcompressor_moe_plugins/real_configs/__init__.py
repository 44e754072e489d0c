"""Real MoE layouts (GLM-4.5/4.5-Air/4.6/4.7, Qwen3-30B-A3B, Qwen3-235B-A22B,
DeepSeek-V3/R1, Mixtral-8x7B), and tiny twins of them.

``<name>.json`` next to this file holds the architecture fields of each model's
``config.json`` (no weights, no tokenizer ids) with a ``_source`` key naming where
they come from. :func:`real_config` loads one as its transformers config class (by
``model_type``); :func:`~.twins.tiny_config_like` shrinks it to a model that builds
and calibrates in seconds on a CPU while keeping every property that decides
whether a quantization recipe fits and how vLLM loads the result;
:func:`~.twins.build_tiny_like` saves such a model, MTP layer included, the way the
real checkpoint is stored.

Real layouts (from the JSON files; "experts" is routed + shared):

- GLM-4.5, GLM-4.6, GLM-4.7 (``glm4_moe``): 92 layers (3 dense), 160 + 1 experts,
  top-8, 1 MTP layer; hidden 5120, dense MLP 12288, experts 1536; q/k norm; routed
  scaling 2.5; 4.6 and 4.7 take 202752 positions, 4.5 131072.
- GLM-4.5-Air (``glm4_moe``): 46 layers (1 dense), 128 + 1 experts, top-8, 1 MTP
  layer; hidden 4096, dense MLP 10944, experts 1408; no q/k norm; routed scaling 1.0.
- Qwen3-30B-A3B / Qwen3-235B-A22B (``qwen3_moe``): 48 / 94 layers, all MoE, 128
  experts (no shared expert), top-8, renormalized; hidden 2048 / 4096, experts
  768 / 1536; 32 / 64 query heads, 4 key-value heads of 128.
- DeepSeek-V3 (``deepseek_v3``; DeepSeek-R1 is the same architecture): 61 layers
  (3 dense), 256 + 1 experts, top-8 in 4 of 8 groups, routed scaling 2.5, 1 MTP
  layer; hidden 7168, dense MLP 18432, experts 2048; multi-head latent attention
  (q rank 1536, kv rank 512, 128 heads of 128 + 64 rope dims, values 128).
- Mixtral-8x7B-v0.1 (``mixtral``): 32 layers, 8 experts, top-2; hidden 4096,
  experts 14336; 32 query heads, 8 key-value heads of 128.

Only GLM-4.5-Air has a width that is not a multiple of 128: its dense MLP
(``intermediate_size`` 10944 = 85 x 128 + 64), which is the input width of
``model.layers.0.mlp.down_proj``.
"""

from __future__ import annotations

from .configs import (
    ALIASES,
    names,
    real_config,
    real_config_dict,
    real_config_source,
)
from .twins import (
    TINY_EXPERTS,
    TINY_MOE_LAYERS,
    TINY_TOP_K,
    WIDTH_BLOCK,
    build_tiny_like,
    tiny_config_like,
    tiny_width,
)

__all__ = [
    "ALIASES",
    "names",
    "real_config_dict",
    "real_config_source",
    "real_config",
    "tiny_width",
    "tiny_config_like",
    "build_tiny_like",
    "TINY_EXPERTS",
    "TINY_TOP_K",
    "TINY_MOE_LAYERS",
    "WIDTH_BLOCK",
]
