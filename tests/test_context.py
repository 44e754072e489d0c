import pytest
import torch
from loguru import logger
from transformers import AutoModelForCausalLM

from llmcompressor_moe_plugins import (
    MoECalibrationModule,
    MoeLayer,
    moe_calibration_context,
    register,
)
from llmcompressor_moe_plugins.calibration.registry import unregister


@pytest.fixture
def textbook(textbook_dir):
    return AutoModelForCausalLM.from_pretrained(textbook_dir).eval()


def snapshot(model):
    return (
        {name: type(module) for name, module in model.named_modules()},
        {name: param for name, param in model.named_parameters()},
    )


@pytest.mark.parametrize("fail", [False, True])
def test_restore_after_normal_exit_and_exception(textbook, fail):
    x = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        expected = textbook(x).logits
    classes, params = snapshot(textbook)

    with pytest.raises(RuntimeError) if fail else torch.no_grad():
        with moe_calibration_context(textbook) as swapped:
            assert len(swapped) == 2
            assert all(
                isinstance(layer.mlp, MoECalibrationModule)
                for layer in textbook.model.layers
            )
            if fail:
                raise RuntimeError("boom")

    after_classes, after_params = snapshot(textbook)
    assert after_classes == classes
    assert after_params.keys() == params.keys()
    assert all(after_params[n] is params[n] for n in params)  # same objects
    with torch.no_grad():
        assert torch.equal(textbook(x).logits, expected)


def test_weight_changes_during_calibration_survive_restore(textbook):
    with moe_calibration_context(textbook):
        with torch.no_grad():
            textbook.model.layers[0].mlp.experts[3].up_proj.weight.zero_()
    assert isinstance(textbook.model.layers[0].mlp, MoeLayer)
    assert textbook.model.layers[0].mlp.experts[3].up_proj.weight.abs().sum() == 0


def test_failed_construction_restores_earlier_swaps(textbook):
    class Exploding(MoECalibrationModule):
        def __init__(self, original, config, calibrate_all_experts=True, **kwargs):
            super().__init__(original, config, calibrate_all_experts, **kwargs)
            raise ValueError("cannot wrap")

    class_names, params = snapshot(textbook)
    # fail on the second decoder layer only: the first swap must be undone
    layer1 = textbook.model.layers[1].mlp
    layer1.__class__ = type("Glm4LikeBlock", (MoeLayer,), {})
    register("Glm4LikeBlock", Exploding)
    try:
        with pytest.raises(ValueError, match="cannot wrap"):
            with moe_calibration_context(textbook):
                pass
    finally:
        unregister("Glm4LikeBlock")
    assert isinstance(textbook.model.layers[0].mlp, MoeLayer)
    assert textbook.model.layers[1].mlp is layer1


def test_block_modes_override_the_default(textbook):
    with moe_calibration_context(
        textbook, mode="routed", block_modes={"MoeLayer": "top_k:3"}
    ) as swapped:
        modes = {b.replacement.calibration_mode.spec() for b in swapped.blocks}
    assert modes == {"top_k:3"}


def test_bad_block_mode_fails_before_any_swap(textbook):
    with pytest.raises(ValueError, match="Unknown calibration mode"):
        with moe_calibration_context(textbook, block_modes={"MoeLayer": "most"}):
            pass
    assert isinstance(textbook.model.layers[0].mlp, MoeLayer)


def test_fused_glm4_is_linearized_and_packed_back(glm4_dir):
    model = AutoModelForCausalLM.from_pretrained(glm4_dir).eval()
    fused = model.model.layers[1].mlp.experts
    x = torch.randint(0, 500, (1, 10))
    with torch.no_grad():
        expected = model(x).logits
        with moe_calibration_context(model) as swapped:
            assert len(swapped) == 2
            experts = model.model.layers[1].mlp.experts
            assert type(experts).__name__ == "LinearExperts2D"
        # the context leaves the model as it came: fused experts, same outputs
        assert torch.equal(model(x).logits, expected)
    assert type(model.model.layers[1].mlp).__name__ == "Glm4MoeMoE"
    experts = model.model.layers[1].mlp.experts
    assert type(experts) is type(fused)
    assert torch.equal(experts.gate_up_proj, fused.gate_up_proj)


def test_model_without_registered_blocks_warns_with_class_names():
    class SparseBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(4, 2)
            self.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    messages = []
    handle = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    try:
        with moe_calibration_context(torch.nn.Sequential(SparseBlock())) as swapped:
            assert len(swapped) == 0
    finally:
        logger.remove(handle)
    assert any("SparseBlock" in m for m in messages), messages
