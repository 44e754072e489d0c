"""A third party's calibration module, written on our base class only, gets every
mode, the coverage counts and the shared-input declaration without extra code."""

import pytest
import torch
from torch import nn

from llmcompressor_moe_plugins import (
    MoECalibrationModule,
    Routing,
    moe_calibration_context,
    register,
)
from llmcompressor_moe_plugins.calibration.registry import unregister

from .helpers import install_fake_distribution

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
    """All a third party writes: the children and the routing."""

    dispatch_order = "token"  # Top1Moe loops over torch.where(choice == e)

    def __init__(self, original, config, calibrate_all_experts=True):
        super().__init__(original, config, calibrate_all_experts)
        self.router = original.router
        self.experts = original.experts

    def route(self, x):
        probs = self.router(x).softmax(dim=-1)
        weight, choice = probs.max(dim=-1)
        return Routing(choice[:, None], weight[:, None], lambda: probs)

    def forward(self, x):
        return self.dispatch(x, self.route(x))


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
    routed, calibrated = block.dispatcher.counts()
    assert seen == calibrated
    assert all(c >= r for c, r in zip(calibrated, routed, strict=True))
    assert sum(routed) == 30
    assert all(0 not in calls for calls in recorder.calls.values())
    if mode == "all":
        assert seen == [30] * EXPERTS
        assert len(block.shared_input_linears()) == 2 * EXPERTS
    else:
        assert block.shared_input_linears() == []
    assert isinstance(model[0], Top1Moe)  # restored


# Written exactly to upstream llmcompressor 0.10/0.11's contract: constructor
# (original, config, calibrate_all_experts=True), super().__init__() with no
# arguments, no knowledge of modes, its own expert loop. Only the import differs
# (upstream: from llmcompressor.modeling.moe_context import MoECalibrationModule).
UPSTREAM_STYLE_SOURCE = """
import torch
from llmcompressor_moe_plugins import MoECalibrationModule


class CalibrationTop1Moe(MoECalibrationModule):
    is_permanent = False

    def __init__(self, original, config, calibrate_all_experts=True):
        super().__init__()
        self.router = original.router
        self.experts = original.experts
        self.calibrate_all_experts = calibrate_all_experts

    def forward(self, x):
        probs = self.router(x).softmax(dim=-1)
        weight, choice = probs.max(dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            idx = torch.where(choice == e)[0]
            if self.calibrate_all_experts:
                y = expert(x)[idx]
            elif idx.numel():
                y = expert(x[idx])
            else:
                continue
            out[idx] = weight[idx, None] * y
        return out

    def restore(self, original):
        return original
"""


@pytest.fixture
def upstream_style_plugin(plugin_path):
    install_fake_distribution(
        plugin_path,
        "fake-upstream-style",
        {"Top1Moe": "fake_plugin_upstream:CalibrationTop1Moe"},
        {"fake_plugin_upstream": UPSTREAM_STYLE_SOURCE},
    )
    torch.manual_seed(0)
    return nn.Sequential(Top1Moe())


@pytest.mark.parametrize("mode", ["all", "routed"])
def test_upstream_style_module_runs_through_entry_points(
    upstream_style_plugin, mode, record_linear_inputs
):
    model = upstream_style_plugin
    x = torch.randn(30, HIDDEN)
    expected = model(x)
    with moe_calibration_context(model, mode=mode) as swapped:
        (block,) = [b.replacement for b in swapped.blocks]
        assert type(block).__module__ == "fake_plugin_upstream"
        assert block.calibrate_all_experts is (mode == "all")
        recorder = record_linear_inputs(block.experts)
        actual = model(x)
        report = swapped.coverage()
    if mode == "routed":
        assert torch.equal(actual, expected)
    else:  # its loop runs expert(x)[idx]: other batch shapes, other rounding of
        # sums of HIDDEN + 24 + 1 float32 products
        bound = 4 * (HIDDEN + 24 + 1) * torch.finfo(torch.float32).eps
        torch.testing.assert_close(
            actual, expected, rtol=0, atol=bound * float(expected.abs().max())
        )
    # coverage is what its expert Linears were called with
    seen = [recorder.rows[f"{e}.gate_proj"] for e in range(EXPERTS)]
    assert report.blocks[0].calibrated == seen
    assert seen == ([30] * EXPERTS if mode == "all" else report.blocks[0].routed)
    assert isinstance(model[0], Top1Moe)  # restored


def test_upstream_style_module_refuses_modes_it_cannot_honour(upstream_style_plugin):
    with pytest.raises(ValueError, match="CalibrationTop1Moe .*own expert loop"):
        with moe_calibration_context(upstream_style_plugin, mode="top_k:2"):
            pass
    assert isinstance(upstream_style_plugin[0], Top1Moe)  # nothing left swapped


def test_upstream_style_module_in_all_mode_is_checked_and_reported(
    upstream_style_plugin,
):
    """Its own loop observes no routing in 'all' mode (routed counts 0): the block
    is still checked in its layer and reported, from its calibrated counts."""
    from llmcompressor_moe_plugins import (
        MoECalibrationModifier,
        UndercalibratedExpertsError,
    )
    from llmcompressor_moe_plugins.calibration.context import (
        swap_in_calibration_modules,
    )

    model = upstream_style_plugin
    modifier = MoECalibrationModifier(mode="all", min_tokens=31)
    swapped = swap_in_calibration_modules(model, mode="all")
    modifier._swapped = swapped
    model(torch.randn(30, HIDDEN))
    with pytest.raises(UndercalibratedExpertsError, match="experts.0"):
        modifier.on_pass_end()
    report = modifier._keep_report(swapped)
    swapped.restore()
    assert [block.calibrated for block in report.blocks] == [[30] * EXPERTS]
