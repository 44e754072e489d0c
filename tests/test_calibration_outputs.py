"""What the next layer calibrates on, under both ``propagate_error`` settings, as
the README states it (Performance, ``batched_expert_statistics``): with
``SharedHessianGPTQModifier`` in ``all`` mode the calibration forwards compute
the experts from their weights, equal to the per-expert path up to rounding.

- ``propagate_error=False``: llmcompressor passes those calibration outputs on
  as they are;
- ``propagate_error=True`` (its default): it discards them and propagates
  through the compressed layer again, on the exact path (bit for bit the
  original block's computation with the quantized weights)."""

import torch
from llmcompressor.modeling.moe.linearize import linearize_moe
from transformers import AutoModelForCausalLM

from llmcompressor_moe_plugins import (
    MoECalibrationModifier,
    SharedHessianGPTQModifier,
    upstream,
)
from llmcompressor_moe_plugins.calibration import from_weights
from llmcompressor_moe_plugins.calibration.architectures.glm4_moe import (
    CalibrationGlm4MoeMoE,
)
from llmcompressor_moe_plugins.tiny import stdlib_texts, tokenize_for_calibration

from .helpers import calibrate, relative_error

# the first MoE layer's experts only: GPTQ's time is most of a run, and their
# compression is what the propagation pass must see
FIRST_MOE_EXPERTS = r"re:model\.layers\.1\.mlp\.(shared_)?experts\..*_proj$"
# float32 rounding of differently ordered sums; a wrong expert or weight is O(1)
ROUNDING = 1e-5


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _calibrate(glm4_dir, tokenizer, propagate_error: bool, monkeypatch):
    """One oneshot; returns the model and what was seen: the first MoE block's
    forwards (calibrating?, input, output), the first MoE layer's outputs per
    pass, the inputs of the layer after it while it calibrates, and whether each
    forward computed from the weights was a calibrating one."""
    blocks, layer_out, next_in, from_weight_calls = [], [], [], []
    original_forward = CalibrationGlm4MoeMoE.forward
    original_from_weights = from_weights.forward_from_weights

    def forward_from_weights(*args, **kwargs):
        from_weight_calls.append(upstream.hooks_enabled())
        return original_from_weights(*args, **kwargs)

    monkeypatch.setattr(from_weights, "forward_from_weights", forward_from_weights)

    def forward(self, hidden_states):
        output = original_forward(self, hidden_states)
        if self.dispatcher.name == "model.layers.1.mlp":
            calibrating = upstream.hooks_enabled()
            blocks.append((calibrating, hidden_states.clone(), output.clone()))
        return output

    monkeypatch.setattr(CalibrationGlm4MoeMoE, "forward", forward)
    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    layers = model.model.layers
    layers[1].register_forward_hook(
        lambda _m, _a, out: layer_out.append(
            (upstream.hooks_enabled(), _first(out).clone())
        )
    )

    def record_next(_module, args, kwargs):
        if upstream.hooks_enabled():
            hidden = args[0] if args else kwargs["hidden_states"]
            next_in.append(hidden.clone())

    layers[2].register_forward_pre_hook(record_next, with_kwargs=True)
    data = tokenize_for_calibration(tokenizer, stdlib_texts(skip_files=100), 2, 16)
    recipe = [
        MoECalibrationModifier(mode="all"),
        SharedHessianGPTQModifier(targets=[FIRST_MOE_EXPERTS], scheme="W4A16"),
    ]
    calibrate(model, tokenizer, data, recipe, 16, propagate_error=propagate_error)
    # only the first MoE block's calibrating forwards compute from the weights
    assert from_weight_calls == [True, True]
    return model, blocks, layer_out, next_in


def _reference_block(glm4_dir, weights_from=None):
    """The first MoE block as upstream linearizes it (per-expert module calls),
    with the unquantized weights or those of ``weights_from``'s block."""
    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    linearize_moe(model)
    block = model.model.layers[1].mlp
    if weights_from is not None:
        source = weights_from.model.layers[1].mlp.state_dict()
        mine = block.state_dict()
        assert mine.keys() <= source.keys()
        block.load_state_dict({name: source[name] for name in mine})
    return block


def test_without_propagate_error_the_next_layer_gets_the_calibration_outputs(
    glm4_dir, tokenizer, monkeypatch, one_thread
):
    model, blocks, layer_out, next_in = _calibrate(
        glm4_dir, tokenizer, False, monkeypatch
    )
    # only calibrating forwards: no propagation pass
    assert [c for c, *_ in blocks] == [True, True]
    assert [c for c, _ in layer_out] == [True, True]
    # passed on as they are
    assert len(next_in) == 2
    for (_, calibration_output), received in zip(layer_out, next_in, strict=True):
        assert torch.equal(received, calibration_output)
    # ... and those came from the experts' weights (above): equal to the
    # per-expert path of the unquantized block up to rounding
    reference = _reference_block(glm4_dir)
    with torch.no_grad():
        for _, block_input, block_output in blocks:
            exact = reference(block_input)
            assert relative_error(block_output, exact) < ROUNDING


def test_with_propagate_error_the_next_layer_gets_the_compressed_layers_exact_path(
    glm4_dir, tokenizer, monkeypatch, one_thread
):
    model, blocks, layer_out, next_in = _calibrate(
        glm4_dir, tokenizer, True, monkeypatch
    )
    # a calibrating forward per batch, then a propagating one per batch
    assert [c for c, *_ in blocks] == [True, True, False, False]
    assert [c for c, _ in layer_out] == [True, True, False, False]
    assert len(next_in) == 2
    for (_, calibration_output), (_, propagated), received in zip(
        layer_out[:2], layer_out[2:], next_in, strict=True
    ):
        assert torch.equal(received, propagated)  # the propagation pass's
        assert not torch.equal(received, calibration_output)  # discarded
    # the propagation pass: bit for bit the block's own computation with the
    # quantized weights
    quantized = _reference_block(glm4_dir, weights_from=model)
    with torch.no_grad():
        for _, block_input, block_output in blocks[2:]:
            assert torch.equal(block_output, quantized(block_input))
