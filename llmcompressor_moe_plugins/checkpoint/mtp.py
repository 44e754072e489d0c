"""Carry a checkpoint's MTP (multi-token prediction) layers into the output.

GLM-4.5/4.5-Air/4.6/4.7 and DeepSeek-V3/R1 store ``num_nextn_predict_layers`` (1)
MTP layers after the decoder layers, as ``model.layers.{num_hidden_layers + i}.*``
(GLM-4.5-Air: 46, GLM-4.5: 92, DeepSeek-V3: 61): a full MoE decoder layer
(``self_attn.*``, DeepSeek's latent-attention projections included,
``mlp.gate.*``, ``mlp.experts.E.{gate,up,down}_proj``, ``mlp.shared_experts.*``,
norms) plus ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` and, in the
released checkpoints, ``shared_head.head`` and ``embed_tokens``. transformers never
builds these layers (``Glm4MoeForCausalLM`` drops ``model.layers.46.*`` /
``model.layers.92.*`` on load, ``DeepseekV3ForCausalLM`` ``model.layers.61.*``), so
a checkpoint saved after ``oneshot`` lacks them and vLLM cannot use MTP speculative
decoding with it. llmcompressor's own ``save_mtp_tensors_to_checkpoint`` looks for
an ``mtp.`` prefix (Qwen3.5 style) and finds nothing in these checkpoints.

:func:`copy_mtp_tensors` copies them, unchanged (bit for bit, unquantized), from the
source checkpoint into the saved output, in the form vLLM's MTP loaders read
(``vllm/model_executor/models/glm4_moe_mtp.py``: ``Glm4MoeMTP.load_weights``, and
``deepseek_mtp.py``: ``DeepSeekMTP.load_weights``, both through
``get_spec_layer_idx_from_weight_name`` in ``models/utils.py``: every tensor whose
name starts with ``model.layers.{num_hidden_layers + i}.`` for
``i < num_nextn_predict_layers``; ``embed_tokens`` is renamed onto the MTP module,
``enorm``/``hnorm``/``eh_proj``/``shared_head`` stay on the layer, the rest goes to
its ``mtp_block`` decoder layer, built under the prefix ``model.layers.{index}``):

- new shard(s) ``model_mtp.safetensors`` (``model_mtp-0000K-of-0000N`` when over
  ``max_shard_bytes``) in the output directory;
- ``model.safetensors.index.json`` created or updated so that every tensor of
  every shard is listed, with ``metadata.total_size`` the tensors' byte total (vLLM
  loads only the shards the index names when there is one; transformers and
  compressed-tensors keep reading ``model.safetensors`` when that file exists);
- ``config.json``: ``num_nextn_predict_layers`` as in the source, and every MTP
  Linear listed in ``quantization_config.ignore``. The MTP layer stays in bf16, but
  vLLM builds it with the checkpoint's quantization config: a Linear that is not
  ignored matches the ``Linear`` target and would be created quantized (packed
  weights and scales that the copied tensors do not have), and its routed experts
  are one ``FusedMoE`` that ``CompressedTensorsMoEMethod.get_moe_method`` makes
  ``UnquantizedFusedMoEMethod`` only when ``<prefix>.0.gate_proj`` etc. are ignored.

Python, after ``oneshot(..., output_dir=out)`` (or ``model.save_pretrained(out)``)::

    from llmcompressor_moe_plugins.checkpoint.mtp import copy_mtp_tensors
    copy_mtp_tensors("path/to/GLM-4.5-Air", out)  # or DeepSeek-V3 / R1 (BF16)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from loguru import logger

from .files import INDEX_NAME, shard_headers

__all__ = [
    "MTP_SHARD_NAME",
    "copy_mtp_tensors",
    "mtp_layer_indices",
    "mtp_linear_names",
]

MTP_SHARD_NAME = "model_mtp.safetensors"
MAX_SHARD_BYTES = 5 * 1024**3
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_NOT_LINEAR = (".embed_tokens.weight",)


def mtp_layer_indices(config: dict) -> list[int]:
    """Layer indices of the MTP layers a ``config.json`` dict declares."""
    text = config.get("text_config", config)
    first = int(text["num_hidden_layers"])
    count = int(
        text.get("num_nextn_predict_layers", text.get("num_mtp_layers", 0)) or 0
    )
    return list(range(first, first + count))


def mtp_linear_names(tensor_names) -> list[str]:
    """Module names of the Linears among MTP tensor names: every ``.weight`` but
    norms and the token embedding. The router (``mlp.gate``) is included, as
    compressed-tensors lists the decoder layers' routers in ``ignore`` too."""
    names = []
    for tensor in tensor_names:
        if tensor.endswith(".weight") and not tensor.endswith(_NOT_LINEAR):
            module = tensor.removesuffix(".weight")
            if not module.endswith(("norm", "layernorm")):
                names.append(module)
    return sorted(set(names))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _tensor_bytes(entry: dict) -> int:
    start, end = entry["data_offsets"]
    return end - start


