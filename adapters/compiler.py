"""The ``Compiler`` protocol: how a lifecycle's module is compiled, behind the backend adapter.

The backend adapter picks and configures one compiler per lifecycle (``BackendAdapter.compiler``)
and owns the translation of ``compile_options`` into it, so ``mode``, ``options`` and the plan's
``reproducible`` reach every path or are refused at construction. The lifecycle calls that one
object and never asks which kind it holds. Three implementations:

- ``JitModelCompiler``: ``torch.compile`` of the whole model in place (``CompilePlan()``);
- ``JitBlocksCompiler``: ``torch.compile`` of each repeated block in place
  (``CompilePlan(scope="blocks")``);
- ``adapters.aot.compiler.AotBlocksCompiler``: each block kind exported and AOTInductor-compiled
  from example calls, loaded on a restart, falling back to ``JitBlocksCompiler`` when no trusted
  package can serve (``CompilePlan(scope="blocks", ahead_of_time=True)``).

The methods, in the order a lifecycle uses them:

- ``compile(module, examples, options)``: compile in place; ``examples`` are zero-argument
  callables that each run the module once (one per declared bucket), for compilers that build
  from real calls. A compiler that needs them and gets none defers (``CompileReport.deferred``):
  the lifecycle passes the warm-up's calls to ``compile`` again before warming.
- ``rebind(module)``: before a warm-up, follow weights the host replaced (fields to audit).
- ``misses(module)``: block calls the compiled code could not serve so far, or None when the
  compiler checks no call itself (just in time, or fell back): then the lifecycle's own shape
  checks decide misses.
- ``refusing(refuse)``: a context inside which such a call raises ``OutsideBounds`` instead of
  running eagerly (``on_unwarmed="fail"``), in this thread or task only.
- ``listen(sink)``: where events to audit go as they happen (``lifecycle.artifacts``: a
  store's ``waiting`` while the compile waits, a background watch's end), rather than in the
  report when the compile ends.
- ``switch(module)``: at a request boundary (the lifecycle's lock held, no request running):
  apply what a background watch found (e.g. another replica's packages replacing just-in-time
  blocks); None when there is nothing to apply (the common case: it must be cheap).
- ``describe()``: what ``stats()`` reports; ``restore(module)``: the module eager again (and any
  background watch stopped); ``close()``: release what the compiler keeps on disk for this
  process only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn

from adapters.errors import AdapterError
from adapters.protocols import CompilePlanLike

Example = Callable[[], object]
# Receives one ``lifecycle.artifacts`` event's fields (``status``, ``detail``, ``problem``...).
EventSink = Callable[[dict[str, Any]], None]
# The ``detected`` value of a request whose block calls lay outside what was compiled.
OUTSIDE_BOUNDS = "aot_bounds"


class OutsideBounds(AdapterError):
    """A block call lies outside what its compiled code was built for, and the request refuses
    to run it eagerly; ``reason`` says which check failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CompileReport:
    """What one ``compile`` did.

    ``fields``: what the compile transition's audit records; ``row``: what each coverage row
    reports about it; ``ran_examples``: the examples were called (the cache context is no longer
    fresh); ``deferred``: nothing compiled yet, examples are needed first; ``events``: what the
    artifact store did (``status``: ``loaded``, ``compiled``, ``waiting``, ``untrusted``,
    ``unreachable``, ``timeout``...), each a ``lifecycle.artifacts`` event."""

    compiler: str
    fields: dict[str, Any] = field(default_factory=dict)
    row: dict[str, Any] = field(default_factory=dict)
    ran_examples: bool = False
    deferred: bool = False
    events: tuple[dict[str, Any], ...] = ()


@runtime_checkable
class Compiler(Protocol):
    """One lifecycle's compiler (see the module docstring)."""

    name: str

    def compile(
        self, module: nn.Module, examples: Sequence[Example] | None, options: Mapping[str, Any]
    ) -> CompileReport:
        """Compile ``module`` in place; ``options`` are this compile's torch.compile arguments."""
        ...

    @property
    def pending(self) -> bool:
        """Whether a compile was deferred until examples come."""
        ...

    def rebind(self, module: nn.Module) -> dict[str, Any]:
        """Follow replaced weights; the fields to audit (empty: nothing changed)."""
        ...

    def listen(self, sink: EventSink | None) -> None:
        """Send events to audit to ``sink`` as they happen (None: only in the reports)."""
        ...

    def switch(self, module: nn.Module) -> CompileReport | None:
        """At a request boundary: apply what a background watch found; None: nothing to apply."""
        ...

    def misses(self, module: nn.Module) -> int | None:
        """Calls the compiled code could not serve so far; None: it checks no call itself."""
        ...

    def refusing(self, refuse: bool) -> AbstractContextManager[Any]:
        """Inside, a call outside the compiled bounds raises ``OutsideBounds`` (when ``refuse``)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What ``stats()`` reports about the compile."""
        ...

    def restore(self, module: nn.Module) -> None:
        """Drop what ``compile`` installed: the module runs eagerly again."""
        ...

    def close(self) -> None:
        """Release what this compiler keeps for this process only (temporary files)."""
        ...


class _JitCompiler:
    """``torch.compile`` in place through the backend adapter, as ``plan`` says."""

    name = "jit"

    def __init__(
        self,
        compile_fn: Callable[[nn.Module, Mapping[str, Any], CompilePlanLike], None],
        decompile_fn: Callable[[nn.Module], None],
        plan: CompilePlanLike,
    ) -> None:
        self._compile = compile_fn
        self._decompile = decompile_fn
        self._plan = plan
        self._compiled = False

    def compile(
        self, module: nn.Module, examples: Sequence[Example] | None, options: Mapping[str, Any]
    ) -> CompileReport:
        self._compile(module, options, self._plan)
        self._compiled = True
        return CompileReport(self.name)

    @property
    def pending(self) -> bool:
        return False

    def rebind(self, module: nn.Module) -> dict[str, Any]:
        return {}  # compiled code reads the module's tensors themselves

    def listen(self, sink: EventSink | None) -> None:
        return None  # nothing happens in the background

    def switch(self, module: nn.Module) -> CompileReport | None:
        return None

    def misses(self, module: nn.Module) -> int | None:
        return None

    def refusing(self, refuse: bool) -> AbstractContextManager[Any]:
        return nullcontext()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "compiled": self._compiled}

    def restore(self, module: nn.Module) -> None:
        self._decompile(module)
        self._compiled = False

    def close(self) -> None:
        return None


class JitModelCompiler(_JitCompiler):
    """The whole model, just in time (``CompilePlan()``)."""

    name = "jit_model"


class JitBlocksCompiler(_JitCompiler):
    """Each repeated block, just in time (``CompilePlan(scope="blocks")``)."""

    name = "jit_blocks"


__all__ = [
    "OUTSIDE_BOUNDS",
    "CompileReport",
    "Compiler",
    "EventSink",
    "Example",
    "JitBlocksCompiler",
    "JitModelCompiler",
    "OutsideBounds",
]
