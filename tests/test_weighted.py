"""Weighted modes: each expert's GPTQ Hessians weight its tokens by the routing
weight to a power, near-miss (floor) tokens by a prior; outputs stay the original
block's; without a weighting consumer the token choice is calibrated unweighted."""

import pytest
import torch
import torch.nn.functional as F
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM

from llmcompressor_moe_plugins import (
    MoECalibrationModifier,
    SharedHessianGPTQModifier,
    last_coverage_report,
    upstream,
)
from llmcompressor_moe_plugins.calibration import dispatch, from_weights
from llmcompressor_moe_plugins.calibration.architectures.glm4_moe import (
    CalibrationGlm4MoeMoE,
)
from llmcompressor_moe_plugins.calibration.modes import WeightedMode, parse_mode
from llmcompressor_moe_plugins.upstream.compat import cpu_only_calibration

from .helpers import calibration_module, relative_error
from .modules.test_glm4_moe import linearized_block


class RecordingConsumer:
    """Takes weighted statistics as SharedHessianGPTQModifier does, and keeps them."""

    def __init__(self):
        self.calls = []

    def accepts(self, linears) -> bool:
        return True

    def consume_weighted(self, mlp, tokens, intermediate, weights):
        self.calls.append((mlp, tokens.clone(), intermediate.clone(), weights.clone()))


def run_weighted_gptq(model, tokenizer, calibration_data, **modifier_fields):
    with cpu_only_calibration():
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=calibration_data,
            recipe=[
                MoECalibrationModifier(rtn_fallback=True, **modifier_fields),
                SharedHessianGPTQModifier(
                    targets=["Linear"], scheme="W4A16", ignore=["lm_head"]
                ),
            ],
            num_calibration_samples=len(calibration_data),
            max_seq_length=64,
        )


def expected_choice(block, x, power, prior, floor):
    """Per expert: {token: weight}, from the router's own output and the rules
    (routed: |c|**power; the floor's top-ups: prior x mean routed weight)."""
    logits, topk_weights, topk_indices = block.gate(x)
    num_experts = logits.shape[-1]
    routing = torch.zeros(x.shape[0], num_experts).scatter_(
        1, topk_indices, topk_weights.float()
    )
    routed = routing != 0
    powered = routing.abs().pow(power)
    prior_weight = prior * powered.sum() / routed.sum()
    affinity = logits.sigmoid()
    choice = []
    for expert in range(num_experts):
        tokens = {
            int(t): float(powered[t, expert]) for t in routed[:, expert].nonzero()
        }
        missing = max(0, floor - len(tokens))
        candidates = affinity[:, expert].masked_fill(routed[:, expert], -torch.inf)
        for t in candidates.topk(min(missing, x.shape[0] - len(tokens))).indices:
            tokens[int(t)] = float(prior_weight)
        choice.append(tokens)
    return choice


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("floor", [0, 20])
def test_consumer_gets_each_experts_tokens_with_their_weights(power, floor):
    block = linearized_block()
    x = torch.randn(45, 128)
    with torch.no_grad():
        expected_output = block(x)
    mode = f"weighted:{power},prior:0.2"
    module = calibration_module(
        CalibrationGlm4MoeMoE, block, block.config, mode, floor=floor
    )
    consumer = RecordingConsumer()
    module.dispatcher.consumer = consumer
    with torch.no_grad():
        output = module(x)
        expected = expected_choice(block, x, power, 0.2, floor)
    assert torch.equal(output, expected_output)

    by_expert = {id(mlp.gate_proj): call for mlp, *call in consumer.calls}
    for index, expert in enumerate(module.dispatcher.experts):
        if not expected[index]:
            assert id(expert.gate_proj) not in by_expert  # no empty call
            continue
        tokens, intermediate, weights = by_expert[id(expert.gate_proj)]
        # which tokens: match rows back to x
        rows = [int((x == row).all(dim=1).nonzero()) for row in tokens]
        assert sorted(rows) == sorted(expected[index])
        for row, weight in zip(rows, weights.tolist(), strict=True):
            assert weight == pytest.approx(expected[index][row], rel=1e-6)
        with torch.no_grad():
            reference = F.silu(expert.gate_proj(tokens)) * expert.up_proj(tokens)
        assert relative_error(intermediate, reference) < 1e-6
    counts = module.dispatcher.counts()
    assert counts[1] == [len(tokens) for tokens in expected]


