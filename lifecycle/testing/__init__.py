"""What a host needs to test its own integration, in the spirit of ``structlog.testing``:
audit capture, a no-op backend adapter and a no-op cache adapter (``NoopCache`` implements
``adapters.protocols.CacheAdapter``; mypy checks it below)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, overload

from structlog.testing import capture_logs
from torch import nn

from adapters import BackendAdapter, CacheSummary, InvalidOptions
from adapters.protocols import CompilePlanLike
from lifecycle import audit

if TYPE_CHECKING:
    from adapters.protocols import CacheAdapter


@contextmanager
def capture_audit() -> Iterator[AuditEvents]:
    """Collect the lifecycle's audit events (transition, request, recompile, coverage) as dicts.

    Like ``structlog.testing.capture_logs``, it replaces the processors for the duration, so
    events are captured whatever the host configured.

    Example::

        with capture_audit() as events:
            lc.prepare(run)
        assert all(e["outcome"] == "ok" for e in events.of("lifecycle.transition"))
    """
    with capture_logs() as logs:
        yield AuditEvents(logs)


class AuditEvents(Sequence[MutableMapping[str, Any]]):
    """A live, read-only view of the captured ``lifecycle.*`` events, oldest first.

    Args:
        logs: the list ``structlog.testing.capture_logs`` fills (``capture_audit`` passes it).

    Example::

        with capture_audit() as events:
            lc.prepare(run)
        print(len(events), events[0]["event"], events[:2])
    """

    def __init__(self, logs: list[MutableMapping[str, Any]]) -> None:
        self._logs = logs

    def _events(self) -> list[MutableMapping[str, Any]]:
        return [e for e in self._logs if str(e.get("event", "")).startswith("lifecycle.")]

    @overload
    def __getitem__(self, index: int) -> MutableMapping[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[MutableMapping[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> MutableMapping[str, Any] | list[MutableMapping[str, Any]]:
        return self._events()[index]

    def __len__(self) -> int:
        return len(self._events())

    def of(self, event: str, module: str | None = None) -> list[MutableMapping[str, Any]]:
        """Events named ``event`` (e.g. "lifecycle.transition"), optionally of one module.

        Args:
            event: the event name.
            module: the module name to keep; None keeps every module's events.

        Example::

            requests = events.of("lifecycle.request", module="transformer")
        """
        return [
            e for e in self._events()
            if e["event"] == event and (module is None or e.get("module") == module)
        ]


class NoopBackend(BackendAdapter):
    """A backend that compiles nothing and counts calls: the lifecycle's own cost, isolated.

    Example::

        backend = NoopBackend()
        lc = ModuleLifecycle(tiny_flux(), backend=backend, cache_adapter=NoopCache())
        lc.prepare(denoiser(flux_inputs(), steps=4))
        print(backend.compiles, backend.decompiles)
    """

    name = "noop"
    device_type = "cpu"

    def __init__(self) -> None:
        self.compiles = 0
        self.decompiles = 0
        self.graphs = 0

    @classmethod
    def is_available(cls) -> bool:
        return True

    def ensure_available(self) -> None:
        return None

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(options, Mapping):
            raise InvalidOptions(f"compile_options must be a dict, got {type(options).__name__}")
        return dict(options)

    def compile(self, module: nn.Module, options: Mapping[str, Any], plan: CompilePlanLike) -> None:
        self.compiles += 1

    def decompile(self, module: nn.Module) -> None:
        self.decompiles += 1

    def synchronize(self) -> None:
        return None

    def graph_count(self) -> int:
        return self.graphs


class NoopCache:
    """A cache adapter that mounts nothing but keeps the mounted flag and counts refreshes.
    Implements ``adapters.protocols.CacheAdapter`` structurally (no base class).

    Example::

        cache = NoopCache()
        lc = ModuleLifecycle(tiny_flux(), backend=NoopBackend(), cache_adapter=cache)
        lc.prepare(denoiser(flux_inputs(), steps=4))
        print(cache.refreshes, cache.mounted)
    """

    name = "noop-cache"

    def __init__(self) -> None:
        self.mounted: set[int] = set()
        self.refreshes = 0

    def default_config(self) -> dict[str, Any]:
        return {}

    def validate_config(self, config: Any) -> Any:
        return {} if config is None else config

    def check_supported(self, module: nn.Module) -> None:
        return None

    def is_mounted(self, module: nn.Module) -> bool:
        return id(module) in self.mounted

    def mount(self, module: nn.Module, config: Any) -> None:
        self.mounted.add(id(module))

    def refresh(self, module: nn.Module, config: Any, num_inference_steps: int | None = None) -> None:
        self.refreshes += 1

    def refresh_for_warmup(self, module: nn.Module, config: Any) -> None:
        self.refreshes += 1

    def unmount(self, module: nn.Module) -> None:
        self.mounted.discard(id(module))

    def summary(self, module: nn.Module) -> CacheSummary:
        return CacheSummary()

    def warmup_covered(self, module: nn.Module) -> bool:
        return True

    def describe_config(self, config: Any) -> dict[str, Any]:
        return {"type": "noop"}


if TYPE_CHECKING:
    # mypy --strict checks that NoopCache implements the protocol, method by method.
    _NOOP_CACHE_IS_A_CACHE_ADAPTER: type[CacheAdapter] = NoopCache


__all__ = ["AuditEvents", "NoopBackend", "NoopCache", "audit", "capture_audit"]
