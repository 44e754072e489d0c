"""A third party's calibration module, written on our base class only, gets every
mode, the coverage counts and the shared-input declaration without extra code."""

import pytest
import torch
from torch import nn

from llmcompressor_moe_plugins import (
    MoECalibrationModule,
    moe_calibration_context,
    register,
)
from llmcompressor_moe_plugins.registry import unregister

HIDDEN, EXPERTS = 16, 5


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, 24, bias=False)
        self.up_proj = nn.Linear(HIDDEN, 24, bias=False)
        self.down_proj = nn.Linear(24, HIDDEN, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Top1Moe(nn.Module):
    """Someone's MoE block: top-1 routing scaled by the softmax probability."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(EXPERTS))

    def forward(self, x):
        probs = self.router(x).softmax(dim=-1)
        weight, choice = probs.max(dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            idx = torch.where(choice == e)[0]
            if idx.numel():
                out[idx] = weight[idx, None] * expert(x[idx])
        return out


class CalibrationTop1Moe(MoECalibrationModule):
    def __init__(self, original, config, calibrate_all_experts=True, **kwargs):
        super().__init__(original, config, calibrate_all_experts, **kwargs)
        self.router = original.router
        self.experts = original.experts

    def forward(self, x):
        probs = self.router(x).softmax(dim=-1)
        weight, choice = probs.max(dim=-1)
        routed = nn.functional.one_hot(choice, EXPERTS).bool()
        calibrate = self.select_calibration_tokens(routed, lambda: probs)
        extras = self.extra_token_indices(routed, calibrate)
        busiest = int(routed.sum(dim=0).max())
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            idx = torch.where(choice == e)[0]
            y = self.run_expert(expert, x, idx, extras[e], busiest)
            if y is not None:
                out[idx] = weight[idx, None] * y
        return out


@pytest.fixture
def model():
    register("Top1Moe", CalibrationTop1Moe)
    torch.manual_seed(0)
    yield nn.Sequential(Top1Moe())
    unregister("Top1Moe")


@pytest.mark.parametrize(
    "mode", ["routed", "all", "top_k:2", "min_tokens:8", "affinity:0.5"]
)
def test_every_mode_reaches_a_third_party_module(model, mode, record_linear_inputs):
    x = torch.randn(30, HIDDEN)
    expected = model(x)
    with moe_calibration_context(model, mode=mode) as swapped:
        (block,) = [b.replacement for b in swapped.blocks]
        assert isinstance(block, CalibrationTop1Moe)
        recorder = record_linear_inputs(block.experts)
        assert torch.equal(model(x), expected)
    seen = [recorder.rows[f"{e}.gate_proj"] for e in range(EXPERTS)]
    assert seen == block.calibrated_token_counts.tolist()
    assert (block.calibrated_token_counts >= block.routed_token_counts).all()
    assert int(block.routed_token_counts.sum()) == 30
    assert all(0 not in calls for calls in recorder.calls.values())
    if mode == "all":
        assert seen == [30] * EXPERTS
        assert len(block.shared_input_linears()) == 2 * EXPERTS
    else:
        assert block.shared_input_linears() == []
    assert isinstance(model[0], Top1Moe)  # restored
