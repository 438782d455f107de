"""How a lifecycle compiles and how it serves: frozen, typed values checked at construction.

``compile_options`` stays what the host wrote, torch.compile's own keyword arguments, and is
passed to torch unchanged. Everything the library itself decides about compiling lives in a
``CompilePlan``, everything about serving in a ``ServingPolicy``. What a warm-up later decides
(dynamic dims and their bounds) is recorded in the lifecycle's stats and coverage, never written
back here: two lifecycles built with identical arguments stay identical.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, overload

from lifecycle._errors import InvalidConfigError, UnsupportedModuleError
from states import LifecyclePolicy, State, Trigger

if TYPE_CHECKING:
    from torch import nn

    from adapters import BackendAdapter
    from adapters.protocols import CacheAdapter
    from adapters.store import PackageStore

Scope = Literal["model", "blocks"]
OnUnwarmed = Literal["eager", "fail", "compile"]
WhileBuilding = Literal["wait", "serve_jit"]
SCOPES: tuple[str, ...] = ("model", "blocks")
ON_UNWARMED: tuple[str, ...] = ("eager", "fail", "compile")
WHILE_BUILDING: tuple[str, ...] = ("wait", "serve_jit")


def _check_bool(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidConfigError(f"{owner}({name}=...) must be True or False, got {value!r}")


def _check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise InvalidConfigError(f"{owner}({name}=...) must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class CompilePlan:
    """How to compile.

    - ``scope="model"``: ``torch.compile`` the whole module in place. ``"blocks"``: compile each
      repeated block (diffusers' ``_repeated_blocks``, else the items of an ``nn.ModuleList`` of
      identical blocks) in place; cache-dit's wrappers and the model's own code stay eager.
    - ``ahead_of_time``: with ``scope="blocks"``, export and AOTInductor-compile each block class
      once, with the dims that differ between the declared buckets dynamic within their range;
      a restart with ``artifact_dir`` loads the packages (no dynamo, no compile).
    - ``reproducible``: bit-identical outputs across processes and restarts (inductor's
      deterministic mode, for this module's compile only).

    Args:
        scope: ``"model"`` or ``"blocks"``.
        ahead_of_time: export and AOTInductor-compile the blocks (needs ``scope="blocks"``).
        reproducible: bit-identical outputs across processes and restarts.

    Raises:
        InvalidConfigError: a bad value, here at construction.

    Example::

        plan = CompilePlan(scope="blocks", ahead_of_time=True)
        lc = ModuleLifecycle(transformer, compile_plan=plan, artifact_dir="/var/cache/dit")
        lc.prepare(run, shapes=[{"height": 1024, "width": 1024}])
    """

    scope: Scope = "model"
    ahead_of_time: bool = False
    reproducible: bool = False

    def __post_init__(self) -> None:
        _check_choice("CompilePlan", "scope", self.scope, SCOPES)
        _check_bool("CompilePlan", "ahead_of_time", self.ahead_of_time)
        _check_bool("CompilePlan", "reproducible", self.reproducible)
        if self.ahead_of_time and self.scope != "blocks":
            raise InvalidConfigError(
                "CompilePlan(ahead_of_time=True) compiles the repeated blocks ahead of time and "
                "needs scope='blocks': use CompilePlan(scope='blocks', ahead_of_time=True)"
            )

    def as_dict(self) -> dict[str, Any]:
        """The plan as the audit and the artifact key record it."""
        return {"scope": self.scope, "ahead_of_time": self.ahead_of_time, "reproducible": self.reproducible}


@dataclass(frozen=True)
class ServingPolicy:
    """How to serve.

    - ``on_unwarmed``: what a request at a shape no warm-up covered does. ``"eager"`` runs this
      module's eager path (nothing compiles, and nothing else in the process changes);
      ``"fail"`` raises ``UnwarmedShapeError`` before the transformer runs; ``"compile"``
      compiles inline, audited as a recompile. ``request(..., on_unwarmed=...)`` overrides it
      for one request.
    - ``share_bucket_graphs``: two or more buckets declared before the compile share dynamic
      graphs (one compile for all of them), unless ``compile_options`` sets ``dynamic`` itself.
    - ``measure_paths``: after warm-up, time each bucket compiled and eager, and serve it on
      the faster path.
    - ``while_building``: what a replica does while another replica of the fleet holds the build
      lease of its ahead-of-time packages (``CompilePlan(ahead_of_time=True)`` with
      ``artifact_dir``). ``"wait"``: the compile waits for the packages (up to ``build_wait_s``)
      and the replica is not ready meanwhile. ``"serve_jit"``: the blocks are compiled just in
      time, so the replica reaches WarmedUp and serves; a background thread watches the store
      (up to ``build_wait_s``) and, once the packages are published and checked, the next request
      to start switches the blocks to them (audited ``lifecycle.artifacts`` ``switched``; a
      request already running finishes just in time). A wait that ends without packages is
      audited (``timeout``, ``switch_abandoned``) and the replica stays just in time. Such a
      replica never builds the packages itself. Refused at construction without an
      ahead-of-time plan, compile on, and ``artifact_dir``.

    Args:
        on_unwarmed: ``"eager"``, ``"fail"`` or ``"compile"``.
        share_bucket_graphs: share dynamic graphs between buckets declared before the compile.
        measure_paths: time each bucket compiled and eager, and serve the faster.
        while_building: ``"wait"`` or ``"serve_jit"``.

    Raises:
        InvalidConfigError: a bad value, here at construction.

    Example::

        lc = ModuleLifecycle(transformer, serving=ServingPolicy(on_unwarmed="fail"))
        lc.prepare(run, shapes=[{"height": 1024, "width": 1024}])
    """

    on_unwarmed: OnUnwarmed = "eager"
    share_bucket_graphs: bool = True
    measure_paths: bool = False
    while_building: WhileBuilding = "wait"

    def __post_init__(self) -> None:
        _check_choice("ServingPolicy", "on_unwarmed", self.on_unwarmed, ON_UNWARMED)
        _check_bool("ServingPolicy", "share_bucket_graphs", self.share_bucket_graphs)
        _check_bool("ServingPolicy", "measure_paths", self.measure_paths)
        _check_choice("ServingPolicy", "while_building", self.while_building, WHILE_BUILDING)

    def as_dict(self) -> dict[str, Any]:
        """The policy as the audit records it."""
        return {
            "on_unwarmed": self.on_unwarmed,
            "share_bucket_graphs": self.share_bucket_graphs,
            "measure_paths": self.measure_paths,
            "while_building": self.while_building,
        }


def check_steps(steps: object, *, module: str, state: State, trigger: Trigger) -> None:
    """A step count (``num_inference_steps``): None, or a positive int."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
        raise InvalidConfigError(
            f"{module}: num_inference_steps must be a positive int, got {steps!r}",
            module=module, state=state, trigger=trigger,
        )


def check_on_unwarmed(value: object, *, module: str) -> OnUnwarmed:
    """A per-request override of ``ServingPolicy.on_unwarmed``."""
    if not isinstance(value, str) or value not in ON_UNWARMED:
        raise InvalidConfigError(
            f"{module}: on_unwarmed must be one of {list(ON_UNWARMED)}, got {value!r}", module=module
        )
    return value  # type: ignore[return-value]


# compile_options keys that earlier versions took for the library's own settings, and where each
# lives now: refused with the fix rather than silently passed to torch.compile.
MOVED_OPTIONS: dict[str, str] = {
    "regional": "compile_plan=CompilePlan(scope='blocks')",
    "reproducible": "compile_plan=CompilePlan(reproducible=True)",
    "dynamic_buckets": "serving=ServingPolicy(share_bucket_graphs=...)",
    "measure_paths": "serving=ServingPolicy(measure_paths=True)",
}


def check_not_moved(options: object, *, module: str) -> None:
    """Refuse a library setting passed as a torch.compile argument, naming where it lives now."""
    if not isinstance(options, Mapping):
        return
    for key, fix in MOVED_OPTIONS.items():
        if key in options:
            raise InvalidConfigError(
                f"{module}: compile_options holds torch.compile's own arguments only; {key!r} is "
                f"a lifecycle setting: pass {fix}",
                module=module,
            )


@dataclass(frozen=True, eq=False)
class LifecycleConfig:
    """A ``ModuleLifecycle``'s constructor arguments, checked (``check_lifecycle_arguments``):
    the lifecycle applies them as they are. ``compile_options`` is the host's mapping copied once;
    ``torch_options`` is the backend's validated copy with its defaults."""

    name: str
    policy: LifecyclePolicy
    compile_plan: CompilePlan
    serving: ServingPolicy
    backend: BackendAdapter
    cache: CacheAdapter
    compile_options: dict[str, Any]
    torch_options: dict[str, Any]
    cache_config: Any
    artifact_dir: str | os.PathLike[str] | None
    # The artifact store opened from artifact_dir and its options (None without artifact_dir).
    store: PackageStore | None = None
    build_wait_s: float = 600.0

    def drives_alike(self, other: LifecycleConfig) -> bool:
        """Whether two lifecycles would drive one module the same way (and may share it)."""
        return (
            other.policy == self.policy
            and other.compile_plan == self.compile_plan
            and other.serving == self.serving
            and type(other.cache) is type(self.cache)
            and _same(other.cache_config, self.cache_config)
            and _same(other.compile_options, self.compile_options)
        )


def check_lifecycle_arguments(
    module: object,
    name: object,
    policy: object,
    backend: object,
    cache_config: Any,
    compile_options: object,
    *,
    compile_plan: object,
    serving: object,
    cache_adapter: object,
    artifact_dir: object,
    artifact_storage_options: object = None,
    artifact_signing_key: object = None,
    cache_dir: object = None,
    build_wait_s: object = 600.0,
) -> LifecycleConfig:
    """Every ``ModuleLifecycle`` argument checked before anything is built; the backend and
    the cache adapter validate what is theirs (options, plan, cache config, the module).

    Raises:
        InvalidConfigError: a bad argument (the message names it and the fix).
        UnsupportedModuleError: not an ``nn.Module``, or one the host compiled in place.
        BackendUnavailableError: the backend's runtime or device is missing.
    """
    # The adapters import torch: configuration types stay importable without it.
    from torch import nn

    from adapters import CacheDitAdapter, get_backend
    from adapters import _torch_internals as internals
    from adapters.errors import AdapterError
    from adapters.protocols import CacheAdapter
    from lifecycle._errors import translate_adapter_error

    if not isinstance(name, str) or not name:
        raise InvalidConfigError(f"name must be a non-empty str, got {name!r}")
    if not isinstance(module, nn.Module):
        raise UnsupportedModuleError(
            f"{name}: ModuleLifecycle manages a torch.nn.Module, got {type(module).__name__}; "
            "pass the transformer itself (e.g. pipe.transformer)",
            module=name,
        )
    loaded = State.LOADED
    policy = LifecyclePolicy() if policy is None else policy
    compile_plan = CompilePlan() if compile_plan is None else compile_plan
    serving = ServingPolicy() if serving is None else serving
    for value, kind, argument in (
        (policy, LifecyclePolicy, "policy"),
        (compile_plan, CompilePlan, "compile_plan"),
        (serving, ServingPolicy, "serving"),
    ):
        if not isinstance(value, kind):
            raise InvalidConfigError(
                f"{name}: {argument} must be a {kind.__name__}, got {type(value).__name__}",
                module=name, state=loaded,
            )
    assert isinstance(policy, LifecyclePolicy) and isinstance(compile_plan, CompilePlan)
    assert isinstance(serving, ServingPolicy)
    if artifact_dir is not None and not isinstance(artifact_dir, (str, os.PathLike)):
        raise InvalidConfigError(
            f"{name}: artifact_dir must be a directory path (str or PathLike), got "
            f"{type(artifact_dir).__name__}", module=name, state=loaded,
        )
    if artifact_dir is not None and not os.fspath(artifact_dir):
        raise InvalidConfigError(
            f"{name}: artifact_dir is empty (an unset environment variable?); pass a directory "
            "path to keep compile artifacts, or None to keep none",
            module=name, state=loaded,
        )
    store = open_artifact_store(
        name, artifact_dir, artifact_storage_options, artifact_signing_key, cache_dir
    )
    check_while_building(name, serving, policy, compile_plan, store)
    wait_s = check_build_wait(name, build_wait_s)
    check_not_moved(compile_options, module=name)
    try:
        internals.check()
        chosen = get_backend(backend)  # type: ignore[arg-type]  # the registry refuses a bad one
    except AdapterError as exc:
        raise translate_adapter_error(exc, module=name, state=loaded) from exc
    if cache_adapter is None:
        cache_adapter = CacheDitAdapter()
    elif not isinstance(cache_adapter, CacheAdapter):
        raise InvalidConfigError(
            f"{name}: cache_adapter must implement adapters.CacheAdapter (mount, refresh, "
            f"unmount, summary, ...), got {type(cache_adapter).__name__}; leave it None for "
            "cache-dit's",
            module=name, state=loaded,
        )
    try:
        # The host's mapping, copied once and never changed; the adapter applies its defaults
        # to its own copy.
        options: Any = (
            dict(compile_options or {})
            if isinstance(compile_options, Mapping) or compile_options is None else compile_options
        )
        torch_options = chosen.validate_options(options)
        if policy.compile:
            chosen.validate_plan(compile_plan, torch_options)
            chosen.validate_for_module(module, torch_options, compile_plan)
        checked_cache_config = cache_adapter.validate_config(cache_config) if policy.cache_dit else None
        check_for_module = getattr(cache_adapter, "validate_for_module", None)
        if policy.cache_dit and callable(check_for_module):
            check_for_module(module, checked_cache_config)
    except AdapterError as exc:
        raise translate_adapter_error(exc, module=name, state=loaded) from exc
    _refuse_host_compiled(module, name)
    return LifecycleConfig(
        name=name, policy=policy, compile_plan=compile_plan, serving=serving, backend=chosen,
        cache=cache_adapter, compile_options=options, torch_options=torch_options,
        cache_config=checked_cache_config, artifact_dir=artifact_dir, store=store,
        build_wait_s=wait_s,
    )


def open_artifact_store(
    name: str, artifact_dir: object, storage_options: object, signing_key: object, cache_dir: object
) -> PackageStore | None:
    """The artifact store ``artifact_dir`` names (a local path or an fsspec URL), opened with its
    options and checked without touching the network; None without ``artifact_dir``. The caller's
    options mapping is copied, never kept or changed.

    Raises:
        InvalidConfigError: naming the option or the extra (a malformed URL, an unknown protocol,
            fsspec or the protocol's package missing, no credentials, a bad signing key, options
            without ``artifact_dir``).
    """
    from adapters.errors import AdapterError
    from adapters.store import open_store
    from lifecycle._errors import translate_adapter_error

    loaded = State.LOADED
    if artifact_dir is None:
        given = [option for option, value in (
            ("artifact_storage_options", storage_options), ("artifact_signing_key", signing_key),
            ("cache_dir", cache_dir),
        ) if value is not None]
        if given:
            raise InvalidConfigError(
                f"{name}: {', '.join(given)} given without artifact_dir (they configure the "
                "artifact store); pass artifact_dir= (a local path or an fsspec URL such as "
                "'s3://bucket/prefix') or drop them",
                module=name, state=loaded,
            )
        return None
    try:
        return open_store(
            artifact_dir,  # type: ignore[arg-type]  # the location refuses a bad one
            storage_options=storage_options,  # type: ignore[arg-type]
            signing_key=signing_key,  # type: ignore[arg-type]
            cache_dir=cache_dir,  # type: ignore[arg-type]
        )
    except AdapterError as exc:
        raise translate_adapter_error(exc, module=name, state=loaded) from exc


def check_build_wait(name: str, value: object) -> float:
    """``build_wait_s``: seconds (finite, >= 0) a replica waits for another replica's build."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise InvalidConfigError(
            f"{name}: build_wait_s must be a finite number of seconds >= 0 (how long a replica "
            f"waits for another replica's build), got {value!r}",
            module=name, state=State.LOADED,
        )
    return float(value)


def check_while_building(
    name: str, serving: ServingPolicy, policy: LifecyclePolicy, plan: CompilePlan, store: object
) -> None:
    """``while_building="serve_jit"`` means something only for a replica that may wait on another
    replica's ahead-of-time build: refused elsewhere rather than silently ignored."""
    if serving.while_building == "wait":
        return
    missing = [what for what, ok in (
        ("compile on (LifecyclePolicy(compile=True))", policy.compile),
        ("compile_plan=CompilePlan(scope='blocks', ahead_of_time=True)", plan.ahead_of_time),
        ("artifact_dir= (the fleet's artifact store)", store is not None),
    ) if not ok]
    if missing:
        raise InvalidConfigError(
            f"{name}: ServingPolicy(while_building='serve_jit') serves just-in-time blocks while "
            "another replica builds the ahead-of-time packages, so it needs "
            f"{' and '.join(missing)}; pass them, or drop while_building (the default 'wait')",
            module=name, state=State.LOADED,
        )


def _refuse_host_compiled(module: nn.Module, name: str) -> None:
    """A module the host compiled in place is refused, never compiled or mounted over:
    mounting cache-dit now would leave that code on the unwrapped path."""
    from adapters import _torch_internals as internals
    from lifecycle._holds import COMPILED

    if COMPILED.holders(module):
        return  # compiled by another lifecycle: adopted at compile()
    if internals.is_compiled(module):
        raise UnsupportedModuleError(
            f"{name}: the module was already compiled in place by the host "
            "(module.compile() or a block's); the lifecycle compiles it itself, after mounting "
            "cache-dit. Pass it uncompiled (set module._compiled_call_impl = None), or do not "
            "manage it with a lifecycle",
            module=name, state=State.LOADED,
        )


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # e.g. configs holding tensors
        return False


_T = TypeVar("_T")


class Setting(Generic[_T]):
    """A read-only attribute of a lifecycle, served from its ``LifecycleConfig`` (``_config``)."""

    def __init__(self, doc: str = "") -> None:
        self.__doc__ = doc or None
        self._field = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._field = name

    @overload
    def __get__(self, lifecycle: None, owner: type) -> Setting[_T]: ...

    @overload
    def __get__(self, lifecycle: object, owner: type) -> _T: ...

    def __get__(self, lifecycle: object, owner: type) -> Any:
        return self if lifecycle is None else getattr(lifecycle._config, self._field)  # type: ignore[attr-defined]

    def __set__(self, lifecycle: object, value: object) -> None:
        raise AttributeError(f"{self._field} is read-only: construct a new lifecycle to change it")


__all__ = [
    "LifecycleConfig",
    "MOVED_OPTIONS",
    "ON_UNWARMED",
    "SCOPES",
    "WHILE_BUILDING",
    "CompilePlan",
    "OnUnwarmed",
    "Scope",
    "ServingPolicy",
    "WhileBuilding",
    "check_build_wait",
    "check_lifecycle_arguments",
    "check_not_moved",
    "check_on_unwarmed",
    "check_while_building",
    "open_artifact_store",
    "check_steps",
]
