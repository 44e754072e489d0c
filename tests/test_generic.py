"""The generic path on tiny random models of transformers 5.17's MoE families:
outputs bit-identical to the (linearized) original in every mode, every expert
calibrated as its mode says with no empty call, and the whole workflow (CLI
quantize, save, reload) per family."""

import json
import subprocess
import sys

import pytest
import torch
from llmcompressor.modeling.moe.linearize import linearize_moe

from llmcompressor_moe_plugins import moe_calibration_context, plan_calibration
from llmcompressor_moe_plugins.calibration.architectures.generic import (
    CalibrationExperts,
)

from .families import FAMILIES, build_tiny, find_moe_blocks, load_tiny, save_tiny
from .helpers import relative_error

GENERIC_FAMILIES = [
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "deepseek_v3",
    "gpt_oss",
    "olmoe",
    "qwen3_next",
    "granitemoe",
    "minimax_m2",
]
# (mode, floor): every mode, and the default's floor on top of sampling
MODES = [
    ("routed", 0),
    ("all", 0),
    ("top_k:4", 0),
    ("min_tokens:20", 0),
    ("affinity:0.5", 0),
    ("affinity:0.1", 12),
]
TOKENS = (2, 24)


def linearized(family, dtype):
    model = build_tiny(family, dtype=dtype)
    linearize_moe(model)
    return model


def expert_input_rows(model):
    """Rows each expert's first Linear is called with, per call, while
    calibrating (llmcompressor's hooks enabled)."""
    from llmcompressor_moe_plugins import upstream

    calls: dict[tuple[str, int], list[int]] = {}
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, CalibrationExperts):
            continue
        for index, expert in enumerate(module.expert_modules()):
            first = expert.gate_proj if hasattr(expert, "gate_proj") else expert.up_proj
            key = (name.removesuffix(".experts"), index)
            calls[key] = []

            def hook(_module, args, key=key):
                if upstream.hooks_enabled():
                    calls[key].append(args[0].reshape(-1, args[0].shape[-1]).shape[0])

            handles.append(first.register_forward_pre_hook(hook))
    return calls, handles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", GENERIC_FAMILIES)
def test_every_mode_keeps_outputs_and_calibrates_as_it_says(family, dtype):
    model = linearized(family, dtype)
    ids = torch.randint(2, 200, TOKENS)
    with torch.no_grad():
        expected = model(ids).logits
    plans = plan_calibration(model)
    assert plans and {p.path for p in plans} == {"generic"}
    assert {p.block_class for p in plans} == {FAMILIES[family].block_cls}

    for mode, floor in MODES:
        with moe_calibration_context(model, mode=mode, floor=floor) as swapped:
            calls, handles = expert_input_rows(model)
            with torch.no_grad():
                actual = model(ids).logits
            report = swapped.coverage()
            for handle in handles:
                handle.remove()
        assert torch.equal(actual, expected), (family, mode)
        tokens = TOKENS[0] * TOKENS[1]
        for block in report.blocks:
            seen = [sum(calls[(block.name, e)]) for e in range(len(block.routed))]
            assert seen == block.calibrated, (family, mode, block.name)
            assert all(0 not in calls[(block.name, e)] for e in range(len(seen)))
            assert (
                sum(block.routed)
                == tokens * FAMILIES[family].config_kwargs.get("num_experts_per_tok", 2)
                or sum(block.routed) > 0
            )
            if mode == "routed":
                assert block.calibrated == block.routed
            elif mode == "all":
                assert block.calibrated == [tokens] * len(seen)
            elif mode.startswith("min_tokens"):
                assert min(block.calibrated) >= 20
            if floor:
                assert min(block.calibrated) >= floor
            assert all(
                c >= r for c, r in zip(block.calibrated, block.routed, strict=True)
            )
    # restored: the linearized experts are back in every block
    for _, block in find_moe_blocks(model, family):
        assert not isinstance(block.experts, CalibrationExperts)


# the default mode weights every family it calibrates: all but llama4 (its
# linearized experts take pre-scaled tokens; the text model does not build with
# llmcompressor's Llama4 converter) and longcat_flash (not linearized upstream)
WEIGHTED_FAMILIES = [
    family
    for family in FAMILIES
    if family not in {"llama4", "llama4_vl", "longcat_flash"}
]


@pytest.mark.parametrize("family", WEIGHTED_FAMILIES)
def test_weighted_mode_hands_every_family_its_weighted_statistics(family):
    """With a weighting consumer (SharedHessianGPTQModifier), every expert's
    routed and floor tokens reach it once, with positive weights computed from
    the expert weights (no family falls back to unweighted), and the model's
    outputs stay the original's."""
    model = linearized(family, torch.float32)
    ids = torch.randint(2, 200, TOKENS)
    with torch.no_grad():
        expected = model(ids).logits
    received: dict[int, list[torch.Tensor]] = {}

    class Consumer:
        def accepts(self, linears):
            return True

        def consume_weighted(self, mlp, tokens, intermediate, weights):
            assert intermediate.shape[0] == tokens.shape[0] == weights.shape[0]
            received.setdefault(id(mlp.down_proj), []).append(weights)

    with moe_calibration_context(model, mode="weighted:2", floor=12) as swapped:
        for block in swapped.blocks:
            block.replacement.dispatcher.consumer = Consumer()
        with torch.no_grad():
            actual = model(ids).logits
        report = swapped.coverage()
        experts = {
            block.name: block.replacement.dispatcher.experts for block in swapped.blocks
        }
    assert torch.equal(actual, expected)
    assert report.blocks
    for block in report.blocks:
        for index, expert in enumerate(experts[block.name]):
            weights = torch.cat(received.get(id(expert.down_proj), [torch.zeros(0)]))
            assert weights.numel() == block.calibrated[index] >= 12
            assert (weights > 0).all()


