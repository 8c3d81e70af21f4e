"""GPU memory as the device sees it: torch's caching allocator and what it never sees.

torch.cuda.max_memory_allocated counts the caching allocator only. Paged 8-bit optimizer state is
cudaMallocManaged memory (bitsandbytes/functional.py:91-99, `get_paged` -> `cget_managed_ptr`): it lives on
the device while the step runs and is invisible to the allocator, and so are the CUDA context and library
workspaces, and torch.cuda.set_per_process_memory_fraction does not cap any of it. The device's own count
(cudaMemGetInfo, torch.cuda.mem_get_info) does include it (and any other process on the same GPU).
"""

from __future__ import annotations

GIB = 1024**3


class DevicePeak:
    """The peak of device memory in use, allocator and outside it: the allocator's own peak (reserved) plus
    the most the device used beyond what the allocator reserved, over the samples taken (each logging step)."""

    def __init__(self, device=None) -> None:
        import torch

        self.device = torch.device("cuda" if device is None else device)
        self.outside = 0
        self.sample()

    def used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def sample(self) -> int:
        """Device memory used now; remembers the part outside torch's allocator."""
        import torch

        used = self.used()
        self.outside = max(self.outside, used - torch.cuda.memory_reserved(self.device))
        return used

    def peak(self) -> int:
        import torch

        self.sample()
        return torch.cuda.max_memory_reserved(self.device) + self.outside
