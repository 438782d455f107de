"""CUDA backend: torch.compile with inductor on an NVIDIA GPU."""

from __future__ import annotations

import torch

from adapters.base import TorchCompileAdapter
from adapters.errors import BackendUnavailable


class CudaAdapter(TorchCompileAdapter):
    name = "cuda"
    device_type = "cuda"

    @classmethod
    def is_available(cls) -> bool:
        return bool(torch.cuda.is_available())

    def ensure_available(self) -> None:
        if not torch.backends.cuda.is_built():
            raise BackendUnavailable(
                f"backend 'cuda' needs a CUDA build of torch, but torch {torch.__version__} is a "
                "CPU build; install a CUDA wheel of torch, or use backend='cpu'"
            )
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                "backend 'cuda' found no usable NVIDIA GPU (torch.cuda.is_available() is False); "
                "check the driver and CUDA_VISIBLE_DEVICES, or use backend='cpu'"
            )

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = dict(super().describe())
        if self.is_available():
            info["device_name"] = torch.cuda.get_device_name()
        return info