def test_llama4_experts_are_not_taken_by_the_generic_path():
    """Llama4's linearized experts take pre-scaled tokens and no routing."""
    model = linearized("llama4_vl", torch.float32)
    assert not [p for p in plan_calibration(model) if p.path == "generic"]


def test_router_without_scores_refuses_affinity_modes_and_keeps_routed():
    model = linearized("qwen3_moe", torch.float32)
    for _, block in find_moe_blocks(model, "qwen3_moe"):
        router = block.gate
        forward = router.forward

        def only_routing(hidden, forward=forward):
            logits, weights, indices = forward(hidden)
            return logits[:, :1], weights, indices  # no [tokens, experts] scores

        router.forward = only_routing
    ids = torch.randint(2, 200, TOKENS)
    with torch.no_grad():
        expected = model(ids).logits
    with moe_calibration_context(model, mode="routed", floor=4):
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)
    with pytest.raises(ValueError, match="no usable per-expert scores"):
        with moe_calibration_context(model, mode="top_k:4"):
            with torch.no_grad():
                model(ids)
    assert not any(isinstance(m, CalibrationExperts) for m in model.modules())


# -- the whole workflow per family ---------------------------------------------

WIDE = dict(  # widths W4A16's group of 128 divides, for the experts
    hidden_size=128,
    intermediate_size=128,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=128,
)
EXPERTS_ONLY_RECIPE = """
default_stage:
  default_modifiers:
    MoECalibrationModifier: {}
    GPTQModifier:
      targets: ['re:.*experts\\.\\d+\\.(gate|up|down)_proj$']
      scheme: W4A16
"""


def expert_weights(model, family):
    weights = {}
    for name, block in find_moe_blocks(model, family):
        experts = block.experts
        if hasattr(experts, "gate_up_proj"):
            for index in range(experts.gate_up_proj.shape[0]):
                weights[(name, index)] = experts.gate_up_proj[index].float()
        else:
            for index in range(experts.num_experts):
                expert = experts[index]
                weights[(name, index)] = torch.cat(
                    [expert.gate_proj.weight, expert.up_proj.weight]
                ).float()
    return weights


# gpt-oss and GraniteMoE checkpoints store their experts fused: the plugin refuses
# them before calibrating (tests/test_family_checkpoints.py)
SAVED_FAMILIES = [f for f in GENERIC_FAMILIES if f not in {"gpt_oss", "granitemoe"}]


@pytest.mark.slow
@pytest.mark.parametrize("family", SAVED_FAMILIES)
def test_cli_quantizes_saves_and_reloads(family, tokenizer, tmp_path):
    source = save_tiny(family, tmp_path / "model", tokenizer, **WIDE)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(EXPERTS_ONLY_RECIPE)
    output = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmcompressor_moe_plugins",
            "quantize",
            "--model",
            str(source),
            "--recipe",
            str(recipe),
            "--output",
            str(output),
            "--num-samples",
            "4",
            "--seq-len",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    coverage = json.loads((output / "coverage.json").read_text())
    blocks = coverage["passes"][-1]["blocks"]
    assert blocks and all(min(b["calibrated"]) >= 1 for b in blocks)

    original = load_tiny(family, source)
    quantized = load_tiny(family, output)
    # each expert's weights moved by int4 rounding, none zeroed or left as is
    before, after = expert_weights(original, family), expert_weights(quantized, family)
    assert before.keys() == after.keys()
    for key in before:
        error = relative_error(after[key], before[key])
        assert 0 < error < 0.2, (key, error)
    ids = torch.randint(2, 200, (1, 16))
    with torch.no_grad():
        logits_error = relative_error(quantized(ids).logits, original(ids).logits)
    assert logits_error < 0.3


def test_plugins_command_shows_each_blocks_path(tmp_path, glm4_dir, capsys):
    from llmcompressor_moe_plugins.cli import main

    qwen3 = save_tiny("qwen3_moe", tmp_path / "qwen3")
    llama4 = save_tiny("llama4", tmp_path / "llama4")
    expected = {
        qwen3: "Qwen3MoeSparseMoeBlock           generic          2",
        glm4_dir: "Glm4MoeMoE                       registered       2",
        llama4: "Llama4TextMoe                    none",
    }
    for directory, row in expected.items():
        assert main(["plugins", "--model", str(directory)]) == 0
        assert row in capsys.readouterr().out
