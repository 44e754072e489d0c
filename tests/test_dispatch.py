"""The shared dispatcher: floor, per-block generators, affinities read from the
router's output, and the mode choices as the experts' Linears see them."""

import pytest
import torch

from llmcompressor_moe_plugins.calibration.architectures.glm4_moe import (
    CalibrationGlm4MoeMoE,
)
from llmcompressor_moe_plugins.calibration.dispatch import block_seed
from llmcompressor_moe_plugins.calibration.modes import AffinitySampledMode, apply_floor

from .helpers import calibration_module
from .modules.test_glm4_moe import linearized_block

HIDDEN = 128


def test_floor_tops_up_each_expert_with_its_best_candidates():
    selected = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]]).bool()
    affinity = torch.tensor(
        [[0.9, 0.1, 0.5], [0.8, 0.7, 0.2], [0.1, 0.9, 0.3], [0.3, 0.8, 0.4]]
    )
    history = torch.tensor([0, 5, 0])
    topped = apply_floor(selected, affinity, history, floor=3)
    # expert 0 had 2: + its best unselected (token 3, 0.3); expert 1 had 5 before
    # this forward: nothing; expert 2 had 0: its 3 best (tokens 0, 3, 2)
    assert topped[:, 0].tolist() == [True, True, False, True]
    assert topped[:, 1].tolist() == selected[:, 1].tolist()
    assert topped[:, 2].tolist() == [True, False, True, True]
    assert (topped | selected).equal(topped)  # a superset
    # fewer candidates than the floor: all of them
    assert apply_floor(selected, affinity, torch.zeros(3), floor=10).all()


def test_floor_without_affinity_draws_seeded_random_tokens():
    selected = torch.zeros(50, 2, dtype=torch.bool)
    first = apply_floor(
        selected, None, torch.zeros(2), 7, torch.Generator().manual_seed(1)
    )
    again = apply_floor(
        selected, None, torch.zeros(2), 7, torch.Generator().manual_seed(1)
    )
    assert first.sum(dim=0).tolist() == [7, 7]
    assert torch.equal(first, again)


def test_each_block_draws_from_its_own_generator():
    """A block's sampled tokens depend on the seed and its own name, not on which
    blocks ran before it or on a mode object shared between blocks."""
    mode = "affinity:0.5"
    x = torch.randn(40, HIDDEN)

    def seen(name, warm_up_other_first):
        block = linearized_block()
        if warm_up_other_first:
            other = calibration_module(CalibrationGlm4MoeMoE, block, block.config, mode)
            with torch.no_grad():
                other(x)
        module = calibration_module(
            CalibrationGlm4MoeMoE, block, block.config, mode, name=name
        )
        with torch.no_grad():
            module(x)
        return module.dispatcher.counts()[1]

    assert seen("model.layers.1.mlp", False) == seen("model.layers.1.mlp", True)
    assert seen("model.layers.1.mlp", False) != seen("model.layers.2.mlp", False)
    assert block_seed(0, "a") != block_seed(1, "a") != block_seed(0, "a", rank=1)


def offloaded_router(router):
    """Puts the router's weight on the meta device outside its forward, as
    accelerate's offloading does; only its output is usable then."""
    real = router.weight
    meta = torch.nn.Parameter(torch.empty_like(real, device="meta"))

    def onload(module, args):
        module._parameters["weight"] = real

    def offload(module, args, output):
        module._parameters["weight"] = meta

    router.register_forward_pre_hook(onload)
    router.register_forward_hook(offload)
    offload(router, None, None)


def expert_inputs(module, expert):
    rows = []
    linear = module.experts[expert].up_proj
    handle = linear.register_forward_pre_hook(lambda m, a: rows.append(a[0]))
    return rows, handle


def test_glm4_affinity_comes_from_the_router_output_under_offloading():
    """min_tokens tops a starved expert up with exactly its highest-scoring tokens
    (sigmoid of the router's logits), read from the router's output even while
    the router's weight is offloaded outside its forward."""
    block = linearized_block()
    with torch.no_grad():
        block.gate.e_score_correction_bias[5] = -10.0  # expert 5 is never chosen
    x = torch.randn(64, HIDDEN)
    with torch.no_grad():
        expected_scores = (x @ block.gate.weight.t()).sigmoid()[:, 5]
    offloaded_router(block.gate)
    assert block.gate.weight.is_meta
    module = calibration_module(
        CalibrationGlm4MoeMoE, block, block.config, "min_tokens:9"
    )
    rows, handle = expert_inputs(module, 5)
    with torch.no_grad():
        module(x)
    handle.remove()
    assert module.dispatcher.counts()[0][5] == 0
    picked = torch.cat(rows)
    best = x[expected_scores.topk(9).indices]
    assert picked.shape[0] == 9
    assert set(map(tuple, picked.tolist())) == set(map(tuple, best.tolist()))


def test_widened_top_k_calibrates_the_next_best_experts_of_each_token():
    block = linearized_block()
    x = torch.randn(32, HIDDEN)
    module = calibration_module(CalibrationGlm4MoeMoE, block, block.config, "top_k:6")
    seen = {e: expert_inputs(module, e) for e in range(16)}
    with torch.no_grad():
        module(x)
        scores = (x @ block.gate.weight.t()).sigmoid()
    for expert, (rows, handle) in seen.items():
        handle.remove()
        tokens = {tuple(r) for r in torch.cat(rows).tolist()} if rows else set()
        top6 = scores.topk(6, dim=1).indices
        wanted = {tuple(x[t].tolist()) for t in range(32) if expert in top6[t]}
        assert wanted <= tokens, expert  # every token that ranks it in its top 6
    routed, calibrated = module.dispatcher.counts()
    assert sum(calibrated) >= 6 * 32 > sum(routed) == 2 * 32


@pytest.mark.parametrize("strength", [0.25, 1.0])
def test_affinity_mode_object_is_stateless(strength):
    mode = AffinitySampledMode(strength)
    routed = torch.zeros(100, 4, dtype=torch.bool)
    routed[:, 0] = True
    affinity = torch.rand(100, 4)
    history = torch.zeros(4)
    first = mode.select(routed, affinity, history, torch.Generator().manual_seed(3))
    again = mode.select(routed, affinity, history, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
