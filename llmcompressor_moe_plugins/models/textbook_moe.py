"""The textbook MoE layer (LLMBook, ``code/5.4 MoE.py``) and a small causal LM on it.

Reads top to bottom in the order data flows: config -> norm -> attention -> expert
MLP -> ``MoeLayer`` -> decoder layer -> model -> causal LM. Registered with
transformers' Auto classes under ``model_type = "textbook_moe"`` so ``oneshot`` can
load, calibrate, save and reload it like any Hugging Face model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = [
    "MoeLayer",
    "TextbookMoeConfig",
    "TextbookMoeModel",
    "TextbookMoeForCausalLM",
]


class TextbookMoeConfig(PretrainedConfig):
    model_type = "textbook_moe"

    def __init__(
        self,
        vocab_size: int = 512,
        hidden_size: int = 128,
        intermediate_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_local_experts: int = 8,
        num_experts_per_tok: int = 2,
        max_position_embeddings: int = 512,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class TextbookRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return self.weight * hidden_states.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class TextbookAttention(nn.Module):
    """Causal multi-head attention with rotary positions."""

    def __init__(self, config: TextbookMoeConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rope_theta = config.rope_theta
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[-2]
        inv_freq = 1.0 / (
            self.rope_theta
            ** (
                torch.arange(0, self.head_dim, 2, device=x.device).float()
                / self.head_dim
            )
        )
        angles = torch.outer(torch.arange(seq_len, device=x.device).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, seq_len, hidden = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

        query = self._rope(heads(self.q_proj(hidden_states)))
        key = self._rope(heads(self.k_proj(hidden_states)))
        value = heads(self.v_proj(hidden_states))

        mask = torch.ones(
            seq_len, seq_len, dtype=torch.bool, device=query.device
        ).tril()
        if attention_mask is not None:
            mask = mask[None, None] & attention_mask[:, None, None, :].bool()
            # a fully padded query row would give NaN; let it attend to itself
            mask = mask | torch.eye(seq_len, dtype=torch.bool, device=mask.device)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return self.o_proj(attended.transpose(1, 2).reshape(batch, seq_len, hidden))


class TextbookExpert(nn.Module):
    """SwiGLU feed-forward network, one per expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoeLayer(nn.Module):
    """The book's MoE layer: top-k over the gate logits, softmax over the k
    selected logits, weighted sum of the selected experts' outputs.

    Differs from the book only in accepting any leading shape: the book's code
    takes ``[tokens, hidden]``; leading dimensions are flattened here so a decoder
    can pass ``[batch, seq, hidden]`` (results on 2-D input are the same).
    """

    def __init__(
        self, experts: list[nn.Module], gate: nn.Module, num_experts_per_tok: int
    ):
        super().__init__()
        if len(experts) == 0:
            raise ValueError("MoeLayer needs at least one expert")
        self.experts = nn.ModuleList(experts)
        self.gate = gate
        self.num_experts_per_tok = num_experts_per_tok

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        shape = inputs.shape
        inputs = inputs.reshape(-1, shape[-1])
        gate_logits = self.gate(inputs)
        weights, selected_experts = torch.topk(gate_logits, self.num_experts_per_tok)
        weights = F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)
        results = torch.zeros_like(inputs)
        for i, expert in enumerate(self.experts):
            token_idx, nth_expert = torch.where(selected_experts == i)
            results[token_idx] += weights[token_idx, nth_expert, None] * expert(
                inputs[token_idx]
            )
        return results.reshape(shape)


class TextbookMoeDecoderLayer(nn.Module):
    def __init__(self, config: TextbookMoeConfig):
        super().__init__()
        self.input_layernorm = TextbookRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TextbookAttention(config)
        self.post_attention_layernorm = TextbookRMSNorm(
            config.hidden_size, config.rms_norm_eps
        )
        self.mlp = MoeLayer(
            experts=[
                TextbookExpert(config.hidden_size, config.intermediate_size)
                for _ in range(config.num_local_experts)
            ],
            gate=nn.Linear(config.hidden_size, config.num_local_experts, bias=False),
            num_experts_per_tok=config.num_experts_per_tok,
        )

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), attention_mask
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class TextbookMoePreTrainedModel(PreTrainedModel):
    config_class = TextbookMoeConfig
    base_model_prefix = "model"
    # the sequential pipeline calibrates one decoder layer at a time
    _no_split_modules = ["TextbookMoeDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, TextbookRMSNorm):
            nn.init.ones_(module.weight)


class TextbookMoeModel(TextbookMoePreTrainedModel):
    def __init__(self, config: TextbookMoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [TextbookMoeDecoderLayer(config) for _ in range(config.num_hidden_layers)]
        )
        self.norm = TextbookRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
        return self.norm(hidden_states)


class TextbookMoeForCausalLM(TextbookMoePreTrainedModel, GenerationMixin):
    def __init__(self, config: TextbookMoeConfig):
        super().__init__(config)
        self.model = TextbookMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        logits = self.lm_head(self.model(input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)


AutoConfig.register(TextbookMoeConfig.model_type, TextbookMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(TextbookMoeConfig, TextbookMoeForCausalLM, exist_ok=True)
