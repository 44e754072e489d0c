"""Fast tests for behaviour a mutation run found only slow tests (or none) to
check: the seed reaches the selection and the quantized weights, sigmoid routers
are scored with sigmoid."""

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from transformers import AutoModelForCausalLM

from llmcompressor_moe_plugins import MoECalibrationModifier, moe_calibration_context
from llmcompressor_moe_plugins.calibration.architectures.generic import RouterScores
from llmcompressor_moe_plugins.tiny import stdlib_texts, tokenize_for_calibration
from llmcompressor_moe_plugins.upstream.compat import cpu_only_calibration

from .modules.test_moe_layer import HIDDEN, make_layer

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrated_counts(seed: int) -> list[int]:
    layer = torch.nn.Sequential(make_layer())
    x = torch.randn(4, 64, HIDDEN, generator=torch.Generator().manual_seed(1))
    with moe_calibration_context(layer, mode="affinity:0.5", seed=seed) as swapped:
        layer(x)
        return swapped.coverage().blocks[0].calibrated


def test_the_seed_changes_which_tokens_are_sampled():
    assert _calibrated_counts(0) == _calibrated_counts(0)
    assert _calibrated_counts(0) != _calibrated_counts(1)


_FIRST_LAYER_DOWN_PROJS = r"re:model\.layers\.1\.mlp\.experts\.\d+\.down_proj$"


def _quantized_expert_weights(glm4_dir, data, seed: int) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    with cpu_only_calibration():
        oneshot(
            model=model,
            dataset=data,
            recipe=[
                MoECalibrationModifier(mode="affinity:0.5", floor=2, seed=seed),
                # one MoE layer's down_proj only: GPTQ's time is most of a run
                GPTQModifier(targets=[_FIRST_LAYER_DOWN_PROJS], scheme="W4A16"),
            ],
            num_calibration_samples=len(data),
            max_seq_length=16,
            # the order is the modifier's to seed too: fixed, so only the blocks'
            # sampling can carry the seed into the weights
            shuffle_calibration_samples=False,
        )
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if ".experts." in name and hasattr(module, "weight_scale")
    }


def test_the_seed_changes_the_quantized_weights(glm4_dir, tokenizer):
    """The recipe's seed reaches the Hessians: another seed samples other tokens
    for the experts, and so quantizes some of them differently; the same seed
    gives the same weights."""
    data = tokenize_for_calibration(tokenizer, stdlib_texts(skip_files=100), 2, 16)
    first = _quantized_expert_weights(glm4_dir, data, seed=0)
    again = _quantized_expert_weights(glm4_dir, data, seed=0)
    other = _quantized_expert_weights(glm4_dir, data, seed=1)
    assert len(first) == 16
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


class _BiasedRouter(torch.nn.Linear):
    def __init__(self):
        super().__init__(8, 4)
        self.e_score_correction_bias = torch.nn.Parameter(torch.zeros(4))


def test_sigmoid_routers_are_scored_with_sigmoid_in_the_generic_path():
    raw = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    biased = RouterScores("block", _BiasedRouter(), config=None)
    assert torch.equal(biased.affinity(raw), raw.sigmoid())
    config = type("Config", (), {"scoring_func": "sigmoid"})()
    by_config = RouterScores("block", torch.nn.Linear(8, 4), config=config)
    assert torch.equal(by_config.affinity(raw), raw.sigmoid())
    softmax = RouterScores("block", torch.nn.Linear(8, 4), config=None)
    assert torch.equal(softmax.affinity(raw), raw.softmax(dim=-1))
    for scores in (biased, by_config, softmax):
        scores.remove()
