"""Fast tests for behaviour a mutation run found only slow tests (or none) to
check: the seed reaches the selection, sigmoid routers are scored with sigmoid."""

import torch

from llmcompressor_moe_plugins import moe_calibration_context
from llmcompressor_moe_plugins.calibration.architectures.generic import RouterScores

from .modules.test_moe_layer import HIDDEN, make_layer


def _calibrated_counts(seed: int) -> list[int]:
    layer = torch.nn.Sequential(make_layer())
    x = torch.randn(4, 64, HIDDEN, generator=torch.Generator().manual_seed(1))
    with moe_calibration_context(layer, mode="affinity:0.5", seed=seed) as swapped:
        layer(x)
        return swapped.coverage().blocks[0].calibrated


def test_the_seed_changes_which_tokens_are_sampled():
    assert _calibrated_counts(0) == _calibrated_counts(0)
    assert _calibrated_counts(0) != _calibrated_counts(1)


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
