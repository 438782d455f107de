"""The backend adapter interface and the registry: built-ins, register_backend, and a real
``dit_lifecycle.backends`` entry point from a dist-info directory put on sys.path."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from adapters import BackendAdapter, BackendUnavailable, InvalidOptions, dynamo_graph_count, get_backend
from adapters.cpu import CpuAdapter
from adapters.registry import (
    AUTO_ORDER,
    ENTRY_POINT_GROUP,
    backend_names,
    register_backend,
    reload_entry_points,
    unregister_backend,
)
from lifecycle import InvalidConfigError, LifecyclePolicy, ModuleLifecycle
from lifecycle._config import CompilePlan

PLUGIN_PACKAGE = "dit_lifecycle_test_plugin"


class CountingCpuAdapter(CpuAdapter):
    """A third-party adapter: the CPU one under another name, counting compiles."""

    name = "counting-cpu"
    compiles = 0

    def compile(self, module: nn.Module, options, plan) -> None:
        type(self).compiles += 1
        super().compile(module, options, plan)


@pytest.fixture
def registered() -> Iterator[str]:
    register_backend(CountingCpuAdapter.name, CountingCpuAdapter)
    yield CountingCpuAdapter.name
    unregister_backend(CountingCpuAdapter.name)


@pytest.fixture
def plugin_on_path(tmp_path: Path) -> Iterator[Path]:
    """An installed-looking distribution: a package plus a dist-info with entry_points.txt."""
    package = tmp_path / PLUGIN_PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            from adapters.cpu import CpuAdapter

            class PluginAdapter(CpuAdapter):
                name = "plugin-cpu"

            def make_adapter():
                return PluginAdapter()

            NOT_AN_ADAPTER = object
            """
        )
    )
    dist_info = tmp_path / "dit_lifecycle_test_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: dit-lifecycle-test-plugin\nVersion: 0.1\n"
    )
    (dist_info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n"
        f"plugin-cpu = {PLUGIN_PACKAGE}:PluginAdapter\n"
        f"plugin-factory = {PLUGIN_PACKAGE}:make_adapter\n"
        f"plugin-broken = {PLUGIN_PACKAGE}:NOT_AN_ADAPTER\n"
        f"plugin-missing = {PLUGIN_PACKAGE}.nowhere:Adapter\n"
        f"cuda = {PLUGIN_PACKAGE}:PluginAdapter\n"
    )
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        with pytest.warns(RuntimeWarning, match="built-in backend name"):
            reload_entry_points()
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(PLUGIN_PACKAGE, None)
        importlib.invalidate_caches()
        reload_entry_points()


def test_the_interface_is_abstract():
    class Incomplete(BackendAdapter):
        name = "incomplete"
        device_type = "cpu"

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_builtins_and_auto():
    assert {"cpu", "cuda", "npu"} <= set(backend_names())
    from adapters.cuda import CudaAdapter
    from adapters.npu import NpuAdapter

    expected = "cuda" if CudaAdapter.is_available() else "npu" if NpuAdapter.is_available() else "cpu"
    assert AUTO_ORDER == ("cuda", "npu", "cpu")
    assert get_backend("auto").name == expected
    assert get_backend("cpu").describe()["device_type"] == "cpu"


def test_unknown_backend_names_the_choices(flux):
    with pytest.raises(InvalidOptions, match="choose one of") as info:
        get_backend("tpu")
    assert "'cpu'" in str(info.value) and "'auto'" in str(info.value)
    with pytest.raises(InvalidConfigError, match="tpu"):
        ModuleLifecycle(flux, backend="tpu")


def test_an_adapter_instance_is_used_as_is():
    adapter = CpuAdapter()
    assert get_backend(adapter) is adapter
    with pytest.raises(InvalidOptions, match="BackendAdapter"):
        get_backend(42)  # type: ignore[arg-type]


def test_register_backend_plugs_into_the_lifecycle(registered, flux, inputs, audit_events):
    from lifecycle.testing.tiny import denoiser

    before = CountingCpuAdapter.compiles
    lc = ModuleLifecycle(
        flux, backend=registered, policy=LifecyclePolicy(cache_dit=False),
        compile_options={"backend": "eager"},
    )
    lc.prepare(denoiser(inputs, 1))
    assert CountingCpuAdapter.compiles == before + 1
    assert {e["backend"] for e in audit_events.of("lifecycle.transition")} == {registered}
    assert registered in backend_names()


