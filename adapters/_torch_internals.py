"""The only code that touches torch's internals: a module's call slot, dynamo's counters, the fx
duck-shape switch, dynamic-dim marks. Everything else asks here.

Why each is needed, and how it is kept from the rest of the process:

- **The call slot.** ``nn.Module.__call__`` runs ``module._compiled_call_impl`` when it is set
  (``nn.Module.compile()`` sets it), else ``module._call_impl``. Compiling in place keeps the
  object the host holds, and ``None`` returns the module to eager. Every compiled callable we
  install goes through an ``EagerSwitch``, so one module can run its own eager path for one call
  (an eager miss, a bucket measured faster eager) without touching torch's process-wide compile
  stance: the switch reads a context variable, which another thread or task never sees.
- **Duck shaping** (``torch.fx.experimental._config.use_duck_shape``) is read when dynamo
  traces, and it is process-wide. Buckets that share graphs must trace with it off (two sizes
  equal at one bucket must not become one symbol), so every warm-up traces under ``TRACE_LOCK``
  and a trace that needs it off restores it before the lock is released.
- **Dynamic-dim marks** are set on tensors the library makes (aliases), never on the host's.
- **Counters**: dynamo's ``unique_graphs`` counts compiled graphs; inductor's FX-graph cache
  misses tell a load from artifacts from a cold compile.
- **AOTInductor** (ahead-of-time blocks): ``aoti_compile_and_package``, the package loader class
  ``torch._C._aoti.AOTIModelPackageLoader`` (its ``load_constants``, ``get_constant_fqns``,
  ``get_call_spec``, ``boxed_run``), inductor's mode table and configs; a module's tensor slots
  (``_parameters``/``_buffers``), its forward hooks, and a tensor's version counter.

This file imports only the standard library and torch (``TorchInternalsMoved`` is imported where
it is raised): the package check's child process loads it by path, without the ``adapters``
package, so the child and the serving process load packages through the very same calls.

``check()`` runs at a lifecycle's construction and turns a torch that moved any of these into
``TorchInternalsMoved`` (a typed refusal naming what moved), never a silent no-op.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Any

import torch
from torch import nn

SLOT = "_compiled_call_impl"
# Ids of the modules that run their eager path in this thread or task (a context variable: an
# eager call in one thread leaves every other thread's calls as they were).
_EAGER: ContextVar[frozenset[int]] = ContextVar("dit_lifecycle_eager_modules", default=frozenset())
# Held while a warm-up traces: the duck-shape switch is process-wide, so one trace at a time
# may change it, and a trace never sees another's setting.
TRACE_LOCK = threading.RLock()


# ---------------------------------------------------------------------------- self-test
@cache
def _check() -> None:
    problems: list[str] = []
    probe = nn.Linear(1, 1)
    if not hasattr(probe, SLOT):
        problems.append(f"nn.Module has no {SLOT} slot (nn.Module.compile() stores its call there)")
    else:
        seen: list[bool] = []

        def spy(*args: Any, **kwargs: Any) -> Any:
            seen.append(True)
            return eager_call(probe)(*args, **kwargs)

        object.__setattr__(probe, SLOT, spy)
        with torch.no_grad():
            probe(torch.zeros(1, 1))
        object.__setattr__(probe, SLOT, None)
        if not seen:
            problems.append(f"nn.Module.__call__ no longer calls {SLOT}")
    try:
        from torch._dynamo.utils import counters

        int(counters["stats"]["unique_graphs"])
    except Exception as exc:  # any shape of "moved"
        problems.append(f"torch._dynamo.utils.counters['stats']['unique_graphs'] is gone ({exc})")
    try:
        import torch.fx.experimental._config as fx_config

        if not isinstance(fx_config.use_duck_shape, bool):
            problems.append("torch.fx.experimental._config.use_duck_shape is not a bool")
    except Exception as exc:
        problems.append(f"torch.fx.experimental._config.use_duck_shape is gone ({exc})")
    if not callable(getattr(torch._dynamo, "mark_dynamic", None)):
        problems.append("torch._dynamo.mark_dynamic is gone")
    if problems:
        from adapters.errors import TorchInternalsMoved

        raise TorchInternalsMoved(
            f"torch {torch.__version__} moved what dit-lifecycle relies on: {'; '.join(problems)}. "
            "Use a torch version the library supports (see its pyproject), or report it"
        )


def check() -> None:
    """Raise ``TorchInternalsMoved`` if this torch moved anything the library relies on
    (checked once per process; a failure is raised again on every call)."""
    _check()


def forget_check() -> None:
    """Run the self-tests again next time (for tests that simulate a moved internal)."""
    _check.cache_clear()
    _checked_aot.cache_clear()


# ---------------------------------------------------------------------------- the call slot
def compiled_call(module: nn.Module) -> Callable[..., Any] | None:
    """What ``module.__call__`` runs instead of ``_call_impl`` now (None: eager)."""
    call: Callable[..., Any] | None = getattr(module, SLOT, None)
    return call


def set_compiled_call(module: nn.Module, call: Callable[..., Any] | None) -> None:
    """Set the slot the way ``Module.__init__`` does, past ``nn.Module.__setattr__``."""
    object.__setattr__(module, SLOT, call)


def eager_call(module: nn.Module) -> Callable[..., Any]:
    """The module's own uncompiled call (hooks and all)."""
    call: Callable[..., Any] = module._call_impl
    return call


