"""Everything the serving-shapes work needs from torch: compile stances, a guard in front of a
module's calls, input signatures, and bucket-shared dynamic dimensions.

``lifecycle`` never imports torch for shapes; it calls these functions.

- ``stance(name)``: ``torch.compiler.set_stance`` for one block. ``"eager_on_recompile"`` runs a
  frame eagerly where its guards fail instead of compiling it (torch's own words: "run code
  eagerly when a recompile is necessary"); ``"fail_on_recompile"`` raises instead;
  ``"force_eager"`` ignores compiled code altogether. The stance is process-wide in torch, so a
  block under it affects every compiled function called meanwhile, in any thread.
- ``guard_calls(module, before)``: ``before(args, kwargs)`` runs in front of every call of
  ``module`` while the block is open, *outside* compiled code: it wraps
  ``module._compiled_call_impl``, which ``Module.__call__`` reads on every call (set by
  ``nn.Module.compile()``; for an eager top level, regional compile or none, the wrapper calls
  ``module._call_impl``, hooks and all). Dynamo never traces it, so installing and removing it
  compiles nothing. ``before`` may raise (nothing of the module ran) or return a context
  manager that the call runs inside.
- ``input_signature(args, kwargs)``: the shapes and dtypes of a call's tensor arguments.
- ``shared_dims(signatures)`` and ``mark_shared_dims(...)``: the dimensions that differ between
  the buckets' signatures, marked dynamic with the buckets' bounds before a call, so that one
  compile serves every bucket; ``no_duck_shape()`` turns duck shaping off while that compile
  traces (two sizes equal at one bucket must not become one symbol: diffusers #10795,
  pytorch #150702).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import Any

import torch
from torch import nn

# One tensor argument: (name, sizes, dtype). Positional arguments are named "#0", "#1", ...
TensorSig = tuple[str, tuple[int, ...], str]
Signature = tuple[TensorSig, ...]
# (argument name, dimension) -> (smallest, largest) size over the buckets
SharedDims = dict[tuple[str, int], tuple[int, int]]
Before = Callable[[tuple[Any, ...], dict[str, Any]], "AbstractContextManager[Any] | None"]

STANCES = ("default", "eager_on_recompile", "fail_on_recompile", "force_eager")


@contextmanager
def stance(name: str) -> Iterator[None]:
    """Run the block under ``torch.compiler.set_stance(name)``; the previous stance comes back."""
    if name not in STANCES:
        raise ValueError(f"unknown compile stance {name!r}; known: {list(STANCES)}")
    with torch.compiler.set_stance(name):
        yield


def is_recompile_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is dynamo refusing a recompile under ``"fail_on_recompile"``."""
    return isinstance(exc, RuntimeError) and "fail_on_recompile" in str(exc)


