"""CPU backend: torch.compile on the host CPU, for development and CI."""

from __future__ import annotations

import torch

from adapters.base import TorchCompileAdapter


class CpuAdapter(TorchCompileAdapter):
    name = "cpu"
    device_type = "cpu"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def synchronize(self) -> None:
        # CPU kernels run synchronously; nothing is queued.
        return None

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "threads": torch.get_num_threads()}
