"""The real GLM-4.5 / 4.5-Air / 4.6 / 4.7 layouts, and tiny twins of them.

``<name>.json`` next to this file holds the architecture fields of each model's
``config.json`` (no weights, no tokenizer ids) with a ``_source`` key naming where
they come from. :func:`real_config` loads one as a ``Glm4MoeConfig``;
:func:`tiny_config_like` shrinks it to a model that builds and calibrates in
seconds on a CPU while keeping every property that decides whether a quantization
recipe fits and how vLLM loads the result; :func:`build_tiny_like` saves such a
model, MTP layer included, the way the real checkpoint is stored.

Real layouts (from the JSON files; "experts" is routed + shared):

- GLM-4.5, GLM-4.6, GLM-4.7: 92 layers (3 dense), 160 + 1 experts, top-8, 1 MTP
  layer; hidden 5120, dense MLP 12288, experts 1536; q/k norm; routed scaling 2.5;
  4.6 and 4.7 take 202752 positions, 4.5 131072.
- GLM-4.5-Air: 46 layers (1 dense), 128 + 1 experts, top-8, 1 MTP layer; hidden
  4096, dense MLP 10944, experts 1408; no q/k norm; routed scaling 1.0.

Only GLM-4.5-Air has a width that is not a multiple of 128: its dense MLP
(``intermediate_size`` 10944 = 85 x 128 + 64), which is the input width of
``model.layers.0.mlp.down_proj``.
"""

from __future__ import annotations

import json
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

__all__ = [
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
]

WIDTH_BLOCK = 128
TINY_EXPERTS = 8
TINY_TOP_K = 2
TINY_MOE_LAYERS = 2
TINY_ATTENTION_HEADS = 4
TINY_KV_HEADS = 2


def _directory():
    return files(__name__)


def names() -> list[str]:
    """The real configs shipped, e.g. ``['GLM-4.5', 'GLM-4.5-Air', ...]``."""
    return sorted(
        entry.name.removesuffix(".json")
        for entry in _directory().iterdir()
        if entry.name.endswith(".json")
    )


def _load(name: str) -> dict[str, Any]:
    name = name.removeprefix("zai-org/")
    entry = _directory() / f"{name}.json"
    if not entry.is_file():
        raise KeyError(f"No real config named {name!r}. Shipped: {', '.join(names())}.")
    return json.loads(entry.read_text())


def real_config_dict(name: str) -> dict[str, Any]:
    """The architecture fields of ``name``'s ``config.json`` (without ``_source``)."""
    data = _load(name)
    data.pop("_source")
    return data


def real_config_source(name: str) -> dict[str, Any]:
    """Where the values of ``name`` come from (URL, date, cross-checks)."""
    return _load(name)["_source"]


def real_config(name: str):
    """``name``'s real layout as a ``Glm4MoeConfig`` (``zai-org/`` prefix optional)."""
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig.from_dict(real_config_dict(name))


def tiny_width(width: int, block: int = WIDTH_BLOCK) -> int:
    """A small width with the same residue modulo ``block`` (128) as ``width``.

    ``width % 128`` plus one block of 128 when ``width`` has one: 10944
    (= 85 x 128 + 64) -> 192, 1408 (= 11 x 128) -> 128, 96 -> 96. Because 16, 32 and
    64 divide 128, the tiny width is a multiple of 16/32/64/128 exactly when the real
    one is, so every group size fits (or does not fit) both alike.
    """
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return width % block + (block if width >= block else 0)


def tiny_config_like(name: str, **overrides):
    """A tiny ``Glm4MoeConfig`` that keeps what matters of ``name``'s real layout.

    Kept as in the real config: ``first_k_dense_replace`` (the leading dense
    layers), ``n_group``/``topk_group``, ``routed_scaling_factor``,
    ``norm_topk_prob``, ``use_qk_norm``, ``num_nextn_predict_layers`` (MTP),
    ``n_shared_experts``, ``partial_rotary_factor``, ``attention_bias``,
    ``head_dim``, ``rms_norm_eps``, ``rope_theta``, ``tie_word_embeddings``.

    Scaled down:

    - widths ``hidden_size``, ``intermediate_size`` (dense MLP),
      ``moe_intermediate_size`` (experts, shared experts): :func:`tiny_width`,
      i.e. the residue modulo 128 is kept (GLM-4.5-Air's 10944 -> 192, a multiple
      of 64 but not of 128; 4096, 5120, 12288, 1408, 1536 -> 128);
    - ``head_dim`` is kept (128), heads go to 4 query / 2 key-value (grouped-query
      attention stays, and ``o_proj``'s input width 4 x 128 is still not the
      hidden size, as 96 x 128 is not in the real models);
    - ``num_hidden_layers``: the real dense layers plus 2 MoE layers;
    - ``n_routed_experts`` 8, ``num_experts_per_tok`` 2 (``n_group`` is capped so
      that it still divides the experts);
    - ``vocab_size`` 512, ``max_position_embeddings`` 512.

    ``overrides`` win over everything (e.g. ``vocab_size=len(tokenizer)``).
    """
    from transformers import Glm4MoeConfig

    real = real_config_dict(name)
    experts = TINY_EXPERTS
    n_group = real.get("n_group", 1)
    while experts % n_group:
        n_group -= 1
    settings = {
        key: real[key]
        for key in (
            "first_k_dense_replace",
            "routed_scaling_factor",
            "norm_topk_prob",
            "use_qk_norm",
            "num_nextn_predict_layers",
            "n_shared_experts",
            "partial_rotary_factor",
            "attention_bias",
            "head_dim",
            "hidden_act",
            "rms_norm_eps",
            "rope_theta",
            "tie_word_embeddings",
        )
        if key in real
    }
    settings.update(
        hidden_size=tiny_width(real["hidden_size"]),
        intermediate_size=tiny_width(real["intermediate_size"]),
        moe_intermediate_size=tiny_width(real["moe_intermediate_size"]),
        num_hidden_layers=real["first_k_dense_replace"] + TINY_MOE_LAYERS,
        num_attention_heads=TINY_ATTENTION_HEADS,
        num_key_value_heads=TINY_KV_HEADS,
        n_routed_experts=experts,
        num_experts_per_tok=TINY_TOP_K,
        n_group=n_group,
        topk_group=min(real.get("topk_group", 1), n_group),
        vocab_size=512,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
    )
    settings.update(overrides)
    return Glm4MoeConfig(**settings)


