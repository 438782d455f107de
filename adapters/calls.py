"""A module's calls seen from outside compiled code: a guard in front of every call, the call's
input signature, and the dims that differ between serving buckets.

- ``guard_calls(module, before)``: ``before(args, kwargs)`` runs in front of every call of
  ``module`` while the block is open, outside compiled code (it wraps the module's call slot,
  which ``Module.__call__`` reads on every call; dynamo never traces it, so installing and
  removing it compiles nothing). ``before`` may raise (nothing of the module ran) or return a
  ``CallDecision``: arguments to call with instead (aliases marked dynamic) and whether this
  call runs the module's eager path.
- ``input_signature(args, kwargs)``: the sizes and dtypes of a call's tensor arguments.
- ``shared_dims(signatures)``: the dims that differ between the buckets' signatures, with their
  bounds; ``with_shared_dims(...)`` returns the call's arguments with those dims marked dynamic
  on aliases, so one compile serves every bucket and the host's tensors stay unmarked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, NamedTuple

import torch
from torch import nn

from adapters import _torch_internals as internals

# One tensor argument: (name, sizes, dtype). Positional arguments are named "#0", "#1", ...
TensorSig = tuple[str, tuple[int, ...], str]
Signature = tuple[TensorSig, ...]
# (argument name, dimension) -> (smallest, largest) size over the buckets
SharedDims = dict[tuple[str, int], tuple[int, int]]


class CallDecision(NamedTuple):
    """What one guarded call runs with: its arguments, and whether on the eager path."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    eager: bool = False
    # Hold the process's trace lock for the call: it may compile inline, and a warm-up
    # elsewhere may be tracing with duck shaping off.
    exclusive: bool = False


Before = Callable[[tuple[Any, ...], dict[str, Any]], "CallDecision | None"]


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


def signature_sizes(signature: Signature) -> dict[str, list[int]]:
    """A signature as the operator reads it: argument name -> sizes."""
    return {name: list(sizes) for name, sizes, _dtype in signature}


class guard_calls:
    """``with guard_calls(module, before):`` runs ``before`` in front of every call of ``module``
    while the block is open (see the module docstring). Puts the slot back on exit unless
    something replaced the wrapper meanwhile. A class: every request opens one."""

    __slots__ = ("_guarded", "_previous", "before", "module")

    def __init__(self, module: nn.Module, before: Before) -> None:
        self.module = module
        self.before = before
        self._previous: Callable[..., Any] | None = None
        self._guarded: Callable[..., Any] | None = None

    def __enter__(self) -> None:
        module = self.module
        before = self.before
        eager_for = internals.eager_for
        trace_lock = internals.TRACE_LOCK

        def wrap(inner: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(*args: Any, **kwargs: Any) -> Any:
                decision = before(args, kwargs)
                if decision is None:
                    return inner(*args, **kwargs)
                if decision.eager:
                    with eager_for(module):
                        return inner(*decision.args, **decision.kwargs)
                if decision.exclusive:
                    with trace_lock:
                        return inner(*decision.args, **decision.kwargs)
                return inner(*decision.args, **decision.kwargs)

            return guarded

        self._previous, self._guarded = internals.wrap_call(module, wrap)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._guarded is not None:
            internals.unwrap_call(self.module, self._guarded, self._previous)
            self._previous = self._guarded = None


class _Probed(BaseException):
    """Stops a probe at the module's first call (a BaseException, so hosts' ``except
    Exception`` does not swallow it)."""

    def __init__(self, signature: Signature) -> None:
        super().__init__("probe")
        self.signature = signature


def probe_signature(
    module: nn.Module, call: Callable[[], object], eager: list[nn.Module]
) -> Signature | None:
    """The input signature of ``module``'s first call made by ``call()``, stopping ``call`` right
    there: nothing of ``module`` runs, and the ``eager`` modules (the warm-up's members) run
    their eager paths meanwhile, so nothing of theirs compiles. None when ``call`` never calls
    the module."""

    def stop(args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallDecision | None:
        raise _Probed(input_signature(args, kwargs))

    try:
        with guard_calls(module, stop), internals.eager_for(*eager):
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


def with_shared_dims(
    dims: Mapping[tuple[str, int], tuple[int, int]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments with the shared dims of its tensors marked dynamic (with the
    buckets' bounds) on aliases. A size outside the bounds is left unmarked (a request outside
    every bucket), so torch treats it as it would any new shape; a tensor that needs grad is
    passed as it is (an alias would cut it from the graph)."""
    wanted: dict[str, list[tuple[int, int, int]]] = {}
    for (name, dim), (low, high) in dims.items():
        # torch specialises sizes 0 and 1; a lower bound of at least 2 keeps the symbol.
        wanted.setdefault(name, []).append((dim, max(2, low), high))
    new_args = list(args)
    new_kwargs = dict(kwargs)
    for name, marks in wanted.items():
        positional = name.startswith("#")
        index = int(name[1:]) if positional else -1
        if positional and index >= len(args):
            continue
        value = args[index] if positional else kwargs.get(name)
        if not isinstance(value, torch.Tensor) or value.requires_grad:
            continue
        fitting = [(d, lo, hi) for d, lo, hi in marks if d < value.dim() and lo <= value.shape[d] <= hi]
        if not fitting:
            continue
        alias = internals.marked_alias(value, fitting)
        if positional:
            new_args[index] = alias
        else:
            new_kwargs[name] = alias
    return tuple(new_args), new_kwargs


__all__ = [
    "Before",
    "CallDecision",
    "SharedDims",
    "Signature",
    "guard_calls",
    "input_signature",
    "probe_signature",
    "shared_dims",
    "signature_sizes",
    "with_shared_dims",
]
