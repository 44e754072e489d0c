"""copy_mtp_tensors: the source's MTP layers end up in the quantized output."""

import json

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from llmcompressor_moe_plugins import MoECalibrationModifier
from llmcompressor_moe_plugins.checkpoint.mtp import (
    MTP_SHARD_NAME,
    copy_mtp_tensors,
    mtp_layer_indices,
    mtp_linear_names,
)
from llmcompressor_moe_plugins.real_configs import build_tiny_like
from llmcompressor_moe_plugins.tiny import (
    build_tiny_glm4_moe,
    stdlib_texts,
    tokenize_for_calibration,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MTP = 3  # the GLM-4.5-Air twin: layers 0 (dense), 1, 2 (MoE), MTP layer 3


@pytest.fixture(scope="module")
def twin(tmp_path_factory, tokenizer):
    return build_tiny_like("GLM-4.5-Air", tmp_path_factory.mktemp("air"), tokenizer)


@pytest.fixture(scope="module")
def quantized(twin, tokenizer, tmp_path_factory):
    """GPTQ W4A16 on the twin, saved by oneshot (as the CLI does)."""
    output = tmp_path_factory.mktemp("w4a16")
    data = tokenize_for_calibration(tokenizer, stdlib_texts(skip_files=100), 4, 32)
    oneshot(
        model=AutoModelForCausalLM.from_pretrained(twin),
        processor=tokenizer,
        dataset=data,
        recipe=[
            MoECalibrationModifier(),
            GPTQModifier(
                targets=["Linear"],
                scheme="W4A16",
                # the dense down_proj (192 wide) is what fit_schemes_to_model ignores
                ignore=["lm_head", r"re:.*mlp\.gate$", "model.layers.0.mlp.down_proj"],
            ),
        ],
        num_calibration_samples=4,
        max_seq_length=32,
        output_dir=str(output),
    )
    return output


def tensors(directory, prefix=""):
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    found[key] = (path.name, handle.get_tensor(key))
    return found


def bits(tensor):
    return tensor.contiguous().view(torch.uint8)


def index_map(directory):
    return json.loads((directory / "model.safetensors.index.json").read_text())


@pytest.mark.slow
def test_oneshot_output_gets_the_mtp_layer(twin, quantized):
    assert not tensors(quantized, f"model.layers.{MTP}.")  # transformers dropped it
    copied = copy_mtp_tensors(twin, quantized)

    source = tensors(twin, f"model.layers.{MTP}.")
    assert copied == sorted(source)
    output = tensors(quantized)
    for name, (_, tensor) in source.items():
        shard, saved = output[name]
        assert shard == MTP_SHARD_NAME
        assert saved.dtype == tensor.dtype and saved.shape == tensor.shape
        assert torch.equal(bits(saved), bits(tensor)), name  # bit-identical

    # the index lists every tensor of every shard, and nothing else
    index = index_map(quantized)
    assert index["weight_map"] == {name: shard for name, (shard, _) in output.items()}
    sizes = sum(t.numel() * t.element_size() for _, t in output.values())
    assert index["metadata"]["total_size"] == sizes

    config = json.loads((quantized / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    assert mtp_layer_indices(config) == [MTP]
    ignore = config["quantization_config"]["ignore"]
    linears = mtp_linear_names(copied)
    assert set(linears) <= set(ignore)
    prefix = f"model.layers.{MTP}"
    for module in (
        "self_attn.q_proj",
        "self_attn.o_proj",
        "mlp.experts.0.gate_proj",
        "mlp.experts.7.down_proj",
        "mlp.shared_experts.up_proj",
        "eh_proj",
        "shared_head.head",
        "mlp.gate",  # as compressed-tensors lists the decoder layers' routers
    ):
        assert f"{prefix}.{module}" in linears
    for not_linear in ("enorm", "embed_tokens", "input_layernorm", "self_attn.q_norm"):
        assert f"{prefix}.{not_linear}" not in ignore
    # the quantized layers are untouched
    assert "model.layers.0.mlp.down_proj" in ignore
    assert "model.layers.1.mlp.experts.0.gate_proj" not in ignore

    # a second call rewrites the same shard, no duplicates
    assert copy_mtp_tensors(twin, quantized) == copied
    assert index_map(quantized) == index
    ignore_again = json.loads((quantized / "config.json").read_text())[
        "quantization_config"
    ]["ignore"]
    assert ignore_again == ignore

    model = AutoModelForCausalLM.from_pretrained(quantized)
    with torch.no_grad():
        logits = model(torch.tensor([[2, 3, 4, 5]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_oneshot_writes_the_coverage_report_beside_its_checkpoint(quantized):
    report = json.loads((quantized / "coverage.json").read_text())
    assert [b["name"] for b in report["passes"][-1]["blocks"]] == [
        "model.layers.1.mlp",
        "model.layers.2.mlp",
    ]
    assert (quantized / "coverage.png").stat().st_size > 1000


@pytest.mark.slow
def test_cli_output_carries_the_mtp_layer(twin, tmp_path):
    from llmcompressor_moe_plugins.cli import main

    output = tmp_path / "out"
    arguments = ["quantize", "--model", str(twin), "--output", str(output)]
    assert main([*arguments, "--num-samples", "4", "--seq-len", "32"]) == 0
    source = tensors(twin, f"model.layers.{MTP}.")
    copied = tensors(output, f"model.layers.{MTP}.")
    assert source.keys() == copied.keys() and source
    for name, (_, tensor) in source.items():
        assert torch.equal(bits(copied[name][1]), bits(tensor)), name
    assert (output / "coverage.json").is_file()
    # the dense MLP's 192-wide down_proj does not fit group 128: kept unquantized
    config = json.loads((output / "config.json").read_text())
    assert "model.layers.0.mlp.down_proj" in config["quantization_config"]["ignore"]


def test_large_layers_are_split_over_shards(twin, tmp_path):
    output = tmp_path / "out"
    AutoModelForCausalLM.from_pretrained(twin).save_pretrained(output)
    copied = copy_mtp_tensors(twin, output, max_shard_bytes=200_000)
    shards = sorted(p.name for p in output.glob("model_mtp*.safetensors"))
    assert len(shards) > 1
    assert shards[0] == f"model_mtp-00001-of-{len(shards):05d}.safetensors"
    saved = tensors(output)
    assert index_map(output)["weight_map"] == {n: s for n, (s, _) in saved.items()}
    assert set(copied) <= set(saved)
    # no quantization_config: nothing to ignore, the count is still there
    config = json.loads((output / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    assert "quantization_config" not in config

    # fewer, larger shards on a second call: the old ones go
    copy_mtp_tensors(twin, output)
    assert sorted(p.name for p in output.glob("model_mtp*.safetensors")) == [
        MTP_SHARD_NAME
    ]
    assert index_map(output)["weight_map"] == {
        n: s for n, (s, _) in tensors(output).items()
    }


def test_source_without_mtp_tensors_copies_nothing(tmp_path, tokenizer):
    # tiny.build_tiny_glm4_moe declares one MTP layer (the config default) but
    # writes none, as a checkpoint saved by transformers does
    source = build_tiny_glm4_moe(tmp_path / "src", tokenizer=tokenizer)
    output = tmp_path / "out"
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(output)
    before = sorted(p.name for p in output.iterdir())
    assert copy_mtp_tensors(source, output) == []
    assert sorted(p.name for p in output.iterdir()) == before


def test_bad_sources_are_refused(twin, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        copy_mtp_tensors(tmp_path, twin)
    quantized_source = tmp_path / "q"
    quantized_source.mkdir()
    config = json.loads((twin / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (quantized_source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="already quantized"):
        copy_mtp_tensors(quantized_source, twin)
    other = tmp_path / "other"
    other.mkdir()
    config["num_hidden_layers"] = 7
    del config["quantization_config"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="decoder layers"):
        copy_mtp_tensors(twin, other)


def test_mtp_layer_indices_reads_either_name():
    assert mtp_layer_indices(
        {"num_hidden_layers": 46, "num_nextn_predict_layers": 1}
    ) == [46]
    assert mtp_layer_indices({"num_hidden_layers": 92, "num_mtp_layers": 2}) == [92, 93]
    assert mtp_layer_indices({"num_hidden_layers": 4}) == []


@pytest.fixture(scope="module")
def deepseek_twin(tmp_path_factory, tokenizer):
    return build_tiny_like("DeepSeek-V3", tmp_path_factory.mktemp("dsv3"), tokenizer)


def test_deepseek_v3_mtp_layer_is_carried_too(deepseek_twin, tmp_path):
    """DeepSeek-V3 stores its MTP layer as GLM does (model.layers.61 in the real
    checkpoint; 5 in the twin: 3 dense + 2 MoE layers), latent attention included."""
    mtp = 5
    model = AutoModelForCausalLM.from_pretrained(deepseek_twin)
    model.save_pretrained(tmp_path)  # what transformers keeps: no MTP layer
    assert not tensors(tmp_path, f"model.layers.{mtp}.")
    copied = copy_mtp_tensors(deepseek_twin, tmp_path)

    source = tensors(deepseek_twin, f"model.layers.{mtp}.")
    assert copied == sorted(source) and len(copied) > 60
    output = tensors(tmp_path)
    for name, (_, tensor) in source.items():
        shard, saved = output[name]
        assert shard == MTP_SHARD_NAME
        assert torch.equal(bits(saved), bits(tensor)), name
    assert index_map(tmp_path)["weight_map"] == {
        name: shard for name, (shard, _) in output.items()
    }
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    assert mtp_layer_indices(config) == [mtp]
    linears = mtp_linear_names(copied)
    prefix = f"model.layers.{mtp}"
    for module in ("self_attn.q_a_proj", "self_attn.q_b_proj",
                   "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
                   "mlp.experts.15.up_proj", "mlp.shared_experts.down_proj",
                   "eh_proj", "shared_head.head"):  # fmt: skip
        assert f"{prefix}.{module}" in linears, module
    # latent-attention norms are norms, not Linears to ignore
    assert f"{prefix}.self_attn.kv_a_layernorm" not in linears
    assert f"{prefix}.self_attn.q_a_layernorm" not in linears

    # transformers still loads the output cleanly: it reads model.safetensors,
    # which the MTP shard sits beside
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
