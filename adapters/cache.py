"""The cache adapter: mounts cache-dit's DBCache on a transformer and manages its context.

Everything that touches cache-dit lives here; ``lifecycle`` only calls this class.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
import weakref
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from adapters import versions
from adapters.errors import InvalidOptions, UnsupportedForCache


@dataclass(frozen=True)
class CacheSummary:
    """What cache-dit did in the current context.

    Args:
        cached_steps: steps served from the cache.
        executed_steps: steps the transformer computed.
        cached_step_indices: which steps were served from the cache.
        cfg_cached_steps: cached steps of the separate CFG branch.
        contexts: how many cache contexts the module has.
        config: the live config, as plain data.

    Example::

        summary = CacheDitAdapter().summary(pipe.transformer)
        print(summary.cached_steps, summary.executed_steps)
    """

    cached_steps: int = 0
    executed_steps: int = 0
    cached_step_indices: tuple[int, ...] = ()
    cfg_cached_steps: int = 0
    contexts: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The summary as plain data (what ``stats()["cache"]`` shows).

        Example::

            CacheSummary(cached_steps=3).as_dict()["cached_steps"]     # 3
        """
        return dataclasses.asdict(self)


# Fields of a steered warm-up context: cache from the 2nd step on, never twice in a row, so a
# warm-up of any length reaches both cache-dit's cached-step branch and its post-warm-up compute
# branch. Fn/Bn (which decide the graphs' shapes) are kept from the user's config.
_WARMUP_STEERING: dict[str, Any] = {
    "max_warmup_steps": 1,
    "warmup_interval": 1,
    "residual_diff_threshold": 1.0e9,
    "max_accumulated_residual_diff_threshold": None,
    "max_cached_steps": -1,
    "max_continuous_cached_steps": 1,
    # Far beyond any warm-up, so the context never wraps back to its warm-up steps mid-way.
    "num_inference_steps": 1_000_000,
    "steps_computation_mask": None,
    "steps_computation_policy": "dynamic",
    "force_refresh_step_hint": None,
}
# Steps a steered context must execute to have run: warm-up compute, cached, compute again.
WARMUP_STEPS_TO_COVER = 3


def _cache_dit() -> Any:
    import cache_dit  # imported on first use: it is heavy and logs at import

    return cache_dit


# What a mount changed outside cache-dit's own bookkeeping: cache-dit's patch functors (Chroma,
# HiDream, DiT, HunyuanDiT, ...) replace ``forward`` on the transformer and on its blocks and
# mark the transformer ``_is_patched``; ``disable_cache`` undoes neither. Recorded per module
# before each mount (weakly: no module is kept alive) so ``unmount`` restores them all.
_MISSING = object()
_PATCH_ATTRIBUTES = ("forward", "_is_patched", "_block_id")
# The submodules are held weakly: a value that referenced its key (the module is its own first
# submodule) would keep the entry, and the module, alive forever.
_PREMOUNT: weakref.WeakKeyDictionary[
    nn.Module, list[tuple[weakref.ref[nn.Module], dict[str, Any]]]
] = weakref.WeakKeyDictionary()


def _snapshot(module: nn.Module) -> list[tuple[weakref.ref[nn.Module], dict[str, Any]]]:
    return [
        (weakref.ref(sub), {name: vars(sub).get(name, _MISSING) for name in _PATCH_ATTRIBUTES})
        for sub in module.modules()
    ]


def _from_cache_dit(value: Any) -> bool:
    function = getattr(value, "__func__", value)
    return str(getattr(function, "__module__", "")).startswith("cache_dit")


