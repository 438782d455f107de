"""Ascend NPU backend: torch.compile through torchair's NPU backend on torch_npu.

Written to the published torch_npu / torchair API (``import torch_npu`` before ``torchair``;
``torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())`` as torch.compile's
backend; ``CompilerConfig().mode`` is "max-autotune", a GE graph, or "reduce-overhead", an
aclgraph). It has NOT run on Ascend hardware: the tests verify the import guard, the option
mapping and the registration only.

Options (``compile_options``):
- ``backend``: "torchair" (default) or any dynamo backend name/callable (e.g. "eager" to debug).
- ``mode``: torchair's ``CompilerConfig.mode``, "max-autotune" or "reduce-overhead"; None or
  "default" keeps torchair's default. It is never passed to torch.compile, whose ``mode`` is an
  inductor option.
- ``frozen_parameter``: torchair's ``experimental_config.frozen_parameter`` (weights treated as
  constants: for inference with fixed weights).
- ``fullgraph``, ``dynamic``, ``disable``: passed to torch.compile unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from adapters import _torch_internals as internals
from adapters.base import TorchCompileAdapter, check_option_types
from adapters.errors import BackendUnavailable, InvalidOptions
from adapters.protocols import CompilePlanLike
from adapters.regional import compile_regional

REQUIRED_PACKAGES = ("torch_npu", "torchair")
TORCHAIR_MODES = ("max-autotune", "reduce-overhead")
_TORCH_KEYS = frozenset({"backend", "fullgraph", "dynamic", "disable"})
_TORCHAIR_KEYS = frozenset({"mode", "frozen_parameter"})
_INSTALL_HINT = (
    "install Ascend's CANN toolkit, then `pip install torch-npu` matching your torch version "
    "(it provides torch_npu; install torchair from Ascend's release if your torch_npu does not "
    "bundle it), or use backend='cpu'"
)


def _import(name: str) -> Any:
    return importlib.import_module(name)


@dataclass(frozen=True)
class NpuCompilePlan:
    """Validated options split into what goes to torch.compile and what to torchair's config."""

    torch_options: dict[str, Any]
    # CompilerConfig attribute paths (e.g. "experimental_config.frozen_parameter") -> value.
    torchair_config: dict[str, Any] = field(default_factory=dict)
    uses_torchair: bool = True


def plan_options(options: Mapping[str, Any]) -> NpuCompilePlan:
    """Map ``compile_options`` to torch.compile keywords and torchair ``CompilerConfig`` fields.

    Pure (imports neither torch_npu nor torchair), so it is checked on any machine.
    """
    if not isinstance(options, Mapping):
        raise InvalidOptions(f"compile_options must be a dict, got {type(options).__name__}")
    allowed = _TORCH_KEYS | _TORCHAIR_KEYS
    unknown = sorted(set(options) - allowed)
    if unknown:
        hint = " (inductor options do not apply on the NPU; torchair compiles)" if (
            "options" in unknown
        ) else ""
        raise InvalidOptions(
            f"unknown compile_options {unknown} for backend 'npu'{hint}; accepted: {sorted(allowed)}"
        )
    check_option_types(options)
    backend = options.get("backend", "torchair")
    uses_torchair = backend == "torchair"
    torch_options = {key: options[key] for key in _TORCH_KEYS if key in options}
    torch_options["backend"] = backend
    config: dict[str, Any] = {}
    mode = options.get("mode")
    if mode not in (None, "default", *TORCHAIR_MODES):
        raise InvalidOptions(
            f"unknown compile mode {mode!r} for backend 'npu'; torchair accepts {list(TORCHAIR_MODES)}"
        )
    if mode in TORCHAIR_MODES:
        config["mode"] = mode
    if "frozen_parameter" in options:
        if not isinstance(options["frozen_parameter"], bool):
            raise InvalidOptions(
                f"compile option frozen_parameter must be True or False, got {options['frozen_parameter']!r}"
            )
        config["experimental_config.frozen_parameter"] = options["frozen_parameter"]
    if config and not uses_torchair:
        raise InvalidOptions(
            f"compile options {sorted(k for k in options if k in _TORCHAIR_KEYS)} configure torchair; "
            f"drop them or use backend 'torchair' (got {backend!r})"
        )
    return NpuCompilePlan(torch_options, config, uses_torchair)