def wrap_call(module: nn.Module, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> tuple[
    Callable[..., Any] | None, Callable[..., Any]
]:
    """Make ``wrap(inner)`` what ``module`` runs, where ``inner`` is what it runs now (its compiled
    call, else its eager one). Returns (the slot's previous value, the wrapper) for
    ``unwrap_call``. One call: every request and warm-up bucket wraps its modules."""
    previous: Callable[..., Any] | None = getattr(module, SLOT, None)
    wrapper = wrap(previous if previous is not None else module._call_impl)
    object.__setattr__(module, SLOT, wrapper)
    return previous, wrapper


def unwrap_call(module: nn.Module, wrapper: Callable[..., Any], previous: Callable[..., Any] | None) -> None:
    """Undo ``wrap_call``, unless something replaced ``wrapper`` meanwhile (then that stays)."""
    if getattr(module, SLOT, None) is wrapper:
        object.__setattr__(module, SLOT, previous)


def is_compiled(module: nn.Module) -> bool:
    """Whether the module or any submodule runs a compiled call."""
    return any(compiled_call(sub) is not None for sub in module.modules())


class EagerSwitch:
    """A compiled call that runs the module's eager path instead while its owner is in
    ``eager_for(owner)`` (in this thread or task only)."""

    __slots__ = ("compiled", "eager", "owner")

    def __init__(self, owner: int, compiled: Callable[..., Any], eager: Callable[..., Any]) -> None:
        self.owner = owner
        self.compiled = compiled
        self.eager = eager

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.owner in _EAGER.get():
            return self.eager(*args, **kwargs)
        return self.compiled(*args, **kwargs)


def install(target: nn.Module, owner: nn.Module, call: Callable[..., Any]) -> None:
    """Make ``call`` what ``target`` runs, switchable to its eager path for ``owner``."""
    set_compiled_call(target, EagerSwitch(id(owner), call, eager_call(target)))


def compile_in_place(target: nn.Module, owner: nn.Module, torch_options: dict[str, Any]) -> None:
    """``target.compile(**torch_options)`` behind an ``EagerSwitch`` for ``owner``; on failure
    the target is left eager, never half-compiled."""
    try:
        target.compile(**torch_options)
        compiled = compiled_call(target)
        if compiled is None:
            from adapters.errors import TorchInternalsMoved

            raise TorchInternalsMoved(f"nn.Module.compile() left {SLOT} unset")
        install(target, owner, compiled)
    except BaseException:
        set_compiled_call(target, None)
        raise


@contextmanager
def eager_for(*owners: nn.Module) -> Iterator[None]:
    """Inside the block, the ``owners``' compiled calls (their own and their blocks') run
    eagerly, in this thread or task only."""
    token = _EAGER.set(_EAGER.get() | {id(owner) for owner in owners})
    try:
        yield
    finally:
        _EAGER.reset(token)


def is_eager(owner: nn.Module) -> bool:
    return id(owner) in _EAGER.get()


# ---------------------------------------------------------------------------- counters
def graph_count() -> int:
    """Graphs dynamo has compiled in this process (its own counter, shared by all backends)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def fxgraph_cache_misses() -> int:
    """Inductor FX-graph cache misses in this process (a load from artifacts has none)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"])


# ---------------------------------------------------------------------------- tracing
class _NoDuckShape:
    """The trace lock held, duck shaping off inside, restored before the lock is released."""

    __slots__ = ("_previous",)

    def __init__(self) -> None:
        self._previous: bool | None = None

    def __enter__(self) -> None:
        TRACE_LOCK.acquire()
        try:
            import torch.fx.experimental._config as fx_config

            self._previous = bool(fx_config.use_duck_shape)
            fx_config.use_duck_shape = False
        except BaseException:
            TRACE_LOCK.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self._previous is not None:
                import torch.fx.experimental._config as fx_config

                fx_config.use_duck_shape = self._previous
                self._previous = None
        finally:
            TRACE_LOCK.release()


def tracing(*, duck_shape: bool = True) -> AbstractContextManager[Any]:
    """``with tracing(duck_shape=...)``: hold the process's trace lock for a warm-up; with
    ``duck_shape=False``, duck shaping is off inside and restored before the lock is released.
    With duck shaping left on, that is the lock itself (every warm-up opens one)."""
    return TRACE_LOCK if duck_shape else _NoDuckShape()


def duck_shape() -> bool:
    import torch.fx.experimental._config as fx_config

    return bool(fx_config.use_duck_shape)


def marked_alias(tensor: torch.Tensor, dims: list[tuple[int, int, int]]) -> torch.Tensor:
    """An alias of ``tensor`` (same storage, not a view in dynamo's eyes) with ``dims``
    ((dim, min, max) each) marked dynamic: the caller's tensor is never marked."""
    alias = tensor.detach()
    for dim, low, high in dims:
        torch._dynamo.mark_dynamic(alias, dim, min=low, max=high)
    return alias


# ---------------------------------------------------------------------------- AOTInductor
_LOADER_METHODS = ("load_constants", "get_constant_fqns", "get_call_spec", "boxed_run")


def _loader_class() -> Any:
    return getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)


