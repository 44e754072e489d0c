"""One rank of the collective checks in tests/test_distributed.py (gloo, CPU).

Started once per rank by the test with torchrun's variables set (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); runs every check in order, the same on every
rank, and writes ``rank{R}.json``: check name -> "ok" or the traceback. A check
that fails must not leave the other rank waiting, so each ends with a collective that
every rank reaches whatever happened (``failed_ranks``).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

WIDTH = {0: 8, 1: 8, 2: 8, 3: 8, "down": 16}


def _experts() -> dict:
    """The same modules on every rank (as every rank loads the same model)."""
    torch.manual_seed(0)
    modules = {e: torch.nn.Linear(WIDTH[e], 4, bias=False) for e in (0, 1, 2, 3)}
    modules["down"] = torch.nn.Linear(WIDTH["down"], 4, bias=False)
    return modules


def _local_hessian(rank: int, key) -> tuple[torch.Tensor, torch.Tensor]:
    """What rank ``rank`` accumulated for ``key``: distinct per (rank, key), and
    computable on every rank so expected sums can be checked anywhere."""
    seed = 1000 * rank + (key if isinstance(key, int) else 99)
    x = torch.randn(5, WIDTH[key], generator=torch.Generator().manual_seed(seed))
    return 2 * x.t() @ x, torch.tensor(float(rank + 1 + (key if key != "down" else 7)))


def _fake_gptq(rank: int, seen: list):
    """A stand-in GPTQModifier: the three attributes the distributed branch uses."""
    modules = _experts()
    names = {modules[k]: f"mlp.experts.{k}" for k in (0, 1, 2, 3)}
    names[modules["down"]] = "mlp.down"
    fake = SimpleNamespace(_hessians={}, _num_samples={}, _module_names=names)
    for key in seen:
        hessian, count = _local_hessian(rank, key)
        fake._hessians[modules[key]] = hessian
        fake._num_samples[modules[key]] = count
    return fake, modules


def _upstream_reduce(fake) -> dict:
    """GPTQModifier.compress_modules' distributed branch up to quantization:
    upstream's own bin packing and reduction, run on the fake."""
    import torch.distributed as dist
    from compressed_tensors.distributed import greedy_bin_packing
    from llmcompressor.modifiers.gptq import GPTQModifier

    module_list, _, owner = greedy_bin_packing(
        list(fake._hessians.keys()),
        dist.get_world_size(),
        item_weight_fn=lambda m: fake._hessians[m].shape[0],
    )
    GPTQModifier._reduce_hessian_to_target_rank(fake, module_list, owner)
    return owner


# rank 0 saw experts {0, 2} (2 first), rank 1 saw {1, 2} (1 first) and both the
# dense "down"; expert 3 was seen by nobody
SEEN = {0: [2, "down", 0], 1: [1, 2, "down"]}


def check_all_reduce_counts(rank, size, out):
    from llmcompressor_moe_plugins.distributed import all_reduce_counts

    counts = torch.tensor([rank, 10 * rank + 1, 0], dtype=torch.long)
    summed = all_reduce_counts(counts)
    expected = [sum(r for r in range(size)), sum(10 * r + 1 for r in range(size)), 0]
    assert summed.tolist() == expected, summed
    assert summed.dtype == torch.long and counts.tolist() == [rank, 10 * rank + 1, 0]
    flags = all_reduce_counts(torch.tensor([rank == 1, False]))
    assert flags.dtype == torch.bool and flags.tolist() == [True, False], flags


def check_all_reduce_coverage(rank, size, out):
    from llmcompressor_moe_plugins.distributed import all_reduce_coverage

    def block(name, routed, calibrated):
        return SimpleNamespace(
            name=name, mode="routed", routed=routed, calibrated=calibrated
        )

    passes = [
        SimpleNamespace(label="GPTQModifier", blocks=[block("l1", [rank], [rank])]),
        SimpleNamespace(
            label="GPTQModifier",
            blocks=[
                block("layers.1.mlp", [rank, 0, 2], [rank, 0, 2]),
                block("layers.2.mlp", [5, rank * 3], [6, rank * 3]),
            ],
        ),
    ]
    report = SimpleNamespace(passes=passes)
    assert all_reduce_coverage(report) is report
    assert [b.routed for b in passes[1].blocks] == [[1, 0, 4], [10, 3]]
    assert [b.calibrated for b in passes[1].blocks] == [[1, 0, 4], [12, 3]]
    assert passes[0].blocks[0].routed == [1]
    all_reduce_coverage(report)  # summed once, however often it is called
    assert [b.routed for b in passes[1].blocks] == [[1, 0, 4], [10, 3]]
    assert all(b.world_size == size for p in passes for b in p.blocks)


