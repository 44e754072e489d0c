"""The real GLM layouts load, and their tiny twins keep what matters."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Glm4MoeConfig

from llmcompressor_moe_plugins import real_configs
from llmcompressor_moe_plugins.real_configs import (
    build_tiny_like,
    names,
    real_config,
    real_config_dict,
    real_config_source,
    tiny_config_like,
    tiny_width,
)

ALL = ["GLM-4.5", "GLM-4.5-Air", "GLM-4.6", "GLM-4.7"]
# (layers, dense layers, routed experts, top-k, hidden, dense width, expert width,
#  qk norm, routed scaling, positions)
EXPECTED = {
    "GLM-4.5": (92, 3, 160, 8, 5120, 12288, 1536, True, 2.5, 131072),
    "GLM-4.5-Air": (46, 1, 128, 8, 4096, 10944, 1408, False, 1.0, 131072),
    "GLM-4.6": (92, 3, 160, 8, 5120, 12288, 1536, True, 2.5, 202752),
    "GLM-4.7": (92, 3, 160, 8, 5120, 12288, 1536, True, 2.5, 202752),
}
WIDTHS = ("hidden_size", "intermediate_size", "moe_intermediate_size")
KEPT = (
    "first_k_dense_replace",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "norm_topk_prob",
    "use_qk_norm",
    "num_nextn_predict_layers",
    "n_shared_experts",
    "attention_bias",
    "head_dim",
)
ARCHITECTURE_FIELDS = {
    "architectures", "model_type", "attention_bias", "head_dim", "hidden_act",
    "hidden_size", "partial_rotary_factor", "intermediate_size",
    "max_position_embeddings", "moe_intermediate_size", "norm_topk_prob",
    "num_attention_heads", "n_group", "topk_group", "n_routed_experts",
    "n_shared_experts", "routed_scaling_factor", "num_experts_per_tok",
    "first_k_dense_replace", "num_hidden_layers", "num_key_value_heads",
    "rms_norm_eps", "rope_theta", "num_nextn_predict_layers",
    "tie_word_embeddings", "use_qk_norm", "vocab_size",
}  # fmt: skip


def test_all_four_glms_are_shipped():
    assert names("glm4_moe") == ALL


@pytest.mark.parametrize("name", ALL)
def test_real_config_loads_with_its_values(name):
    config = real_config(name)
    assert isinstance(config, Glm4MoeConfig)
    layers, dense, experts, top_k, hidden, dense_w, expert_w, qk, scale, pos = EXPECTED[
        name
    ]
    assert config.num_hidden_layers == layers
    assert config.first_k_dense_replace == dense
    assert config.n_routed_experts == experts
    assert config.num_experts_per_tok == top_k
    assert config.hidden_size == hidden
    assert config.intermediate_size == dense_w
    assert config.moe_intermediate_size == expert_w
    assert config.use_qk_norm is qk
    assert config.routed_scaling_factor == scale
    assert config.max_position_embeddings == pos
    assert config.num_nextn_predict_layers == 1
    assert config.n_shared_experts == 1
    assert (config.n_group, config.topk_group) == (1, 1)
    assert config.attention_bias is True and config.norm_topk_prob is True
    assert (config.head_dim, config.num_attention_heads) == (128, 96)
    assert config.num_key_value_heads == 8
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    assert config.rope_parameters["rope_theta"] == 1000000
    assert config.vocab_size == 151552
    assert real_config(f"zai-org/{name}").to_dict() == config.to_dict()


@pytest.mark.parametrize("name", ALL)
def test_files_hold_architecture_fields_and_name_their_source(name):
    assert set(real_config_dict(name)) <= ARCHITECTURE_FIELDS
    source = real_config_source(name)
    assert (
        source["url"] == f"https://huggingface.co/zai-org/{name}/blob/main/config.json"
    )
    assert source["retrieved"] == "2026-11-23"
    assert source["how"] and source["cross_checked"]


def test_only_air_has_a_width_that_is_not_a_multiple_of_128():
    for name in ALL:
        config = real_config_dict(name)
        off = [f for f in WIDTHS if config[f] % 128]
        assert off == (["intermediate_size"] if name == "GLM-4.5-Air" else []), name
    assert 10944 % 64 == 0 and 10944 % 128 == 64


def test_tiny_width_keeps_the_residue():
    assert tiny_width(10944) == 192
    assert tiny_width(1408) == tiny_width(1536) == tiny_width(5120) == 128
    assert tiny_width(96) == 96 and tiny_width(200) == 200
    with pytest.raises(ValueError):
        tiny_width(0)


@pytest.mark.parametrize("name", ALL)
def test_twin_keeps_the_properties_that_matter(name):
    real, tiny = real_config(name), tiny_config_like(name)
    for field in WIDTHS:
        big, small = getattr(real, field), getattr(tiny, field)
        assert small <= 192, field
        for block in (16, 32, 64, 128):
            assert small % block == big % block, (field, block)
    for field in KEPT:
        assert getattr(tiny, field) == getattr(real, field), field
    assert tiny.rope_parameters["partial_rotary_factor"] == 0.5
    assert tiny.first_k_dense_replace >= 1
    assert tiny.num_hidden_layers == real.first_k_dense_replace + 2
    assert tiny.n_routed_experts < real.n_routed_experts
    assert tiny.n_routed_experts % tiny.n_group == 0
    assert tiny.num_attention_heads > tiny.num_key_value_heads
    # o_proj's input width is not the hidden size, as in the real models
    assert tiny.num_attention_heads * tiny.head_dim != tiny.hidden_size


def test_overrides_win_and_unknown_names_say_what_exists():
    assert tiny_config_like("GLM-4.5", vocab_size=100).vocab_size == 100
    with pytest.raises(KeyError, match="GLM-4.5-Air"):
        real_config("GLM-9")


@pytest.fixture(scope="module")
def air_twin(tmp_path_factory, tokenizer):
    return build_tiny_like("GLM-4.5-Air", tmp_path_factory.mktemp("air"), tokenizer)


def shard_contents(directory):
    contents = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            contents |= {key: path.name for key in handle.keys()}
    return contents


def test_built_twin_stores_the_mtp_layer_as_the_real_checkpoint(air_twin, tokenizer):
    config = json.loads((air_twin / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    mtp = config["num_hidden_layers"]  # 3: layers 0 (dense), 1, 2 (MoE)
    index = json.loads((air_twin / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == shard_contents(air_twin)
    mtp_names = {k for k in index["weight_map"] if k.startswith(f"model.layers.{mtp}.")}
    assert {index["weight_map"][k] for k in mtp_names} == {
        "model-00002-of-00002.safetensors"
    }
    prefix = f"model.layers.{mtp}"
    expected = {
        f"{prefix}.{tail}"
        for tail in (
            "enorm.weight",
            "hnorm.weight",
            "eh_proj.weight",
            "shared_head.norm.weight",
            "shared_head.head.weight",
            "embed_tokens.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.q_proj.bias",
            "self_attn.o_proj.weight",
            "mlp.gate.weight",
            "mlp.gate.e_score_correction_bias",
            "mlp.shared_experts.down_proj.weight",
            *(
                f"mlp.experts.{e}.{p}.weight"
                for e in range(real_configs.TINY_EXPERTS)
                for p in ("gate_proj", "up_proj", "down_proj")
            ),
        )
    }
    assert expected <= mtp_names
    with safe_open(str(air_twin / "model-00002-of-00002.safetensors"), "pt") as f:
        hidden = config["hidden_size"]
        assert f.get_slice(f"{prefix}.eh_proj.weight").get_shape() == [
            hidden,
            2 * hidden,
        ]
        assert f.get_slice(f"{prefix}.mlp.experts.0.down_proj.weight").get_shape() == [
            hidden,
            config["moe_intermediate_size"],
        ]
    assert len(tokenizer) == config["vocab_size"]


def test_built_twin_has_uneven_router_bias_and_loads(air_twin):
    model = AutoModelForCausalLM.from_pretrained(air_twin)
    biases = [
        m.e_score_correction_bias
        for m in model.modules()
        if hasattr(m, "e_score_correction_bias")
    ]
    assert len(biases) == 2
    for bias in biases:
        assert len(set(bias.tolist())) == bias.numel()  # all different
        assert bias.max() - bias.min() == pytest.approx(0.2)
    assert not torch.equal(biases[0], biases[1])
    assert model.get_submodule("model.layers.0.mlp.down_proj").in_features == 192


# --- beyond GLM: Qwen3-MoE, DeepSeek-V3, Mixtral --------------------------------

OTHERS = {
    # name: (model_type, config class, layers, dense layers, experts key, experts,
    #        top-k, hidden, expert width)
    "Qwen3-30B-A3B":
        ("qwen3_moe", "Qwen3MoeConfig", 48, 0, "num_experts", 128, 8, 2048, 768),
    "Qwen3-235B-A22B":
        ("qwen3_moe", "Qwen3MoeConfig", 94, 0, "num_experts", 128, 8, 4096, 1536),
    "DeepSeek-V3":
        ("deepseek_v3", "DeepseekV3Config", 61, 3, "n_routed_experts", 256, 8, 7168,
         2048),
    "Mixtral-8x7B-v0.1":
        ("mixtral", "MixtralConfig", 32, 0, "num_local_experts", 8, 2, 4096, 14336),
}  # fmt: skip
MLA = ("q_lora_rank", "kv_lora_rank")
MLA_HEAD_DIMS = ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def test_every_family_is_shipped():
    assert names() == sorted([*ALL, *OTHERS])
    assert names("qwen3_moe") == ["Qwen3-235B-A22B", "Qwen3-30B-A3B"]
    assert names("deepseek_v3") == ["DeepSeek-V3"] and names("gpt_oss") == []


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_other_real_configs_load_with_their_values(name):
    import transformers

    model_type, cls, layers, dense, key, experts, top_k, hidden, width = OTHERS[name]
    config = real_config(name)
    assert type(config) is getattr(transformers, cls)
    assert config.model_type == model_type
    assert config.num_hidden_layers == layers
    assert getattr(config, "first_k_dense_replace", 0) == dense
    assert real_config_dict(name)[key] == experts
    assert config.num_experts_per_tok == top_k
    assert config.hidden_size == hidden
    expert_width = (
        "intermediate_size" if model_type == "mixtral" else "moe_intermediate_size"
    )
    assert getattr(config, expert_width) == width
    every_width = [v for f, v in real_config_dict(name).items() if f in (*WIDTHS, *MLA)]
    assert all(w % 128 == 0 for w in every_width), every_width
    source = real_config_source(name)
    assert source["url"].startswith("https://huggingface.co/") and source[
        "url"
    ].endswith(f"/{name}/blob/main/config.json")
    assert source["retrieved"] and source["how"] and source["cross_checked"]


def test_deepseek_v3_layout_and_r1_alias():
    config = real_config("deepseek-ai/DeepSeek-V3")
    assert (config.n_group, config.topk_group, config.routed_scaling_factor) == (
        8,
        4,
        2.5,
    )
    assert (config.q_lora_rank, config.kv_lora_rank) == (1536, 512)
    assert (config.qk_rope_head_dim, config.qk_nope_head_dim, config.v_head_dim) == (
        64,
        128,
        128,
    )
    assert config.num_nextn_predict_layers == 1 and config.n_shared_experts == 1
    assert real_config("deepseek-ai/DeepSeek-R1").to_dict() == config.to_dict()


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_other_twins_keep_the_properties_that_matter(name):
    real, tiny, raw = real_config(name), tiny_config_like(name), real_config_dict(name)
    model_type, _, _, dense, key, experts, _, _, _ = OTHERS[name]
    assert tiny.model_type == model_type
    for field in (*WIDTHS, *MLA):
        if field not in raw:
            continue
        big, small = getattr(real, field), getattr(tiny, field)
        assert small <= 192, field
        for block in (16, 32, 64, 128):
            assert small % block == big % block, (field, block)
    assert tiny.num_hidden_layers == dense + 2
    assert getattr(tiny, "first_k_dense_replace", 0) == dense
    tiny_experts = tiny.to_dict().get(key, getattr(tiny, "num_local_experts", None))
    assert 8 <= tiny_experts <= experts
    assert tiny.num_experts_per_tok == 2
    assert tiny.head_dim == (64 if model_type == "deepseek_v3" else 128)
    for field in ("norm_topk_prob", "routed_scaling_factor", "n_shared_experts",
                  "num_nextn_predict_layers", "decoder_sparse_step", "mlp_only_layers",
                  "rms_norm_eps", "tie_word_embeddings", *MLA_HEAD_DIMS):  # fmt: skip
        if field in raw:
            assert getattr(tiny, field) == getattr(real, field), field
    if model_type == "deepseek_v3":
        # grouped routing kept exactly: 8 groups of 2 experts, the best 4 groups
        assert (tiny.n_routed_experts, tiny.n_group, tiny.topk_group) == (16, 8, 4)
        assert tiny.num_key_value_heads == tiny.num_attention_heads  # MLA
    else:
        assert tiny.num_attention_heads > tiny.num_key_value_heads
        assert tiny.num_attention_heads * tiny.head_dim != tiny.hidden_size


def test_twins_refuse_a_family_without_one():
    from llmcompressor_moe_plugins.real_configs.twins import _family

    with pytest.raises(
        KeyError, match="gpt_oss.*deepseek_v3, glm4_moe, mixtral, qwen3_moe"
    ):
        _family("gpt_oss")


@pytest.fixture(scope="module")
def deepseek_twin(tmp_path_factory, tokenizer):
    return build_tiny_like("DeepSeek-V3", tmp_path_factory.mktemp("dsv3"), tokenizer)


def test_deepseek_twin_stores_its_mtp_layer_and_loads(deepseek_twin):
    config = json.loads((deepseek_twin / "config.json").read_text())
    mtp = config["num_hidden_layers"]  # 5: layers 0-2 dense, 3-4 MoE
    assert mtp == 5 and config["num_nextn_predict_layers"] == 1
    index = json.loads((deepseek_twin / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == shard_contents(deepseek_twin)
    prefix = f"model.layers.{mtp}"
    mtp_names = {k for k in index["weight_map"] if k.startswith(f"{prefix}.")}
    for tail in ("enorm.weight", "hnorm.weight", "eh_proj.weight",
                 "shared_head.head.weight", "embed_tokens.weight",
                 "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_b_proj.weight",
                 "self_attn.q_a_layernorm.weight", "mlp.gate.e_score_correction_bias",
                 "mlp.shared_experts.up_proj.weight",
                 "mlp.experts.15.down_proj.weight"):  # fmt: skip
        assert f"{prefix}.{tail}" in mtp_names, tail
    model, info = AutoModelForCausalLM.from_pretrained(
        deepseek_twin, output_loading_info=True
    )
    assert info["missing_keys"] == set() or not info["missing_keys"]
    # transformers drops the MTP layer (it ignores model.layers.61.* by name only)
    assert all(k.startswith(f"{prefix}.") for k in info["unexpected_keys"])
    biases = [m.e_score_correction_bias for m in model.modules()
              if hasattr(m, "e_score_correction_bias")]  # fmt: skip
    assert len(biases) == 2 and all(len(set(b.tolist())) == 16 for b in biases)
    assert model.get_submodule("model.layers.0.mlp.down_proj").in_features == 128
    assert model.get_submodule("model.layers.3.self_attn.kv_b_proj").in_features == 128


@pytest.mark.parametrize("name", ["Qwen3-30B-A3B", "Mixtral-8x7B-v0.1"])
def test_twins_without_mtp_save_one_shard_and_reload_exactly(name, tmp_path, tokenizer):
    directory = build_tiny_like(name, tmp_path, tokenizer)
    assert [p.name for p in directory.glob("*.safetensors")] == ["model.safetensors"]
    model, info = AutoModelForCausalLM.from_pretrained(
        directory, output_loading_info=True
    )
    assert not any(info.values()), info
    router = model.get_submodule("model.layers.0.mlp.gate").weight
    assert router.shape == (8, 128) and router.abs().sum() > 0