@cache
def _checked_aot() -> None:
    problems = _check_aot()
    if problems:
        from adapters.errors import TorchInternalsMoved

        raise TorchInternalsMoved(
            f"torch {torch.__version__} moved what ahead-of-time blocks rely on: {'; '.join(problems)}. "
            "Use a torch version the library supports (see its pyproject), or a just-in-time plan"
        )


def check_aot() -> None:
    """Raise ``TorchInternalsMoved`` if this torch moved anything ahead-of-time blocks use (checked
    once per process, when a lifecycle asks for them: importing inductor costs seconds)."""
    _checked_aot()


def _check_aot() -> list[str]:
    """What ahead-of-time blocks use, present and callable (nothing is compiled here)."""
    problems: list[str] = []
    loader = _loader_class()
    if loader is None:
        problems.append("torch._C._aoti.AOTIModelPackageLoader is gone")
    else:
        problems.extend(f"AOTIModelPackageLoader.{name} is gone" for name in _LOADER_METHODS
                        if not callable(getattr(loader, name, None)))
    try:
        import torch._inductor as inductor

        if not callable(getattr(inductor, "aoti_compile_and_package", None)):
            problems.append("torch._inductor.aoti_compile_and_package is gone")
        if not isinstance(inductor.list_mode_options("max-autotune"), dict):
            problems.append("torch._inductor.list_mode_options no longer returns a dict")
        if not inductor_has_config("aot_inductor.package_constants_in_so"):
            problems.append("inductor config aot_inductor.package_constants_in_so is gone")
    except Exception as exc:
        problems.append(f"torch._inductor's AOT entry points are gone ({exc})")
    probe = nn.Linear(1, 1)
    slots = getattr(probe, "_parameters", None)
    if not isinstance(slots, dict) or "weight" not in tensor_slots(probe, "weight"):
        problems.append("nn.Module._parameters no longer holds a module's parameters")
    if not isinstance(tensor_version(probe.weight), int):
        problems.append("Tensor._version is gone")
    try:
        has_forward_hooks(probe)
    except AttributeError as exc:
        problems.append(f"nn.Module's forward hook dicts moved ({exc})")
    return problems