def copy_mtp_tensors(
    source: str | Path,
    output_dir: str | Path,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
    """Copy the MTP layers' tensors of the checkpoint in ``source`` into the
    checkpoint saved in ``output_dir`` (see the module docstring).

    :param source: local directory of the original (unquantized) checkpoint
    :param output_dir: directory ``oneshot``/``save_pretrained`` saved to
    :param max_shard_bytes: largest new shard; more shards are written beyond it
    :return: the tensor names copied (empty when the source declares or holds no
        MTP layer; logged)
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, output_dir = Path(source), Path(output_dir)
    for directory, role in ((source, "source"), (output_dir, "output")):
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"{role} {directory}: no config.json; pass a local checkpoint "
                "directory (download the model first)"
            )
    source_config = _read_json(source / "config.json")
    if source_config.get("quantization_config"):
        raise ValueError(
            f"source {source} is already quantized "
            f"({source_config['quantization_config'].get('quant_method')}); copy the "
            "MTP layers from the unquantized checkpoint, whose tensors the output's "
            "quantization_config can list as unquantized"
        )
    output_config = _read_json(output_dir / "config.json")
    source_layers = source_config.get("text_config", source_config)["num_hidden_layers"]
    output_layers = output_config.get("text_config", output_config)["num_hidden_layers"]
    if source_layers != output_layers:
        raise ValueError(
            f"source {source} has {source_layers} decoder layers, output "
            f"{output_dir} {output_layers}: the MTP layer index would not match; "
            "pass the checkpoint the output was quantized from"
        )
    layers = set(mtp_layer_indices(source_config))
    if not layers:
        logger.info(f"{source} declares no MTP layer; nothing to copy")
        return []

    located: dict[str, tuple[str, int]] = {}
    for shard, header in shard_headers(source).items():
        for name, entry in header.items():
            match = _LAYER.match(name)
            if match and int(match.group(1)) in layers:
                located[name] = (shard, _tensor_bytes(entry))
    if not located:
        logger.info(
            f"{source} declares MTP layer(s) {sorted(layers)} but holds no "
            f"model.layers.{min(layers)}.* tensors (a checkpoint saved by "
            "transformers drops them); nothing copied"
        )
        return []

    # output shards and index, without MTP tensors a previous call wrote
    previous = sorted(p.name for p in output_dir.glob("model_mtp*.safetensors"))
    headers = {
        shard: header
        for shard, header in shard_headers(output_dir).items()
        if shard not in previous
    }
    for name in previous:
        (output_dir / name).unlink()
    clash = [n for header in headers.values() for n in header if n in located]
    if clash:
        raise ValueError(
            f"{output_dir} already holds MTP tensors ({clash[0]}, ...) outside "
            f"{MTP_SHARD_NAME}; refusing to write them twice"
        )

    # group by size into new shards, then copy tensor by tensor, shard by shard
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(located):
        nbytes = located[name][1]
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        shard_names = [MTP_SHARD_NAME]
    else:
        stem = MTP_SHARD_NAME.removesuffix(".safetensors")
        shard_names = [
            f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            for i in range(len(groups))
        ]
    for shard_name, names in zip(shard_names, groups, strict=True):
        tensors = {}
        for source_shard in sorted({located[name][0] for name in names}):
            with safe_open(str(source / source_shard), "pt") as handle:
                for name in names:
                    if located[name][0] == source_shard:
                        tensors[name] = handle.get_tensor(name)
        save_file(tensors, str(output_dir / shard_name), metadata={"format": "pt"})
        headers[shard_name] = {
            name: {"data_offsets": [0, located[name][1]]} for name in names
        }

    weight_map = {name: shard for shard, header in headers.items() for name in header}
    total = sum(
        _tensor_bytes(entry) for header in headers.values() for entry in header.values()
    )
    index = {
        "metadata": {"total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (output_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    _update_config(output_dir, source_config, sorted(located))
    copied = sorted(located)
    logger.info(
        f"Copied {len(copied)} MTP tensor(s) of layer(s) {sorted(layers)} from "
        f"{source} into {', '.join(shard_names)} in {output_dir}"
    )
    return copied


def _update_config(output_dir: Path, source_config: dict, copied: list[str]) -> None:
    path = output_dir / "config.json"
    config = _read_json(path)
    text = config.get("text_config", config)
    source_text = source_config.get("text_config", source_config)
    count = source_text.get(
        "num_nextn_predict_layers", source_text.get("num_mtp_layers")
    )
    text["num_nextn_predict_layers"] = count
    text.pop("num_mtp_layers", None)
    quantization = config.get("quantization_config")
    if quantization is not None:
        ignore = list(quantization.get("ignore") or [])
        ignore += [n for n in mtp_linear_names(copied) if n not in ignore]
        quantization["ignore"] = ignore
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