def _restore_patched(module: nn.Module) -> None:
    """Put back what patch functors replaced; without a snapshot (a mount made by the host),
    drop the instance attributes that cache-dit installed."""
    snapshot = _PREMOUNT.pop(module, None)
    if snapshot is None:
        for sub in module.modules():
            for name in _PATCH_ATTRIBUTES:
                value = vars(sub).get(name, _MISSING)
                if value is not _MISSING and (name != "forward" or _from_cache_dit(value)):
                    delattr(sub, name)
        return
    for sub_ref, before in snapshot:
        alive = sub_ref()
        if alive is None:
            continue
        for name, value in before.items():
            if value is _MISSING:
                if name in vars(alive):
                    delattr(alive, name)
            else:
                setattr(alive, name, value)


class CacheDitAdapter:
    """cache-dit's transformer-only API: ``enable_cache``, ``refresh_context``, ``disable_cache``,
    ``summary``. One instance serves any number of modules; it holds no per-module state.

    ``pipeline_class`` (optional, e.g. ``"StableDiffusion3Pipeline"``) is the name of the
    pipeline the modules come from: cache-dit registers some families only under the pipeline's
    name (StableDiffusion3 for ``SD3Transformer2DModel``), so a transformer no adapter matches by
    its own class name is mounted through the adapter registered for its pipeline.
    ``PipelineLifecycle.from_diffusers`` passes it.

    Args:
        pipeline_class: the diffusers pipeline's class name; None to match by the module alone.

    Example::

        cache = CacheDitAdapter(pipeline_class="StableDiffusion3Pipeline")
        config = cache.validate_config(cache.make_config(residual_diff_threshold=0.12))
        lc = ModuleLifecycle(pipe.transformer, cache_adapter=cache, cache_config=config)
    """

    name = "cache-dit"

    def __init__(self, pipeline_class: str | None = None) -> None:
        self.pipeline_class = pipeline_class

    def _registered(self, module: nn.Module) -> tuple[str, bool] | None:
        """The cache-dit registry prefix that serves ``module``, and whether it matched the
        module's own class name (else the pipeline's)."""
        register = _cache_dit().BlockAdapterRegister
        for owner, by_module in ((type(module).__name__, True), (self.pipeline_class, False)):
            if owner:
                for prefix in register._adapters:
                    if owner.startswith(prefix):
                        return prefix, by_module
        return None

    def _family(self, module: nn.Module) -> str:
        owner = f" (pipeline {self.pipeline_class})" if self.pipeline_class else ""
        return f"{type(module).__name__}{owner}"

    def _separate_cfg(self, module: nn.Module) -> bool:
        """Whether cache-dit lists this family (by pipeline or transformer class name) among
        those that run classifier-free guidance as separate cond/uncond transformer calls."""
        prefixes = _cache_dit().BlockAdapterRegister._predefined_adapters_has_separate_cfg
        owners = [name for name in (self.pipeline_class, type(module).__name__) if name]
        return any(owner.startswith(prefix) for owner in owners for prefix in prefixes)

    def _block_adapter(self, module: nn.Module, prefix: str, **kwargs: Any) -> Any:
        """cache-dit's registered adapter ``prefix`` built around ``module`` alone."""
        from cache_dit.caching.block_adapters import FakeDiffusionPipeline

        factory = _cache_dit().BlockAdapterRegister._adapters[prefix]
        return factory(FakeDiffusionPipeline(module), **kwargs)

    def version(self) -> str:
        """The installed cache-dit's version (part of the compile-artifact key).

        Example::

            CacheDitAdapter().version()     # "1.5.3"
        """
        return versions.cache_dit_version()

    def default_config(self) -> Any:
        """``cache_dit.DBCacheConfig()``: the config a lifecycle built with ``cache_config=None`` uses.

        Example::

            config = CacheDitAdapter().default_config()
        """
        return _cache_dit().DBCacheConfig()

    def make_config(self, **fields: Any) -> Any:
        """A ``cache_dit.DBCacheConfig`` with ``fields`` (for hosts that do not import cache-dit).

        Args:
            **fields: ``DBCacheConfig``'s own fields (``Fn_compute_blocks``, ...).

        Raises:
            TypeError: a field ``DBCacheConfig`` does not have.

        Example::

            config = CacheDitAdapter().make_config(Fn_compute_blocks=8, residual_diff_threshold=0.12)
        """
        return _cache_dit().DBCacheConfig(**fields)

    def validate_config(self, config: Any) -> Any:
        """Return a private copy of ``config``; refuse anything that is not a DBCacheConfig.

        Args:
            config: a ``cache_dit.DBCacheConfig``; None for ``default_config()``.

        Raises:
            InvalidOptions: not a cache-dit config, a field of the wrong type, or a bad step count.

        Example::

            config = CacheDitAdapter().validate_config(cache_dit.DBCacheConfig())
        """
        cache_dit = _cache_dit()
        if config is None:
            return self.default_config()
        if not isinstance(config, cache_dit.BasicCacheConfig):
            raise InvalidOptions(
                f"cache_config must be a cache_dit.DBCacheConfig, got {type(config).__name__}; "
                "build one with cache_dit.DBCacheConfig(Fn_compute_blocks=..., "
                "residual_diff_threshold=...)"
            )
        check_field_types(config)
        steps = config.num_inference_steps
        if steps is not None and (not isinstance(steps, int) or steps <= 0):
            raise InvalidOptions(f"cache_config.num_inference_steps must be a positive int, got {steps!r}")
        return copy.deepcopy(config)

    def validate_for_module(self, module: nn.Module, config: Any) -> None:
        """Refuse, at construction, a config whose ``Fn_compute_blocks + Bn_compute_blocks``
        exceed a block list of the module (cache-dit asserts only during the first call).

        Args:
            module: the transformer.
            config: the validated config.

        Raises:
            InvalidOptions: ``Fn_compute_blocks + Bn_compute_blocks`` exceed a block list.

        Example::

            cache.validate_for_module(pipe.transformer, cache.make_config(Fn_compute_blocks=8))
        """
        fn = getattr(config, "Fn_compute_blocks", 0) or 0
        bn = getattr(config, "Bn_compute_blocks", 0) or 0
        lists = {
            name: len(child) for name, child in module.named_children()
            if isinstance(child, nn.ModuleList) and "blocks" in name and len(child) > 0
        }
        if not lists or fn + bn <= min(lists.values()):
            return
        name, count = min(lists.items(), key=lambda item: item[1])
        raise InvalidOptions(
            f"cache_config Fn_compute_blocks={fn} + Bn_compute_blocks={bn} = {fn + bn} exceed the "
            f"{count} blocks of {type(module).__name__}.{name}; choose Fn_compute_blocks + "
            f"Bn_compute_blocks <= {count}"
        )

    def check_supported(self, module: nn.Module) -> None:
        """Refuse, before anything is installed, a module cache-dit cannot wrap: no registered
        adapter matches it (nor its pipeline), or the matching adapter rejects its structure.

        Args:
            module: the transformer.

        Raises:
            UnsupportedForCache: cache-dit cannot wrap it; the message names the way out.

        Example::

            CacheDitAdapter().check_supported(pipe.transformer)
        """
        way_out = (
            "describe its blocks with cache_dit.BlockAdapter(transformer=..., blocks=..., "
            "forward_pattern=...) and mount that, or use LifecyclePolicy(cache_dit=False)"
        )
        registered = self._registered(module)
        if registered is None:
            raise UnsupportedForCache(
                f"cache-dit has no registered adapter for {self._family(module)}; {way_out}"
            )
        prefix, _ = registered
        try:
            self._block_adapter(module, prefix, skip_post_init=True)
        except Exception as exc:
            raise UnsupportedForCache(
                f"cache-dit's registered {prefix!r} adapter cannot wrap {self._family(module)} "
                f"({type(exc).__name__}: {exc}); {way_out}"
            ) from exc

    def is_mounted(self, module: nn.Module) -> bool:
        """Whether cache-dit is mounted on ``module`` (by this adapter or by the host).

        Args:
            module: the transformer.

        Example::

            CacheDitAdapter().is_mounted(pipe.transformer)     # False before mount()
        """
        return bool(getattr(module, "_is_cached", False))

    def mount(self, module: nn.Module, config: Any) -> None:
        """Mount DBCache on ``module`` with a private copy of ``config``; cache-dit replaces
        ``forward`` on the instance. A mount that fails leaves nothing installed.

        Args:
            module: the transformer.
            config: a validated ``DBCacheConfig`` (copied).

        Raises:
            UnsupportedForCache: cache-dit has no adapter for the module's family.

        Example::

            cache = CacheDitAdapter()
            cache.mount(pipe.transformer, cache.default_config())
        """
        self.check_supported(module)
        prefix, by_module = self._registered(module) or ("", True)
        config = copy.deepcopy(config)
        if getattr(config, "enable_separate_cfg", None) is None and self._separate_cfg(module):
            # cache-dit decides this from the pipeline's class name, which a transformer-only
            # mount hides from it (Lumina2 would count each cond/uncond call as a step).
            config.enable_separate_cfg = True
        _PREMOUNT[module] = _snapshot(module)
        try:
            # Matched by the module's own class: cache-dit builds the same adapter itself.
            target = module if by_module else self._block_adapter(module, prefix)
            versions.forget_fake_pipeline_flag()  # older cache-dit releases: see adapters.versions
            _cache_dit().enable_cache(target, cache_config=config)
        except BaseException:
            self.unmount(module)  # never leave half-installed hooks behind
            raise

    def refresh(self, module: nn.Module, config: Any, num_inference_steps: int | None = None) -> None:
        """A fresh context from ``config`` (never cache-dit's defaults), optionally re-stepped.

        Args:
            module: a mounted transformer.
            config: the config the context takes (copied).
            num_inference_steps: the request's step count; None keeps the config's.

        Example::

            cache.refresh(pipe.transformer, config, num_inference_steps=28)
        """
        fresh = copy.deepcopy(config)
        if num_inference_steps is not None:
            fresh.num_inference_steps = num_inference_steps
        # The config is live on the contexts first: should the rebuild below fail (after a
        # warm-up, say), the contexts still decide with this config, never a steered one.
        for context in self._contexts(module):
            if hasattr(context, "cache_config"):
                context.cache_config = copy.deepcopy(fresh)
        _cache_dit().refresh_context(module, cache_config=fresh)

    def refresh_for_warmup(self, module: nn.Module, config: Any) -> None:
        """A context steered so that any warm-up reaches the cached-step branch.

        Args:
            module: a mounted transformer.
            config: the user's config; its ``Fn``/``Bn`` blocks are kept.

        Example::

            cache.refresh_for_warmup(pipe.transformer, config)
            pipe(prompt, num_inference_steps=4)
            cache.warmup_covered(pipe.transformer)     # True
        """
        steered = copy.deepcopy(config)
        for key, value in _WARMUP_STEERING.items():
            if hasattr(steered, key):
                setattr(steered, key, value)
        if config.num_inference_steps is None:
            # cache-dit's refresh skips None fields, so a step count set here could never be
            # taken back; without one the context does not wrap anyway.
            steered.num_inference_steps = None
        _cache_dit().refresh_context(module, cache_config=steered)

    def unmount(self, module: nn.Module) -> None:
        """Remove cache-dit's hooks and restore every ``forward`` it or its patch functors
        replaced: the module then runs exactly as before the mount.

        Args:
            module: the transformer (not mounted: nothing happens).

        Example::

            cache.unmount(pipe.transformer)
        """
        if hasattr(module, "_original_forward") or self.is_mounted(module):
            _cache_dit().disable_cache(module)
        # cache-dit restores forward as an instance attribute; drop it so the class's forward
        # (and anything patched on the class later) is what runs.
        if "forward" in vars(module) and not hasattr(module, "_original_forward"):
            del module.forward
        _restore_patched(module)

    def _contexts(self, module: nn.Module) -> list[Any]:
        manager = getattr(module, "_context_manager", None)
        names = getattr(module, "_context_names", None) or []
        if manager is None:
            return []
        return [manager.get_context(name) for name in names]

    def summary(self, module: nn.Module) -> CacheSummary:
        """Counts of the current context(s), read live.

        cache-dit's own ``summary()`` shows stats it copies onto the module only when an
        inference of ``num_inference_steps`` ends; a request of another length, or a steered
        warm-up, never gets there. The live contexts always know.

        Args:
            module: the transformer; not mounted: an empty ``CacheSummary``.

        Example::

            cache.summary(pipe.transformer).cached_steps
        """
        contexts = self._contexts(module) if self.is_mounted(module) else []
        if not contexts:
            return CacheSummary()
        first = contexts[0]
        return CacheSummary(
            cached_steps=max(c.get_accumulated_cached_steps() for c in contexts),
            executed_steps=max(c.get_accumulated_executed_steps() for c in contexts),
            cached_step_indices=tuple(first.get_cached_steps()),
            cfg_cached_steps=max(c.get_cfg_accumulated_cached_steps() for c in contexts),
            contexts=len(contexts),
            config=_config_summary(first.cache_config),
        )

    def warmup_covered(self, module: nn.Module) -> bool:
        """Whether the steered context has run the cached branch and computed after it.

        Args:
            module: the transformer, after a warm-up under ``refresh_for_warmup``.

        Example::

            covered = cache.warmup_covered(pipe.transformer)
        """
        summary = self.summary(module)
        return summary.cached_steps >= 1 and summary.executed_steps >= WARMUP_STEPS_TO_COVER

    def describe_config(self, config: Any) -> dict[str, Any]:
        """``config`` as plain data for the audit (the mount event's ``cache_config``).

        Args:
            config: a ``DBCacheConfig``.

        Example::

            cache.describe_config(cache.default_config())["residual_diff_threshold"]
        """
        return _config_summary(config)