def check_any_rank_and_fail_together(rank, size, out):
    from llmcompressor_moe_plugins.distributed import (
        RankFailedError,
        any_rank,
        fail_together,
        failed_ranks,
    )

    assert any_rank(rank == 1) is True
    assert any_rank(False) is False
    assert failed_ranks(rank == 1) == [1]
    try:
        with fail_together("the starved-expert check"):
            if rank == 1:
                raise ValueError("expert 3 starved")
    except ValueError as err:
        assert rank == 1 and "expert 3" in str(err)
    except RankFailedError as err:
        assert rank == 0 and err.ranks == [1], err
        assert "the starved-expert check failed on rank(s) 1" in str(err)
    else:
        raise AssertionError("no rank may go on when one failed")
    with fail_together("a check that passes everywhere"):
        pass


def check_same_and_empty_partition(rank, size, out):
    from llmcompressor.datasets.utils import get_rank_partition

    from llmcompressor_moe_plugins.distributed import (
        DistributedSetupError,
        RankFailedError,
        check_same_on_all_ranks,
        rank_partition,
        rank_slice,
        require_data_on_every_rank,
    )

    check_same_on_all_ranks("names", "a\nb")
    try:
        check_same_on_all_ranks("the block lists", f"block-{rank}")
    except RankFailedError as err:
        assert "the block lists differ between ranks" in str(err)
    else:
        raise AssertionError("different values must raise on every rank")
    assert require_data_on_every_rank(3 + rank) == 7
    try:
        require_data_on_every_rank(0 if rank == 1 else 4)
    except DistributedSetupError as err:
        assert "rank(s) 1 got no calibration samples" in str(err), err
    else:
        raise AssertionError("an empty partition must fail on every rank")
    # upstream's split, as a range and as a load_dataset split
    assert list(rank_slice(5)) == ([0, 1] if rank == 0 else [2, 3, 4])
    assert get_rank_partition("train", 5) == f"train[{2 * rank}:{2 + 3 * rank}]"
    assert rank_partition("train", 5) == get_rank_partition("train", 5)
    # 1 sample on 2 ranks: upstream gives rank 0 nothing; both ranks raise
    assert len(rank_slice(1)) == (0 if rank == 0 else 1)
    try:
        rank_partition("train", 1)
    except DistributedSetupError as err:
        assert "leave rank(s) 0 with none" in str(err), err
    else:
        raise AssertionError("an empty split must fail on every rank")


def check_rank_seed(rank, size, out):
    from llmcompressor_moe_plugins.calibration.routing import (
        BLOCK_SEED_RANK_STRIDE,
        block_seed,
    )
    from llmcompressor_moe_plugins.distributed import all_reduce_counts

    seed = block_seed(5, "block", rank)
    assert seed == block_seed(5, "block") + rank * BLOCK_SEED_RANK_STRIDE
    draws = torch.rand(4, generator=torch.Generator().manual_seed(seed))
    gathered = all_reduce_counts(
        torch.nn.functional.one_hot(torch.tensor(rank), size)[:, None] * draws
    )
    assert not torch.equal(gathered[0], gathered[1]), "ranks drew the same numbers"
    again = torch.rand(4, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draws, again)


def check_upstream_mixes_experts_without_alignment(rank, size, out):
    """The bug: same number of same-shaped Hessians, different keys per rank ->
    upstream's positional reduction sums different experts, no error."""
    fake, modules = _fake_gptq(rank, SEEN[rank])
    owner = _upstream_reduce(fake)
    mixed = []
    for module, hessian in fake._hessians.items():
        key = next(k for k, m in modules.items() if m is module)
        right = sum(_local_hessian(r, key)[0] for r in range(size) if key in SEEN[r])
        if not torch.allclose(hessian, right):
            mixed.append(fake._module_names[module])
    out["unaligned_owned"] = sorted(fake._module_names[m] for m in fake._hessians)
    out["unaligned_wrong"] = mixed
    assert len(owner) == len(SEEN[rank])


