"""Backend adapters found by name: built-ins, runtime registrations, and the
``dit_lifecycle.backends`` entry-point group, so an engine can plug in its own without forking.

A third-party package declares, in its pyproject.toml::

    [project.entry-points."dit_lifecycle.backends"]
    mybackend = "my_package.adapters:MyAdapter"

where the object is a ``BackendAdapter`` subclass, or a callable returning an instance. Then
``ModuleLifecycle(..., backend="mybackend")`` finds it. Entry points cannot shadow the built-in
names (cpu, cuda, npu); ``register_backend(name, factory, replace=True)`` can, on purpose.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from importlib import metadata

from adapters.base import BackendAdapter
from adapters.errors import BackendUnavailable, InvalidOptions

ENTRY_POINT_GROUP = "dit_lifecycle.backends"
"""The entry-point group third-party backends register under."""
# backend="auto" tries these in order and takes the first available.
AUTO_ORDER = ("cuda", "npu", "cpu")
"""What ``backend="auto"`` tries, in order: the first available wins."""

AdapterFactory = Callable[[], BackendAdapter]

_lock = threading.Lock()
_factories: dict[str, AdapterFactory] = {}  # register_backend()
_entry_point_factories: dict[str, AdapterFactory] = {}
_entry_points_loaded = False


def _builtin(module: str, cls: str) -> AdapterFactory:
    # Imported lazily: the NPU adapter must not import torch_npu until it is asked for.
    def factory() -> BackendAdapter:
        import importlib

        adapter_class: type[BackendAdapter] = getattr(importlib.import_module(module), cls)
        return adapter_class()

    return factory


_BUILTINS: dict[str, AdapterFactory] = {
    "cpu": _builtin("adapters.cpu", "CpuAdapter"),
    "cuda": _builtin("adapters.cuda", "CudaAdapter"),
    "npu": _builtin("adapters.npu", "NpuAdapter"),
}


def register_backend(name: str, factory: AdapterFactory, *, replace: bool = False) -> None:
    """Make ``factory`` (a ``BackendAdapter`` subclass or a callable returning an instance)
    available as ``backend=name``. ``replace=True`` overrides an existing name, built-ins too.

    Args:
        name: the name ``backend=`` will take; not ``"auto"``.
        factory: a ``BackendAdapter`` subclass, or a callable returning an instance.
        replace: override a name already registered (built-ins included).

    Raises:
        ValueError: an empty name, ``"auto"``, or a name already registered without ``replace``.
        TypeError: ``factory`` is not callable.

    Example::

        class MyAdapter(CudaAdapter):
            name = "mine"

        register_backend("mine", MyAdapter)
        lc = ModuleLifecycle(transformer, backend="mine")
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"backend name must be a non-empty str other than 'auto', got {name!r}")
    if not callable(factory):
        raise TypeError(f"backend factory for {name!r} must be callable, got {type(factory).__name__}")
    with _lock:
        if not replace and (name in _factories or name in _BUILTINS or name in _entry_point_factories):
            raise ValueError(f"backend {name!r} is already registered; pass replace=True")
        _factories[name] = factory


def unregister_backend(name: str) -> None:
    """Remove a ``register_backend`` registration (built-ins and entry points stay)."""
    with _lock:
        _factories.pop(name, None)


def _entry_point_factory(entry_point: metadata.EntryPoint) -> AdapterFactory:
    def factory() -> BackendAdapter:
        try:
            target = entry_point.load()
        except Exception as exc:
            raise InvalidOptions(
                f"backend {entry_point.name!r} (entry point {entry_point.value!r} in group "
                f"{ENTRY_POINT_GROUP!r}) failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        return _instantiate(entry_point.name, target, f"entry point {entry_point.value!r}")

    return factory


def _instantiate(name: str, target: object, origin: str) -> BackendAdapter:
    adapter = target() if callable(target) else target
    if not isinstance(adapter, BackendAdapter):
        raise InvalidOptions(
            f"backend {name!r} ({origin}) gave {type(adapter).__name__}, not an "
            "adapters.BackendAdapter; point it at a BackendAdapter subclass or a factory returning one"
        )
    return adapter


def reload_entry_points() -> None:
    """Read the entry-point group again (after installing a plugin into a running process)."""
    global _entry_points_loaded
    with _lock:
        _entry_points_loaded = False
        _entry_point_factories.clear()
    _load_entry_points()


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry_point.name in _BUILTINS or entry_point.name == "auto":
                warnings.warn(
                    f"ignoring entry point {entry_point.value!r}: {entry_point.name!r} is a built-in "
                    "backend name; register it under another name",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            _entry_point_factories.setdefault(entry_point.name, _entry_point_factory(entry_point))


def backend_names() -> list[str]:
    """Every name ``get_backend`` accepts, besides "auto" (sorted; entry points are read on the
    first call).

    Example::

        backend_names()     # ["cpu", "cuda", "npu"], plus any registered or plugged in
    """
    _load_entry_points()
    with _lock:
        return sorted(set(_BUILTINS) | set(_factories) | set(_entry_point_factories))


def _factory(name: str) -> AdapterFactory:
    _load_entry_points()
    with _lock:
        factory = _factories.get(name) or _BUILTINS.get(name) or _entry_point_factories.get(name)
    if factory is None:
        raise InvalidOptions(f"unknown backend {name!r}; choose one of {['auto', *backend_names()]}")
    return factory


def _make(name: str) -> BackendAdapter:
    factory = _factory(name)
    if factory in _BUILTINS.values() or factory in _entry_point_factories.values():
        return factory()
    return _instantiate(name, factory, "register_backend")


def get_backend(backend: str | BackendAdapter = "auto") -> BackendAdapter:
    """Resolve ``backend`` to an available adapter instance.

    "auto" picks CUDA, then NPU, then CPU (``AUTO_ORDER``). The lifecycle calls this at
    construction and turns the errors below into ``BackendUnavailableError`` and
    ``InvalidConfigError``.

    Args:
        backend: ``"auto"``, a registered name (``backend_names()``), or an adapter instance.

    Raises:
        BackendUnavailable: the named backend's runtime or device is missing; says what to install.
        InvalidOptions: an unknown name, or an object that is not a ``BackendAdapter``.

    Example::

        get_backend("auto").name     # "cuda" on a GPU machine, "cpu" elsewhere
        get_backend("cpu").describe()
    """
    if isinstance(backend, BackendAdapter):
        backend.ensure_available()
        return backend
    if not isinstance(backend, str):
        raise InvalidOptions(
            f"backend must be a name or a BackendAdapter instance, got {type(backend).__name__}"
        )
    if backend == "auto":
        for name in AUTO_ORDER:
            adapter = _make(name)
            if adapter.is_available():
                return adapter
        raise BackendUnavailable("no backend is available, not even the CPU")
    adapter = _make(backend)
    adapter.ensure_available()
    return adapter