def test_without_a_weighting_consumer_the_token_choice_is_calibrated_unweighted():
    """AWQ, range observers, plain GPTQ: the experts are called on the routed
    tokens plus the floor's, and see nothing else."""
    block = linearized_block()
    x = torch.randn(45, 128)
    module = calibration_module(
        CalibrationGlm4MoeMoE, block, block.config, "weighted:2", floor=20
    )
    seen = {}
    for index, expert in enumerate(module.dispatcher.experts):
        expert.gate_proj.register_forward_pre_hook(
            lambda _m, args, i=index: seen.setdefault(i, []).append(args[0].shape[0])
        )
    with torch.no_grad():
        expected_output = block(x)
        seen.clear()
        output = module(x)
        expected = expected_choice(block, x, 2, 0.1, 20)
    assert torch.equal(output, expected_output)
    for index, tokens in enumerate(expected):
        assert sum(seen.get(index, [])) == len(tokens)


def test_spellings_and_the_default_floor():
    assert parse_mode("weighted:2") == WeightedMode(2.0)
    assert parse_mode({"weighted": 1, "prior": 0.05}) == WeightedMode(1.0, 0.05)
    assert parse_mode("weighted:1,prior:0.05").spec() == "weighted:1,prior:0.05"
    # the floor's top-ups are the weighted modes' prior: on unless turned off
    assert MoECalibrationModifier(mode="weighted:2").resolved_floor() == 16
    assert MoECalibrationModifier(mode="weighted:2", floor=0).resolved_floor() == 0
    assert MoECalibrationModifier(mode="routed").resolved_floor() == 0
    for bad in ("weighted:0", "weighted:2,prior:0", "weighted:2,top:3", "weighted:x"):
        with pytest.raises(ValueError, match="weighted"):
            parse_mode(bad)


@pytest.mark.slow
@pytest.mark.parametrize("observed", [False, True])
def test_gptq_hessians_are_the_routing_weighted_sums(
    glm4_dir, tokenizer, calibration_data, monkeypatch, observed
):
    """The Hessians SharedHessianGPTQModifier quantizes each expert against equal
    2 sum_t c_t^2 x x^T (gate/up, shared) and 2 sum_t c_t^2 h h^T (down_proj),
    from the block inputs and routing of the calibration forwards. ``observed``:
    another hook listens on the experts, so they are called as modules and GPTQ's
    own per-Linear hooks fire, which must add nothing."""
    forwards = []  # (block, flat inputs, indices, weights) of calibrating forwards

    def listener(*_):
        pass

    original_route = CalibrationGlm4MoeMoE.route

    def route(self, hidden_states):
        routing = original_route(self, hidden_states)
        if observed:  # a listener besides GPTQ on every expert's down_proj
            for expert in self.dispatcher.experts:
                if not any(
                    h is listener for h in expert.down_proj._forward_hooks.values()
                ):
                    expert.down_proj.register_forward_hook(listener)
        if upstream.hooks_enabled():
            flat = hidden_states.reshape(-1, hidden_states.shape[-1]).detach().clone()
            forwards.append((self, flat, routing.indices.clone(), routing.weights))
        return routing

    monkeypatch.setattr(CalibrationGlm4MoeMoE, "route", route)

    captured = []  # per compress_modules call: {Linear: normalized Hessian}
    leaked = []
    original_compress = SharedHessianGPTQModifier.compress_modules

    def compress_modules(self):
        # GPTQ's own hooks must not have accumulated anything for these Linears
        leaked.extend(m for m in self._hessians if m in self._weighted_members)
        hessians = {}
        for group, hessian in self._shared_hessians.items():
            for member in self._shared_members[group]:
                calls = self._weighted_calls.get(group)  # weighted groups' count
                count = self._shared_num_samples[group] if calls is None else calls
                hessians[member] = hessian / count
        for down, hessian in self._consumed_hessians.items():
            hessians[down] = hessian / self._consumed_num_samples[down]
        weights = {m: m.weight.detach().clone() for m in hessians}
        captured.append((hessians, weights))
        return original_compress(self)

    monkeypatch.setattr(SharedHessianGPTQModifier, "compress_modules", compress_modules)

    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    run_weighted_gptq(model, tokenizer, calibration_data, mode="weighted:2", floor=0)
    assert not leaked
    hessians, weights = {}, {}
    for layer_hessians, layer_weights in captured:
        hessians.update(layer_hessians)
        weights.update(layer_weights)
    checked, starved = 0, []
    for block in {id(f[0]): f[0] for f in forwards}.values():
        mine = [f for f in forwards if f[0] is block]
        for index, expert in enumerate(block.dispatcher.experts):
            if expert.gate_proj not in hessians:
                starved.append(expert)
                continue
            gate_up = torch.zeros(128, 128, dtype=torch.float64)
            down = None
            calls = 0
            for _, x, indices, routing_weights in mine:
                tokens, slots = (indices == index).nonzero(as_tuple=True)
                if not tokens.numel():
                    continue
                calls += 1
                c2 = routing_weights[tokens, slots].double() ** 2
                rows = x[tokens].double()
                gate_up += 2 * (rows * c2[:, None]).t() @ rows
                h = F.silu(rows @ weights[expert.gate_proj].double().t()) * (
                    rows @ weights[expert.up_proj].double().t()
                )
                term = 2 * (h * c2[:, None]).t() @ h
                down = term if down is None else down + term
            assert calls
            for linear in (expert.gate_proj, expert.up_proj):
                assert relative_error(hessians[linear], gate_up / calls) < 1e-4
            assert relative_error(hessians[expert.down_proj], down / calls) < 1e-4
            checked += 1
    # both MoE layers, 16 experts each: those routed no token are left to RTN
    assert checked + len(starved) == 32 and checked >= 28
    report = last_coverage_report()
    assert len(report.rtn_fallback) == len(starved)
    experts = [
        (name, module)
        for name, module in model.named_modules()
        if ".experts." in name and isinstance(module, torch.nn.Linear)
    ]
    assert len(experts) == 2 * 16 * 3
    for name, module in experts:
        assert torch.isfinite(module.weight_scale).all(), name


