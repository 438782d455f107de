"""Backend adapters found by name: built-ins, runtime registrations, and the
``dit_lifecycle.backends`` entry-point group, so an engine can plug in its own without forking."""

from __future__ import annotations

import threading
from collections.abc import Callable
from importlib import metadata

from adapters.base import BackendAdapter
from adapters.errors import BackendUnavailable, InvalidOptions

ENTRY_POINT_GROUP = "dit_lifecycle.backends"
# backend="auto" tries these in order and takes the first available.
AUTO_ORDER = ("cuda", "npu", "cpu")

AdapterFactory = Callable[[], BackendAdapter]

_lock = threading.Lock()
_factories: dict[str, AdapterFactory] = {}
_entry_points_loaded = False


def _builtin(module: str, cls: str) -> AdapterFactory:
    # Imported lazily: the NPU adapter must not import torch_npu until it is asked for.
    def factory() -> BackendAdapter:
        import importlib

        return getattr(importlib.import_module(module), cls)()

    return factory


_BUILTINS: dict[str, AdapterFactory] = {
    "cpu": _builtin("adapters.cpu", "CpuAdapter"),
    "cuda": _builtin("adapters.cuda", "CudaAdapter"),
    "npu": _builtin("adapters.npu", "NpuAdapter"),
}


def register_backend(name: str, factory: AdapterFactory, *, replace: bool = False) -> None:
    """Make ``factory`` available as ``backend=name``."""
    with _lock:
        if not replace and (name in _factories or name in _BUILTINS):
            raise ValueError(f"backend {name!r} is already registered; pass replace=True")
        _factories[name] = factory


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            _factories.setdefault(entry_point.name, entry_point.load)


def backend_names() -> list[str]:
    """Every name ``get_backend`` accepts, besides "auto"."""
    _load_entry_points()
    return sorted(set(_BUILTINS) | set(_factories))


def _factory(name: str) -> AdapterFactory:
    _load_entry_points()
    factory = _factories.get(name) or _BUILTINS.get(name)
    if factory is None:
        raise InvalidOptions(f"unknown backend {name!r}; choose one of {['auto', *backend_names()]}")
    return factory


def get_backend(backend: str | BackendAdapter = "auto") -> BackendAdapter:
    """Resolve ``backend`` to an available adapter instance.

    "auto" picks CUDA, then NPU, then CPU. A named backend that is missing raises
    ``BackendUnavailable`` with what to install; an unknown name raises ``InvalidOptions``.
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
            adapter = _factory(name)()
            if adapter.is_available():
                return adapter
        raise BackendUnavailable("no backend is available, not even the CPU")
    adapter = _factory(backend)()
    adapter.ensure_available()
    return adapter
