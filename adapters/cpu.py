"""CPU backend: torch.compile on the host CPU, for development and CI.

Options are torch.compile's (``backend`` defaults to "inductor"; tests use "aot_eager" or
"eager", which compile the same graphs faster), compiled in place like every torch device (see
``TorchCompileAdapter``)."""

from __future__ import annotations

import torch

from adapters.base import TorchCompileAdapter


class CpuAdapter(TorchCompileAdapter):
    """``backend="cpu"``: torch.compile on the host CPU. Always available. Inductor compiles C++
    here, slowly on a small machine; ``compile_options={"backend": "aot_eager"}`` compiles the same
    graphs in seconds (what the tests, the demo and the docs' examples use).

    Example::

        lc = ModuleLifecycle(transformer, backend="cpu", compile_options={"backend": "aot_eager"})
        CpuAdapter().describe()     # {"backend": "cpu", "device_type": "cpu", "torch": ..., "threads": ...}
    """

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