def test_plain_gptq_with_a_weighted_mode_stops_before_calibrating(
    glm4_dir, tokenizer, calibration_data
):
    """Under GPTQModifier the weights would silently not apply: the run stops at
    initialize, naming the fix, and the model is untouched."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="SharedHessianGPTQModifier"):
        with cpu_only_calibration():
            oneshot(
                model=model,
                processor=tokenizer,
                dataset=calibration_data,
                recipe=[
                    MoECalibrationModifier(mode="weighted:1"),
                    GPTQModifier(targets=["Linear"], scheme="W4A16"),
                ],
                num_calibration_samples=len(calibration_data),
                max_seq_length=64,
            )
    # oneshot linearized the fused experts before any modifier ran (upstream);
    # every other tensor is as it was, and nothing was quantized
    after = model.state_dict()
    kept = before.keys() & after.keys()
    assert len(kept) > len(before) - 5
    assert all(torch.equal(before[k], after[k]) for k in kept)
    assert not any(hasattr(m, "weight_scale") for m in model.modules())


@pytest.fixture(params=["unknown_activation", "not_gated_mlps"])
def uncomputable_experts(request, monkeypatch):
    """Simulates experts the plugin cannot compute from their weights: an
    activation it does not know (its MLP does not reproduce theirs), or experts
    that are not gate/up/down MLPs at all."""
    if request.param == "unknown_activation":
        monkeypatch.setattr(from_weights, "matches_module", lambda *_, **__: False)
    else:
        monkeypatch.setattr(dispatch.ExpertDispatcher, "gated_mlps", lambda _: None)
    return request.param


def test_experts_the_plugin_cannot_compute_stop_a_chosen_weighted_mode(
    glm4_dir, tokenizer, calibration_data, uncomputable_experts
):
    """A weighted mode the user chose on such experts stops the run, at the first
    MoE layer at the latest, naming the fix."""
    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    with pytest.raises(
        (RuntimeError, ValueError), match=r"model\.layers\.1\.mlp.*block_modes"
    ):
        run_weighted_gptq(model, tokenizer, calibration_data, mode="weighted:2")


def test_experts_the_plugin_cannot_compute_take_the_default_unweighted(
    glm4_dir, tokenizer, calibration_data, monkeypatch, uncomputable_experts
):
    """The same experts under the default mode (not the user's choice): the run
    goes on, and GPTQ's own hooks give every expert Linear its Hessian from the
    default's token choice (routed plus the floor), unweighted."""
    accumulated = []  # expert Linears GPTQ's own hooks accumulated, per layer
    original_compress = SharedHessianGPTQModifier.compress_modules

    def compress_modules(self):
        assert not self._consumed_hessians  # nothing weighted reached GPTQ
        accumulated.extend(self._module_names[m] for m in self._hessians)
        return original_compress(self)

    monkeypatch.setattr(SharedHessianGPTQModifier, "compress_modules", compress_modules)
    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    run_weighted_gptq(model, tokenizer, calibration_data)

    report = last_coverage_report()
    assert not report.rtn_fallback
    for block in report.blocks:
        assert (block.mode, block.floor) == ("weighted:2", 16)
        assert min(block.calibrated) >= 16
    experts = [n for n in accumulated if ".experts." in n]
    assert len(experts) == 2 * 16 * 3  # two MoE layers, every expert Linear
    for name, module in model.named_modules():
        if ".experts." in name and isinstance(module, torch.nn.Linear):
            assert torch.isfinite(module.weight_scale).all(), name