def check_field_types(config: Any) -> None:
    """Each field of a cache-dit config dataclass against its declared type, before any work
    (a wrong-typed field otherwise fails inside the first warm-up call)."""
    if not dataclasses.is_dataclass(config):
        return
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if not _matches(value, item.type):
            raise InvalidOptions(
                f"cache_config.{item.name} must be {_type_name(item.type)}, got "
                f"{type(value).__name__} {value!r}"
            )


def _matches(value: Any, declared: Any) -> bool:
    origin = typing.get_origin(declared)
    if declared is Any or isinstance(declared, str) or isinstance(declared, typing.TypeVar):
        return True  # unresolved annotation: nothing to check against
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, arg) for arg in typing.get_args(declared))
    if declared is type(None):
        return value is None
    if origin in (list, tuple, set, frozenset):
        args = [a for a in typing.get_args(declared) if a is not Ellipsis]
        if not isinstance(value, origin):
            return False
        return all(_matches(v, args[0]) for v in value) if args else True
    if origin is not None:
        return isinstance(value, origin)
    if not isinstance(declared, type):
        return True
    if declared is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if declared is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, declared)


def _type_name(declared: Any) -> str:
    if typing.get_origin(declared) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(declared))
    if typing.get_origin(declared) is None and isinstance(declared, type):
        return "None" if declared is type(None) else declared.__name__
    return str(declared).replace("typing.", "")


def _config_summary(config: Any) -> dict[str, Any]:
    keys = (
        "Fn_compute_blocks",
        "Bn_compute_blocks",
        "residual_diff_threshold",
        "max_warmup_steps",
        "max_cached_steps",
        "max_continuous_cached_steps",
        "num_inference_steps",
    )
    summary: dict[str, Any] = {"type": type(config).__name__}
    for key in keys:
        value: Any = getattr(config, key, None)
        summary[key] = float(value) if hasattr(value, "item") else value
    return summary
