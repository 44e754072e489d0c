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
from llmcompressor_moe_plugins.statistics import (
    expert_budget,
    shared_hessian_gptq,
    shared_reduction,
    stacked_gptq,
)
from llmcompressor_moe_plugins.statistics.expert_budget import (
    GiB,
    expert_statistics_bytes,
    plan_groups,
)
from llmcompressor_moe_plugins.statistics.stacked_gptq import solve_batch_cap
from llmcompressor_moe_plugins.upstream import gptq

from .helpers import calibrate, group_budget, linearized_expert

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


def record_compressions(monkeypatch, stacked_caller) -> tuple[list, list, list]:
    """Per compression of a run: the per-expert statistics held, the room its GPTQ
    batches were given (None: GPTQ's own), and each batch limit the stacked solves
    (called from module ``stacked_caller``) and upstream's batches got."""
    held, rooms, limits = [], [], []
    original = SharedHessianGPTQModifier._compress_pending

    def compress_pending(self, solve_room=None):
        held.append(len(self._shared_hessians) + len(self._consumed_hessians))
        rooms.append(solve_room)
        return original(self, solve_room)

    stacked_groups = stacked_caller.compress_stacked_groups
    batches_within = gptq.batches_within

    def compress_stacked_groups(modifier, groups, limit=None):
        limits.append(("stacked", limit))
        return stacked_groups(modifier, groups, limit)

    def bounded(modifier, limit):
        limits.append(("upstream", limit))
        return batches_within(modifier, limit)

    monkeypatch.setattr(
        SharedHessianGPTQModifier, "_compress_pending", compress_pending
    )
    monkeypatch.setattr(
        stacked_caller, "compress_stacked_groups", compress_stacked_groups
    )
    monkeypatch.setattr(gptq, "batches_within", bounded)
    return held, rooms, limits


def test_groups_give_the_one_pass_weights(
    glm4_dir, tokenizer, calibration_data, monkeypatch
):
    held, rooms, limits = record_compressions(monkeypatch, shared_hessian_gptq)
    one_pass, plans = run(glm4_dir, tokenizer, calibration_data)
    assert max(held) == 2 * EXPERTS  # gate/up and down_proj of every expert
    assert set(rooms) == {None}  # one pass: upstream's automatic batches
    assert {limit for _, limit in limits} == {None}
    held.clear()
    rooms.clear()
    limits.clear()
    assert plans == [
        f"per-expert statistics: {EXPERTS * tiny_expert_bytes(one_pass) / 2**20:.2f} "
        "MiB per layer within no budget: one pass"
    ]
    # room for 5 experts besides the block's all-token statistics and one GPTQ
    # solve (gate/up stacked: 256 x 128): groups of 4
    expert = one_pass.model.layers[1].mlp.experts[0]
    budget_bytes, reserved, expert_bytes = group_budget(expert, 5)
    assert expert_bytes == tiny_expert_bytes(one_pass)
    solve = gptq.solve_bytes(2 * 128, 128, 128)
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
    # both kinds of GPTQ batches get each group's room (None: what has
    # statistics before the groups, with none of them held)
    for kind in ("stacked", "upstream"):
        assert [limit for k, limit in limits if k == kind] == rooms, limits
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


def test_the_distributed_path_gives_each_group_its_room(
    glm4_dir, tokenizer, calibration_data, monkeypatch
):
    """Under torchrun a split layer's shared Hessians go through
    ``compress_shared_hessians``: its stacked solves, and GPTQ's batches after
    them, keep to each group's room as in one process. One process stands in for
    the ranks (the reductions' one-process forms); the two-rank run is
    tests/test_distributed.py::test_two_ranks_hold_one_group_of_a_split_layer_at_a_time."""
    monkeypatch.setattr(shared_hessian_gptq, "is_distributed", lambda: True)
    held, rooms, limits = record_compressions(monkeypatch, shared_reduction)
    budget, reserved, expert_bytes = group_budget(linearized_expert(glm4_dir), 5)
    _, plans = run(glm4_dir, tokenizer, calibration_data, budget_gib=budget / GiB)
    assert len(plans) == 1 and ": 4 groups" in plans[0], plans
    assert max(held) == 2 * 4 and held.count(2 * 4) == 2 * 4, held
    group_rooms = [room for room in rooms if room is not None]
    assert group_rooms == [budget - reserved - 4 * expert_bytes] * (2 * 4), rooms
    for kind in ("stacked", "upstream"):
        assert [limit for k, limit in limits if k == kind] == rooms, limits


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

    # upstream's own batches (a group's down_proj solves) likewise: the largest
    # Linear that shares its shape sets the number; one alone in its shape (an
    # o_proj) is never batched and does not
    modifier = SharedHessianGPTQModifier(targets=["Linear"], scheme="W4A16")
    _hessians, counts = gptq.statistics(modifier)
    alone = torch.nn.Linear(1024, 1024, bias=False)
    smaller = [torch.nn.Linear(64, 64, bias=False) for _ in range(2)]
    downs = [torch.nn.Linear(128, 256, bias=False) for _ in range(8)]
    counts.update({linear: 1 for linear in [alone, *smaller, *downs]})
    need = gptq.solve_bytes(256, 128, modifier.block_size)
    monkeypatch.setattr(helpers, "max_batch_size", lambda module, setting, bs: 1000)
    seen = []
    with gptq.batches_within(modifier, 5 * need + 1):
        seen.append(modifier.batched_quantization)
    with gptq.batches_within(modifier, need - 1):  # at least one
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
    assert seen == [5, 1, "auto", 16, 2]
    with pytest.raises(RuntimeError), gptq.batches_within(modifier, need):
        raise RuntimeError("a failed solve")
    assert modifier.batched_quantization == "auto"  # restored, even after a failure
    counts.clear()
    with gptq.batches_within(modifier, need):  # nothing pending: nothing to bound
        assert modifier.batched_quantization == "auto"


@pytest.mark.parametrize("shape", [(2048, 7168), (7168, 2048), (4096, 7168), (3, 5)])
def test_a_solve_is_counted_as_upstreams_automatic_batches_count_it(monkeypatch, shape):
    free = 100 * GiB
    monkeypatch.setattr(helpers, "get_execution_device", lambda module: "cuda:0")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(
        torch,
        "get_device_module",
        lambda *device: type("cuda", (), {"mem_get_info": lambda d: (free, free)}),
    )
    linear = torch.nn.Linear(shape[1], shape[0], bias=False, device="meta")
    upstream_cap = helpers.max_batch_size(linear, "auto", 128)
    assert upstream_cap == int(free * 0.75) // gptq.solve_bytes(*shape, 128)


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
