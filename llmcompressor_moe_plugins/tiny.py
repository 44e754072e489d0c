"""Tiny models, a tokenizer and calibration text that need no download.

Calibration text is the Python standard library's own source, which every Python
install has. The tokenizer is a byte-level BPE trained on it in about a second.
Used by the CLI's embedded default, the tests and the benchmarks.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "stdlib_texts",
    "train_tokenizer",
    "train_bpe_tokenizer",
    "tokenize_for_calibration",
    "tiny_glm4_moe_config",
    "build_tiny_glm4_moe",
    "build_tiny_textbook_moe",
]


def stdlib_texts(max_files: int | None = None, skip_files: int = 0) -> Iterator[str]:
    """Source of the standard library's ``.py`` files, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.glob("*.py")
        if p.stat().st_size > 2000 and not p.name.startswith("_")
    )
    files = files[skip_files:]
    for path in files[:max_files] if max_files is not None else files:
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def train_tokenizer(vocab_size: int = 512, max_files: int = 40):
    """A byte-level BPE tokenizer trained offline on standard-library source."""
    return train_bpe_tokenizer(stdlib_texts(max_files), vocab_size)


def train_bpe_tokenizer(texts: Iterator[str] | list[str], vocab_size: int):
    """A byte-level BPE tokenizer (``<pad>``, ``<eos>``) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>"
    )


def tokenize_for_calibration(
    tokenizer, texts: Iterator[str] | list[str], num_samples: int, seq_len: int
):
    """A ``datasets.Dataset`` of ``num_samples`` full windows of ``seq_len`` tokens
    cut from ``texts`` (concatenated), ready for ``oneshot(dataset=...)``."""
    from datasets import Dataset

    needed = num_samples * seq_len
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise ValueError(
            f"Calibration text gives {len(ids)} tokens; {num_samples} samples x "
            f"{seq_len} tokens need {needed}. Pass more text or fewer samples."
        )
    windows = [ids[i * seq_len : (i + 1) * seq_len] for i in range(num_samples)]
    return Dataset.from_dict(
        {"input_ids": windows, "attention_mask": [[1] * seq_len for _ in windows]}
    )


def tiny_glm4_moe_config(**overrides):
    """GLM4-MoE in miniature: a leading dense layer, group-limited routing,
    shared experts. Widths are multiples of 128 (W4A16 group size)."""
    from transformers import Glm4MoeConfig

    settings = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        n_routed_experts=16,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=1.5,
        norm_topk_prob=True,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
    )
    settings.update(overrides)
    return Glm4MoeConfig(**settings)


def _save(model, tokenizer, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny_glm4_moe(
    directory: str | Path,
    seed: int = 0,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> Path:
    """Random-init tiny ``Glm4MoeForCausalLM`` plus tokenizer, saved to
    ``directory`` (oneshot validates models by their saved config)."""
    from transformers import Glm4MoeForCausalLM

    tokenizer = tokenizer or train_tokenizer()
    config = tiny_glm4_moe_config(vocab_size=len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(config).to(dtype)
    with torch.no_grad():
        # a non-zero correction bias, so tests see it steer the choice
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.02)
    return _save(model, tokenizer, directory)


def build_tiny_textbook_moe(
    directory: str | Path,
    seed: int = 0,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> Path:
    """Random-init tiny ``TextbookMoeForCausalLM`` plus tokenizer, saved."""
    from .models import TextbookMoeConfig, TextbookMoeForCausalLM

    tokenizer = tokenizer or train_tokenizer()
    config = TextbookMoeConfig(vocab_size=len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = TextbookMoeForCausalLM(config).to(dtype)
    return _save(model, tokenizer, directory)
