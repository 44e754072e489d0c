"""The Hessian GPTQ actually solves against for each expert Linear, read at
``quantize_weight`` (after every merge step), against float64 sums from that
expert's own tokens. In a weighted mode: ``2 sum_t w_t x_t x_t^T`` for
``gate_proj``/``up_proj`` (shared by the two) and ``2 sum_t w_t h_t h_t^T`` for
``down_proj``, and with shrinkage (the default) those mixed with the block's
all-token statistics by each expert's own share; in ``all`` mode (batched from the
weights): ``2 X^T X`` of the
block input for every expert's and the shared expert's input projections, and
each expert's own ``2 H^T H`` for its ``down_proj``. Driven without oneshot:
one calibrating forward of one GLM4-MoE block, then the layer's compression."""

import pytest
import torch
import torch.nn.functional as F
from llmcompressor.core import State
from llmcompressor.modifiers.gptq import base as gptq_base

from llmcompressor_moe_plugins import SharedHessianGPTQModifier, upstream
from llmcompressor_moe_plugins.calibration.architectures.glm4_moe import (
    CalibrationGlm4MoeMoE,
)
from llmcompressor_moe_plugins.statistics import shrinkage, stacked_gptq

from .helpers import calibration_module, relative_error
from .modules.test_glm4_moe import linearized_block
from .test_weighted import expected_choice

pytestmark = pytest.mark.usefixtures("one_thread")

POWER, PRIOR, FLOOR = 2, 0.2, 20
KEPT = 32  # rows kept for the down_proj targets, fewer than the 45 tokens


class SolveRecorder:
    """Stands in for GPTQ's ``quantize_weight`` (weights returned unchanged: only
    the Hessians matter here, and this keeps the test fast) and pairs each call's
    Hessians with the Linears ``update_batch_qparams`` then writes."""

    def __init__(self, monkeypatch):
        self.pending = None
        self.solved: dict[torch.nn.Module, list[torch.Tensor]] = {}
        for owner in (gptq_base, stacked_gptq):
            monkeypatch.setattr(owner, "quantize_weight", self.quantize_weight)
            monkeypatch.setattr(
                owner, "update_batch_qparams", self.update(owner.update_batch_qparams)
            )

    def quantize_weight(self, weights, hessians, **_):
        assert self.pending is None
        self.pending = hessians.clone()
        batch = weights.shape[0]
        return weights, torch.zeros(batch), torch.zeros(batch, dtype=torch.bool)

    def update(self, original):
        def update_batch_qparams(modules, *args, **kwargs):
            hessians, self.pending = self.pending, None
            # GPTQ's batches: one Hessian per module; a shared chunk: one for all
            assert hessians.shape[0] in (1, len(modules))
            for index, module in enumerate(modules):
                hessian = hessians[index if hessians.shape[0] > 1 else 0]
                self.solved.setdefault(module, []).append(hessian)
            return original(modules, *args, **kwargs)

        return update_batch_qparams


def calibrate_and_compress(
    module, x, observed: bool = False, forwards: int = 1, budget_gib=None
) -> tuple[SharedHessianGPTQModifier, list[torch.Tensor]]:
    """``forwards`` calibrating forwards of ``module`` on ``x``, then the layer's
    compression: the modifier and the forwards' outputs."""
    model = torch.nn.ModuleDict({"mlp": module})
    state = State(model=model)
    modifier = SharedHessianGPTQModifier(
        targets=["Linear"],
        scheme="W4A16",
        ignore=["re:.*gate$"],
        statistics_budget_gib=budget_gib,
    )
    try:
        modifier.initialize(state)
        modifier.on_calibration_start(state, None)
        if observed:  # a listener besides GPTQ: the experts are called as modules
            for expert in module.dispatcher.experts:
                expert.down_proj.register_forward_hook(lambda *_: None)
        with torch.no_grad():
            outputs = [module(x) for _ in range(forwards)]
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        modifier.on_sequential_epoch_end(state, None, modules=linears)
        modifier.on_calibration_end(state, None)
        modifier.finalize(state)
    finally:
        upstream.end_run()
    return modifier, outputs


def shrunk(own, weights, all_rows, width, share_of=None):
    """The expected mix, float64: ``(1 - a) own / sum(w) + a 2 X^T X / N``."""
    effective = weights.sum() ** 2 / (weights**2).sum()
    share = width / (width + effective)
    target = 2 * all_rows.t() @ all_rows / all_rows.shape[0]
    return (1 - share) * own / weights.sum() + share * target, float(share)


