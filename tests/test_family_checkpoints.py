"""Every family the plugin calibrates: quantized, saved in the layout of the
family's own checkpoints, reloaded by transformers and compared expert by expert,
at expert widths 128, 64 and 32 (W4A16's group of 128 divides only the first);
families whose checkpoints cannot hold per-expert tensors are refused before any
calibration; the save-time check names what a broken checkpoint lacks."""

import json
import re

import pytest
import torch
from llmcompressor import oneshot
from safetensors.torch import load_file, save_file

from llmcompressor_moe_plugins import MoECalibrationModifier
from llmcompressor_moe_plugins.checkpoint.layout import UnsavableLayoutError
from llmcompressor_moe_plugins.checkpoint.verify import (
    CheckpointMismatchError,
    verify_checkpoint,
)
from llmcompressor_moe_plugins.checkpoint.vllm_rules import vllm_layout_violations
from llmcompressor_moe_plugins.upstream.compat import cpu_only_calibration

from .families import FAMILIES, load_tiny, save_tiny
from .helpers import relative_error

# every family the plugin calibrates (llama4's experts are not taken by the
# generic path; longcat_flash's are not linearized upstream)
CALIBRATED = [f for f in FAMILIES if f not in {"llama4", "llama4_vl", "longcat_flash"}]
# checkpoints that store the experts fused (gpt-oss: gate/up interleaved, with
# biases; the GraniteMoE family: input_linear/output_linear; Qwen3-VL-MoE:
# transposed): no per-expert checkpoint of them reloads in transformers
REFUSED = {
    "gpt_oss",
    "granitemoe",
    "granitemoeshared",
    "granitemoehybrid",
    "qwen3_vl_moe",
}
# checkpoints that name experts w1 (gate), w3 (up), w2 (down)
RENAMED = {"mixtral", "minimax", "minimax_m2", "phimoe", "lfm2_moe"}
SAVED = [f for f in CALIBRATED if f not in REFUSED]


def expert_width_overrides(family: str, width: int) -> dict:
    """Hidden 128 and routed experts ``width`` wide: families name the expert width
    ``moe_intermediate_size`` where they have it, else ``intermediate_size``; the
    dense and shared widths become 128."""
    config = FAMILIES[family].config_kwargs
    text = config.get("text_config", config)
    overrides = {"hidden_size": 128}
    for key in (
        "intermediate_size",
        "shared_expert_intermediate_size",
        "shared_intermediate_size",
        "intermediate_size_mlp",
    ):
        if key in text:
            overrides[key] = 128
    expert = (
        "moe_intermediate_size"
        if "moe_intermediate_size" in text
        else "intermediate_size"
    )
    overrides[expert] = width
    return overrides


RECIPE = """
default_stage:
  default_modifiers:
    MoECalibrationModifier: {}
    QuantizationModifier:
      targets: ['re:.*experts\\.\\d+\\.(gate|up|down)_proj$']
      scheme: W4A16
"""


def quantize(family, source, output, calibration_data, tokenizer):
    model = load_tiny(family, source)
    with cpu_only_calibration():
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=calibration_data,
            recipe=RECIPE,
            output_dir=str(output),
            num_calibration_samples=2,
            max_seq_length=16,
        )
    return model


def fused_experts(model) -> dict[str, torch.Tensor]:
    """Each routed expert's gate/up and down weights as transformers holds them."""
    out = {}
    for name, parameter in model.named_parameters():
        if re.search(r"\.experts\.(gate_up_proj|down_proj)$", name):
            for index in range(parameter.shape[0]):
                out[f"{name}[{index}]"] = parameter[index].detach().float()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("width", [128, 64, 32])
