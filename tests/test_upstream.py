"""The one seam to upstream: private names only in ``upstream/``, hook points checked
at import, and patches active only while a run of ours is."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.core import LifecycleCallbacks
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.gptq import GPTQModifier
from transformers import AutoModelForCausalLM

import llmcompressor_moe_plugins
from llmcompressor_moe_plugins import MoECalibrationModifier, MoECalibrationModule
from llmcompressor_moe_plugins.upstream import hookpoints, run_active
from llmcompressor_moe_plugins.upstream.compat import cpu_only_calibration

PACKAGE = Path(llmcompressor_moe_plugins.__file__).parent
UPSTREAM_PACKAGES = ("llmcompressor", "compressed_tensors")


def _defined_private_names(files) -> set[str]:
    """``_name``s a set of sources defines: attributes set on self or a class,
    class-level fields, functions, module-level names."""
    names = set()
    for path in files:
        try:
            tree = ast.parse(Path(path).read_text())
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _upstream_private_names() -> set[str]:
    files = []
    for package in UPSTREAM_PACKAGES:
        root = Path(importlib.import_module(package).__file__).parent
        files += root.rglob("*.py")
    files.append(Path(torch.nn.modules.module.__file__))
    return _defined_private_names(files)


def _private_upstream_uses(path: Path, upstream: set[str], ours: set[str]):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            (*UPSTREAM_PACKAGES, "torch", "transformers")
        ):
            private = [a.name for a in node.names if a.name.startswith("_")]
            if private or "._" in f".{node.module}":
                yield node.lineno, f"from {node.module} import {', '.join(private)}"
        elif isinstance(node, ast.Attribute):
            name = node.attr
            if name in upstream and name not in ours:
                yield node.lineno, f"._{name.lstrip('_')}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and str(node.args[1].value) in upstream
        ):
            yield node.lineno, f"{node.func.id}(..., {node.args[1].value!r})"


def test_no_private_upstream_name_outside_upstream():
    """Every private llmcompressor / compressed-tensors / torch.nn.Module name the
    package touches is touched in upstream/ only."""
    outside = [
        path
        for path in PACKAGE.rglob("*.py")
        if "upstream" not in path.relative_to(PACKAGE).parts
    ]
    ours = _defined_private_names(outside)
    upstream = _upstream_private_names()
    assert {"_hessians", "_module_names", "_forward_hooks", "_HOOKS_DISABLED"} <= (
        upstream
    )
    found = [
        f"{path.relative_to(PACKAGE)}:{line}: {what}"
        for path in outside
        for line, what in _private_upstream_uses(path, upstream, ours)
    ]
    assert not found, "private upstream names outside upstream/:\n" + "\n".join(found)


def test_the_check_sees_a_private_upstream_name(tmp_path):
    """The check above fails on what it claims to catch."""
    source = tmp_path / "bad.py"
    source.write_text(
        "from llmcompressor.modifiers.gptq.base import _GPTQ_Q_PARAMS\n"
        "def f(modifier, linear):\n"
        "    linear._forward_hooks.clear()\n"
        "    return modifier._hessians, getattr(linear, '_apply_gate')\n"
    )
    upstream = _upstream_private_names()
    found = [what for _, what in _private_upstream_uses(source, upstream, set())]
    assert len(found) == 4, found


@pytest.fixture
def lifecycle_callback_renamed(monkeypatch):
    monkeypatch.delattr(LifecycleCallbacks, "sequential_epoch_end")
    hookpoints.recheck()
    yield
    monkeypatch.undo()
    assert not hookpoints.recheck()


def test_a_changed_hook_point_stops_our_modifiers_naming_it(lifecycle_callback_renamed):
    assert [p.symbol for p in hookpoints.check_hook_points()] == [
        "llmcompressor.core:LifecycleCallbacks.sequential_epoch_end"
    ]
    with pytest.raises(hookpoints.UpstreamChangedError) as err:
        MoECalibrationModifier().on_initialize(state=None)
    message = str(err.value)
    assert "`llmcompressor.core:LifecycleCallbacks.sequential_epoch_end`" in message
    assert "Supported: llmcompressor 0.14, compressed-tensors 0.19" in message
    assert "installed: llmcompressor 0.14" in message
    assert not run_active()


def test_import_succeeds_when_a_hook_point_is_gone():
    code = (
        "import llmcompressor.core as core\n"
        "del core.LifecycleCallbacks\n"
        "import llmcompressor_moe_plugins\n"
        "from llmcompressor_moe_plugins.upstream import hookpoints\n"
        "print([p.symbol for p in hookpoints.check_hook_points()][:1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LifecycleCallbacks.calibration_start" in result.stdout


def _patchable():
    """Everything a run of ours patches, as found on the classes and modules."""
    from llmcompressor.core import active_session

    oneshot_module = importlib.import_module("llmcompressor.entrypoints.oneshot")
    return {
        **{
            name: vars(LifecycleCallbacks)[name]
            for name in ("calibration_start", "sequential_epoch_end", "calibration_end")
        },
        "compress_modules": vars(GPTQModifier)["compress_modules"],
        "post_process": oneshot_module.post_process,
        "apply_recipe_modifiers": oneshot_module.Oneshot.apply_recipe_modifiers,
        "session.finalize": vars(active_session()).get("finalize"),
    }


def _gptq_recipe(ours: bool):
    gptq = GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])
    return [MoECalibrationModifier(mode="all"), gptq] if ours else [gptq]


def _run(model, tokenizer, data, recipe):
    with cpu_only_calibration():
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=data,
            recipe=recipe,
            num_calibration_samples=2,
            max_seq_length=64,
        )


@pytest.mark.slow
def test_an_upstream_only_oneshot_runs_upstream_unpatched(
    glm4_dir, tokenizer, calibration_data
):
    """After ``import llmcompressor_moe_plugins`` a oneshot without our modifiers
    runs upstream's own functions (no barrier, no aligned GPTQ, no listeners);
    one with them runs patched and leaves them as they were."""
    originals = _patchable()
    seen = {}

    def observe(_module, _args):
        seen.setdefault("during", (_patchable(), run_active()))

    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    handle = model.model.layers[0].register_forward_pre_hook(observe)
    _run(model, tokenizer, calibration_data.select(range(2)), _gptq_recipe(ours=False))
    handle.remove()
    during, active = seen.pop("during")
    assert not active and during == originals
    assert _patchable() == originals

    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    handle = model.model.layers[0].register_forward_pre_hook(observe)
    _run(model, tokenizer, calibration_data.select(range(2)), _gptq_recipe(ours=True))
    handle.remove()
    during, active = seen.pop("during")
    assert active
    patched = [name for name in originals if during[name] is not originals[name]]
    assert sorted(patched) == sorted(
        [
            "calibration_start",
            "sequential_epoch_end",
            "calibration_end",
            "compress_modules",
            "post_process",
            "session.finalize",
        ]
    )
    assert not run_active() and _patchable() == originals


_UPSTREAM_ONLY_RUN = """
import sys

