"""Tiny random causal LMs for the transformers 5.17 MoE families, with a survey of
how each family routes tokens to its experts.

Used to develop and test the generic (experts-level) calibration path: that path
swaps the forward of the experts container that llmcompressor's ``linearize_moe``
leaves (a ``LinearExperts2D``) for a dispatcher and takes per-token affinities from
the block's router output through a forward hook on the router. ``FAMILIES`` records,
per family, what that dispatcher and that hook will see; ``check_family`` verifies it
on a tiny model (router output layout, whether the experts receive the routing the
router returned, linearization equivalence, save/reload).

Rerun the survey (about 30 s of CPU; ``--json=PATH`` also writes the raw results,
``--static`` prints a source-only scan of every transformers MoE block instead)::

    python -m tests.families               # all families
    python -m tests.families qwen3_moe gpt_oss
    python -m tests.families --static
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

__all__ = [
    "RouterLayout",
    "FamilySpec",
    "FAMILIES",
    "build_tiny",
    "save_tiny",
    "load_tiny",
    "find_moe_blocks",
    "check_family",
    "run_checks",
    "format_table",
]

VOCAB = 256
BATCH, SEQ = 2, 16


@dataclass(frozen=True)
class RouterLayout:
    """Where each routing tensor sits in the router's forward output.

    Indices into the returned tuple; ``None`` when the router does not return it.
    ``logits`` is [tokens, E] (E may include zero-compute experts), ``weights`` and
    ``indices`` are [tokens, k], ``dense_scores`` is [tokens, E] with non-selected
    experts zeroed (llama4). ``tuple_output=False``: the router returns a bare tensor
    (jamba: an ``nn.Linear`` whose output is the logits)."""

    logits: int | None = 0
    weights: int | None = 1
    indices: int | None = 2
    dense_scores: int | None = None
    tuple_output: bool = True

    def describe(self) -> str:
        if not self.tuple_output:
            return "logits (bare tensor)"
        slots = {
            self.logits: "logits[T,E]",
            self.weights: "weights[T,k]",
            self.indices: "indices[T,k]",
            self.dense_scores: "dense_scores[T,E]",
        }
        slots.pop(None, None)
        return "(" + ", ".join(slots[i] for i in sorted(slots)) + ")"


STANDARD = RouterLayout()  # (router_logits, top_k_weights, top_k_index)
GRANITE = RouterLayout(logits=2, weights=1, indices=0)
JAMBA = RouterLayout(logits=0, weights=None, indices=None, tuple_output=False)
LLAMA4 = RouterLayout(logits=1, weights=None, indices=None, dense_scores=0)
LONGCAT = RouterLayout(logits=None, weights=0, indices=1)


@dataclass(frozen=True)
class FamilySpec:
    """What a generic experts-level dispatcher needs to know about one family.

    ``scoring`` is how the router turns logits into the choice of experts;
    ``weights_fn`` how it turns them into the combination weights passed to the
    experts. ``experts_get_router_routing``: the block passes the router's
    ``indices``/``weights`` to ``self.experts(hidden, top_k_index, top_k_weights)``
    unchanged (verified by ``check_family``)."""

    model_type: str
    config_cls: str  # name in the ``transformers`` namespace
    model_cls: str  # name in the ``transformers`` namespace
    config_kwargs: dict
    block_cls: str
    experts_cls: str
    router_attr: str  # attribute of the block holding the router
    router_cls: str
    layer_attr: str  # attribute of the decoder layer holding the block
    router_layout: RouterLayout
    scoring: str
    weights_fn: str
    logits_fp32: bool  # logits computed in float32 whatever the model dtype
    has_shared_expert: bool
    shared_expert_gate: bool
    gated_experts: bool
    expert_activation: str
    expert_bias: bool
    linearizable: bool
    experts_get_router_routing: bool
    router_extra_args: str = ""
    # how ``routing_affinity`` rebuilds the router's choice scores from its output
    affinity_fn: str = "softmax"  # "softmax" | "sigmoid" over the logits
    choice_bias: str = ""  # "" | attribute path on the router | "arg1"
    group_score: str = ""  # "" | "top2sum" | "max": group-limited choice
    logits_from: str = "output"  # "output" | "classifier" (recomputed, longcat)
    auto_cls: str = "AutoModelForCausalLM"
    notes: str = ""
    routing_bias: tuple[str, ...] = field(default=())  # buffers to randomize


# common tiny sizes; families override below
_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=1,
    tie_word_embeddings=False,
)
_E, _K = 8, 2
_MLA = dict(  # DeepSeek multi-head latent attention, tiny
    kv_lora_rank=32,
    q_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=32,
)
_SOFTMAX_TOPK = "softmax over E, top-k"
_CORRECTION_BIAS = ("e_score_correction_bias",)

FAMILIES: dict[str, FamilySpec] = {
    "qwen3_moe": FamilySpec(
        model_type="qwen3_moe",
        config_cls="Qwen3MoeConfig",
        model_cls="Qwen3MoeForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            head_dim=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_experts=_E,
            num_experts_per_tok=_K,
            norm_topk_prob=True,
        ),
        block_cls="Qwen3MoeSparseMoeBlock",
        experts_cls="Qwen3MoeExperts",
        router_attr="gate",
        router_cls="Qwen3MoeTopKRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring=_SOFTMAX_TOPK,
        weights_fn="top-k softmax probs, renormalized if norm_topk_prob",
        logits_fp32=False,
        has_shared_expert=False,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="reference layout; mlp_only_layers / decoder_sparse_step give "
        "dense layers",
    ),
    "qwen2_moe": FamilySpec(
        model_type="qwen2_moe",
        config_cls="Qwen2MoeConfig",
        model_cls="Qwen2MoeForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=_E,
            num_experts_per_tok=_K,
        ),
        block_cls="Qwen2MoeSparseMoeBlock",
        experts_cls="Qwen2MoeExperts",
        router_attr="gate",
        router_cls="Qwen2MoeTopKRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring=_SOFTMAX_TOPK,
        weights_fn="top-k softmax probs (norm_topk_prob default False)",
        logits_fp32=False,
        has_shared_expert=True,
        shared_expert_gate=True,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="block adds sigmoid(shared_expert_gate(x)) * shared_expert(x)",
    ),
    "mixtral": FamilySpec(
        model_type="mixtral",
        config_cls="MixtralConfig",
        model_cls="MixtralForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            head_dim=32,
            intermediate_size=32,
            num_local_experts=_E,
            num_experts_per_tok=_K,
        ),
        block_cls="MixtralSparseMoeBlock",
        experts_cls="MixtralExperts",
        router_attr="gate",
        router_cls="MixtralTopKRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring=_SOFTMAX_TOPK,
        weights_fn="top-k softmax probs, always renormalized (float32)",
        logits_fp32=False,
        has_shared_expert=False,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="weights stay float32 in bf16 models; jitter noise only in training",
    ),
    "deepseek_v3": FamilySpec(
        model_type="deepseek_v3",
        config_cls="DeepseekV3Config",
        model_cls="DeepseekV3ForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=3,
            first_k_dense_replace=1,
            intermediate_size=64,
            moe_intermediate_size=32,
            n_routed_experts=_E,
            num_experts_per_tok=_K,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            **_MLA,
        ),
        block_cls="DeepseekV3MoE",
        experts_cls="DeepseekV3Experts",
        router_attr="gate",
        router_cls="DeepseekV3TopkRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring="sigmoid+bias, grouped top-k (top-2 sum per group, topk_group groups)",
        weights_fn="sigmoid (no bias) of chosen, renormalized, * routed_scaling_factor",
        logits_fp32=True,
        has_shared_expert=True,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="router called on 3-D hidden (reshapes itself); bias is "
        "gate.e_score_correction_bias; weights sum to routed_scaling_factor",
        routing_bias=_CORRECTION_BIAS,
        affinity_fn="sigmoid",
        choice_bias="e_score_correction_bias",
        group_score="top2sum",
    ),
    "gpt_oss": FamilySpec(
        model_type="gpt_oss",
        config_cls="GptOssConfig",
        model_cls="GptOssForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            head_dim=32,
            num_key_value_heads=1,
            intermediate_size=32,
            num_local_experts=_E,
            num_experts_per_tok=_K,
            sliding_window=8,
        ),
        block_cls="GptOssMLP",
        experts_cls="GptOssExperts",
        router_attr="router",
        router_cls="GptOssTopKRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring="top-k of raw logits (router has a bias)",
        weights_fn="softmax over the k chosen logits",
        logits_fp32=False,
        has_shared_expert=False,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="clamped SwiGLU: (clamp(up,+-7)+1)*g*sigmoid(1.702*g), "
        "g=clamp(gate,max=7)",
        expert_bias=True,
        linearizable=True,
        experts_get_router_routing=True,
        notes="block returns (hidden, router_scores) tuple; router has bias; "
        "fused gate_up is interleaved (even=gate, odd=up) and transposed "
        "(GptOssLinearExperts de-interleaves); experts.forward args are named "
        "(router_indices, routing_weights); scores are top-k only (no dense scores)",
        routing_bias=("gate_up_proj_bias", "down_proj_bias"),
    ),
    "olmoe": FamilySpec(
        model_type="olmoe",
        config_cls="OlmoeConfig",
        model_cls="OlmoeForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            intermediate_size=32,
            num_experts=_E,
            num_experts_per_tok=_K,
        ),
        block_cls="OlmoeSparseMoeBlock",
        experts_cls="OlmoeExperts",
        router_attr="gate",
        router_cls="OlmoeTopKRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring=_SOFTMAX_TOPK,
        weights_fn="top-k softmax probs (norm_topk_prob default False)",
        logits_fp32=False,
        has_shared_expert=False,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
    ),
    "qwen3_next": FamilySpec(
        model_type="qwen3_next",
        config_cls="Qwen3NextConfig",
        model_cls="Qwen3NextForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            head_dim=32,
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=32,
            linear_value_head_dim=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=_E,
            num_experts_per_tok=_K,
        ),
        block_cls="Qwen3NextSparseMoeBlock",
        experts_cls="Qwen3NextExperts",
        router_attr="gate",
        router_cls="Qwen3NextTopKRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring=_SOFTMAX_TOPK,
        weights_fn="top-k softmax probs, renormalized (norm_topk_prob default True)",
        logits_fp32=False,
        has_shared_expert=True,
        shared_expert_gate=True,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="hybrid gated-DeltaNet/attention layers; MoE block as qwen2_moe",
    ),
    "granitemoe": FamilySpec(
        model_type="granitemoe",
        config_cls="GraniteMoeConfig",
        model_cls="GraniteMoeForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            intermediate_size=32,
            num_local_experts=_E,
            num_experts_per_tok=_K,
        ),
        block_cls="GraniteMoeMoE",
        experts_cls="GraniteMoeExperts",
        router_attr="router",
        router_cls="GraniteMoeTopKRouter",
        layer_attr="block_sparse_moe",
        router_layout=GRANITE,
        scoring="top-k of raw logits",
        weights_fn="softmax over the k chosen logits",
        logits_fp32=True,
        has_shared_expert=False,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="router returns (top_k_index, top_k_weights, router_logits): "
        "REVERSED order; logits .float()",
    ),
    "minimax_m2": FamilySpec(
        model_type="minimax_m2",
        config_cls="MiniMaxM2Config",
        model_cls="MiniMaxM2ForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            head_dim=32,
            intermediate_size=32,
            num_local_experts=_E,
            num_experts_per_tok=_K,
        ),
        block_cls="MiniMaxM2SparseMoeBlock",
        experts_cls="MiniMaxM2Experts",
        router_attr="gate",
        router_cls="MiniMaxM2TopKRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring="sigmoid+bias, top-k (no groups)",
        weights_fn="sigmoid (no bias) of chosen, renormalized (float32)",
        logits_fp32=False,
        has_shared_expert=False,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        router_extra_args="gate(hidden, block.e_score_correction_bias)",
        notes="correction bias lives on the BLOCK and is passed to the router "
        "as a 2nd positional arg",
        routing_bias=_CORRECTION_BIAS,
        affinity_fn="sigmoid",
        choice_bias="arg1",
    ),
    "qwen3_5_moe": FamilySpec(
        model_type="qwen3_5_moe_text",
        config_cls="Qwen3_5MoeTextConfig",
        model_cls="Qwen3_5MoeForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            head_dim=32,
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=32,
            linear_value_head_dim=32,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=_E,
            num_experts_per_tok=_K,
        ),
        block_cls="Qwen3_5MoeSparseMoeBlock",
        experts_cls="Qwen3_5MoeExperts",
        router_attr="gate",
        router_cls="Qwen3_5MoeTopKRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring=_SOFTMAX_TOPK,
        weights_fn="top-k softmax probs, always renormalized",
        logits_fp32=False,
        has_shared_expert=True,
        shared_expert_gate=True,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="text-only Qwen3_5MoeForCausalLM; as qwen3_next; llmcompressor "
        "needs repack_moe before save for this arch",
    ),
    "qwen3_vl_moe": FamilySpec(
        model_type="qwen3_vl_moe",
        config_cls="Qwen3VLMoeConfig",
        model_cls="Qwen3VLMoeForConditionalGeneration",
        config_kwargs=dict(
            text_config=dict(
                vocab_size=VOCAB,
                hidden_size=64,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=32,
                max_position_embeddings=128,
                num_hidden_layers=2,
                intermediate_size=64,
                moe_intermediate_size=32,
                num_experts=_E,
                num_experts_per_tok=_K,
                rope_parameters=dict(
                    rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6]
                ),
            ),
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=64,
                deepstack_visual_indexes=[0],
                num_position_embeddings=16,
            ),
        ),
        block_cls="Qwen3VLMoeTextSparseMoeBlock",
        experts_cls="Qwen3VLMoeTextExperts",
        router_attr="gate",
        router_cls="Qwen3VLMoeTextTopKRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring=_SOFTMAX_TOPK,
        weights_fn="top-k softmax probs, always renormalized",
        logits_fp32=False,
        has_shared_expert=False,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        auto_cls="AutoModelForImageTextToText",
        notes="no text-only CausalLM class: built as the VLM with a 1-block vision "
        "tower, run on text ids; model.config is composite (text_config)",
    ),
    "deepseek_v2": FamilySpec(
        model_type="deepseek_v2",
        config_cls="DeepseekV2Config",
        model_cls="DeepseekV2ForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=3,
            first_k_dense_replace=1,
            intermediate_size=64,
            moe_intermediate_size=32,
            n_routed_experts=_E,
            num_experts_per_tok=_K,
            n_shared_experts=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.0,
            **_MLA,
        ),
        block_cls="DeepseekV2Moe",
        experts_cls="DeepseekV2Experts",
        router_attr="gate",
        router_cls="DeepseekV2TopkRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring="softmax; greedy top-k or group_limited_greedy (max per group)",
        weights_fn="softmax probs of chosen (no renorm) * routed_scaling_factor",
        logits_fp32=True,
        has_shared_expert=True,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="router on 3-D hidden; weights float32 in bf16 models",
        group_score="max",
    ),
    "glm4_moe": FamilySpec(
        model_type="glm4_moe",
        config_cls="Glm4MoeConfig",
        model_cls="Glm4MoeForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=3,
            first_k_dense_replace=1,
            head_dim=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            n_routed_experts=_E,
            num_experts_per_tok=_K,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
        ),
        block_cls="Glm4MoeMoE",
        experts_cls="Glm4MoeExperts",
        router_attr="gate",
        router_cls="Glm4MoeTopkRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring="sigmoid+bias, grouped top-k (as deepseek_v3)",
        weights_fn="sigmoid (no bias) of chosen, renormalized, * routed_scaling_factor",
        logits_fp32=True,
        has_shared_expert=True,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="identical routing code to deepseek_v3",
        routing_bias=_CORRECTION_BIAS,
        affinity_fn="sigmoid",
        choice_bias="e_score_correction_bias",
        group_score="top2sum",
    ),
    "ernie4_5_moe": FamilySpec(
        model_type="ernie4_5_moe",
        config_cls="Ernie4_5_MoeConfig",
        model_cls="Ernie4_5_MoeForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=3,
            moe_layer_start_index=1,
            intermediate_size=64,
            moe_intermediate_size=32,
            moe_num_experts=_E,
            moe_k=_K,
            moe_num_shared_experts=1,
        ),
        block_cls="Ernie4_5_MoeSparseMoeBlock",
        experts_cls="Ernie4_5_MoeExperts",
        router_attr="gate",
        router_cls="Ernie4_5_MoeTopKRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring="softmax+bias, top-k (bias added to probabilities)",
        weights_fn="softmax probs (no bias) of chosen, renormalized (clamp norm_min)",
        logits_fp32=True,
        has_shared_expert=True,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="bias is gate.moe_statics.e_score_correction_bias [1,E] (a "
        "Parameter); router weight float32 and autocast disabled",
        routing_bias=_CORRECTION_BIAS,
        choice_bias="moe_statics.e_score_correction_bias",
    ),
    "dots1": FamilySpec(
        model_type="dots1",
        config_cls="Dots1Config",
        model_cls="Dots1ForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=3,
            first_k_dense_replace=1,
            head_dim=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            n_routed_experts=_E,
            num_experts_per_tok=_K,
            n_shared_experts=1,
            norm_topk_prob=True,
        ),
        block_cls="Dots1MoE",
        experts_cls="Dots1Experts",
        router_attr="gate",
        router_cls="Dots1TopkRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring="sigmoid+bias, grouped top-k (n_group=1 default)",
        weights_fn="sigmoid (no bias) of chosen, renormalized, * routed_scaling_factor",
        logits_fp32=True,
        has_shared_expert=True,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="deepseek_v3 routing code",
        routing_bias=_CORRECTION_BIAS,
        affinity_fn="sigmoid",
        choice_bias="e_score_correction_bias",
        group_score="top2sum",
    ),
    "hunyuan_v1_moe": FamilySpec(
        model_type="hunyuan_v1_moe",
        config_cls="HunYuanMoEV1Config",
        model_cls="HunYuanMoEV1ForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            head_dim=32,
            intermediate_size=32,
            num_experts=_E,
            moe_topk=_K,
        ),
        block_cls="HunYuanMoEV1Moe",
        experts_cls="HunYuanMoEV1Experts",
        router_attr="gate",
        router_cls="HunYuanMoEV1Gate",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring=_SOFTMAX_TOPK,
        weights_fn="top-k softmax probs, renormalized",
        logits_fp32=False,
        has_shared_expert=True,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="router projection is gate.wg (nn.Linear created float32; logits "
        "are float32 only while wg stays float32, from_pretrained casts it); "
        "shared_mlp and experts both use intermediate_size; num_experts/moe_topk "
        "may be per-layer lists",
    ),
    "granitemoehybrid": FamilySpec(
        model_type="granitemoehybrid",
        config_cls="GraniteMoeHybridConfig",
        model_cls="GraniteMoeHybridForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            layer_types=["mamba", "attention"],
            intermediate_size=32,
            shared_intermediate_size=64,
            num_local_experts=_E,
            num_experts_per_tok=_K,
            mamba_n_heads=4,
            mamba_d_head=32,
            mamba_d_state=16,
            mamba_n_groups=1,
            mamba_chunk_size=16,
        ),
        block_cls="GraniteMoeHybridMoE",
        experts_cls="GraniteMoeHybridExperts",
        router_attr="router",
        router_cls="GraniteMoeHybridTopKRouter",
        layer_attr="block_sparse_moe",
        router_layout=GRANITE,
        scoring="top-k of raw logits",
        weights_fn="softmax over the k chosen logits",
        logits_fp32=True,
        has_shared_expert=True,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="router order REVERSED as granitemoe; shared_mlp is on the DECODER "
        "LAYER, outside the MoE block; Mamba2 layers",
    ),
    "jamba": FamilySpec(
        model_type="jamba",
        config_cls="JambaConfig",
        model_cls="JambaForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            num_key_value_heads=1,
            intermediate_size=32,
            num_experts=_E,
            num_experts_per_tok=_K,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            use_mamba_kernels=False,
            mamba_d_state=16,
            mamba_dt_rank=8,
        ),
        block_cls="JambaSparseMoeBlock",
        experts_cls="JambaExperts",
        router_attr="router",
        router_cls="Linear",
        layer_attr="feed_forward",
        router_layout=JAMBA,
        scoring=_SOFTMAX_TOPK + " (block.route_tokens_to_experts)",
        weights_fn="top-k softmax probs, no renorm",
        logits_fp32=False,
        has_shared_expert=False,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=False,
        notes="router is a plain nn.Linear returning logits; top-k is done by "
        "the block, so the router hook sees only logits (indices/weights must be "
        "recomputed or taken at the experts call); MoE every 2nd layer",
    ),
    "phimoe": FamilySpec(
        model_type="phimoe",
        config_cls="PhimoeConfig",
        model_cls="PhimoeForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            intermediate_size=32,
            num_local_experts=_E,
            num_experts_per_tok=_K,
        ),
        block_cls="PhimoeSparseMoeBlock",
        experts_cls="PhimoeExperts",
        router_attr="router",
        router_cls="PhimoeTopKRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring="sparsemixer: top-1, then top-1 of the rest (always k=2)",
        weights_fn="per pick, softmax over logits within a jitter_eps "
        "relative window of that pick",
        logits_fp32=False,
        has_shared_expert=False,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="router subclasses nn.Linear (forward returns a tuple); sparsemixer "
        "hard-codes 2 picks whatever num_experts_per_tok; weights are not "
        "probabilities over E",
    ),
    "flex_olmo": FamilySpec(
        model_type="flex_olmo",
        config_cls="FlexOlmoConfig",
        model_cls="FlexOlmoForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            intermediate_size=32,
            num_experts=_E,
            num_experts_per_tok=_K,
        ),
        block_cls="FlexOlmoSparseMoeBlock",
        experts_cls="FlexOlmoExperts",
        router_attr="gate",
        router_cls="FlexOlmoTopKRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring=_SOFTMAX_TOPK,
        weights_fn="top-k softmax probs (norm_topk_prob default False)",
        logits_fp32=False,
        has_shared_expert=False,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
    ),
    "lfm2_moe": FamilySpec(
        model_type="lfm2_moe",
        config_cls="Lfm2MoeConfig",
        model_cls="Lfm2MoeForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=3,
            num_dense_layers=1,
            layer_types=["conv", "full_attention", "conv"],
            intermediate_size=64,
            moe_intermediate_size=32,
            num_experts=_E,
            num_experts_per_tok=_K,
            tie_word_embeddings=True,
        ),
        block_cls="Lfm2MoeSparseMoeBlock",
        experts_cls="Lfm2MoeExperts",
        router_attr="gate",
        router_cls="Lfm2MoeTopKRouter",
        layer_attr="feed_forward",
        router_layout=STANDARD,
        scoring="sigmoid+bias, top-k (use_expert_bias)",
        weights_fn="sigmoid (no bias) of chosen, renormalized, * routed_scaling_factor",
        logits_fp32=False,
        has_shared_expert=False,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up (act fixed; config has no hidden_act)",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        router_extra_args="gate(hidden, block.expert_bias)",
        notes="bias is block.expert_bias, passed to the router as 2nd arg; "
        "no hidden_act in config (llmcompressor special-cases silu)",
        routing_bias=("expert_bias",),
        affinity_fn="sigmoid",
        choice_bias="arg1",
    ),
    "longcat_flash": FamilySpec(
        model_type="longcat_flash",
        config_cls="LongcatFlashConfig",
        model_cls="LongcatFlashForCausalLM",
        config_kwargs=dict(
            num_layers=1,
            num_hidden_layers=2,
            ffn_hidden_size=64,
            expert_ffn_hidden_size=32,
            n_routed_experts=_E,
            zero_expert_num=2,
            moe_topk=_K,
            head_dim=16,
            **_MLA,
        ),
        block_cls="LongcatFlashMoE",
        experts_cls="LongcatFlashExperts",
        router_attr="router",
        router_cls="LongcatFlashTopkRouter",
        layer_attr="mlp",
        router_layout=LONGCAT,
        scoring="softmax+bias over E+zero experts, top-k",
        weights_fn="softmax probs (no bias) of chosen * routed_scaling_factor",
        logits_fp32=True,
        has_shared_expert=False,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=False,
        experts_get_router_routing=True,
        notes="NOT linearized (experts not @use_experts_implementation); router "
        "returns (weights, indices) only - no logits, and uses F.linear on "
        "router.classifier.weight so hooking classifier sees nothing; indices >= "
        "n_routed_experts are zero-compute (identity) experts; each decoder layer "
        "holds 2 attention + 2 dense MLPs + 1 MoE (shortcut)",
        routing_bias=_CORRECTION_BIAS,
        choice_bias="e_score_correction_bias",
        logits_from="classifier",
    ),
    "llama4": FamilySpec(
        model_type="llama4_text",
        config_cls="Llama4TextConfig",
        model_cls="Llama4ForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            head_dim=32,
            intermediate_size=32,
            intermediate_size_mlp=64,
            num_local_experts=_E,
            num_experts_per_tok=_K,
            interleave_moe_layer_step=1,
        ),
        block_cls="Llama4TextMoe",
        experts_cls="Llama4TextExperts",
        router_attr="router",
        router_cls="Llama4Router",
        layer_attr="feed_forward",
        router_layout=LLAMA4,
        scoring="top-k of raw logits",
        weights_fn="sigmoid of chosen logits (dense [T,E], others 0)",
        logits_fp32=False,
        has_shared_expert=True,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=False,
        notes="experts called as self.experts(routed_in) with ALL tokens repeated E "
        "times and PRE-SCALED by the score (weight applied to the input, not the "
        "output; non-chosen rows are zeros); no indices/weights reach the "
        "experts; block returns (out, router_logits); linearized through the "
        "registered Llama4LinearExperts (custom forward), which FAILS on "
        "Llama4ForCausalLM (reads config.text_config; see llama4_vl)",
        affinity_fn="sigmoid",
    ),
    # extras, beyond the brief's list
    "minimax": FamilySpec(
        model_type="minimax",
        config_cls="MiniMaxConfig",
        model_cls="MiniMaxForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            head_dim=32,
            intermediate_size=32,
            num_local_experts=_E,
            num_experts_per_tok=_K,
            layer_types=["linear_attention", "full_attention"],
            block_size=16,
        ),
        block_cls="MiniMaxSparseMoeBlock",
        experts_cls="MiniMaxExperts",
        router_attr="gate",
        router_cls="MiniMaxTopKRouter",
        layer_attr="mlp",
        router_layout=STANDARD,
        scoring=_SOFTMAX_TOPK,
        weights_fn="top-k softmax probs, renormalized (float32)",
        logits_fp32=False,
        has_shared_expert=False,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="MiniMax-Text-01 (lightning attention); MoE block = mixtral",
    ),
    "granitemoeshared": FamilySpec(
        model_type="granitemoeshared",
        config_cls="GraniteMoeSharedConfig",
        model_cls="GraniteMoeSharedForCausalLM",
        config_kwargs=dict(
            num_hidden_layers=2,
            intermediate_size=32,
            shared_intermediate_size=64,
            num_local_experts=_E,
            num_experts_per_tok=_K,
        ),
        block_cls="GraniteMoeSharedMoE",
        experts_cls="GraniteMoeSharedExperts",
        router_attr="router",
        router_cls="GraniteMoeSharedTopKRouter",
        layer_attr="block_sparse_moe",
        router_layout=GRANITE,
        scoring="top-k of raw logits",
        weights_fn="softmax over the k chosen logits",
        logits_fp32=True,
        has_shared_expert=True,
        shared_expert_gate=False,
        gated_experts=True,
        expert_activation="silu(gate)*up",
        expert_bias=False,
        linearizable=True,
        experts_get_router_routing=True,
        notes="as granitemoe; shared_mlp on the decoder layer, outside the block",
    ),
}


FAMILIES["llama4_vl"] = replace(
    FAMILIES["llama4"],
    model_type="llama4",
    config_cls="Llama4Config",
    model_cls="Llama4ForConditionalGeneration",
    config_kwargs=dict(
        text_config=FAMILIES["llama4"].config_kwargs,
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=28,
            patch_size=14,
            vision_output_dim=32,
            projector_input_dim=32,
            projector_output_dim=32,
        ),
    ),
    auto_cls="AutoModelForImageTextToText",
    notes="llama4 built as the VLM (1-block vision tower), run on text ids: "
    "Llama4LinearExperts.from_experts_module reads config.text_config, so "
    "linearize_moe only works when model.config is the composite Llama4Config",
)

# ----------------------------------------------------------------------------- build


def _resolve(name: str):
    import transformers

    return getattr(transformers, name)


def tiny_config(family: str, **overrides):
    """The tiny config of ``family`` (``_BASE`` + the family's kwargs + overrides)."""
    spec = FAMILIES[family]
    config_cls = _resolve(spec.config_cls)
    if "text_config" in spec.config_kwargs:  # composite (VLM) config
        kwargs = copy.deepcopy(spec.config_kwargs)
        kwargs["text_config"] = {**_BASE, **kwargs["text_config"], **overrides}
        return config_cls(**kwargs)
    kwargs = {**_BASE, **copy.deepcopy(spec.config_kwargs), **overrides}
    return config_cls(**kwargs)


def _randomize_routing_biases(model: torch.nn.Module, names: tuple[str, ...]):
    """Non-zero routing/expert biases (transformers inits them to zero), so the
    checks see them steer the choice and reach the outputs."""
    if not names:
        return
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.rsplit(".", 1)[-1] in names:
                tensor.normal_(0.0, 0.02)


def _cast_like_from_pretrained(model, dtype: torch.dtype):
    """Cast as ``from_pretrained(dtype=...)`` leaves a model, which ``.to(dtype)``
    does not: non-persistent buffers (RoPE ``inv_freq``) and complex ones stay as
    they are, and ``_keep_in_fp32_modules_strict`` (``e_score_correction_bias``,
    ernie's ``gate.weight``) stays float32 for bf16/fp16."""
    if dtype == torch.float32:
        return
    strict = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    non_persistent = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name in module._non_persistent_buffers_set
    }
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if not tensor.is_floating_point() or name in non_persistent:
            continue
        keep = dtype in (torch.float16, torch.bfloat16) and any(
            pattern in name for pattern in strict
        )
        tensor.data = tensor.data.to(torch.float32 if keep else dtype)


