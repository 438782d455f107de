"""The Ascend NPU adapter, verified without Ascend hardware: the import guard, the mapping of
compile options onto torch.compile and torchair's CompilerConfig, the registration, and the
compile path against stand-in ``torch_npu``/``torchair`` modules (with the functions their docs
name) under a real ``torch.compile``. Nothing here runs on an NPU."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapters import BackendUnavailable, InvalidOptions, get_backend
from adapters.npu import REQUIRED_PACKAGES, NpuAdapter, NpuCompilePlan, plan_options
from adapters.registry import AUTO_ORDER, backend_names
from lifecycle import BackendUnavailableError, LifecyclePolicy, ModuleLifecycle, State
from lifecycle._config import CompilePlan

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


# ---------------------------------------------------------------------------- the compile path
class _ExperimentalConfig:
    def __init__(self) -> None:
        self.frozen_parameter = False


class _CompilerConfig:
    """torchair.CompilerConfig as its docs define it: ``mode`` ("max-autotune" by default, or
    "reduce-overhead") and ``experimental_config.frozen_parameter`` among its fields."""

    def __init__(self) -> None:
        self.mode = "max-autotune"
        self.experimental_config = _ExperimentalConfig()


def _stand_in(name: str, **attributes: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)  # find_spec sees it
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


@pytest.fixture
def npu_stack(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Stand-in ``torch_npu`` and ``torchair`` modules with the functions their docs name;
    ``get_npu_backend`` returns a real dynamo backend that records every graph it is given."""
    seen = types.SimpleNamespace(configs=[], graphs=[], imported=[], synchronized=0)

    def get_npu_backend(*, compiler_config: _CompilerConfig | None = None,
                        custom_decompositions: dict[str, object] | None = None) -> object:
        assert "torch_npu" in seen.imported, "torch_npu must be imported before torchair is used"
        seen.configs.append(compiler_config)

        def npu_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
            seen.graphs.append(gm)
            return gm.forward

        seen.backend = npu_backend
        return npu_backend

    def synchronize() -> None:
        seen.synchronized += 1

    torch_npu = _stand_in("torch_npu", npu=types.SimpleNamespace(is_available=lambda: True,
                                                                 synchronize=synchronize))
    torchair = _stand_in("torchair", CompilerConfig=_CompilerConfig, get_npu_backend=get_npu_backend)
    monkeypatch.setitem(sys.modules, "torch_npu", torch_npu)
    monkeypatch.setitem(sys.modules, "torchair", torchair)
    real_import = importlib.import_module

    def recording_import(name: str, package: str | None = None) -> types.ModuleType:
        seen.imported.append(name)
        return real_import(name, package)

    monkeypatch.setattr("adapters.npu._import", recording_import)
    return seen


class _Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x)) * 2


def test_compile_goes_through_torchair_with_the_mapped_config(npu_stack):
    torch.manual_seed(0)
    adapter = get_backend("npu")
    assert isinstance(adapter, NpuAdapter) and NpuAdapter.missing_packages() == []
    module, x = _Small(), torch.randn(3, 4)
    eager = module(x)
    options = adapter.validate_options(
        {"mode": "reduce-overhead", "frozen_parameter": True, "dynamic": False})
    adapter.compile(module, options, CompilePlan())
    (config,) = npu_stack.configs
    assert isinstance(config, _CompilerConfig)
    assert config.mode == "reduce-overhead" and config.experimental_config.frozen_parameter is True
    assert npu_stack.imported.index("torch_npu") < npu_stack.imported.index("torchair")
    assert npu_stack.graphs == []  # torch.compile is lazy: nothing traced yet
    assert torch.equal(module(x), eager)  # the compiled call: dynamo hands its graph to torchair's backend
    assert len(npu_stack.graphs) == 1
    adapter.synchronize()
    assert npu_stack.synchronized == 1
    adapter.decompile(module)
    module(x)
    assert len(npu_stack.graphs) == 1  # eager again


def test_torchair_defaults_are_left_alone(npu_stack):
    adapter = get_backend("npu")
    adapter.compile(_Small(), adapter.validate_options({}), CompilePlan())
    (config,) = npu_stack.configs
    assert config.mode == "max-autotune" and config.experimental_config.frozen_parameter is False


def test_another_dynamo_backend_skips_torchair(npu_stack):
    adapter = get_backend("npu")
    module = _Small()
    adapter.compile(module, adapter.validate_options({"backend": "eager"}), CompilePlan())
    module(torch.randn(2, 4))
    assert npu_stack.configs == [] and npu_stack.graphs == []


def test_a_lifecycle_on_the_npu_adapter_compiles_through_torchair(npu_stack, audit_events):
    lc = ModuleLifecycle(_Small(), name="dit", policy=LifecyclePolicy(cache_dit=False), backend="npu",
                         compile_options={"mode": "reduce-overhead"})
    lc.prepare(lambda module: module(torch.randn(2, 4)))
    assert lc.state is State.WARMED_UP
    assert [c.mode for c in npu_stack.configs] == ["reduce-overhead"] and len(npu_stack.graphs) == 1
    assert {e["backend"] for e in audit_events.of("lifecycle.transition")} == {"npu"}
