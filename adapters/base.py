"""The one interface every backend adapter implements, and the torch.compile base they share."""

from __future__ import annotations

import inspect
import os
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from adapters import _torch_internals as internals
from adapters.compiler import Compiler, JitBlocksCompiler, JitModelCompiler
from adapters.errors import BackendUnavailable, InvalidOptions
from adapters.protocols import CompilePlanLike
from adapters.regional import check_regional_module, compile_regional, decompile_regional
from adapters.reproducible import audit_fields, torch_compile_kwargs, validate_reproducible

if TYPE_CHECKING:
    from adapters.store import PackageStore


def dynamo_graph_count() -> int:
    """Graphs dynamo has compiled in this process (torch's own counter, shared by all backends).

    Example::

        before = dynamo_graph_count()
        compiled(x)
        new_graphs = dynamo_graph_count() - before     # 0 once warm
    """
    return internals.graph_count()


class BackendAdapter(ABC):
    """Runs the compile for one device family.

    An adapter holds no per-module state: the lifecycle decides *when* to compile, the adapter
    decides *how* on its device. Third parties subclass this and register under the
    ``dit_lifecycle.backends`` entry-point group (see ``adapters.registry``).

    Contract, in the order the lifecycle uses it: ``is_available`` (cheap, never raises) and
    ``ensure_available`` (raises ``BackendUnavailable`` saying what to install) at construction;
    ``validate_options`` and ``validate_plan`` once, before any work; ``compile`` in place;
    ``graph_count`` before and after warm-up and each request, so its deltas count recompiles;
    ``synchronize`` before a clock is read; ``decompile`` on reset.

    ``options`` are torch.compile's own keyword arguments (never rewritten: an adapter applies
    its defaults to a copy); how to compile (whole model or blocks, ahead of time, reproducible)
    comes as a ``CompilePlanLike``.

    Example::

        adapter = get_backend("cpu")
        options = adapter.validate_options({"backend": "aot_eager"})
        adapter.compile(module, options, CompilePlan())
        adapter.decompile(module)      # eager again
    """

    name: ClassVar[str]
    device_type: ClassVar[str]

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """Whether the runtime and a device are present (cheap, never raises).

        Example::

            CudaAdapter.is_available()     # False on a machine without a GPU
        """

    @abstractmethod
    def ensure_available(self) -> None:
        """Raise ``BackendUnavailable`` saying what to install or attach, if not available.

        Raises:
            BackendUnavailable: the runtime or the device is missing.

        Example::

            CudaAdapter().ensure_available()     # raises on a CPU build of torch
        """

    @abstractmethod
    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check torch.compile's arguments before any work; return them as the adapter will
        use them (a copy, its defaults applied; the caller's mapping is never changed).

        Args:
            options: torch.compile's keyword arguments (``mode``, ``fullgraph``, ``backend``, ...).

        Raises:
            InvalidOptions: an unknown key or a bad value; names the accepted ones.

        Example::

            CpuAdapter().validate_options({"fullgraph": True})
            # {"backend": "inductor", "fullgraph": True}
        """

    def validate_plan(self, plan: CompilePlanLike, options: Mapping[str, Any]) -> None:
        """Refuse a plan this backend cannot run (``InvalidOptions`` naming the fix). The
        default runs whole-model and per-block compiles, not ahead-of-time ones.

        Args:
            plan: how to compile (``lifecycle.CompilePlan``).
            options: the validated options.

        Raises:
            InvalidOptions: the plan needs what this backend lacks.

        Example::

            NpuAdapter().validate_plan(CompilePlan(scope="blocks", ahead_of_time=True), {})  # raises
        """
        if plan.ahead_of_time:
            raise InvalidOptions(
                f"backend {self.name!r} does not compile ahead of time; use "
                "CompilePlan(scope='blocks') (just-in-time), or a backend that does"
            )

    @abstractmethod
    def compile(self, module: nn.Module, options: Mapping[str, Any], plan: CompilePlanLike) -> None:
        """Compile ``module`` in place with validated ``options``, as ``plan`` says.

        Args:
            module: the ``nn.Module`` to compile; the host's reference stays valid.
            options: what ``validate_options`` returned.
            plan: how to compile (``lifecycle.CompilePlan``).

        Example::

            adapter.compile(module, adapter.validate_options({}), CompilePlan(scope="blocks"))
        """

    def compiler(
        self, plan: CompilePlanLike, options: Mapping[str, Any],
        artifact_dir: str | os.PathLike[str] | PackageStore | None, *, build_wait_s: float = 600.0,
        while_building: str = "wait",
    ) -> Compiler:
        """The one compiler a lifecycle calls, configured from ``plan`` and validated ``options``
        (see ``adapters.compiler``). ``artifact_dir`` is a local path or an opened artifact store
        (``adapters.store``): ahead-of-time packages are loaded from it, or built once per fleet
        under its lease while other replicas wait up to ``build_wait_s`` (``while_building="wait"``)
        or serve just-in-time blocks meanwhile (``"serve_jit"``). The default compiles
        just in time through ``compile`` and ``decompile``; ``validate_plan`` has refused what
        this backend cannot run.

        Raises:
            InvalidOptions: ``options`` have no meaning for the compiler the plan picks.

        Example::

            compiler = adapter.compiler(CompilePlan(scope="blocks"), options, None)
        """
        if plan.scope == "blocks":
            return JitBlocksCompiler(self.compile, self.decompile, plan)
        return JitModelCompiler(self.compile, self.decompile, plan)

    @abstractmethod
    def decompile(self, module: nn.Module) -> None:
        """Drop what ``compile`` installed; the module runs eagerly again.

        Args:
            module: a module ``compile`` compiled (anything else is left as it is).

        Example::

            adapter.decompile(module)
        """

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for queued device work, so that timings mean something.

        Example::

            start = time.perf_counter()
            module(x)
            adapter.synchronize()
            seconds = time.perf_counter() - start
        """

    def validate_for_module(
        self, module: nn.Module, options: Mapping[str, Any], plan: CompilePlanLike
    ) -> None:
        """Check validated ``options`` and ``plan`` against the module itself, at construction
        (e.g. compiling blocks needs repeated blocks). The default accepts all.

        Args:
            module: the module the lifecycle will compile.
            options: the validated options.
            plan: how to compile (``lifecycle.CompilePlan``).

        Raises:
            InvalidOptions: the module cannot be compiled as asked.

        Example::

            adapter.validate_for_module(transformer, options, CompilePlan(scope="blocks"))
        """
        return None

    def graph_count(self) -> int:
        """Monotonic count of graphs compiled in this process; its deltas count recompiles.

        Example::

            before = adapter.graph_count()
            module(x)
            recompiled = adapter.graph_count() > before
        """
        return dynamo_graph_count()

    def describe(self) -> dict[str, Any]:
        """What the audit records about this backend.

        Example::

            get_backend("cpu").describe()["backend"]     # "cpu"
        """
        return {"backend": self.name, "device_type": self.device_type}

    def reproducibility(self, plan: CompilePlanLike, options: Mapping[str, Any]) -> dict[str, Any] | None:
        """What the compile transition's audit records about ``reproducible=True`` (None: off or
        not supported by this backend).

        Args:
            plan: how to compile (``lifecycle.CompilePlan``).
            options: the validated options.

        Example::

            adapter.reproducibility(CompilePlan(reproducible=True), options)
        """
        return None


# torch.compile's keyword arguments, read from its signature so a torch upgrade is picked up.
TORCH_COMPILE_KEYS = frozenset(
    name for name in inspect.signature(torch.compile).parameters if name != "model"
)
# Inductor's modes; None and "default" are the same.
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_BOOL_KEYS = ("fullgraph", "disable")


class TorchCompileAdapter(BackendAdapter):
    """``nn.Module.compile()`` in place, for every torch device family.

    In place rather than wrapping: ``nn.Module.compile()`` keeps the object the host already
    holds (``pipe.transformer`` keeps working), and it compiles ``_call_impl``, which calls
    ``self.forward`` at run time. cache-dit mounts by replacing ``forward`` on the instance, so
    the compiled code traces cache-dit's wrapped forward when the cache is mounted first, and
    ``decompile`` (``_compiled_call_impl = None``) returns exactly the eager module. A
    ``torch.compile(module)`` wrapper would be a new object the pipeline does not reference, and
    compiling ``module.forward`` would capture the forward of the moment, missing cache-dit's.

    Subclasses set ``name`` and ``device_type`` and implement ``is_available`` and
    ``synchronize``.

    Example::

        adapter = CpuAdapter()      # a TorchCompileAdapter
        adapter.compile(module, adapter.validate_options({"backend": "aot_eager"}), CompilePlan())
        module(x)                   # the host's own object, compiled in place
    """

    default_backend: ClassVar[str] = "inductor"
    modes: ClassVar[tuple[str, ...]] = INDUCTOR_MODES

    def accepted_keys(self) -> frozenset[str]:
        """The compile_options keys this backend takes (torch.compile's own).

        Example::

            "fullgraph" in CpuAdapter().accepted_keys()     # True
        """
        return TORCH_COMPILE_KEYS

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(options, Mapping):
            raise InvalidOptions(
                f"compile_options must be a dict of torch.compile keyword arguments, "
                f"got {type(options).__name__}"
            )
        allowed = self.accepted_keys()
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise InvalidOptions(
                f"unknown compile_options {unknown} for backend {self.name!r}: compile_options "
                f"holds torch.compile's own arguments only; accepted: {sorted(allowed)}"
            )
        merged = {"backend": self.default_backend, **options}
        check_option_types(merged)
        backend = merged["backend"]
        if isinstance(backend, str):
            known = internals.dynamo_backends()
            if backend not in known:
                raise InvalidOptions(
                    f"unknown torch.compile backend {backend!r}; available: {sorted(known)}"
                )
        elif not callable(backend):
            raise InvalidOptions(f"compile backend must be a name or a callable, got {backend!r}")
        mode = merged.get("mode")
        if mode is not None and mode not in self.modes:
            raise InvalidOptions(f"unknown compile mode {mode!r}; accepted: {list(self.modes)}")
        for key in ("mode", "options"):
            if merged.get(key) is not None and backend != "inductor":
                raise InvalidOptions(
                    f"compile option {key}={merged[key]!r} is an inductor option; drop it or use "
                    "backend 'inductor'"
                )
        if merged.get("mode") is not None and merged.get("options") is not None:
            raise InvalidOptions("torch.compile takes mode or options, not both; drop one of them")
        return merged

    def validate_plan(self, plan: CompilePlanLike, options: Mapping[str, Any]) -> None:
        if plan.ahead_of_time:
            if self.device_type not in ("cpu", "cuda"):
                raise InvalidOptions(
                    f"backend {self.name!r} does not compile ahead of time (AOTInductor builds CPU "
                    "and CUDA code); use CompilePlan(scope='blocks') on this backend"
                )
            if options.get("backend", "inductor") != "inductor":
                raise InvalidOptions(
                    f"CompilePlan(ahead_of_time=True) compiles with AOTInductor; compile_options "
                    f"backend={options.get('backend')!r} does not apply: drop it or use 'inductor'"
                )
        validate_reproducible(plan.reproducible, options)

    def validate_for_module(
        self, module: nn.Module, options: Mapping[str, Any], plan: CompilePlanLike
    ) -> None:
        if plan.scope == "blocks":
            check_regional_module(module)

    def torch_options(self, options: Mapping[str, Any], plan: CompilePlanLike) -> dict[str, Any]:
        """torch.compile's keyword arguments for this compile (a new dict).

        Args:
            options: the validated options.
            plan: how to compile; ``reproducible`` adds inductor's deterministic settings.

        Example::

            adapter.torch_options(adapter.validate_options({}), CompilePlan())
        """
        return torch_compile_kwargs(options, reproducible=plan.reproducible)

    def compiler(
        self, plan: CompilePlanLike, options: Mapping[str, Any],
        artifact_dir: str | os.PathLike[str] | PackageStore | None, *, build_wait_s: float = 600.0,
        while_building: str = "wait",
    ) -> Compiler:
        if not plan.ahead_of_time:
            return super().compiler(plan, options, artifact_dir, build_wait_s=build_wait_s)
        from adapters.aot.compiler import AotBlocksCompiler

        # The fallback compiles the same blocks with the same options and the same reproducibility.
        fallback = JitBlocksCompiler(self.compile, self.decompile, BlocksPlan(reproducible=plan.reproducible))
        return AotBlocksCompiler(
            options=options, reproducible=plan.reproducible, directory=artifact_dir, fallback=fallback,
            build_wait_s=build_wait_s, while_building=while_building,
        )

    def compile(self, module: nn.Module, options: Mapping[str, Any], plan: CompilePlanLike) -> None:
        torch_options = self.torch_options(options, plan)
        if plan.scope == "blocks":
            compile_regional(module, torch_options)  # never half-compiled either
            return
        internals.compile_in_place(module, module, torch_options)

    def decompile(self, module: nn.Module) -> None:
        # None in the call slot returns the module to eager.
        internals.set_compiled_call(module, None)
        decompile_regional(module)

    def ensure_available(self) -> None:
        if not self.is_available():
            raise BackendUnavailable(f"backend {self.name!r} is not available on this machine")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "torch": torch.__version__}

    def reproducibility(self, plan: CompilePlanLike, options: Mapping[str, Any]) -> dict[str, Any] | None:
        return audit_fields(plan.reproducible, options, self.device_type)