def test_register_backend_refuses_duplicates_and_bad_factories(registered):
    with pytest.raises(ValueError, match="already registered"):
        register_backend(registered, CountingCpuAdapter)
    with pytest.raises(ValueError, match="already registered"):
        register_backend("cpu", CountingCpuAdapter)
    with pytest.raises(ValueError, match="auto"):
        register_backend("auto", CountingCpuAdapter)
    with pytest.raises(TypeError, match="callable"):
        register_backend("not-callable", 3)  # type: ignore[arg-type]
    register_backend("wrong-type", lambda: object(), replace=True)  # type: ignore[arg-type, return-value]
    try:
        with pytest.raises(InvalidOptions, match=r"not an adapters\.BackendAdapter"):
            get_backend("wrong-type")
    finally:
        unregister_backend("wrong-type")


def test_entry_point_backends_are_found(plugin_on_path, flux):
    names = backend_names()
    assert {"plugin-cpu", "plugin-factory"} <= set(names)
    adapter = get_backend("plugin-cpu")
    assert type(adapter).__name__ == "PluginAdapter" and adapter.name == "plugin-cpu"
    assert type(get_backend("plugin-factory")).__name__ == "PluginAdapter"
    lc = ModuleLifecycle(flux, backend="plugin-cpu", policy=LifecyclePolicy(cache_dit=False))
    assert lc.backend.name == "plugin-cpu"


def test_entry_points_cannot_shadow_builtins(plugin_on_path):
    assert type(get_backend("cpu")) is CpuAdapter
    from adapters.cuda import CudaAdapter

    if CudaAdapter.is_available():
        assert type(get_backend("cuda")) is CudaAdapter
    else:
        with pytest.raises(BackendUnavailable):  # the built-in answered, not the plugin
            get_backend("cuda")


def test_broken_entry_points_say_which(plugin_on_path):
    with pytest.raises(InvalidOptions, match=r"plugin-broken.*not an adapters\.BackendAdapter"):
        get_backend("plugin-broken")
    with pytest.raises(InvalidOptions, match=r"plugin-missing.*failed to load"):
        get_backend("plugin-missing")


def test_entry_points_go_away_with_the_distribution(plugin_on_path):
    assert "plugin-cpu" in backend_names()
    sys.path.remove(str(plugin_on_path))
    try:
        reload_entry_points()
        assert "plugin-cpu" not in backend_names()
    finally:
        sys.path.insert(0, str(plugin_on_path))


class Scale(nn.Module):
    # torch's own nn.Linear is in dynamo's skip list; a user module is traced.
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + 1


def test_cpu_compile_is_in_place_and_counted():
    module = Scale()
    adapter = CpuAdapter()
    options = adapter.validate_options({"backend": "eager", "fullgraph": True})
    before = dynamo_graph_count()
    adapter.compile(module, options, CompilePlan())
    x = torch.randn(2, 4)
    expected = x * module.weight + 1
    assert torch.equal(module(x), expected)
    assert adapter.graph_count() == before + 1
    assert module._compiled_call_impl is not None
    adapter.decompile(module)
    assert module._compiled_call_impl is None
    adapter.synchronize()


def test_compile_options_are_checked_before_any_work(flux):
    with pytest.raises(InvalidConfigError, match="fullgraph"):
        ModuleLifecycle(flux, backend="cpu", compile_options={"fullgraph": "yes"})
    with pytest.raises(InvalidConfigError, match="unknown compile_options"):
        ModuleLifecycle(flux, backend="cpu", compile_options={"fulgraph": True})
    assert not hasattr(flux, "_is_cached") and flux._compiled_call_impl is None


def test_the_auto_choice_is_in_the_audit(flux, cache_config, audit_events):
    lc = ModuleLifecycle(flux, backend="auto", cache_config=cache_config)
    lc.mount_cache()
    (event,) = audit_events.of("lifecycle.transition")
    assert event["backend"] == lc.backend.name == get_backend("auto").name


def test_the_no_op_adapters_implement_the_interfaces_and_drive_a_lifecycle():
    """``lifecycle.testing``'s stand-ins are what hosts test with: they must stay conformant."""
    from adapters.protocols import CacheAdapter
    from lifecycle.testing import NoopBackend, NoopCache

    cache, backend = NoopCache(), NoopBackend()
    assert isinstance(cache, CacheAdapter) and not isinstance(object(), CacheAdapter)
    lc = ModuleLifecycle(nn.Linear(2, 2), backend=backend, cache_adapter=cache, compile_options={})
    lc.prepare(lambda module: module(torch.ones(1, 2)))
    assert lc.state.value == "WarmedUp" and backend.compiles == 1 and cache.is_mounted(lc.module)
    lc.reset()
    assert not cache.is_mounted(lc.module) and backend.decompiles == 1


def test_an_unknown_dynamo_backend_is_named_with_the_available_ones():
    # (Refusal at ModuleLifecycle construction, with its typed error: tests/test_bad_inputs.py.)
    with pytest.raises(InvalidOptions) as info:
        CpuAdapter().validate_options({"backend": "no-such-backend"})
    assert "no-such-backend" in str(info.value) and "aot_eager" in str(info.value)
