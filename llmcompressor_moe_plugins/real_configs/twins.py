"""Tiny twins of the real layouts in :mod:`..real_configs`: configs and saved
checkpoints that build and calibrate in seconds on a CPU and keep every property
that decides whether a quantization recipe fits and how vLLM loads the result."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "tiny_width",
    "tiny_config_like",
    "build_tiny_like",
    "WIDTH_BLOCK",
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
_COMMON = ("hidden_act", "rms_norm_eps", "rope_theta", "tie_word_embeddings")


@dataclass(frozen=True)
class _Family:
    """How one ``model_type`` is shrunk."""

    model_cls: str  # in the transformers namespace
    experts_key: str  # routed experts
    widths: tuple[str, ...]  # shrunk by tiny_width
    kept: tuple[str, ...]  # copied from the real config when present
    latent_attention: bool = False  # MLA: as many key-value heads as query heads


_FAMILIES = {
    "glm4_moe": _Family(
        model_cls="Glm4MoeForCausalLM",
        experts_key="n_routed_experts",
        widths=("hidden_size", "intermediate_size", "moe_intermediate_size"),
        kept=(
            "first_k_dense_replace",
            "routed_scaling_factor",
            "norm_topk_prob",
            "use_qk_norm",
            "num_nextn_predict_layers",
            "n_shared_experts",
            "partial_rotary_factor",
            "attention_bias",
            "head_dim",
            *_COMMON,
        ),
    ),
    "deepseek_v3": _Family(
        model_cls="DeepseekV3ForCausalLM",
        experts_key="n_routed_experts",
        # the MLA ranks are the input widths of q_b_proj and kv_b_proj
        widths=(
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "q_lora_rank",
            "kv_lora_rank",
        ),
        kept=(
            "first_k_dense_replace",
            "routed_scaling_factor",
            "norm_topk_prob",
            "num_nextn_predict_layers",
            "n_shared_experts",
            "attention_bias",
            "qk_rope_head_dim",
            "qk_nope_head_dim",
            "v_head_dim",
            *_COMMON,
        ),
        latent_attention=True,
    ),
    "qwen3_moe": _Family(
        model_cls="Qwen3MoeForCausalLM",
        experts_key="num_experts",
        widths=("hidden_size", "intermediate_size", "moe_intermediate_size"),
        kept=(
            "norm_topk_prob",
            "decoder_sparse_step",
            "mlp_only_layers",
            "attention_bias",
            "head_dim",
            *_COMMON,
        ),
    ),
    "mixtral": _Family(
        model_cls="MixtralForCausalLM",
        experts_key="num_local_experts",
        widths=("hidden_size", "intermediate_size"),
        kept=_COMMON,
    ),
}


def _family(model_type: str) -> _Family:
    if model_type not in _FAMILIES:
        raise KeyError(
            f"No tiny twin for model_type {model_type!r}; twins exist for "
            f"{', '.join(sorted(_FAMILIES))}"
        )
    return _FAMILIES[model_type]


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


def _grouping(real: dict, experts: int) -> tuple[int, int, int]:
    """(experts, n_group, topk_group) for the twin. Grouped routing scores a group
    by its top-2 experts, so each group needs two: the twin gets enough experts to
    keep the real n_group (DeepSeek-V3: 8 groups -> 16 experts), capped by the real
    count, and n_group falls to a divisor only when that cannot be."""
    n_group = real.get("n_group") or 1
    if n_group > 1:
        experts = min(max(experts, 2 * n_group), real.get("n_routed_experts", experts))
    while experts % n_group or (n_group > 1 and experts // n_group < 2):
        n_group -= 1
    return experts, n_group, min(real.get("topk_group") or 1, n_group)


def tiny_config_like(name: str, **overrides):
    """A tiny config of ``name``'s family that keeps what matters of its layout.

    Kept as in the real config (where the family has them): the leading dense layers
    (``first_k_dense_replace``), grouped routing (``n_group``/``topk_group``),
    ``routed_scaling_factor``, ``norm_topk_prob``, shared experts
    (``n_shared_experts``), the MTP layers (``num_nextn_predict_layers``),
    ``use_qk_norm``, ``partial_rotary_factor``, ``attention_bias``, ``head_dim``,
    the MLA head dims (``qk_rope_head_dim``, ``qk_nope_head_dim``, ``v_head_dim``),
    Qwen3's ``decoder_sparse_step``/``mlp_only_layers``, ``hidden_act``,
    ``rms_norm_eps``, ``rope_theta``, ``tie_word_embeddings``.

    Scaled down:

    - widths (``hidden_size``, ``intermediate_size`` (dense MLP; Mixtral's experts),
      ``moe_intermediate_size`` (experts, shared experts), the MLA ranks
      ``q_lora_rank``/``kv_lora_rank``): :func:`tiny_width`, i.e. the residue modulo
      128 is kept (GLM-4.5-Air's 10944 -> 192, a multiple of 64 but not of 128;
      the other real widths -> 128);
    - ``head_dim`` is kept (128; Mixtral's is its hidden size over its heads),
      heads go to 4 query / 2 key-value (grouped-query attention stays, and
      ``o_proj``'s input width 4 x 128 is still not the hidden size, as in the real
      models); multi-head latent attention keeps as many key-value heads as query
      heads (4), as DeepSeek-V3 does;
    - ``num_hidden_layers``: the real dense layers plus 2 MoE layers;
    - routed experts 8 (16 for DeepSeek-V3, whose 8 routing groups need two
      experts each), ``num_experts_per_tok`` 2;
    - ``vocab_size`` 512, ``max_position_embeddings`` 512.

    ``overrides`` win over everything (e.g. ``vocab_size=len(tokenizer)``).
    """
    from transformers import CONFIG_MAPPING

    from .configs import real_config_dict

    real = real_config_dict(name)
    family = _family(real["model_type"])
    experts, n_group, topk_group = _grouping(
        real, min(TINY_EXPERTS, real[family.experts_key])
    )
    settings = {key: real[key] for key in family.kept if key in real}
    settings.update({key: tiny_width(real[key]) for key in family.widths})
    heads = TINY_ATTENTION_HEADS
    if "head_dim" not in real and not family.latent_attention:
        settings["head_dim"] = real["hidden_size"] // real["num_attention_heads"]
    settings.update(
        num_hidden_layers=real.get("first_k_dense_replace", 0) + TINY_MOE_LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=heads if family.latent_attention else TINY_KV_HEADS,
        num_experts_per_tok=min(TINY_TOP_K, real["num_experts_per_tok"]),
        vocab_size=512,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
    )
    settings[family.experts_key] = experts
    if "n_group" in real:
        settings.update(n_group=n_group, topk_group=topk_group)
    settings.update(overrides)
    return CONFIG_MAPPING[real["model_type"]](**settings)


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

    - Every router with an ``e_score_correction_bias`` (GLM, DeepSeek-V3) gets an
      uneven one (a seeded permutation of ``bias_spread x linspace(-1, 1)``), as
      trained routers have: routed-only calibration then leaves some experts with
      few or no tokens.
    - With ``num_nextn_predict_layers`` > 0 (GLM, DeepSeek-V3), the MTP layers are
      written as the real checkpoints store them (transformers never builds them):
      layer ``num_hidden_layers + i`` holds a full MoE decoder layer (attention,
      router, per-expert ``mlp.experts.E.{gate,up,down}_proj``, shared experts,
      norms) plus ``enorm``, ``hnorm``, ``eh_proj`` (2 x hidden -> hidden),
      ``shared_head.norm``, ``shared_head.head`` and ``embed_tokens``, in a second
      shard with a ``model.safetensors.index.json`` over both (the main weights go
      to ``model-00001-of-00002.safetensors``, the MTP layer to
      ``model-00002-of-00002.safetensors``). These are the names vLLM's
      ``Glm4MoeMTP.load_weights`` and ``DeepSeekMTP.load_weights`` read
      (``embed_tokens`` and ``shared_head`` are optional there: vLLM shares the
      target model's when they are absent), that GGUF conversions of GLM-4.5-Air
      list for layer 46 (``nextn.*``) and DeepSeek-V3's index lists for layer 61.
    """
    import transformers

    from ..tiny import train_tokenizer
    from .configs import real_config_dict

    model_cls = getattr(
        transformers, _family(real_config_dict(name)["model_type"]).model_cls
    )
    tokenizer = tokenizer or train_tokenizer()
    config = tiny_config_like(name, vocab_size=len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    _uneven_router_bias(model, bias_spread, seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if getattr(config, "num_nextn_predict_layers", 0):
        _write_mtp_layers(directory, model_cls, config, seed, dtype, bias_spread)
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
    directory: Path,
    model_cls: type,
    config,
    seed: int,
    dtype: torch.dtype,
    bias_spread: float,
) -> None:
    from safetensors.torch import load_file, save_file

    first = config.num_hidden_layers
    count = config.num_nextn_predict_layers
    hidden, vocab = config.hidden_size, config.vocab_size

    # a model with the MTP layers as ordinary layers, saved by transformers, gives
    # decoder-layer tensors in the checkpoint's own (per-expert) layout
    longer = type(config).from_dict(
        {**config.to_dict(), "num_hidden_layers": first + count}
    )
    torch.manual_seed(seed + 1)
    donor = model_cls(longer).to(dtype)
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