def router_weight(router) -> torch.Tensor | None:
    """The [E, hidden] projection weight of a router module."""
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    for sub in ("wg", "classifier"):
        if hasattr(router, sub):
            return getattr(router, sub).weight
    return None


def build_tiny(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
):
    """A tiny random-init model of ``family`` in eval mode.

    Weights are drawn in float32 from ``seed`` and then cast, so the same seed gives
    the same model in every dtype. ``config.dtype`` is set to ``dtype`` (llmcompressor
    sizes ``LinearExperts2D`` from it)."""
    spec = FAMILIES[family]
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = _resolve(spec.model_cls)(config)
    _randomize_routing_biases(model, spec.routing_bias)
    for _, block in find_moe_blocks(model, family):
        weight = router_weight(getattr(block, spec.router_attr))
        if weight is not None and not weight.any():
            with torch.no_grad():  # left at zero by transformers' init (ernie4_5_moe)
                weight.normal_(0.0, config.get_text_config().initializer_range)
    _cast_like_from_pretrained(model, dtype)
    model.eval()
    model.config.dtype = dtype
    for sub in ("text_config", "vision_config"):
        if getattr(model.config, sub, None) is not None:
            getattr(model.config, sub).dtype = dtype
    return model


def save_tiny(
    family: str,
    directory: str | Path,
    tokenizer=None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """Build and save the tiny ``family`` model (and ``tokenizer``) to ``directory``,
    reloadable by ``load_tiny`` / ``AutoModelForCausalLM.from_pretrained`` (the
    VLM qwen3_vl_moe through ``AutoModelForImageTextToText``). The vocabulary grows
    to the tokenizer's size when it has more than 256 tokens."""
    if tokenizer is not None and len(tokenizer) > VOCAB:
        overrides.setdefault("vocab_size", len(tokenizer))
    model = build_tiny(family, seed=seed, dtype=dtype, **overrides)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_tiny(family: str, directory: str | Path, **kwargs):
    import transformers

    auto_cls = getattr(transformers, FAMILIES[family].auto_cls)
    return auto_cls.from_pretrained(directory, **kwargs).eval()


def find_moe_blocks(model: torch.nn.Module, family: str):
    """``[(name, block)]`` of the family's MoE blocks in ``model``."""
    block_cls = FAMILIES[family].block_cls
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__name__ == block_cls
    ]