def aoti_compile_and_package(exported: Any, package_path: str, configs: dict[str, Any]) -> None:
    """AOTInductor-compile an exported program into a package file."""
    import torch._inductor as inductor

    inductor.aoti_compile_and_package(exported, package_path=package_path, inductor_configs=dict(configs))


def load_aoti_package(path: str, device_index: int) -> Any:
    """One package's loader: the loader class itself, as ``aoti_load_package`` does after its first
    try. That first try reads the device's description, which on a CPU compiles inductor's ISA
    probe programs: seconds on a fresh machine before any load."""
    loader = _loader_class()
    if loader is None:
        return torch._inductor.aoti_load_package(path, device_index=device_index).loader
    return loader(path, "model", False, 1, device_index)


def load_constants(loader: Any, tensors: dict[str, torch.Tensor], *, user_managed: bool) -> None:
    """Bind ``tensors`` as the package's constants: ``user_managed`` binds the tensors themselves
    (no copy), else the loader copies them."""
    # (map, use_inactive, check_full_update, user_managed)
    loader.load_constants(tensors, False, True, user_managed)


def aoti_runner(loader: Any) -> Any:
    """A callable over a loader that takes the exported call's arguments (the check's runner)."""
    from torch._inductor.package.package import AOTICompiledModel  # type: ignore[attr-defined]

    return AOTICompiledModel(loader)


def inductor_mode_options(mode: str) -> dict[str, Any]:
    """The inductor configs a ``torch.compile`` mode stands for."""
    import torch._inductor as inductor

    return dict(inductor.list_mode_options(mode))


def inductor_has_config(name: str) -> bool:
    """Whether this torch's inductor has the config ``name`` (dotted)."""
    from torch._inductor import config

    return name in config.get_config_copy()


def inductor_config_copy() -> dict[str, Any]:
    """Inductor's configs, by dotted name."""
    from torch._inductor import config

    return dict(config.get_config_copy())


def inductor_config_type(name: str) -> Any:
    """The declared type of inductor config ``name``."""
    from torch._inductor import config

    return config.get_type(name)  # type: ignore[attr-defined]


def dynamo_backends() -> list[str]:
    """The torch.compile backends dynamo knows by name."""
    return list(torch._dynamo.list_backends(exclude_tags=()))


def tensor_slots(module: nn.Module, name: str) -> dict[str, Any]:
    """The dict of ``module`` that holds its tensor ``name`` (parameters, else buffers): read by
    identity on every call of a bound block, where ``getattr`` would cost more."""
    parameters: dict[str, Any] = module._parameters
    if name in parameters:
        return parameters
    buffers: dict[str, Any] = module._buffers
    return buffers


def tensor_version(tensor: torch.Tensor) -> int:
    """The tensor's version counter (bumped by every in-place change)."""
    return int(tensor._version)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether the module has forward hooks of its own (a compiled call slot skips them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._forward_hooks_with_kwargs)


__all__ = [
    "SLOT",
    "TRACE_LOCK",
    "EagerSwitch",
    "aoti_compile_and_package",
    "aoti_runner",
    "check",
    "check_aot",
    "compile_in_place",
    "dynamo_backends",
    "has_forward_hooks",
    "inductor_config_copy",
    "inductor_config_type",
    "inductor_has_config",
    "inductor_mode_options",
    "load_aoti_package",
    "load_constants",
    "tensor_slots",
    "tensor_version",
    "compiled_call",
    "duck_shape",
    "eager_call",
    "eager_for",
    "forget_check",
    "fxgraph_cache_misses",
    "graph_count",
    "install",
    "is_compiled",
    "is_eager",
    "marked_alias",
    "set_compiled_call",
    "tracing",
    "unwrap_call",
    "wrap_call",
]
