"""Shrinkage of weighted per-expert Hessians toward the block's all-token statistics
(``statistics/shrinkage.py``): the share is decided per expert from its effective
token count, a prior that outweighs every expert's tokens calibrates exactly as
``all`` mode does, and the ``down_proj`` target keeps only its first rows. The
Hessians themselves are checked against float64 sums in test_weighted_hessians."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmcompressor_moe_plugins import (
    MoECalibrationModifier,
    SharedHessianGPTQModifier,
    last_coverage_report,
)
from llmcompressor_moe_plugins.calibration.batched_experts import GatedMLP
from llmcompressor_moe_plugins.statistics.shrinkage import (
    BlockTarget,
    WeightTotals,
    shrinkage_weight,
)

from .helpers import calibrate, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")


def quantize(glm4_dir, tokenizer, data, mode=None, **gptq_fields):
    """The tiny GLM4-MoE quantized W4A16 in ``mode`` (None: the default)."""
    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    gptq = SharedHessianGPTQModifier(
        targets=["Linear"], scheme="W4A16", ignore=["lm_head"], **gptq_fields
    )
    calibrate(model, tokenizer, data, [MoECalibrationModifier(mode=mode), gptq], 64)
    return model, gptq


def expert_weights(model) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if ".experts." in name and isinstance(module, torch.nn.Linear)
    }


def test_the_share_falls_as_the_effective_token_count_rises():
    width = 128
    # n tokens of equal weight w: n_eff = n, whatever w
    shares = [shrinkage_weight(width, n * 0.3, n * 0.09, 1.0) for n in (1, 64, 1e6)]
    assert shares == pytest.approx([128 / 129, 128 / 192, 128 / (128 + 1e6)])
    assert shrinkage_weight(width, 0.0, 0.0, 1.0) == 1.0  # no tokens
    # one heavy token among light ones counts as few
    totals = WeightTotals()  # one expert's column
    totals.add(torch.tensor([[1.0]] + [[1e-3]] * 99))
    (weight_sum,), (weight_sq_sum,) = totals.sums.tolist()
    assert shrinkage_weight(width, weight_sum, weight_sq_sum, 1.0) > 128 / (128 + 2)
    # the strength scales the prior: 4 tokens per column
    assert shrinkage_weight(width, 64.0, 64.0, 4.0) == pytest.approx(512 / 576)


def test_the_down_proj_target_keeps_only_the_first_rows():
    torch.manual_seed(0)
    linears = [torch.nn.Linear(*shape, bias=False) for shape in ((8, 4),) * 2]
    down = torch.nn.Linear(4, 8, bias=False)
    mlp = GatedMLP(*linears, down, lambda g, u: F.silu(g) * u)
    target = BlockTarget(strength=1.0, max_rows=10)
    forwards = [torch.randn(6, 8) for _ in range(3)]
    for x in forwards:
        target.observe(x)
    assert target.kept == 10 and target.tokens == 18
    every = torch.cat(forwards).double()
    assert relative_error(target.hessian, 2 * every.t() @ every) < 1e-6
    first = every[:10]
    h = F.silu(first @ linears[0].weight.double().t()) * (
        first @ linears[1].weight.double().t()
    )
    assert relative_error(target.down_sum(mlp), 2 * h.t() @ h) < 1e-6


def test_each_expert_gets_its_own_share(glm4_dir, tokenizer, calibration_data):
    _, gptq = quantize(glm4_dir, tokenizer, calibration_data, "weighted:2")
    shares = gptq.shrinkage_shares
    report = last_coverage_report()
    for block in report.blocks:
        layer = block.name.rsplit(".mlp", 1)[0]
        by_tokens = sorted(
            (tokens, shares[f"{layer}.mlp.experts.{index}.down_proj"])
            for index, tokens in enumerate(block.calibrated)
        )
        assert len(by_tokens) == 16
        # the expert with the fewest tokens leans most on the block's statistics
        assert by_tokens[0][1] > by_tokens[-1][1], by_tokens
    # gate/up (input width 128, the hidden size) and down_proj differ per Linear
    assert len(set(shares.values())) > 16


def test_a_prior_outweighing_every_expert_calibrates_as_all(
    glm4_dir, tokenizer, calibration_data
):
    """shrink 1e6: every share is 1 - O(1e-6), so each expert is solved against
    the block's all-token statistics, which is what ``all`` mode solves against
    (its down_proj targets hold every token here: 8 x 64 rows < 8 x width)."""
    shrunk, _ = quantize(glm4_dir, tokenizer, calibration_data, "weighted:2,shrink:1e6")
    everything, _ = quantize(glm4_dir, tokenizer, calibration_data, "all")
    routed, _ = quantize(glm4_dir, tokenizer, calibration_data, "weighted:2,shrink:0")
    shrunk, everything, routed = map(expert_weights, (shrunk, everything, routed))
    differ_from_all = sum(
        int((shrunk[n] != everything[n]).sum()) for n in everything
    ) / sum(w.numel() for w in everything.values())
    differ_unshrunk = sum(
        int((routed[n] != everything[n]).sum()) for n in everything
    ) / sum(w.numel() for w in everything.values())
    # the same Hessians up to fp32 summation order: only rounding ties flip
    assert differ_from_all < 0.01, differ_from_all
    # and the check has teeth: unshrunk weighted statistics give other weights
    assert differ_unshrunk > 0.2, differ_unshrunk


def test_expert_groups_solved_in_batches_equal_one_at_a_time(
    glm4_dir, tokenizer, calibration_data, monkeypatch
):
    """The weighted experts' gate/up stacks go to GPTQ batched (as upstream batches
    same-shape modules): four experts a call with ``batched_quantization: 4``, one
    with ``None``, and the same weights either way."""
    from llmcompressor_moe_plugins.statistics import stacked_gptq

    calls = []
    original = stacked_gptq.quantize_weight

    def counting(**kwargs):
        calls.append(kwargs["weights"].shape[0])
        return original(**kwargs)

    monkeypatch.setattr(stacked_gptq, "quantize_weight", counting)
    runs = {}
    for setting in (None, 4):
        calls.clear()
        model, _ = quantize(
            glm4_dir, tokenizer, calibration_data, batched_quantization=setting
        )
        runs[setting] = (expert_weights(model), list(calls))
    (one, one_calls), (batched, batched_calls) = runs[None], runs[4]
    assert one_calls == [1] * 32  # 16 experts in each of 2 MoE layers
    assert batched_calls == [4] * 8
    for name in one:
        assert torch.equal(one[name], batched[name]), name