def check_alignment(rank, size, out):
    from llmcompressor_moe_plugins.upstream.gptq import ensure_same_hessian_order

    fake, modules = _fake_gptq(rank, SEEN[rank])
    keys = ensure_same_hessian_order(fake)
    names = [fake._module_names[m] for m in keys]
    out["aligned_order"] = names
    out["aligned_shapes"] = [list(fake._hessians[m].shape) for m in keys]
    # model order, present somewhere; expert 3 (nobody) absent
    assert names == ["mlp.experts.0", "mlp.experts.1", "mlp.experts.2", "mlp.down"]
    assert list(fake._num_samples) == keys
    added = [k for k in (0, 1, 2) if k not in SEEN[rank]]
    for key in added:
        assert not fake._hessians[modules[key]].any()
        assert fake._num_samples[modules[key]].item() == 0
    assert ensure_same_hessian_order(fake) == keys  # idempotent

    owner = _upstream_reduce(fake)
    checked = []
    for module in list(fake._hessians):
        key = next(k for k, m in modules.items() if m is module)
        assert owner[module] == rank
        seen_by = [r for r in range(size) if key in SEEN[r]]
        hessian_sum = sum(_local_hessian(r, key)[0] for r in seen_by)
        count_sum = sum(_local_hessian(r, key)[1] for r in seen_by)
        assert torch.allclose(fake._hessians[module], hessian_sum), key
        assert fake._num_samples[module].item() == count_sum.item(), key
        # what prepare_batch hands quantize_weight: the global mean
        mean = fake._hessians[module] / fake._num_samples[module]
        assert torch.allclose(mean, hessian_sum / count_sum)
        checked.append(fake._module_names[module])
    out["aligned_owned"] = sorted(checked)


def check_reduce_to_owners(rank, size, out):
    from llmcompressor_moe_plugins.distributed import align_statistics, reduce_to_owners

    # two "blocks" keyed by name, seen in different orders; one only on rank 1
    order = {"block.1": "block.1", "block.2": "block.2", "block.3": "block.3"}
    seen = {0: ["block.2", "block.1"], 1: ["block.3", "block.1", "block.2"]}[rank]
    hessians, counts = {}, {}
    for key in seen:
        hessians[key] = torch.full((3, 3), float(rank + 1))
        counts[key] = torch.tensor(float(rank + 1))
    keys = align_statistics(hessians, counts, order, lambda key: torch.zeros(3, 3))
    assert keys == ["block.1", "block.2", "block.3"]
    owners = reduce_to_owners(keys, hessians, counts)
    out["owners"] = {key: owners[key] for key in keys}
    for key, owner in owners.items():
        assert (key in hessians) == (owner == rank)
    expected = {"block.1": 3.0, "block.2": 3.0, "block.3": 2.0}
    for key in hessians:
        assert torch.equal(hessians[key], torch.full((3, 3), expected[key])), key
        assert counts[key].item() == expected[key]


class GatedExpert(torch.nn.Module):
    """A gate/up/down expert whose forward is not what its weights compute
    (``scale`` != 1): the plugin must not weight it."""

    def __init__(self, hidden: int, scale: float = 2.0):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, 8, bias=False)
        self.up_proj = torch.nn.Linear(hidden, 8, bias=False)
        self.down_proj = torch.nn.Linear(8, hidden, bias=False)
        self.act_fn = torch.nn.SiLU()
        self.scale = scale

    def forward(self, x):
        hidden = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(hidden) * self.scale


class WeightedSink:
    """Takes routing-weighted statistics (as SharedHessianGPTQModifier does)."""

    def __init__(self):
        self.tokens = 0

    def accepts(self, linears) -> bool:
        return True

    def consume(self, down_proj, inputs) -> None:
        pass

    def consume_weighted(self, mlp, tokens, intermediate, weights) -> None:
        self.tokens += tokens.shape[0]


def weighted_dispatcher(scale: float = 2.0, experts: int = 4, hidden: int = 16):
    """A dispatcher in mode weighted:2 over ``experts`` gated experts."""
    from llmcompressor_moe_plugins.calibration.dispatch import ExpertDispatcher
    from llmcompressor_moe_plugins.calibration.modes import parse_mode

    torch.manual_seed(0)
    modules = [GatedExpert(hidden, scale) for _ in range(experts)]
    dispatcher = ExpertDispatcher("block", modules, parse_mode("weighted:2"))
    dispatcher.consumer = WeightedSink()
    return dispatcher


