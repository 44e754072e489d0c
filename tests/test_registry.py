import sys

import pytest
import torch
from loguru import logger

from llmcompressor_moe_plugins import MoECalibrationModule
from llmcompressor_moe_plugins.calibration import registry
from llmcompressor_moe_plugins.calibration.registry import (
    ALLOWLIST_ENV,
    get_calibration_module,
    list_plugins,
    register,
    registered_names,
    reload_plugins,
    unregister,
)

from .helpers import install_fake_distribution

GROUP = registry.ENTRY_POINT_GROUP

MODULE_SOURCE = """
from llmcompressor_moe_plugins import MoECalibrationModule

class {cls}(MoECalibrationModule):
    def __init__(self, original, config, calibrate_all_experts=True, **kwargs):
        super().__init__(original, config, calibrate_all_experts, **kwargs)
        self.inner = original
        self.num_experts = 0

    def forward(self, x):
        return self.inner(x)
"""


@pytest.fixture
def logs():
    messages = []
    handle = logger.add(lambda m: messages.append(m.record["message"]), level="DEBUG")
    yield messages
    logger.remove(handle)


def test_our_modules_are_found_through_entry_points(plugin_path):
    names = registered_names()
    assert {"Glm4MoeMoE", "MoeLayer"} <= set(names)
    entries = {e.name: e for e in list_plugins(load=False)}
    assert entries["Glm4MoeMoE"].distribution == "llmcompressor-moe-plugins"
    assert entries["Glm4MoeMoE"].entry_point is not None  # not register()


def test_third_party_plugin_is_discovered_lazily(plugin_path):
    install_fake_distribution(
        plugin_path,
        "acme-moe",
        {"AcmeMoE": "fake_plugin_acme:CalibrationAcmeMoE"},
        {"fake_plugin_acme": MODULE_SOURCE.format(cls="CalibrationAcmeMoE")},
    )
    reload_plugins()
    assert "AcmeMoE" in registered_names()
    assert "fake_plugin_acme" not in sys.modules  # indexed, not imported
    cls = get_calibration_module("AcmeMoE")
    assert cls.__name__ == "CalibrationAcmeMoE"
    assert issubclass(cls, MoECalibrationModule)
    assert get_calibration_module("AcmeMoE") is cls  # loading twice is harmless


def test_broken_plugin_is_skipped_and_logged(plugin_path, logs):
    install_fake_distribution(
        plugin_path,
        "broken-moe",
        {
            "BrokenMoE": "fake_plugin_broken:Missing",
            "FineMoE": "fake_plugin_fine:CalibrationFineMoE",
        },
        {
            "fake_plugin_broken": "raise ImportError('needs a missing library')",
            "fake_plugin_fine": MODULE_SOURCE.format(cls="CalibrationFineMoE"),
        },
    )
    reload_plugins()
    assert get_calibration_module("BrokenMoE") is None
    assert any("BrokenMoE" in m and "needs a missing library" in m for m in logs), logs
    assert get_calibration_module("FineMoE").__name__ == "CalibrationFineMoE"
    assert get_calibration_module("MoeLayer") is not None
    broken = {e.name: e for e in list_plugins()}["BrokenMoE"]
    assert "needs a missing library" in broken.error


def test_non_module_plugin_is_rejected(plugin_path, logs):
    install_fake_distribution(
        plugin_path,
        "odd-moe",
        {"OddMoE": "fake_plugin_odd:thing"},
        {"fake_plugin_odd": "thing = 42"},
    )
    reload_plugins()
    assert get_calibration_module("OddMoE") is None
    assert any("not a subclass" in m for m in logs)


def test_duplicates_resolve_ours_first_then_by_distribution(plugin_path, logs):
    install_fake_distribution(
        plugin_path,
        "zeta-moe",
        {
            "Glm4MoeMoE": "fake_plugin_zeta:CalibrationZeta",
            "SharedMoE": "fake_plugin_zeta:CalibrationZeta",
        },
        {"fake_plugin_zeta": MODULE_SOURCE.format(cls="CalibrationZeta")},
    )
    install_fake_distribution(
        plugin_path,
        "alpha-moe",
        {"SharedMoE": "fake_plugin_alpha:CalibrationAlpha"},
        {"fake_plugin_alpha": MODULE_SOURCE.format(cls="CalibrationAlpha")},
    )
    reload_plugins()
    assert get_calibration_module("Glm4MoeMoE").__name__ == "CalibrationGlm4MoeMoE"
    assert get_calibration_module("SharedMoE").__name__ == "CalibrationAlpha"
    warnings = [m for m in logs if "Several calibration modules" in m]
    assert len(warnings) == 2
    assert any("zeta-moe" in m and "SharedMoE" in m for m in warnings)


def test_allowlist_limits_what_loads(plugin_path, monkeypatch):
    monkeypatch.setenv(ALLOWLIST_ENV, "MoeLayer, Other")
    reload_plugins()
    assert registered_names() == ["MoeLayer"]
    assert get_calibration_module("Glm4MoeMoE") is None


def test_programmatic_register_wins_and_decorator_works(plugin_path):
    @MoECalibrationModule.register("Glm4MoeMoE")
    class Mine(MoECalibrationModule):
        def forward(self, x):
            return x

    try:
        assert get_calibration_module("Glm4MoeMoE") is Mine
    finally:
        unregister("Glm4MoeMoE")
    assert get_calibration_module("Glm4MoeMoE").__name__ == "CalibrationGlm4MoeMoE"


def test_register_rejects_non_modules():
    with pytest.raises(TypeError, match="subclass of MoECalibrationModule"):
        register("X", torch.nn.Linear)
