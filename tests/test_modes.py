import pytest
import torch

from llmcompressor_moe_plugins.calibration.modes import (
    AffinitySampledMode,
    AllExpertsMode,
    MinTokensMode,
    RoutedMode,
    WidenedTopKMode,
    parse_mode,
)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("routed", RoutedMode()),
        ("all", AllExpertsMode()),
        ("top_k:4", WidenedTopKMode(4)),
        ({"top_k": 3}, WidenedTopKMode(3)),
        ("min_tokens:16", MinTokensMode(16)),
        ({"min_tokens": 2}, MinTokensMode(2)),
        ("affinity", AffinitySampledMode()),
        ("affinity:0.5", AffinitySampledMode(0.5)),
        ({"affinity": 1}, AffinitySampledMode(1.0)),
    ],
)
def test_parse_mode(spec, expected):
    mode = parse_mode(spec)
    assert type(mode) is type(expected)
    assert mode.spec() == expected.spec()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("everything", "Unknown calibration mode"),
        ("top_k", "Unknown calibration mode"),
        ("top_k:abc", "needs a positive whole number"),
        ("top_k:2.5", "needs a positive whole number"),
        ("min_tokens:0", "must be at least 1"),
        ({"top_n": 3}, "'top_n' is not a mode"),
        ({"top_k": True}, "needs a positive whole number"),
        (3, "Unknown calibration mode"),
        ("affinity:0", "strength must be in \\(0, 1\\]"),
        ("affinity:1.5", "strength must be in \\(0, 1\\]"),
        ("affinity:high", "affinity needs a strength"),
        ({"affinity": True}, "affinity needs a strength"),
    ],
)
def test_parse_mode_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_mode(spec)


# 5 tokens, 3 experts; expert 2 is starved (no routed tokens)
ROUTED = torch.tensor(
    [[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.bool
)
AFFINITY = torch.tensor(
    [
        [0.9, 0.8, 0.1],
        [0.7, 0.6, 0.5],
        [0.9, 0.2, 0.4],
        [0.1, 0.9, 0.8],
        [0.8, 0.7, 0.3],
    ]
)
NO_HISTORY = torch.zeros(3, dtype=torch.long)


def test_routed_and_all():
    assert torch.equal(
        RoutedMode().select(ROUTED, None, NO_HISTORY, generator()), ROUTED
    )
    assert AllExpertsMode().select(ROUTED, None, NO_HISTORY, generator()).all()


def test_widened_top_k_adds_the_next_best_experts():
    selected = WidenedTopKMode(3).select(ROUTED, AFFINITY, NO_HISTORY, generator())
    assert selected.all()  # top-3 of 3 experts is everything
    selected = WidenedTopKMode(1).select(ROUTED, AFFINITY, NO_HISTORY, generator())
    assert torch.equal(selected, ROUTED)  # top-1 is already routed here


def test_min_tokens_adds_exactly_the_top_affinity_unrouted_tokens():
    selected = MinTokensMode(2).select(ROUTED, AFFINITY, NO_HISTORY, generator())
    # expert 2: tokens 3 (0.8) and 1 (0.5) are its two best
    assert torch.nonzero(selected[:, 2]).flatten().tolist() == [1, 3]
    # experts 0 and 1 already have >= 2 routed tokens: unchanged
    assert torch.equal(selected[:, :2], ROUTED[:, :2])
    # expert 1 with min 5 gets the one unrouted token (token 2)
    selected = MinTokensMode(5).select(ROUTED, AFFINITY, NO_HISTORY, generator())
    assert selected[:, 1].all()


def test_min_tokens_counts_earlier_forwards():
    history = torch.tensor([0, 0, 1])
    selected = MinTokensMode(2).select(ROUTED, AFFINITY, history, generator())
    assert torch.nonzero(selected[:, 2]).flatten().tolist() == [3]


def test_affinity_probability_is_relative_to_the_routing_threshold():
    probability = AffinitySampledMode(0.5).inclusion_probability(ROUTED, AFFINITY)
    # routed tokens always count
    assert torch.equal(probability[ROUTED], torch.ones(int(ROUTED.sum())))
    # token 1 routed to experts 0 (0.7) and 1 (0.6): threshold 0.6, expert 2 has
    # 0.5 -> 0.5 * 0.5 / 0.6; token 3 routed to expert 1 only (0.9): expert 0 has
    # 0.1 -> 0.5 * 0.1 / 0.9; token 2 (threshold 0.9), expert 2 0.4 -> 0.5 * 0.4/0.9
    assert probability[1, 2].item() == pytest.approx(0.5 * 0.5 / 0.6)
    assert probability[3, 0].item() == pytest.approx(0.5 * 0.1 / 0.9)
    assert probability[2, 2].item() == pytest.approx(0.5 * 0.4 / 0.9)
    # an unrouted expert scoring above the token's threshold is capped at strength
    above = AffinitySampledMode(0.5).inclusion_probability(
        torch.tensor([[False, True]]), torch.tensor([[0.9, 0.3]])
    )
    assert above[0, 0].item() == pytest.approx(0.5)


def test_affinity_sampling_matches_the_probabilities_and_is_reproducible():
    routed = torch.zeros(20000, 3, dtype=torch.bool)
    routed[:, 0] = True
    affinity = torch.tensor([[0.8, 0.4, 0.08]]).expand(20000, 3)
    first = AffinitySampledMode(0.5).select(routed, affinity, NO_HISTORY, generator())
    again = AffinitySampledMode(0.5).select(routed, affinity, NO_HISTORY, generator())
    assert torch.equal(first, again)  # same seed, same tokens
    assert first[:, 0].all()  # superset of routed
    rates = first.float().mean(dim=0)
    assert rates[1].item() == pytest.approx(0.5 * 0.4 / 0.8, abs=0.015)
    assert rates[2].item() == pytest.approx(0.5 * 0.08 / 0.8, abs=0.01)
    other_seed = AffinitySampledMode(0.5).select(
        routed, affinity, NO_HISTORY, generator(seed=1)
    )
    assert not torch.equal(first, other_seed)