# ----------------------------------------------------------------------------- checks


def _source_line(cls, needle: str) -> str:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""
    for line in source.splitlines():
        if needle in line:
            return " ".join(line.split())
    return ""


def _ids(seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (BATCH, SEQ), generator=gen)


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def _eager_logits(model, ids) -> torch.Tensor | None:
    """Logits with the fused experts' eager (per-expert loop, ``index_add_``)
    forward; the default ``grouped_mm`` one sums the k outputs in the routing
    weights' dtype instead. ``None`` where the model has no such switch."""
    try:
        saved = model.get_experts_implementation()
        model.set_experts_implementation("eager")
    except Exception:  # noqa: BLE001 - models without @use_experts_implementation
        return None
    try:
        return _logits(model, ids)
    finally:
        model.set_experts_implementation(saved)


def routing_affinity(
    family: str, router, args: tuple, output, grouped: bool = False
) -> torch.Tensor:
    """Dense per-token affinity [tokens, E] (float32) rebuilt from what a forward
    hook on the router sees (its positional ``args`` and ``output``): the
    family's scoring function of the logits plus its choice bias. With
    ``grouped=True`` experts outside the token's selected groups get ``-inf``, and
    ``topk(k)`` of the result reproduces the router's choice (``check_family``
    verifies it). Longcat's router returns no logits: they are recomputed from
    ``router.classifier`` (E includes its zero-compute experts)."""
    spec = FAMILIES[family]
    if spec.logits_from == "classifier":
        hidden = args[0].reshape(-1, args[0].shape[-1])
        logits = torch.nn.functional.linear(
            hidden.float(), router.classifier.weight.float()
        )
    else:
        outs = output if isinstance(output, tuple) else (output,)
        logits = outs[spec.router_layout.logits].float()
    if spec.affinity_fn == "sigmoid":
        scores = logits.sigmoid()
    else:
        scores = logits.softmax(dim=-1)
    if spec.choice_bias == "arg1":
        bias = args[1] if len(args) > 1 else None
    elif spec.choice_bias:
        bias = router
        for part in spec.choice_bias.split("."):
            bias = getattr(bias, part)
    else:
        bias = None
    if bias is not None:
        scores = scores + bias.float().reshape(-1)
    if grouped and spec.group_score:
        groups, keep = router.num_group, router.topk_group
        per_group = scores.view(-1, groups, scores.shape[-1] // groups)
        if spec.group_score == "top2sum":
            group_scores = per_group.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            group_scores = per_group.max(dim=-1).values
        chosen = group_scores.topk(keep, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores, dtype=torch.bool)
        mask.scatter_(1, chosen, True)
        mask = mask.unsqueeze(-1).expand_as(per_group).reshape(scores.shape)
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores


def _probe_routing(model, family: str, ids) -> dict:
    """Hook the router and the experts of the first MoE block; report the router
    output layout and whether the experts receive the router's routing unchanged."""
    spec = FAMILIES[family]
    blocks = find_moe_blocks(model, family)
    if not blocks:
        return {"error": "no MoE block found"}
    block = blocks[0][1]
    router, experts = getattr(block, spec.router_attr), block.experts
    seen: dict = {}

    def router_hook(_module, args, kwargs, output):
        seen.setdefault("router_args", args)
        seen.setdefault("router_kwargs", kwargs)
        seen.setdefault("router_out", output)

    def experts_hook(_module, args, kwargs):
        seen.setdefault("experts_args", args)
        seen.setdefault("experts_kwargs", kwargs)

    handles = [
        router.register_forward_hook(router_hook, with_kwargs=True),
        experts.register_forward_pre_hook(experts_hook, with_kwargs=True),
    ]
    try:
        _logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()

    out = seen["router_out"]
    outs = out if isinstance(out, tuple) else (out,)
    eargs = seen["experts_args"]
    lay = spec.router_layout
    tokens = BATCH * SEQ
    result = {
        "router_in_shape": list(seen["router_args"][0].shape),
        "router_n_args": len(seen["router_args"]) + len(seen["router_kwargs"]),
        "router_out": [
            [list(t.shape), str(t.dtype).replace("torch.", "")] for t in outs
        ],
        "experts_n_args": len(eargs) + len(seen["experts_kwargs"]),
        "experts_in_shape": list(eargs[0].shape),
    }
    problems = []
    if lay.logits is not None:
        logits = outs[lay.logits]
        if list(logits.shape[-1:]) != [router_weight(router).shape[0]]:
            problems.append(f"logits shape {list(logits.shape)}")
        if logits.float().std() == 0:
            problems.append("constant logits")
        result["logits_dtype"] = str(logits.dtype).replace("torch.", "")
        model_dtype = model.get_input_embeddings().weight.dtype
        if model_dtype != torch.float32 and (logits.dtype == torch.float32) != (
            spec.logits_fp32
        ):
            problems.append("logits_fp32 differs from spec")
    if lay.indices is not None:
        idx = outs[lay.indices]
        if idx.dtype not in (torch.int64, torch.int32) or idx.shape[0] != tokens:
            problems.append(f"indices {list(idx.shape)} {idx.dtype}")
        result["weights_dtype"] = str(outs[lay.weights].dtype).replace("torch.", "")
        result["experts_hit"] = int(idx.unique().numel())
        if len(eargs) >= 3:
            same_idx = eargs[1] is idx or torch.equal(eargs[1], idx)
            w = outs[lay.weights]
            same_w = eargs[2] is w or (
                eargs[2].shape == w.shape and torch.equal(eargs[2], w)
            )
            result["experts_get_router_routing"] = bool(same_idx and same_w)
        else:
            result["experts_get_router_routing"] = False
    else:
        result["experts_get_router_routing"] = False
    # the affinity rebuilt from the hook's view reproduces the router's choice?
    if lay.indices is not None:
        chosen = outs[lay.indices]
    elif lay.dense_scores is not None:  # llama4: nonzero dense scores
        chosen = outs[lay.logits].topk(int(router.top_k), dim=-1)[1]
    else:  # jamba: the block does the top-k; compare at the experts call
        chosen = eargs[1]
    affinity = routing_affinity(family, router, seen["router_args"], out, grouped=True)
    rebuilt = affinity.topk(chosen.shape[-1], dim=-1)[1]
    result["affinity_shape"] = list(affinity.shape)
    result["affinity_topk_match"] = float(
        (rebuilt.sort(-1)[0] == chosen.sort(-1)[0]).all(-1).float().mean()
    )
    if result["experts_get_router_routing"] != spec.experts_get_router_routing:
        problems.append("experts_get_router_routing differs from spec")
    result["layout_problems"] = problems
    return result


def _linearize(model) -> tuple[int, int]:
    from llmcompressor.modeling.moe.linearize import (
        get_linearized_moes,
        get_non_linearized_moes,
    )
    from llmcompressor.modeling.moe.linearize import linearize_moe as _lin

    before = len(get_non_linearized_moes(model))
    with contextlib.redirect_stderr(io.StringIO()):
        _lin(model)
    return before, len(get_linearized_moes(model))


def check_family(family: str, seed: int = 0) -> dict:
    """Build, run (fp32, bf16), linearize, save and reload ``family``'s tiny model.
    Returns a dict of results; ``error_*`` keys hold the failures."""
    spec = FAMILIES[family]
    res: dict = {"family": family}
    start = time.perf_counter()
    block_cls = None
    ids = _ids()
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        try:
            model = build_tiny(family, seed=seed, dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - the survey records every failure
            res[f"error_build_{tag}"] = f"{type(exc).__name__}: {exc}"
            continue
        blocks = find_moe_blocks(model, family)
        if tag == "fp32":
            res["layers"] = model.config.get_text_config().num_hidden_layers
            res["moe_blocks"] = len(blocks)
            res["params"] = sum(p.numel() for p in model.parameters())
            block_cls = type(blocks[0][1]) if blocks else None
        try:
            ref = _logits(model, ids)
            res[f"forward_{tag}"] = bool(torch.isfinite(ref).all())
        except Exception as exc:  # noqa: BLE001
            res[f"error_forward_{tag}"] = f"{type(exc).__name__}: {exc}"
            continue
        res[f"experts_impl_{tag}"] = getattr(
            model.config.get_text_config(), "_experts_implementation", None
        )
        ref_eager = _eager_logits(model, ids)
        try:
            res[f"probe_{tag}"] = _probe_routing(model, family, ids)
        except Exception as exc:  # noqa: BLE001
            res[f"error_probe_{tag}"] = f"{type(exc).__name__}: {exc}"
        if tag == "fp32":
            # the usual flow: save, reload, linearize the reloaded model
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    model.save_pretrained(tmp)
                    res["config_dtype_after_save"] = repr(model.config.dtype)
                    with contextlib.redirect_stderr(io.StringIO()):
                        model = load_tiny(family, tmp)
                    res["reload_type"] = type(model).__name__
                    res["reload_max_abs_diff"] = (
                        (_logits(model, ids) - ref).abs().max().item()
                    )
            except Exception as exc:  # noqa: BLE001
                res["error_reload"] = f"{type(exc).__name__}: {exc}"
                model = build_tiny(family, seed=seed, dtype=dtype)
        try:
            before, after = _linearize(model)
            res[f"experts_found_{tag}"] = before
            res[f"linearized_{tag}"] = after
            lin = _logits(model, ids)
            res[f"lin_max_abs_diff_{tag}"] = (lin - ref).abs().max().item()
            if ref_eager is not None:
                res[f"lin_vs_eager_max_abs_diff_{tag}"] = (
                    (lin - ref_eager).abs().max().item()
                )
            res[f"logits_absmax_{tag}"] = ref.abs().max().item()
            if tag == "fp32" and after:
                experts = find_moe_blocks(model, family)[0][1].experts
                res["linear_experts_cls"] = [
                    c.__name__ for c in type(experts).__mro__[:2]
                ]
                res["linear_expert_bias"] = experts[0].down_proj.bias is not None
        except Exception as exc:  # noqa: BLE001
            res[f"error_linearize_{tag}"] = f"{type(exc).__name__}: {exc}"
    if block_cls is not None:
        res["experts_call"] = _source_line(block_cls, "self.experts(")
        res["router_call"] = _source_line(block_cls, f"self.{spec.router_attr}(")
    res["seconds"] = round(time.perf_counter() - start, 2)
    return res


def static_survey() -> list[dict]:
    """Source scan of every transformers model file: each class whose forward calls
    ``self.experts(``, the router call before it, and whether the experts class is
    ``@use_experts_implementation`` (what ``linearize_moe`` picks up generically).
    ``passes_routing``: the experts call's 2nd/3rd args are names assigned by the
    router call (routing passed unchanged), judged from the source only."""
    import ast
    import re

    import transformers

    models = Path(transformers.__file__).parent / "models"
    rows = []
    for path in sorted(models.glob("*/modeling_*.py")):
        source = path.read_text()
        if "self.experts(" not in source:
            continue
        tree = ast.parse(source)
        classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
        decorated = {
            name
            for name, node in classes.items()
            if any(
                "use_experts_implementation" in ast.unparse(d)
                for d in node.decorator_list
            )
        }
        for name, node in classes.items():
            init = next(
                (f for f in node.body if getattr(f, "name", "") == "__init__"), None
            )
            forward = next(
                (f for f in node.body if getattr(f, "name", "") == "forward"), None
            )
            if forward is None or "self.experts(" not in ast.unparse(forward):
                continue
            experts_cls = ""
            attrs = {}
            for stmt in ast.walk(init) if init else ():
                if (
                    isinstance(stmt, ast.Assign)
                    and isinstance(stmt.targets[0], ast.Attribute)
                    and isinstance(stmt.value, ast.Call)
                ):
                    attrs[stmt.targets[0].attr] = ast.unparse(stmt.value.func)
            experts_cls = attrs.get("experts", "")
            router_attr, router_line, targets = "", "", []
            experts_line, passes = "", False
            statements = sorted(
                (
                    n
                    for n in ast.walk(forward)
                    if isinstance(n, ast.Assign | ast.Expr | ast.Return)
                ),
                key=lambda n: n.lineno,
            )
            for stmt in statements:
                text = ast.unparse(stmt)
                call = re.search(r"self\.(\w+)\(", text)
                if (
                    not router_line
                    and call
                    and call.group(1) != "experts"
                    and re.search(r"gate|router", call.group(1))
                    and not re.search(r"shared", call.group(1))
                ):
                    router_attr, router_line = call.group(1), text
                    if isinstance(stmt, ast.Assign):
                        targets = re.findall(r"\w+", ast.unparse(stmt.targets[0]))
                if "self.experts(" in text and not experts_line:
                    experts_line = text
                    args = re.search(r"self\.experts\(([^)]*)\)", text)
                    names = (
                        [a.strip() for a in args.group(1).split(",")] if args else []
                    )
                    passes = len(names) >= 3 and all(n in targets for n in names[1:3])
            rows.append(
                dict(
                    model=path.parent.name,
                    block=name,
                    experts=experts_cls,
                    generic=experts_cls in decorated,
                    router_attr=router_attr,
                    router_cls=attrs.get(router_attr, ""),
                    router_call=router_line,
                    experts_call=experts_line,
                    passes_routing=passes,
                )
            )
    return rows


def format_static_survey(rows: list[dict]) -> str:
    head = (
        "| model | block | experts (@use_experts_implementation?) | router | "
        "router call | experts call | routing passed unchanged |\n"
        "|---|---|---|---|---|---|---|"
    )
    out = [head]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['block']} | {r['experts']} "
            f"({'yes' if r['generic'] else 'no'}) | `{r['router_attr']}` "
            f"{r['router_cls']} | `{r['router_call']}` | `{r['experts_call']}` | "
            f"{'yes' if r['passes_routing'] else 'NO'} |"
        )
    return "\n".join(out)