def routed_batch(tokens: int, experts: int = 4, hidden: int = 16, seed: int = 0):
    from llmcompressor_moe_plugins.calibration.routing import Routing

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator)
    logits = torch.randn(tokens, experts, generator=generator)
    weights, indices = logits.softmax(-1).topk(2, dim=-1)
    return x, Routing(indices, weights, lambda: logits.softmax(-1))


def check_decision_with_an_empty_rank(rank, size, out):
    """Rank 0's first forward of a block has no tokens, rank 1's has 32: one
    collective, the same decision on both (taken from rank 1's tokens), no hang."""
    from llmcompressor_moe_plugins.calibration.decisions import EXPERTS_MATCH

    dispatcher = weighted_dispatcher(scale=2.0)
    x, routing = routed_batch(0 if rank == 0 else 32)
    try:
        dispatcher(x, routing)
        raised = None
    except RuntimeError as err:
        raised = str(err)
    out["decision_raised"] = raised
    assert raised is not None and "does not reproduce" in raised, raised
    assert dispatcher.decisions.known(EXPERTS_MATCH) == (False, False)
    # experts that do match: weighted on both ranks, rank 0 decided by rank 1
    matching = weighted_dispatcher(scale=1.0)
    matching(x, routing)
    out["decision_match"] = matching.decisions.known(EXPERTS_MATCH)
    assert out["decision_match"] == (True, True)


def check_automatic_budget_is_the_smallest_over_ranks(rank, size, out):
    """Ranks with different free memory plan a block's statistics alike (GPTQ's
    reductions are positional): with the smallest automatic budget, at the first
    forward on every rank."""
    from llmcompressor_moe_plugins.distributed import smallest_on_any_rank
    from llmcompressor_moe_plugins.statistics import budgeted_statistics

    assert smallest_on_any_rank(None) is None  # no limit anywhere (CPU)
    assert smallest_on_any_rank(None if rank == 0 else 7) == 7
    assert smallest_on_any_rank(100 + rank) == 100

    torch.manual_seed(0)
    mlps = [
        SimpleNamespace(
            gate_proj=torch.nn.Linear(16, 8, bias=False),
            up_proj=torch.nn.Linear(16, 8, bias=False),
            down_proj=torch.nn.Linear(8, 16, bias=False),
        )
        for _ in range(4)
    ]
    modifier = SimpleNamespace(
        _shared_members={m.gate_proj: [m.gate_proj, m.up_proj] for m in mlps},
        _weighted_members={m.down_proj for m in mlps},
        statistics_budget_gib=None,  # automatic: planned at the first forward
        block_size=128,
    )
    budget = budgeted_statistics.ExpertBudget()
    budget.add_block(modifier, "mlp", mlps)
    block = budget.blocks["mlp"]
    # rank 0 could hold every expert at once; rank 1 three experts' statistics,
    # which leave no room for a solve beside two: groups of one
    free = {0: 10 * sum(block.per_expert), 1: 3 * block.per_expert[0]}
    original = budgeted_statistics.auto_budget_bytes
    budgeted_statistics.auto_budget_bytes = lambda device: free[rank]
    try:
        assert not budget.one_pass(mlps[0], torch.zeros(3, 16))
    finally:
        budgeted_statistics.auto_budget_bytes = original
    assert block.budget == free[1]
    assert block.record.groups == [[0], [1], [2], [3]]


CHECKS = [
    check_all_reduce_counts,
    check_all_reduce_coverage,
    check_any_rank_and_fail_together,
    check_same_and_empty_partition,
    check_rank_seed,
    check_upstream_mixes_experts_without_alignment,
    check_alignment,
    check_reduce_to_owners,
    check_decision_with_an_empty_rank,
    check_automatic_budget_is_the_smallest_over_ranks,
]


def main() -> int:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    from llmcompressor_moe_plugins import distributed

    rank, size = distributed.init_distributed(timeout=datetime.timedelta(seconds=30))
    results: dict = {"world_size": size, "pid": os.getpid()}
    for check in CHECKS:
        try:
            check(rank, size, results)
            results[check.__name__] = "ok"
        except Exception:
            results[check.__name__] = traceback.format_exc()
        # every rank gets here whatever happened above (the checks' own
        # collectives come in the same order on every rank)
        distributed.failed_ranks(results[check.__name__] != "ok")
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
