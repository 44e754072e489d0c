"""The per-expert statistics budget: a layer over it is calibrated in groups of
experts rebuilt one at a time, with the one-pass run's weights; the planner fits
Kimi-K2 layers on an 80 GB GPU; a budget no plan meets stops before calibrating."""

import pytest
import torch
from loguru import logger
from transformers import AutoModelForCausalLM

from llmcompressor_moe_plugins import MoECalibrationModifier, SharedHessianGPTQModifier
from llmcompressor_moe_plugins.calibration.dispatch import ExpertDispatcher
from llmcompressor_moe_plugins.calibration.modes import DEFAULT_SHRINK
from llmcompressor_moe_plugins.statistics import expert_budget
from llmcompressor_moe_plugins.statistics.expert_budget import (
    GiB,
    expert_statistics_bytes,
    plan_groups,
)
from llmcompressor_moe_plugins.statistics.shrinkage import target_bytes

from .helpers import calibrate

EXPERTS = 16  # the tiny GLM4-MoE: 2 MoE layers of 16 experts


def run(glm4_dir, tokenizer, data, budget_gib=None):
    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="INFO")
    try:
        recipe = [
            MoECalibrationModifier(rtn_fallback=True),  # the default mode
            SharedHessianGPTQModifier(
                targets=["Linear"],
                scheme="W4A16",
                ignore=["lm_head"],
                statistics_budget_gib=budget_gib,
            ),
        ]
        calibrate(model, tokenizer, data, recipe, 64)
    finally:
        logger.remove(sink)
    return model, [m for m in messages if m.startswith("per-expert statistics")]


def tiny_expert_bytes(model) -> int:
    expert = model.model.layers[1].mlp.experts[0]
    return expert_statistics_bytes(
        expert.gate_proj.weight.shape[1], expert.down_proj.weight.shape[1]
    )


def test_groups_give_the_one_pass_weights(
    glm4_dir, tokenizer, calibration_data, monkeypatch
):
    held = []  # per-expert statistics held at each compression
    original = SharedHessianGPTQModifier._compress_pending

    def compress_pending(self):
        held.append(len(self._shared_hessians) + len(self._consumed_hessians))
        return original(self)

    monkeypatch.setattr(
        SharedHessianGPTQModifier, "_compress_pending", compress_pending
    )
    one_pass, plans = run(glm4_dir, tokenizer, calibration_data)
    assert max(held) == 2 * EXPERTS  # gate/up and down_proj of every expert
    held.clear()
    assert plans == [
        f"per-expert statistics: {EXPERTS * tiny_expert_bytes(one_pass) / 2**20:.2f} "
        "MiB per layer within no budget: one pass"
    ]
    # room for 5 experts besides the block's all-token statistics: groups of 4
    expert = one_pass.model.layers[1].mlp.experts[0]
    reserved = target_bytes([expert], DEFAULT_SHRINK)
    budget = (reserved + 5 * tiny_expert_bytes(one_pass)) / GiB
    grouped, plans = run(glm4_dir, tokenizer, calibration_data, budget_gib=budget)
    assert len(plans) == 1, plans  # logged once per run, not once per layer
    assert "> budget" in plans[0] and ": 4 groups" in plans[0], plans
    # the forwards held none; compression one group (4 experts) at a time
    assert max(held) == 2 * 4 and held.count(2 * 4) == 2 * 4, held
    linears = {
        name: module
        for name, module in one_pass.named_modules()
        if isinstance(module, torch.nn.Linear) and hasattr(module, "weight_scale")
    }
    other = dict(grouped.named_modules())
    experts = [n for n in linears if ".experts." in n]
    assert len(experts) == 2 * EXPERTS * 3
    for name, module in linears.items():
        # the same operations in the same order: bit for bit on one device, which
        # is within any GPTQ re-run noise
        assert torch.equal(module.weight, other[name].weight), name
        assert torch.equal(module.weight_scale, other[name].weight_scale), name


def test_kimi_k2_layers_fit_an_80_gb_gpu():
    hidden, width, experts = 7168, 2048, 384
    per_expert = [expert_statistics_bytes(hidden, width)] * experts
    total = sum(per_expert)
    assert 79 * GiB < total < 80 * GiB  # the 79 GiB
    # the automatic budget on an 80 GB H100 with the layer's bf16 experts loaded
    weights = experts * 3 * hidden * width * 2
    free = 80 * 10**9 - weights - 2 * GiB  # attention, activations, CUDA context
    budget = int(expert_budget.AUTO_FRACTION * free)
    # the block's all-token statistics (shrinkage): its input's fp32 Hessian and
    # 8 x width bf16 rows of its input, 0.41 GiB
    reserved = hidden * hidden * 4 + 8 * width * hidden * 2
    groups = plan_groups(per_expert, budget, "model.layers.1.mlp", reserved)
    assert sorted(e for g in groups for e in g) == list(range(experts))
    assert all(sum(per_expert[e] for e in g) + reserved <= budget for g in groups)
    # weights + statistics leave 40 % of the GPU to activations and GPTQ solves
    assert weights + budget < 0.6 * 80 * 10**9
    assert len(groups) == 9
    assert plan_groups(per_expert, None, "x") == [list(range(experts))]
    assert plan_groups(per_expert, total, "x") == [list(range(experts))]
    assert len(plan_groups(per_expert, total - 1, "x")) == 2  # one byte short


def test_a_budget_no_plan_meets_stops_before_calibrating(
    glm4_dir, tokenizer, calibration_data, monkeypatch
):
    forwards = []
    original = ExpertDispatcher.__call__

    def counted(self, *args, **kwargs):
        forwards.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ExpertDispatcher, "__call__", counted)
    with pytest.raises(ValueError) as raised:
        run(glm4_dir, tokenizer, calibration_data, budget_gib=1e-5)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("MoE layer model.layers.1.mlp: one expert's")
    bytes_needed = int(message.split(" need ")[1].split(" bytes")[0])
    assert bytes_needed == (128 * 128 + 128 * 128) * 4  # hidden, width 128; fp32
    assert "statistics_budget_gib" in message
    assert "--statistics-budget-gib" in message
    assert not forwards  # stopped before any calibrating forward


def test_the_cli_flag_sets_the_budget():
    from llmcompressor_moe_plugins import cli, recipes
    from llmcompressor_moe_plugins.cli.recipe import CliError, load_recipe_modifiers

    recipe = str(recipes.path("glm4_moe_w4a16_gptq"))
    parser = cli.build_parser()
    args = parser.parse_args(["quantize", "--statistics-budget-gib", "12.5"])
    modifiers = load_recipe_modifiers(recipe, args)
    takers = [m for m in modifiers if isinstance(m, SharedHessianGPTQModifier)]
    assert [m.statistics_budget_gib for m in takers] == [12.5]
    args = parser.parse_args(["quantize", "--statistics-budget-gib", "0"])
    with pytest.raises(CliError, match="--statistics-budget-gib 0.0: needs a positive"):
        load_recipe_modifiers(recipe, args)
    unset = load_recipe_modifiers(recipe, parser.parse_args(["quantize"]))
    assert all(
        m.statistics_budget_gib is None
        for m in unset
        if isinstance(m, SharedHessianGPTQModifier)
    )