@pytest.mark.parametrize("family", SAVED)
def test_family_checkpoint_reloads_expert_by_expert(
    family, width, tokenizer, calibration_data, tmp_path
):
    source = save_tiny(
        family, tmp_path / "model", tokenizer, **expert_width_overrides(family, width)
    )
    output = tmp_path / "out"
    quantize(family, source, output, calibration_data, tokenizer)

    names = set(load_file(next(output.glob("*.safetensors"))))
    expert_leaves = {
        m.group(1) for n in names if (m := re.search(r"\.experts\.\d+\.(\w+)\.", n))
    }
    expected = (
        {"w1", "w2", "w3"}
        if family in RENAMED
        else {"gate_proj", "up_proj", "down_proj"}
    )
    assert expert_leaves == expected, expert_leaves

    verify_checkpoint(output)
    assert vllm_layout_violations(output, check_values=True) == []
    config = json.loads((output / "config.json").read_text())["quantization_config"]
    # one scheme for every expert, its group the largest of vLLM's MoE sizes
    # (128, 64, 32) dividing the widths (hidden 128, experts ``width``)
    group_sizes = [g["weights"]["group_size"] for g in config["config_groups"].values()]
    assert group_sizes == [width]

    original = load_tiny(family, source)
    reloaded, info = type(original).from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    before, after = fused_experts(original), fused_experts(reloaded)
    assert before.keys() == after.keys() and before
    for key in before:
        error = relative_error(after[key], before[key])
        # int4 rounding moves every expert, and never by as much as a zeroed or
        # uninitialized one (relative error 1 or about 1.4)
        assert 0 < error < 0.25, (key, error)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_fused_checkpoint_families_are_refused_before_calibrating(
    family, tokenizer, calibration_data, tmp_path
):
    source = save_tiny(family, tmp_path / "model", tokenizer)
    calibrated = []
    model = load_tiny(family, source)
    model.register_forward_hook(lambda *args: calibrated.append(1))
    with pytest.raises(UnsavableLayoutError, match=f"^{family}: .*refuses it"):
        with cpu_only_calibration():
            oneshot(
                model=model,
                processor=tokenizer,
                dataset=calibration_data,
                recipe=[MoECalibrationModifier()],
                output_dir=str(tmp_path / "out"),
                num_calibration_samples=2,
                max_seq_length=16,
            )
    assert not calibrated
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def mixtral_checkpoint(tmp_path_factory, tokenizer, calibration_data):
    root = tmp_path_factory.mktemp("mixtral")
    overrides = expert_width_overrides("mixtral", 128)
    source = save_tiny("mixtral", root / "model", tokenizer, **overrides)
    quantize("mixtral", source, root / "out", calibration_data, tokenizer)
    return root / "out"


def rewrite(checkpoint, tmp_path, change) -> "Path":  # noqa: F821
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    shard = next(broken.glob("*.safetensors"))
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return broken


def test_save_check_names_a_renamed_key(mixtral_checkpoint, tmp_path):
    verify_checkpoint(mixtral_checkpoint)
    key = "model.layers.1.block_sparse_moe.experts.3.w1.weight_packed"

    def rename(tensors):
        tensors[key.replace(".w1.", ".gate_proj.")] = tensors.pop(key)

    broken = rewrite(mixtral_checkpoint, tmp_path, rename)
    with pytest.raises(CheckpointMismatchError) as error:
        verify_checkpoint(broken)
    message = str(error.value)
    assert "unexpected on load" in message
    assert "experts.3.gate_proj.weight_packed" in message


def test_save_check_names_a_dropped_expert(mixtral_checkpoint, tmp_path):
    def drop(tensors):
        for name in [
            n for n in tensors if ".layers.0.block_sparse_moe.experts.5." in n
        ]:
            del tensors[name]

    broken = rewrite(mixtral_checkpoint, tmp_path, drop)
    with pytest.raises(CheckpointMismatchError, match=r"experts \[5\] absent"):
        verify_checkpoint(broken)


@pytest.mark.slow
def test_oneshot_output_is_written_only_once_it_passed_the_check(
    tokenizer, calibration_data, tmp_path, monkeypatch
):
    from llmcompressor_moe_plugins.checkpoint import verify

    overrides = expert_width_overrides("qwen3_moe", 128)
    source = save_tiny("qwen3_moe", tmp_path / "model", tokenizer, **overrides)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    monkeypatch.setattr(
        verify, "checkpoint_problems", lambda *a, **k: ["missing on load: x.weight"]
    )
    for output in (existing, tmp_path / "fresh"):
        with pytest.raises(CheckpointMismatchError, match="missing on load: x.weight"):
            quantize("qwen3_moe", source, output, calibration_data, tokenizer)
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "model"]

    monkeypatch.undo()
    quantize("qwen3_moe", source, existing, calibration_data, tokenizer)
    written = {p.name for p in existing.iterdir()}
    assert {"notes.txt", "config.json", "coverage.json", "recipe.yaml"} <= written
