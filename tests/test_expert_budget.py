"""The per-expert statistics budget: a layer over it is calibrated in groups of
experts rebuilt one at a time, with the one-pass run's weights; the planner fits
Kimi-K2 layers on an 80 GB GPU; a budget no plan meets stops before calibrating."""

import llmcompressor.modifiers.gptq.helpers as helpers
import pytest
import torch
from loguru import logger
from transformers import AutoModelForCausalLM

from llmcompressor_moe_plugins import MoECalibrationModifier, SharedHessianGPTQModifier
from llmcompressor_moe_plugins.calibration.dispatch import ExpertDispatcher
from llmcompressor_moe_plugins.calibration.modes import DEFAULT_SHRINK
from llmcompressor_moe_plugins.statistics import expert_budget, stacked_gptq
from llmcompressor_moe_plugins.statistics.expert_budget import (
    GiB,
    expert_statistics_bytes,
    plan_groups,
)
from llmcompressor_moe_plugins.statistics.shrinkage import target_bytes
from llmcompressor_moe_plugins.statistics.stacked_gptq import solve_batch_cap
from llmcompressor_moe_plugins.upstream import gptq

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
    rooms = []  # the bytes each compression's GPTQ batches may hold
    original = SharedHessianGPTQModifier._compress_pending

    def compress_pending(self, solve_room=None):
        held.append(len(self._shared_hessians) + len(self._consumed_hessians))
        rooms.append(solve_room)
        return original(self, solve_room)

    monkeypatch.setattr(
        SharedHessianGPTQModifier, "_compress_pending", compress_pending
    )
    settings = []  # batched_quantization as upstream's compression sees it
    compress_list = SharedHessianGPTQModifier.compress_module_list

    def compress_module_list(self, modules):
        settings.append(self.batched_quantization)
        return compress_list(self, modules)

    monkeypatch.setattr(
        SharedHessianGPTQModifier, "compress_module_list", compress_module_list
    )
    one_pass, plans = run(glm4_dir, tokenizer, calibration_data)
    assert max(held) == 2 * EXPERTS  # gate/up and down_proj of every expert
    assert set(rooms) == {None}  # one pass: upstream's automatic batches
    assert set(settings) == {"auto"}
    held.clear()
    rooms.clear()
    settings.clear()
    assert plans == [
        f"per-expert statistics: {EXPERTS * tiny_expert_bytes(one_pass) / 2**20:.2f} "
        "MiB per layer within no budget: one pass"
    ]
    # room for 5 experts besides the block's all-token statistics and one GPTQ
    # solve (gate/up stacked: 256 x 128): groups of 4
    expert = one_pass.model.layers[1].mlp.experts[0]
    reserved = target_bytes([expert], DEFAULT_SHRINK)
    solve = gptq.solve_bytes(2 * 128, 128, 128)
    budget_bytes = reserved + solve + 5 * tiny_expert_bytes(one_pass)
    budget = budget_bytes / GiB  # exact: GiB is a power of two
    grouped, plans = run(glm4_dir, tokenizer, calibration_data, budget_gib=budget)
    assert len(plans) == 1, plans  # logged once per run, not once per layer
    assert "> budget" in plans[0] and ": 4 groups" in plans[0], plans
    # the forwards held none; compression one group (4 experts) at a time
    assert max(held) == 2 * 4 and held.count(2 * 4) == 2 * 4, held
    # each group's solves get what the group leaves of the budget: one solve and
    # the fifth expert's statistics
    group_rooms = [room for room in rooms if room is not None]
    assert len(group_rooms) == 2 * 4, rooms
    expected = budget_bytes - reserved - 4 * tiny_expert_bytes(one_pass)
    assert set(group_rooms) == {expected}
    assert expected >= solve
    # upstream's batches bounded too (on the CPU its automatic number is 1)
    assert 1 in settings and set(settings) <= {1, "auto"}, settings
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
    # GPTQ's workspace for one expert's gate/up stack (4096 x 7168), 0.79 GiB
    solve = gptq.solve_bytes(2 * width, hidden, 128)
    groups = plan_groups(per_expert, budget, "model.layers.1.mlp", reserved, solve)
    assert sorted(e for g in groups for e in g) == list(range(experts))
    # each group leaves room for at least one solve
    assert all(
        sum(per_expert[e] for e in g) + reserved + solve <= budget for g in groups
    )
    # weights + statistics leave 40 % of the GPU to activations and GPTQ solves
    assert weights + budget < 0.6 * 80 * 10**9
    assert len(groups) == 9
    # the solve counts only once the layer is split
    assert plan_groups(per_expert, total, "x", 0, solve) == [list(range(experts))]
    assert plan_groups(per_expert, None, "x") == [list(range(experts))]
    assert plan_groups(per_expert, total, "x") == [list(range(experts))]
    assert len(plan_groups(per_expert, total - 1, "x")) == 2  # one byte short


