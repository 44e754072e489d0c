import sys

import pytest
import torch
from llmcompressor.modifiers.utils.hooks import HooksMixin

from llmcompressor_moe_plugins.calibration.registry import ALLOWLIST_ENV, reload_plugins
from llmcompressor_moe_plugins.tiny import (
    build_tiny_glm4_moe,
    build_tiny_textbook_moe,
    stdlib_texts,
    tokenize_for_calibration,
    train_tokenizer,
)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def textbook_dir(tmp_path_factory, tokenizer):
    return build_tiny_textbook_moe(
        tmp_path_factory.mktemp("textbook"), tokenizer=tokenizer, num_local_experts=16
    )


@pytest.fixture(scope="session")
def glm4_dir(tmp_path_factory, tokenizer):
    return build_tiny_glm4_moe(tmp_path_factory.mktemp("glm4"), tokenizer=tokenizer)


@pytest.fixture(scope="session")
def calibration_data(tokenizer):
    # held apart from the files the tokenizer was trained on
    return tokenize_for_calibration(tokenizer, stdlib_texts(skip_files=100), 8, 64)


class LinearInputRecorder:
    """Counts the rows every Linear under a module is called with, and each call's
    size, through forward pre-hooks (as quantization hooks see them)."""

    def __init__(self, module: torch.nn.Module):
        self.rows: dict[str, int] = {}
        self.calls: dict[str, list[int]] = {}
        self._handles = []
        for name, sub in module.named_modules():
            if isinstance(sub, torch.nn.Linear):
                self.rows[name] = 0
                self.calls[name] = []
                self._handles.append(sub.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def hook(_module, args):
            if HooksMixin._HOOKS_DISABLED:
                return
            n = args[0].reshape(-1, args[0].shape[-1]).shape[0]
            self.rows[name] += n
            self.calls[name].append(n)

        return hook

    def remove(self):
        for handle in self._handles:
            handle.remove()


@pytest.fixture
def record_linear_inputs():
    recorders = []

    def start(module):
        recorder = LinearInputRecorder(module)
        recorders.append(recorder)
        return recorder

    yield start
    for recorder in recorders:
        recorder.remove()


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ALLOWLIST_ENV, raising=False)
    reload_plugins()
    yield tmp_path
    for name in list(sys.modules):
        if name.startswith("fake_plugin"):
            del sys.modules[name]
    reload_plugins()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads; on a shared 2-core machine the
    spinning threads cost several times the work. A module takes it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
