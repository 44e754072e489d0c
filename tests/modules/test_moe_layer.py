import pytest
import torch
import torch.nn.functional as F

from llmcompressor_moe_plugins import MoeLayer, moe_calibration_context
from llmcompressor_moe_plugins.calibration.architectures.moe_layer import (
    CalibrationMoeLayer,
)
from llmcompressor_moe_plugins.models.textbook_moe import TextbookExpert

from ..helpers import calibration_module

HIDDEN, NUM_EXPERTS, TOP_K = 32, 6, 2


def make_layer(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    experts = [TextbookExpert(HIDDEN, 48) for _ in range(NUM_EXPERTS)]
    gate = torch.nn.Linear(HIDDEN, NUM_EXPERTS, bias=False)
    return MoeLayer(experts, gate, TOP_K).to(dtype)


def dense_reference(layer: MoeLayer, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then the book's top-k softmax mix."""
    flat = x.reshape(-1, x.shape[-1]).float()
    logits = flat @ layer.gate.weight.float().T
    top, idx = logits.topk(TOP_K)
    weights = F.softmax(top, dim=1)
    outputs = torch.stack(
        [expert.float()(flat) for expert in layer.experts], dim=1
    )  # [T, E, H]
    picked = outputs.gather(1, idx[..., None].expand(-1, -1, flat.shape[-1]))
    return (weights[..., None] * picked).sum(1).reshape(x.shape)


def test_moe_layer_matches_dense_reference():
    layer = make_layer()
    x = torch.randn(40, HIDDEN)
    torch.testing.assert_close(layer(x), dense_reference(layer, x))


@pytest.mark.parametrize(
    "mode", ["routed", "all", "top_k:4", "min_tokens:30", "affinity:0.5"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, HIDDEN), (40, HIDDEN), (3, 11, HIDDEN)])
def test_output_equals_original(mode, dtype, shape):
    layer = make_layer(dtype)
    x = torch.randn(*shape, dtype=dtype)
    expected = layer(x)
    calibration = calibration_module(CalibrationMoeLayer, layer, None, mode)
    # routed outputs come from the same expert calls as the original: bit-exact
    assert torch.equal(calibration(x), expected)


@pytest.mark.parametrize("chunk_size", [1, 5, "auto"])
def test_all_experts_see_all_tokens_without_empty_calls(
    chunk_size, record_linear_inputs
):
    layer = make_layer()
    x = torch.randn(24, HIDDEN)
    calibration = calibration_module(
        CalibrationMoeLayer, layer, None, "all", chunk_size=chunk_size
    )
    recorder = record_linear_inputs(calibration.experts)
    calibration(x)
    assert all(rows == 24 for rows in recorder.rows.values()), recorder.rows
    assert all(0 not in calls for calls in recorder.calls.values())
    assert calibration.dispatcher.calibrated_counts.tolist() == [24] * NUM_EXPERTS
    if chunk_size != "auto":  # one routed call, then extra calls of chunk_size
        routed = calibration.dispatcher.routed_counts.tolist()
        for expert in range(NUM_EXPERTS):
            calls = recorder.calls[f"{expert}.gate_proj"]
            extra = calls[1:] if routed[expert] else calls
            assert sum(extra) == 24 - routed[expert]
            assert all(size <= chunk_size for size in extra), (expert, calls)


def gram_matrices(calibration, x) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per expert, the sum of x x^T over what its down_proj saw: GPTQ's Hessian up
    to a constant, the statistic chunking must not change."""
    grams = [torch.zeros(48, 48, dtype=torch.float64) for _ in range(NUM_EXPERTS)]

    def accumulate(gram):
        def hook(_module, args):
            gram.add_(args[0].double().T @ args[0].double())

        return hook

    handles = [
        expert.down_proj.register_forward_pre_hook(accumulate(grams[i]))
        for i, expert in enumerate(calibration.experts)
    ]
    expected = calibration(x)
    for handle in handles:
        handle.remove()
    return grams, expected


@pytest.mark.parametrize("mode", ["all", "affinity:0.5"])
def test_chunking_changes_neither_outputs_nor_statistics(mode):
    layer = make_layer()
    x = torch.randn(40, HIDDEN)
    original = layer(x)
    reference, out = gram_matrices(
        calibration_module(CalibrationMoeLayer, layer, None, mode), x
    )
    assert torch.equal(out, original)
    for chunk_size in (1, 7):
        chunked = calibration_module(
            CalibrationMoeLayer, layer, None, mode, chunk_size=chunk_size
        )
        grams, out = gram_matrices(chunked, x)
        assert torch.equal(out, original)
        for gram, ref in zip(grams, reference, strict=True):
            torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-5)


def test_routed_mode_counts_only_routed_tokens(record_linear_inputs):
    layer = make_layer()
    x = torch.randn(2, HIDDEN)  # 4 assignments over 6 experts: some get none
    routed = torch.zeros(NUM_EXPERTS, dtype=torch.long)
    for expert in layer.gate(x).topk(TOP_K).indices.flatten().tolist():
        routed[expert] += 1
    assert (routed == 0).any()
    calibration = calibration_module(CalibrationMoeLayer, layer, None, "routed")
    recorder = record_linear_inputs(calibration.experts)
    calibration(x)
    for expert in range(NUM_EXPERTS):
        calls = recorder.calls[f"{expert}.gate_proj"]
        assert sum(calls) == routed[expert]
        assert 0 not in calls  # starved experts are not called at all
    assert torch.equal(calibration.dispatcher.routed_counts, routed)
    assert torch.equal(calibration.dispatcher.calibrated_counts, routed)


def test_propagation_forwards_are_routed_only_and_uncounted(record_linear_inputs):
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    layer = make_layer()
    x = torch.randn(10, HIDDEN)
    calibration = calibration_module(CalibrationMoeLayer, layer, None, "all")
    calls = []
    for expert in calibration.experts:
        expert.gate_proj.register_forward_pre_hook(
            lambda m, a: calls.append(a[0].shape[0])
        )
    with HooksMixin.disable_hooks():
        out = calibration(x)
    assert sum(calls) == 10 * TOP_K
    assert calibration.dispatcher.calibrated_counts is None
    assert torch.equal(out, layer(x))


def test_block_missing_attributes_gets_a_clear_error():
    class MoeLayer(torch.nn.Module):  # a user's block that only shares the name
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(ValueError, match="lacks gate, num_experts_per_tok"):
        CalibrationMoeLayer(MoeLayer(), None)


def test_a_users_own_copy_of_the_book_layer_is_handled():
    class MoeLayer(torch.nn.Module):  # the book's code, as a user would paste it
        def __init__(self, experts, gate, num_experts_per_tok):
            super().__init__()
            self.experts = torch.nn.ModuleList(experts)
            self.gate = gate
            self.num_experts_per_tok = num_experts_per_tok

        def forward(self, inputs):
            gate_logits = self.gate(inputs)
            weights, selected = torch.topk(gate_logits, self.num_experts_per_tok)
            weights = F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)
            results = torch.zeros_like(inputs)
            for i, expert in enumerate(self.experts):
                batch_idx, nth = torch.where(selected == i)
                results[batch_idx] += weights[batch_idx, nth, None] * expert(
                    inputs[batch_idx]
                )
            return results

    torch.manual_seed(0)
    block = MoeLayer(
        [TextbookExpert(HIDDEN, 48) for _ in range(4)],
        torch.nn.Linear(HIDDEN, 4, bias=False),
        2,
    )
    model = torch.nn.Sequential(block)
    x = torch.randn(9, HIDDEN)
    expected = model(x)
    with moe_calibration_context(model) as swapped:
        assert isinstance(model[0], CalibrationMoeLayer)
        assert torch.equal(model(x), expected)
    assert swapped.coverage().blocks[0].calibrated == [9] * 4
    assert model[0] is block


@pytest.mark.parametrize("mode", ["top_k:3", "min_tokens:10", "affinity:0.5"])
def test_hooks_see_exactly_what_coverage_reports(mode, record_linear_inputs):
    layer = make_layer()
    x = torch.randn(32, HIDDEN)
    calibration = calibration_module(CalibrationMoeLayer, layer, None, mode)
    recorder = record_linear_inputs(calibration.experts)
    calibration(x)
    seen = [recorder.rows.get(f"{e}.gate_proj", 0) for e in range(NUM_EXPERTS)]
    assert seen == calibration.dispatcher.calibrated_counts.tolist()
    assert (
        calibration.dispatcher.calibrated_counts >= calibration.dispatcher.routed_counts
    ).all()
    assert all(0 not in calls for calls in recorder.calls.values())
