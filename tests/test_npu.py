"""The Ascend NPU adapter, verified without Ascend hardware: the import guard, the mapping of
compile options onto torch.compile and torchair's CompilerConfig, and the registration.
Nothing here runs on an NPU."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters import BackendUnavailable, InvalidOptions, get_backend
from adapters.npu import REQUIRED_PACKAGES, NpuAdapter, NpuCompilePlan, plan_options
from adapters.registry import AUTO_ORDER, backend_names
from lifecycle import BackendUnavailableError, ModuleLifecycle, State

INSTALLED = {name: importlib.util.find_spec(name) is not None for name in REQUIRED_PACKAGES}
no_npu_stack = pytest.mark.skipif(any(INSTALLED.values()), reason="torch_npu or torchair is installed here")


@pytest.fixture
def only_torch_npu_importable(tmp_path: Path) -> Iterator[None]:
    """A torch_npu that imports but has no device API (a broken or partial CANN install)."""
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("torch_npu", None)
        importlib.invalidate_caches()


def test_npu_is_registered_and_last_before_cpu_in_auto():
    assert "npu" in backend_names()
    assert AUTO_ORDER.index("cuda") < AUTO_ORDER.index("npu") < AUTO_ORDER.index("cpu")
    assert (NpuAdapter.name, NpuAdapter.device_type) == ("npu", "npu")


@no_npu_stack
def test_missing_stack_names_both_packages(flux, cache_config):
    assert NpuAdapter.missing_packages() == ["torch_npu", "torchair"]
    assert NpuAdapter.is_available() is False
    with pytest.raises(BackendUnavailable, match="torch_npu and torchair") as info:
        get_backend("npu")
    assert "pip install torch-npu" in str(info.value) and "backend='cpu'" in str(info.value)
    with pytest.raises(BackendUnavailableError, match="torch_npu and torchair") as lc_info:
        ModuleLifecycle(flux, backend="npu", cache_config=cache_config)
    assert lc_info.value.module == "transformer" and lc_info.value.state is State.LOADED
    assert not hasattr(flux, "_is_cached")  # refused before touching the module


@no_npu_stack
def test_auto_skips_a_missing_npu():
    assert get_backend("auto").name in ("cuda", "cpu")


@no_npu_stack
def test_partial_install_names_what_is_missing(only_torch_npu_importable):
    assert NpuAdapter.missing_packages() == ["torchair"]
    with pytest.raises(BackendUnavailable, match="torchair") as info:
        get_backend("npu")
    assert "torch_npu and" not in str(info.value)


@no_npu_stack
def test_a_broken_torch_npu_never_crashes_availability(only_torch_npu_importable, tmp_path):
    (tmp_path / "torchair").mkdir()
    (tmp_path / "torchair" / "__init__.py").write_text("")
    importlib.invalidate_caches()
    try:
        assert NpuAdapter.missing_packages() == []
        assert NpuAdapter.is_available() is False  # torch_npu has no .npu: False, not AttributeError
        with pytest.raises(BackendUnavailable, match="no usable Ascend device"):
            get_backend("npu")
    finally:
        sys.modules.pop("torchair", None)


def test_default_plan_uses_torchair_with_its_defaults():
    assert plan_options({}) == NpuCompilePlan({"backend": "torchair"}, {}, True)


@pytest.mark.parametrize(
    ("options", "torch_options", "config"),
    [
        ({"mode": "reduce-overhead"}, {"backend": "torchair"}, {"mode": "reduce-overhead"}),
        ({"mode": "max-autotune", "dynamic": False}, {"backend": "torchair", "dynamic": False},
         {"mode": "max-autotune"}),
        ({"mode": "default", "fullgraph": True}, {"backend": "torchair", "fullgraph": True}, {}),
        ({"frozen_parameter": True}, {"backend": "torchair"},
         {"experimental_config.frozen_parameter": True}),
        ({"backend": "eager", "dynamic": True}, {"backend": "eager", "dynamic": True}, {}),
    ],
)
def test_options_map_to_torch_compile_and_torchair_config(options, torch_options, config):
    plan = plan_options(options)
    assert plan.torch_options == torch_options
    assert plan.torchair_config == config
    assert plan.uses_torchair is (torch_options["backend"] == "torchair")
    assert "mode" not in plan.torch_options  # torch.compile's mode is inductor's, never torchair's


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"mode": "max-autotune-no-cudagraphs"}, ["max-autotune-no-cudagraphs", "reduce-overhead"]),
        ({"options": {"max_autotune": True}}, ["options", "inductor options do not apply"]),
        ({"regional": True}, ["regional", "accepted"]),
        ({"frozen_parameter": "yes"}, ["frozen_parameter"]),
        ({"fullgraph": 1}, ["fullgraph"]),
        ({"backend": "eager", "mode": "reduce-overhead"}, ["configure torchair", "eager"]),
    ],
)
def test_bad_options_are_refused_naming_them(options, names):
    with pytest.raises(InvalidOptions) as info:
        NpuAdapter().validate_options(options)
    for name in names:
        assert name in str(info.value)


def test_non_torchair_backends_are_checked_like_everywhere():
    with pytest.raises(InvalidOptions, match="no-such-backend"):
        NpuAdapter().validate_options({"backend": "no-such-backend"})
    assert NpuAdapter().validate_options({"backend": "aot_eager"})["backend"] == "aot_eager"
    assert NpuAdapter().validate_options({"mode": "reduce-overhead"}) == {
        "backend": "torchair", "mode": "reduce-overhead"
    }
