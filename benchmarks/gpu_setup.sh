#!/usr/bin/env bash
# Set up the GPU machine (no network there) for the benchmarks: install the wheels
# carried in .whl/ (what its Python 3.12 + torch 2.11 + transformers 5.17 image
# lacks: llmcompressor 0.14.0.1, compressed-tensors 0.19.0, auto-round, datasets,
# dill, multiprocess, loguru, pydantic and friends, nvidia-ml-py), then this
# package, editable (its calibration modules are found through entry points, so
# it must be installed, not only on PYTHONPATH), and print the versions.
#
# Run from anywhere, with .whl carried (device tool: carry [".whl"]):
#     bash benchmarks/gpu_setup.sh
# Re-download the wheels (on a machine with PyPI; see benchmarks/README-gpu.md):
#     bash benchmarks/gpu_setup.sh --download
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip --disable-pip-version-check)

if [[ "${1:-}" == "--download" ]]; then
    mkdir -p .whl
    "${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl \
        llmcompressor==0.14.0.1 compressed-tensors==0.19.0 auto-round==0.15.1 \
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 loguru==0.7.3 \
        nvidia-ml-py==13.615.71 pydantic==2.14.3 pydantic-core==2.50.4 \
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
        py-cpuinfo==9.0.0
    du -sh .whl
    exit 0
fi

start=$(date +%s)
shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} == 0 )); then
    echo "no wheels in $(pwd)/.whl: carry .whl (device tool: carry [\".whl\"])" >&2
    exit 1
fi
"${PIP[@]}" install -q --no-index --no-deps --no-compile "${wheels[@]}"
if ! "${PIP[@]}" install -q --no-index --no-deps --no-build-isolation -e . ; then
    echo "editable install failed; installing a copy of the package" >&2
    "${PIP[@]}" install -q --no-index --no-deps --no-build-isolation .
fi

"$PY" - <<'EOF'
import importlib.metadata as metadata

names = [
    "torch", "transformers", "llmcompressor", "compressed-tensors", "auto-round",
    "accelerate", "datasets", "pyarrow", "fsspec", "dill", "multiprocess",
    "pydantic", "pydantic-core", "typing-extensions", "loguru", "nvidia-ml-py",
    "safetensors", "tokenizers", "psutil", "matplotlib", "llmcompressor-moe-plugins",
]
for name in names:
    try:
        print(f"{name:<26} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name:<26} MISSING")

import torch

cuda = torch.cuda.is_available()
print("cuda", cuda, torch.cuda.get_device_name() if cuda else "", torch.version.cuda)

# what the benchmarks import, and the entry points our modules are found by
from datasets import Dataset
from llmcompressor import oneshot  # noqa: F401

from llmcompressor_moe_plugins import MoECalibrationModifier  # noqa: F401
from llmcompressor_moe_plugins.calibration.registry import registered_names

Dataset.from_dict({"input_ids": [[1, 2, 3]]})
names = registered_names()
print("calibration modules:", names)
if "Glm4MoeMoE" not in names:
    raise SystemExit("Glm4MoeMoE has no calibration module: the package's entry "
                     "points are not installed")
EOF
echo "gpu_setup.sh: done in $(( $(date +%s) - start )) s"