class NpuAdapter(TorchCompileAdapter):
    """``backend="npu"``: torch.compile through torchair's NPU backend on an Ascend NPU
    (torch_npu and torchair, from Ascend's CANN stack, imported only when this backend is used).
    ``ensure_available`` raises ``BackendUnavailable`` naming the missing packages.
    ``CompilePlan(ahead_of_time=True)`` is refused here.

    Example::

        if NpuAdapter.is_available():
            lc = ModuleLifecycle(pipe.transformer, backend="npu")
        NpuAdapter.missing_packages()     # e.g. ["torch_npu", "torchair"] off Ascend
    """

    name = "npu"
    device_type = "npu"
    default_backend = "torchair"

    @classmethod
    def missing_packages(cls) -> list[str]:
        """The packages of ``REQUIRED_PACKAGES`` (torch_npu, torchair) not installed here.

        Example::

            NpuAdapter.missing_packages()     # [] on an Ascend host with CANN's stack
        """
        missing = []
        for name in REQUIRED_PACKAGES:
            try:
                found = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append(name)
        return missing

    @classmethod
    def is_available(cls) -> bool:
        if cls.missing_packages():
            return False
        try:
            return bool(_import("torch_npu").npu.is_available())
        except Exception:  # a broken CANN install must not crash backend="auto"
            return False

    def ensure_available(self) -> None:
        missing = self.missing_packages()
        if missing:
            raise BackendUnavailable(
                f"backend 'npu' needs the package(s) {' and '.join(missing)}, not found: {_INSTALL_HINT}"
            )
        if not self.is_available():
            raise BackendUnavailable(
                "backend 'npu' found torch_npu and torchair but no usable Ascend device "
                "(torch_npu.npu.is_available() is False or torch_npu failed to import); check CANN's "
                "set_env.sh, the driver and ASCEND_RT_VISIBLE_DEVICES, or use backend='cpu'"
            )

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        plan = plan_options(options)
        if not plan.uses_torchair:
            # Any other dynamo backend is checked like on every device.
            super().validate_options(plan.torch_options)
        return dict(options) | {"backend": plan.torch_options["backend"]}

    def validate_plan(self, plan: CompilePlanLike, options: Mapping[str, Any]) -> None:
        if plan.ahead_of_time:
            raise InvalidOptions(
                "backend 'npu' does not compile ahead of time (AOTInductor packages run on the "
                "cpu and cuda backends only); use CompilePlan(scope='blocks') on the NPU"
            )
        if plan.reproducible:
            raise InvalidOptions(
                "CompilePlan(reproducible=True) sets inductor's deterministic mode, and the NPU "
                "compiles with torchair; drop reproducible on backend 'npu'"
            )

    def torchair_backend(self, plan: NpuCompilePlan) -> Any:
        """``torchair.get_npu_backend(compiler_config=...)`` with the plan's config fields."""
        _import("torch_npu")  # torchair requires torch_npu to be imported first
        torchair = _import("torchair")
        config = torchair.CompilerConfig()
        for path, value in plan.torchair_config.items():
            *parents, leaf = path.split(".")
            target = config
            for parent in parents:
                target = getattr(target, parent)
            setattr(target, leaf, value)
        return torchair.get_npu_backend(compiler_config=config)

    def compile(self, module: nn.Module, options: Mapping[str, Any], plan: CompilePlanLike) -> None:
        npu_plan = plan_options(options)
        torch_options = dict(npu_plan.torch_options)
        if npu_plan.uses_torchair:
            torch_options["backend"] = self.torchair_backend(npu_plan)
        if plan.scope == "blocks":
            compile_regional(module, torch_options)
            return
        internals.compile_in_place(module, module, torch_options)

    def synchronize(self) -> None:
        _import("torch_npu").npu.synchronize()