def run_checks(families=None, verbose: bool = True) -> dict[str, dict]:
    results = {}
    for family in families or FAMILIES:
        results[family] = check_family(family)
        if verbose:
            r = results[family]
            errors = {k: v for k, v in r.items() if k.startswith("error")}
            print(
                f"{family:18s} {r['seconds']:6.2f}s "
                f"fp32={_fmt(r.get('lin_max_abs_diff_fp32'))} "
                f"bf16={_fmt(r.get('lin_max_abs_diff_bf16'))} "
                f"reload={_fmt(r.get('reload_max_abs_diff'))} {errors or ''}",
                file=sys.stderr,
                flush=True,
            )
    return results


def _fmt(value) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.1e}"


def format_table(results: dict[str, dict]) -> str:
    """Markdown: one row per family with the spec and the measured results.

    ``bf16`` diffs are against the model's default fused experts forward
    (``grouped_mm``) and, after the slash, against its eager per-expert loop."""
    head = (
        "| family | block | router attr: returns | scoring | shared expert | "
        "experts get router tensors | linearized/found | max abs diff fp32 | "
        "max abs diff bf16 (grouped_mm / eager) | reload | bf16 router dtypes | "
        "affinity top-k = routing | errors |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for family, r in results.items():
        spec = FAMILIES[family]
        shared = "no"
        if spec.has_shared_expert:
            shared = "gated" if spec.shared_expert_gate else "yes"
        probe = r.get("probe_fp32", {})
        probe16 = r.get("probe_bf16", {})
        got = probe.get("experts_get_router_routing")
        errors = "; ".join(
            f"{k[6:]}: {v[:80]}" for k, v in r.items() if k.startswith("error")
        )
        problems = probe.get("layout_problems", []) + probe16.get("layout_problems", [])
        if problems:
            errors += " layout: " + ", ".join(sorted(set(problems)))
        lin = r.get("linearized_fp32")
        lin_txt = "-" if lin is None else f"{lin}/{r.get('experts_found_fp32')}"
        reload = r.get("reload_max_abs_diff")
        reload_txt = "ok" if reload == 0 else _fmt(reload)
        dtypes = "/".join(d for _, d in probe16.get("router_out", []))
        match = probe.get("affinity_topk_match")
        rows.append(
            f"| {family} | {spec.block_cls} | `{spec.router_attr}`: "
            f"{spec.router_layout.describe()} | {spec.scoring} | {shared} | "
            f"{'yes' if got else 'no'} | {lin_txt} | "
            f"{_fmt(r.get('lin_max_abs_diff_fp32'))} | "
            f"{_fmt(r.get('lin_max_abs_diff_bf16'))} / "
            f"{_fmt(r.get('lin_vs_eager_max_abs_diff_bf16'))} | "
            f"{reload_txt} | {dtypes} | "
            f"{'-' if match is None else f'{match:.0%}'} | {errors} |"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    if "--static" in argv:
        print(format_static_survey(static_survey()))
        return 0
    json_path = next((a[7:] for a in argv if a.startswith("--json=")), None)
    families = [a for a in argv if not a.startswith("--")] or None
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import llmcompressor.modeling.moe.linearize  # noqa: F401 - before silencing it
    from loguru import logger

    logger.disable("llmcompressor")
    # tiny tensors: one thread is ~10x faster than two on a loaded 2-core machine
    torch.set_num_threads(1)
    results = run_checks(families)
    print(format_table(results))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