def test_a_budgeted_groups_gptq_batches_stay_in_what_it_leaves(monkeypatch):
    # DeepSeek-V3 on an 80 GB H100: 5 groups of 52 experts (10.8 GiB) within the
    # automatic 14.2 GiB leave 3.0 GiB: 3 gate/up solves (0.79 GiB each) at a time,
    # where upstream's automatic batches take 75 % of the free memory (measured:
    # +9 GiB over the group's statistics for one batch of 64 down_proj solves)
    hidden, width = 7168, 2048
    gate_up = gptq.solve_bytes(2 * width, hidden, 128)
    room = int(3.0 * GiB)
    assert solve_batch_cap(gate_up, int(0.75 * 40 * GiB), room) == 3
    assert solve_batch_cap(gate_up, int(0.75 * 40 * GiB), None) == 37
    assert solve_batch_cap(gate_up, int(0.75 * 40 * GiB), 1) == 1  # at least one
    assert solve_batch_cap(gate_up, 2 * gate_up, room) == 2  # free memory decides

    # upstream's own batches (down_proj, the layer's other Linears) likewise: the
    # largest pending Linear's solve sets the number per batch
    modifier = SharedHessianGPTQModifier(targets=["Linear"], scheme="W4A16")
    downs = [torch.nn.Linear(128, 256, bias=False) for _ in range(8)]
    _hessians, counts = gptq.statistics(modifier)
    counts.update({down: 1 for down in [*downs, torch.nn.Linear(64, 64)]})
    need = gptq.solve_bytes(256, 128, modifier.block_size)
    monkeypatch.setattr(helpers, "max_batch_size", lambda module, setting, bs: 1000)
    seen = []
    with gptq.batches_within(modifier, 5 * need + 1):
        seen.append(modifier.batched_quantization)
    with gptq.batches_within(modifier, None):  # one pass: upstream's own
        seen.append(modifier.batched_quantization)
    modifier.batched_quantization = 16  # the user's number is kept
    with gptq.batches_within(modifier, 5 * need):
        seen.append(modifier.batched_quantization)
    modifier.batched_quantization = "auto"
    monkeypatch.setattr(helpers, "max_batch_size", lambda module, setting, bs: 2)
    with gptq.batches_within(modifier, 5 * need):  # free memory decides
        seen.append(modifier.batched_quantization)
    assert seen == [5, "auto", 16, 2]
    assert modifier.batched_quantization == "auto"  # restored


def test_stacked_solves_are_batched_within_the_groups_room(monkeypatch):
    # 10 DeepSeek-V3 experts' gate/up stacks (shapes only) on a GPU with 40 GiB
    # free: 3 at a time within 3 GiB of room, as many as the free memory holds
    # without
    from compressed_tensors.quantization import preset_name_to_scheme

    modifier = SharedHessianGPTQModifier(targets=["Linear"], scheme="W4A16")
    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    groups = []
    for _ in range(10):
        members = [torch.nn.Linear(7168, 2048, bias=False, device="meta") for _ in "gu"]
        for member in members:
            member.quantization_scheme = scheme
        groups.append((members, None))
    monkeypatch.setattr(
        stacked_gptq, "get_execution_device", lambda module: torch.device("cuda", 0)
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * GiB, 0))
    sizes = []
    monkeypatch.setattr(stacked_gptq, "_solve_batch", lambda m, i: sizes.append(len(i)))
    stacked_gptq.compress_stacked_groups(modifier, groups, int(3.0 * GiB))
    assert sizes == [3, 3, 3, 1]
    sizes.clear()
    stacked_gptq.compress_stacked_groups(modifier, groups)
    assert sizes == [10]


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
