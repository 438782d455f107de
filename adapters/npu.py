"""Ascend NPU backend: torch.compile through torchair's NPU backend on torch_npu.

Written to the published torch_npu / torchair API. It has not run on Ascend hardware: the import
guard, option mapping and registration are what the tests verify.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from typing import Any

from torch import nn

from adapters.base import TorchCompileAdapter
from adapters.errors import BackendUnavailable

_INSTALL_HINT = (
    "install Ascend's CANN toolkit, then `pip install torch-npu` matching your torch version "
    "(torchair ships with torch_npu as `torchair`), or use backend='cpu'"
)


def _import(name: str) -> Any:
    return importlib.import_module(name)


class NpuAdapter(TorchCompileAdapter):
    name = "npu"
    device_type = "npu"
    default_backend = "torchair"
    # "torchair_mode": torchair's CompilerConfig.mode ("max-autotune" builds a GE graph,
    # "reduce-overhead" captures an aclgraph).
    extra_keys = frozenset({"torchair_mode"})

    @classmethod
    def missing_packages(cls) -> list[str]:
        return [name for name in ("torch_npu", "torchair") if importlib.util.find_spec(name) is None]

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
            raise BackendUnavailable(f"backend 'npu' needs {' and '.join(missing)}: {_INSTALL_HINT}")
        if not self.is_available():
            raise BackendUnavailable(
                "backend 'npu' found torch_npu but no usable Ascend device "
                "(torch_npu.npu.is_available() is False); check the driver and ASCEND_RT_VISIBLE_DEVICES"
            )

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        options = dict(options)
        backend = options.get("backend", self.default_backend)
        if backend == "torchair":
            # torchair's backend is a callable built at compile time; validate the rest as usual.
            options.pop("backend", None)
            merged = super().validate_options({**options, "backend": "eager"})
            merged["backend"] = "torchair"
            return merged
        return super().validate_options(options)

    def torchair_backend(self, options: Mapping[str, Any]) -> Any:
        """torchair.get_npu_backend(compiler_config=...) with the mode from ``options``."""
        torchair = _import("torchair")
        config = torchair.CompilerConfig()
        mode = options.get("torchair_mode")
        if mode is not None:
            config.mode = mode
        return torchair.get_npu_backend(compiler_config=config)

    def compile(self, module: nn.Module, options: Mapping[str, Any]) -> None:
        options = dict(options)
        if options.get("backend", self.default_backend) == "torchair":
            options["backend"] = self.torchair_backend(options)
        super().compile(module, options)

    def synchronize(self) -> None:
        _import("torch_npu").npu.synchronize()