@pytest.mark.parametrize(
    ("observed", "shrink"), [(False, False), (True, False), (False, True)]
)
def test_each_expert_is_solved_against_its_own_routing_weighted_hessians(
    monkeypatch, observed, shrink
):
    """``observed``: GPTQ's own per-Linear hooks fire on the expert calls too, and
    must add nothing. ``shrink``: the default shrinkage, each expert's share from
    its own effective token count against the Linear's input width; the
    ``down_proj`` targets keep 32 of the 45 rows, so each target is divided by its
    own count (every row for the input's, the kept rows for ``down_proj``'s)."""
    torch.manual_seed(0)
    # experts wider than the hidden size: the two shares differ
    block = linearized_block(moe_intermediate_size=256)
    x = torch.randn(45, 128)
    weights = {
        m: m.weight.detach().double().clone()
        for m in block.modules()
        if isinstance(m, torch.nn.Linear)
    }
    with torch.no_grad():
        choice = expected_choice(block, x, POWER, PRIOR, FLOOR)
    module = calibration_module(
        CalibrationGlm4MoeMoE,
        block,
        block.config,
        f"weighted:{POWER},prior:{PRIOR}" + ("" if shrink else ",shrink:0"),
        floor=FLOOR,
    )
    recorder = SolveRecorder(monkeypatch)
    monkeypatch.setattr(shrinkage, "kept_rows", lambda mlps: KEPT)
    modifier, _ = calibrate_and_compress(module, x, observed)
    shares = modifier.shrinkage_shares
    assert bool(shares) == shrink

    experts = module.dispatcher.experts
    assert len(experts) == 16 and all(choice)  # the floor reaches every expert
    distinct_down = []
    for index, expert in enumerate(experts):
        tokens = torch.tensor(sorted(choice[index]))
        w = torch.tensor([choice[index][int(t)] for t in tokens], dtype=torch.float64)
        rows = x[tokens].double()
        gate_up = 2 * (rows * w[:, None]).t() @ rows
        h = F.silu(rows @ weights[expert.gate_proj].t()) * (
            rows @ weights[expert.up_proj].t()
        )
        down = 2 * (h * w[:, None]).t() @ h
        if shrink:
            rows = x.double()
            first = rows[:KEPT]
            h_all = F.silu(first @ weights[expert.gate_proj].t()) * (
                first @ weights[expert.up_proj].t()
            )
            gate_up, gate_share = shrunk(gate_up, w, rows, 128)
            down, down_share = shrunk(down, w, h_all, h.shape[1])
            name = f"mlp.experts.{index}"
            assert shares[f"{name}.gate_proj"] == pytest.approx(gate_share, rel=1e-5)
            assert shares[f"{name}.down_proj"] == pytest.approx(down_share, rel=1e-5)
        for linear, expected in (
            (expert.gate_proj, gate_up),
            (expert.up_proj, gate_up),
            (expert.down_proj, down),
        ):
            solves = recorder.solved.get(linear, [])
            assert len(solves) == 1, f"expert {index}: solved {len(solves)} times"
            assert relative_error(solves[0], expected) < 1e-5, f"expert {index}"
        distinct_down.append(recorder.solved[expert.down_proj][0])
    # the check above has teeth: the experts' Hessians differ from each other
    assert relative_error(distinct_down[0], distinct_down[1]) > 0.1


def test_all_mode_shares_the_input_hessian_and_gives_each_down_proj_its_own(
    monkeypatch,
):

    torch.manual_seed(0)
    block = linearized_block()
    x = torch.randn(45, 128)
    weights = {
        m: m.weight.detach().double().clone()
        for m in block.modules()
        if isinstance(m, torch.nn.Linear)
    }
    # one chunk: one down_proj observation per expert, as GPTQ counts samples
    module = calibration_module(
        CalibrationGlm4MoeMoE, block, block.config, "all", chunk_size=1024
    )
    recorder = SolveRecorder(monkeypatch)
    calibrate_and_compress(module, x, observed=False)

    rows = x.double()
    shared_input = 2 * rows.t() @ rows
    inputs = [module.shared_experts.gate_proj, module.shared_experts.up_proj]
    distinct_down = []
    for index, expert in enumerate(module.dispatcher.experts):
        inputs += [expert.gate_proj, expert.up_proj]
        h = F.silu(rows @ weights[expert.gate_proj].t()) * (
            rows @ weights[expert.up_proj].t()
        )
        solves = recorder.solved.get(expert.down_proj, [])
        assert len(solves) == 1, f"expert {index}: solved {len(solves)} times"
        assert relative_error(solves[0], 2 * h.t() @ h) < 1e-5, f"expert {index}"
        distinct_down.append(solves[0])
    for linear in inputs:
        assert len(recorder.solved[linear]) == 1
        assert relative_error(recorder.solved[linear][0], shared_input) < 1e-5
    assert relative_error(distinct_down[0], distinct_down[1]) > 0.1