def input_signature(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Signature:
    """Sizes and dtypes of the tensor arguments of one call, in a stable order. Tensors inside
    lists and tuples count too (Z-Image passes its latents as a list of tensors)."""
    items: list[TensorSig] = []

    def add(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            items.append((name, tuple(int(s) for s in value.shape), str(value.dtype)))
        elif isinstance(value, (list, tuple)):
            for position, item in enumerate(value):
                add(f"{name}[{position}]", item)

    for index, value in enumerate(args):
        add(f"#{index}", value)
    for name in sorted(kwargs):
        add(name, kwargs[name])
    return tuple(items)


class guard_calls:
    """``with guard_calls(module, before):`` runs ``before(args, kwargs)`` in front of every call
    of ``module`` while the block is open, outside compiled code; a context manager it returns
    is entered around that call.

    ``Module.__call__`` calls ``module._compiled_call_impl`` when it is set (``nn.Module.compile()``
    sets it), else ``module._call_impl``. The guard sets it, for the block, to a wrapper around
    whichever of the two would have run, and puts the old value back (unless something replaced
    the wrapper meanwhile). The slot is set the way torch's ``Module.__init__`` sets it, past
    ``nn.Module.__setattr__`` (a tenth of the cost: warm-up and every request open a guard).
    Not hooks: a forward pre-hook cannot wrap the call, and two hooks cost ten times as much.
    """

    __slots__ = ("_guarded", "_previous", "before", "module")

    def __init__(self, module: nn.Module, before: Before) -> None:
        self.module = module
        self.before = before
        self._previous: Callable[..., Any] | None = None
        self._guarded: Callable[..., Any] | None = None

    def __enter__(self) -> None:
        module = self.module
        previous = getattr(module, "_compiled_call_impl", None)
        inner = previous if previous is not None else module._call_impl
        before = self.before

        def guarded(*args: Any, **kwargs: Any) -> Any:
            context = before(args, kwargs)
            if context is None:
                return inner(*args, **kwargs)
            with context:
                return inner(*args, **kwargs)

        self._previous, self._guarded = previous, guarded
        object.__setattr__(module, "_compiled_call_impl", guarded)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._guarded is not None:
            if getattr(self.module, "_compiled_call_impl", None) is self._guarded:
                object.__setattr__(self.module, "_compiled_call_impl", self._previous)
            self._previous = self._guarded = None


class _Probed(BaseException):
    """Stops a probe at the module's first call (a BaseException, so hosts' ``except
    Exception`` does not swallow it)."""

    def __init__(self, signature: Signature) -> None:
        super().__init__("probe")
        self.signature = signature


def probe_signature(module: nn.Module, call: Callable[[], object]) -> Signature | None:
    """The input signature of ``module``'s first call made by ``call()``, stopping ``call`` right
    there: nothing of ``module`` runs, and nothing compiles (the probe runs under
    ``force_eager``, so other modules the call reaches first run eagerly). None when ``call``
    never calls the module."""

    def stop(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Probed(input_signature(args, kwargs))

    try:
        with stance("force_eager"), guard_calls(module, stop):
            call()
    except _Probed as probed:
        return probed.signature
    return None


def shared_dims(signatures: list[Signature]) -> SharedDims:
    """The (argument, dimension) pairs whose size differs between ``signatures``, with bounds.

    Only arguments present with the same rank in every signature take part: anything else is
    left to torch (it would recompile for it, and the lifecycle counts that)."""
    if len(signatures) < 2:
        return {}
    by_name = [{name: sizes for name, sizes, _dtype in sig} for sig in signatures]
    dims: SharedDims = {}
    for name, sizes in by_name[0].items():
        all_sizes = [sig.get(name) for sig in by_name]
        if any(s is None or len(s) != len(sizes) for s in all_sizes):
            continue
        for dim in range(len(sizes)):
            values = [s[dim] for s in all_sizes if s is not None]
            if len(set(values)) > 1:
                dims[(name, dim)] = (min(values), max(values))
    return dims


def mark_shared_dims(dims: SharedDims, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Mark the shared dimensions of this call's tensors dynamic, with the buckets' bounds.

    A size outside the bounds is left unmarked (a request outside every bucket), so torch
    treats it as it would any new shape."""
    if not dims:
        return
    for (name, dim), (low, high) in dims.items():
        value = (
            args[int(name[1:])] if name.startswith("#") and int(name[1:]) < len(args) else kwargs.get(name)
        )
        if isinstance(value, torch.Tensor) and dim < value.dim() and low <= value.shape[dim] <= high:
            # torch specialises sizes 0 and 1; a lower bound of at least 2 keeps the symbol.
            torch._dynamo.mark_dynamic(value, dim, min=max(2, low), max=high)


@contextmanager
def no_duck_shape() -> Iterator[None]:
    """Duck shaping off while the block traces: equal sizes stay separate symbols."""
    import torch.fx.experimental._config as fx_config

    previous = fx_config.use_duck_shape
    fx_config.use_duck_shape = False
    try:
        yield
    finally:
        fx_config.use_duck_shape = previous
