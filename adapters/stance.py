"""Everything the serving-shapes work needs from torch: compile stances, a guard in front of a
module's calls, input signatures, and bucket-shared dynamic dimensions.

``lifecycle`` never imports torch for shapes; it calls these functions.

- ``stance(name)``: ``torch.compiler.set_stance`` for one block. ``"eager_on_recompile"`` runs a
  frame eagerly where its guards fail instead of compiling it (torch's own words: "run code
  eagerly when a recompile is necessary"); ``"fail_on_recompile"`` raises instead;
  ``"force_eager"`` ignores compiled code altogether. The stance is process-wide in torch, so a
  block under it affects every compiled function called meanwhile, in any thread.
- ``guard_calls(module, before)``: ``before(args, kwargs)`` runs in front of every call of
  ``module`` while the block is open, *outside* compiled code: for a module compiled in place
  (``nn.Module.compile()``) it wraps ``module._compiled_call_impl``, which ``Module.__call__``
  reads on every call; otherwise it is a forward pre-hook (the top-level module is eager then:
  regional compile or no compile). Dynamo never traces it, so installing and removing it
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

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

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
    of ``module`` while the block is open.

    A class, not a generator: warm-up and every request open one. ``contexts=False`` promises
    that ``before`` never returns a context, so an eager module gets a pre-hook only (half the
    cost: no forward hook to leave the context).
    """

    __slots__ = ("_compiled", "_contexts", "_guarded", "_handles", "_open", "before", "module")

    def __init__(self, module: nn.Module, before: Before, *, contexts: bool = True) -> None:
        self.module = module
        self.before = before
        self._contexts = contexts
        self._compiled: Callable[..., Any] | None = None
        self._guarded: Callable[..., Any] | None = None
        self._handles: list[RemovableHandle] = []
        self._open: list[contextlib.ExitStack] = []

    def _run_before(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> AbstractContextManager[Any]:
        context = self.before(args, kwargs)
        return context if context is not None else contextlib.nullcontext()

    def __enter__(self) -> None:
        module = self.module
        compiled = getattr(module, "_compiled_call_impl", None)
        if compiled is not None:
            run_before = self._run_before

            def guarded(*args: Any, **kwargs: Any) -> Any:
                with run_before(args, kwargs):
                    return compiled(*args, **kwargs)

            self._compiled, self._guarded = compiled, guarded
            module._compiled_call_impl = guarded
            return
        # Eager top level: a forward pre-hook. A pre-hook cannot wrap the call, so a returned
        # context is entered here and left by a forward hook (or when the block closes).
        if not self._contexts:
            before = self.before

            def check(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                before(args, kwargs)

            self._handles.append(module.register_forward_pre_hook(check, with_kwargs=True))
            return
        open_contexts = self._open

        def pre_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            stack = contextlib.ExitStack()
            stack.enter_context(self._run_before(args, kwargs))
            open_contexts.append(stack)

        def post_hook(_module: nn.Module, _args: tuple[Any, ...], _kwargs: dict[str, Any], _out: Any) -> None:
            if open_contexts:
                open_contexts.pop().close()

        self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post_hook, with_kwargs=True, always_call=True))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._guarded is not None:
            # Put the compiled call back unless something replaced ours meanwhile.
            if getattr(self.module, "_compiled_call_impl", None) is self._guarded:
                self.module._compiled_call_impl = self._compiled
            self._compiled = self._guarded = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        while self._open:
            self._open.pop().close()


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
        with stance("force_eager"), guard_calls(module, stop, contexts=False):
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
