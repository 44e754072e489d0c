"""Models shipped with the plugin (the textbook MoE layer and a causal LM on it)."""

from .textbook_moe import (
    MoeLayer,
    TextbookMoeConfig,
    TextbookMoeForCausalLM,
    TextbookMoeModel,
)

__all__ = [
    "MoeLayer",
    "TextbookMoeConfig",
    "TextbookMoeForCausalLM",
    "TextbookMoeModel",
]