def build_tiny_like(
    name: str,
    directory: str | Path,
    tokenizer=None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    bias_spread: float = 0.1,
    **config_overrides,
) -> Path:
    """Build a random tiny twin of ``name`` (:func:`tiny_config_like`) and save it
    with ``tokenizer`` to ``directory`` (oneshot validates models by their saved
    config); returns ``directory``.

    - Every router gets an uneven ``e_score_correction_bias`` (a seeded permutation
      of ``bias_spread x linspace(-1, 1)``), as trained GLM routers have: routed-only
      calibration then leaves some experts with few or no tokens.
    - With ``num_nextn_predict_layers`` > 0, the MTP layers are written as the real
      checkpoint stores them (transformers never builds them): layer
      ``num_hidden_layers + i`` holds a full MoE decoder layer (attention, router,
      per-expert ``mlp.experts.E.{gate,up,down}_proj``, shared experts, norms) plus
      ``enorm``, ``hnorm``, ``eh_proj`` (2 x hidden -> hidden),
      ``shared_head.norm``, ``shared_head.head`` and ``embed_tokens``, in a second
      shard with a ``model.safetensors.index.json`` over both (the main weights go
      to ``model-00001-of-00002.safetensors``, the MTP layer to
      ``model-00002-of-00002.safetensors``). These are the names vLLM's
      ``Glm4MoeMTP.load_weights`` reads (``embed_tokens`` and ``shared_head`` are
      optional there: vLLM shares the target model's when they are absent) and
      that GGUF conversions of GLM-4.5-Air list for layer 46 (``nextn.*``).
    """
    from transformers import Glm4MoeForCausalLM

    from ..tiny import train_tokenizer

    tokenizer = tokenizer or train_tokenizer()
    config = tiny_config_like(name, vocab_size=len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(config).to(dtype)
    _uneven_router_bias(model, bias_spread, seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if getattr(config, "num_nextn_predict_layers", 0):
        _write_mtp_layers(directory, config, seed, dtype, bias_spread)
    return directory


def _uneven_router_bias(model: torch.nn.Module, spread: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is None:
                continue
            levels = torch.linspace(-spread, spread, bias.numel())
            order = torch.randperm(bias.numel(), generator=generator)
            bias.copy_(levels[order].to(bias.dtype))


def _write_mtp_layers(
    directory: Path, config, seed: int, dtype: torch.dtype, bias_spread: float
) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import Glm4MoeForCausalLM

    first = config.num_hidden_layers
    count = config.num_nextn_predict_layers
    hidden, vocab = config.hidden_size, config.vocab_size

    # a model with the MTP layers as ordinary layers, saved by transformers, gives
    # decoder-layer tensors in the checkpoint's own (per-expert) layout
    longer = type(config).from_dict(
        {**config.to_dict(), "num_hidden_layers": first + count}
    )
    torch.manual_seed(seed + 1)
    donor = Glm4MoeForCausalLM(longer).to(dtype)
    _uneven_router_bias(donor, bias_spread, seed + 1)
    with tempfile.TemporaryDirectory() as scratch:
        donor.save_pretrained(scratch)
        donor_tensors = load_file(str(Path(scratch) / "model.safetensors"))
    mtp: dict[str, torch.Tensor] = {}
    for key, tensor in donor_tensors.items():
        parts = key.split(".")
        if key.startswith("model.layers.") and int(parts[2]) >= first:
            mtp[key] = tensor.contiguous()
    generator = torch.Generator().manual_seed(seed + 2)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(dtype)

    def norm_weight() -> torch.Tensor:
        return (1 + torch.randn(hidden, generator=generator) * 0.05).to(dtype)

    for layer in range(first, first + count):
        prefix = f"model.layers.{layer}"
        mtp[f"{prefix}.enorm.weight"] = norm_weight()
        mtp[f"{prefix}.hnorm.weight"] = norm_weight()
        mtp[f"{prefix}.eh_proj.weight"] = normal(hidden, 2 * hidden)
        mtp[f"{prefix}.shared_head.norm.weight"] = norm_weight()
        mtp[f"{prefix}.shared_head.head.weight"] = normal(vocab, hidden)
        mtp[f"{prefix}.embed_tokens.weight"] = normal(vocab, hidden)

    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(
            f"{directory}: expected the single model.safetensors that a tiny model "
            "saves; the MTP shard is added next to it"
        )
    main_name = "model-00001-of-00002.safetensors"
    mtp_name = "model-00002-of-00002.safetensors"
    main = load_file(str(single))
    single.rename(directory / main_name)
    save_file(mtp, str(directory / mtp_name), metadata={"format": "pt"})
    weight_map = {key: main_name for key in main} | {key: mtp_name for key in mtp}
    total = sum(t.numel() * t.element_size() for t in (*main.values(), *mtp.values()))
    index = {
        "metadata": {"total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
