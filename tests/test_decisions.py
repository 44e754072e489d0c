"""One-time per-block decisions: never taken on an empty batch, cached in one
place (the 2-rank case is ``check_decision_with_an_empty_rank`` in
tests/distributed_checks.py, run by test_distributed.py)."""

import pytest
import torch

from llmcompressor_moe_plugins.calibration.architectures.generic import RouterScores
from llmcompressor_moe_plugins.calibration.decisions import (
    EXPERTS_MATCH,
    ROUTER_SCORES,
    BlockDecisions,
)

from .distributed_checks import routed_batch, weighted_dispatcher


def test_a_decision_waits_for_a_batch_with_tokens_and_is_kept():
    decisions = BlockDecisions("block")
    asked = []

    def votes():
        asked.append(1)
        return (3.0, 4.0)

    rule = lambda ranks, summed: summed[0] / summed[1]  # noqa: E731
    assert decisions.decide(ROUTER_SCORES, 0, votes, rule) is None
    assert not asked and decisions.known(ROUTER_SCORES) is None
    assert decisions.decide(ROUTER_SCORES, 5, votes, rule) == 0.75
    assert decisions.decide(ROUTER_SCORES, 5, lambda: (0.0, 1.0), rule) == 0.75
    assert len(asked) == 1


def test_a_zero_token_first_batch_decides_nothing_about_the_experts():
    """Experts whose forward is not what their weights compute stop a chosen
    weighted mode, also when the block's first calibrating batch is empty (an
    empty probe matches anything: that used to be cached as a match)."""
    dispatcher = weighted_dispatcher(scale=2.0)
    empty, routing = routed_batch(0)
    assert dispatcher(empty, routing).shape == (0, 16)
    assert dispatcher.decisions.known(EXPERTS_MATCH) is None
    x, routing = routed_batch(32)
    with pytest.raises(RuntimeError, match="does not reproduce"):
        dispatcher(x, routing)
    assert dispatcher.consumer.tokens == 0  # no weighted statistics were taken


def test_matching_experts_are_weighted_after_a_zero_token_first_batch():
    dispatcher = weighted_dispatcher(scale=1.0)
    dispatcher(*routed_batch(0))
    dispatcher(*routed_batch(32))
    assert dispatcher.decisions.known(EXPERTS_MATCH) == (True, True)
    assert dispatcher.consumer.tokens >= 64  # top-2 of 32 tokens, weighted


def test_router_verification_on_zero_tokens_leaves_the_scores_usable():
    """0 tokens give a NaN agreement, which used to turn affinities off for the
    whole run; now the first batch with tokens decides."""
    router = torch.nn.Linear(16, 4)
    scores = RouterScores("block", router, config=None)
    decisions = BlockDecisions("block")
    empty = torch.zeros(0, 4)
    assert scores.verify(empty, empty.bool(), decisions) is None
    assert decisions.known(ROUTER_SCORES) is None
    affinity = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]])
    routed = torch.tensor([[True, False, True, False], [False, True, False, True]])
    assert scores.verify(affinity, routed, decisions) is True
    inverted = torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
    assert scores.verify(inverted, routed, decisions) is True  # decided once
    scores.remove()


def test_router_scores_that_rank_unchosen_experts_first_are_refused_once():
    router = torch.nn.Linear(16, 4)
    scores = RouterScores("block", router, config=None)
    decisions = BlockDecisions("block")
    inverted = torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
    routed = torch.tensor([[True, False, True, False], [False, True, False, True]])
    assert scores.verify(inverted, routed, decisions) is False
    assert decisions.known(ROUTER_SCORES) is False
    scores.remove()
