"""CUDA backend: torch.compile with inductor on an NVIDIA GPU.

Options (``compile_options``), all torch.compile's own:
- ``mode``: None/"default", "max-autotune-no-cudagraphs", "reduce-overhead" (CUDA graphs),
  "max-autotune". With cache-dit mounted, cached and computed steps run different graphs; under
  "reduce-overhead" each is captured once, during the warm-up that covers both branches.
- ``fullgraph``: True makes a graph break an error instead of a silent split.
- ``dynamic``: None (torch decides), True (symbolic shapes up front), False (always specialise).
- ``backend``: "inductor" by default; any dynamo backend name or callable also works.

The module is compiled in place (``nn.Module.compile()``), never wrapped: see
``TorchCompileAdapter`` for why this matters with cache-dit, which replaces ``forward`` on the
instance.
"""

from __future__ import annotations

from typing import Any

import torch

from adapters.base import TorchCompileAdapter
from adapters.errors import BackendUnavailable


class CudaAdapter(TorchCompileAdapter):
    """``backend="cuda"``: torch.compile with inductor on an NVIDIA GPU (``compile_options`` as the
    module docstring lists). ``ensure_available`` raises ``BackendUnavailable`` naming what is
    missing: a CUDA build of torch, or a visible GPU.

    Example::

        lc = ModuleLifecycle(pipe.transformer, backend="cuda",
                             compile_options={"mode": "max-autotune-no-cudagraphs", "fullgraph": True})
    """

    name = "cuda"
    device_type = "cuda"

    @classmethod
    def is_available(cls) -> bool:
        try:
            return bool(torch.cuda.is_available())
        except Exception:  # a broken driver must not crash backend="auto"
            return False

    def ensure_available(self) -> None:
        if not torch.backends.cuda.is_built():  # type: ignore[no-untyped-call]
            raise BackendUnavailable(
                f"backend 'cuda' needs a CUDA build of torch, but torch {torch.__version__} is a "
                "CPU build; install a CUDA wheel of torch, or use backend='cpu'"
            )
        if not self.is_available():
            raise BackendUnavailable(
                "backend 'cuda' found no usable NVIDIA GPU (torch.cuda.is_available() is False); "
                "check the driver and CUDA_VISIBLE_DEVICES, or use backend='cpu'"
            )

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def describe(self) -> dict[str, Any]:
        info = dict(super().describe())
        info["cuda"] = torch.version.cuda
        if self.is_available():
            info["device_name"] = torch.cuda.get_device_name()
        return info