@dataclass(frozen=True)
class BlocksPlan:
    """A just-in-time blocks plan (the ahead-of-time compiler's fallback)."""

    reproducible: bool = False
    scope: str = "blocks"
    ahead_of_time: bool = False


def check_option_types(options: Mapping[str, Any]) -> None:
    """Type checks shared by every torch.compile adapter (values, not key names)."""
    for key in _BOOL_KEYS:
        if key in options and not isinstance(options[key], bool):
            raise InvalidOptions(f"compile option {key} must be True or False, got {options[key]!r}")
    dynamic = options.get("dynamic")
    if dynamic is not None and not isinstance(dynamic, bool):
        raise InvalidOptions(f"compile option dynamic must be None, True or False, got {dynamic!r}")
    inductor_options = options.get("options")
    if inductor_options is not None and not isinstance(inductor_options, Mapping):
        raise InvalidOptions(
            f"compile option options must be a dict, got {type(inductor_options).__name__}"
        )
    if inductor_options:
        check_inductor_options(inductor_options)


def check_inductor_options(options: Mapping[str, Any]) -> None:
    """Inductor's own checks (``torch._TorchCompileInductorWrapper.apply_options``), done before
    any work: a key inductor does not know, or a value of the wrong type, is a bad argument."""
    current = internals.inductor_config_copy()
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name not in current:
            close = sorted(k for k in current if name.split(".")[-1] in k)[:5]
            raise InvalidOptions(
                f"unknown inductor option {key!r} in compile_options['options']"
                + (f"; did you mean one of {close}?" if close else "; see torch._inductor.list_options()")
            )
        expected = internals.inductor_config_type(name)
        plain = typing.get_origin(expected) is None and isinstance(expected, type)
        if plain and not isinstance(value, expected):
            raise InvalidOptions(
                f"inductor option {key!r} must be {type(current[name]).__name__}, got "
                f"{type(value).__name__} {value!r}"
            )