import datasets
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, data_dir, out = sys.argv[1:4]
torch.set_num_threads(1)
# what cpu_only_calibration does, without importing the plugin
IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)
model = AutoModelForCausalLM.from_pretrained(model_dir)
oneshot(
    model=model,
    processor=AutoTokenizer.from_pretrained(model_dir),
    dataset=datasets.load_from_disk(data_dir),
    recipe=[GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])],
    num_calibration_samples=2,
    max_seq_length=64,
    shuffle_calibration_samples=False,
)
assert not any(name.startswith("llmcompressor_moe_plugins") for name in sys.modules)
torch.save(model.state_dict(), out)
"""


@pytest.mark.slow
def test_an_upstream_only_oneshot_gives_the_weights_of_a_process_without_the_plugin(
    glm4_dir, tokenizer, calibration_data, tmp_path
):
    """The same upstream-only GPTQ run here, after the plugin's import and a run
    of ours, and in a process that never imported the plugin: the same tensors,
    bit for bit."""
    data = calibration_data.select(range(2))
    data.save_to_disk(str(tmp_path / "data"))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _UPSTREAM_ONLY_RUN,
            str(glm4_dir),
            str(tmp_path / "data"),
            str(tmp_path / "without.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    without = torch.load(tmp_path / "without.pt")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess: the same float reductions
    try:
        one_expert = r"re:.*layers\.1\.mlp\.experts\.0\.down_proj$"
        ours = [
            MoECalibrationModifier(mode="all"),
            GPTQModifier(targets=[one_expert], scheme="W4A16"),
        ]
        _run(AutoModelForCausalLM.from_pretrained(glm4_dir), tokenizer, data, ours)
        model = AutoModelForCausalLM.from_pretrained(glm4_dir)
        with cpu_only_calibration():
            oneshot(
                model=model,
                processor=tokenizer,
                dataset=data,
                recipe=_gptq_recipe(ours=False),
                num_calibration_samples=2,
                max_seq_length=64,
                shuffle_calibration_samples=False,
            )
    finally:
        torch.set_num_threads(threads)
    assert not run_active()
    here = model.state_dict()
    assert here.keys() == without.keys()
    assert sum(name.endswith("weight_scale") for name in here) > 100
    differing = [name for name in here if not torch.equal(here[name], without[name])]
    assert not differing, differing[:5]


class _FailsToInitialize(Modifier):
    def on_initialize(self, state, **kwargs) -> bool:
        raise RuntimeError("a later modifier failed")


def test_a_run_failing_after_our_modifier_initialized_restores_and_unpatches(
    glm4_dir, tokenizer, calibration_data
):
    originals = _patchable()
    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    with pytest.raises(RuntimeError, match="a later modifier failed"):
        _run(
            model,
            tokenizer,
            calibration_data.select(range(2)),
            [MoECalibrationModifier(mode="all"), _FailsToInitialize()],
        )
    assert not any(isinstance(m, MoECalibrationModule) for m in model.modules())
    assert not run_active() and _patchable() == originals
