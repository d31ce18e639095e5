"""Host-built index tensors onto the device without a host synchronisation:
a plain torch.tensor(..., device="cuda") copies from pageable memory and
waits for the stream; a pinned staging copy does not (torch's caching host
allocator keeps the pinned block alive until the copy has run)."""
from __future__ import annotations

from typing import Sequence

import torch


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`: itself on the CPU, a pinned staging copy sent
    without waiting on a CUDA device (ordered on the current stream only),
    a plain copy elsewhere."""
    device = torch.device(device)
    if device.type == "cpu":
        return t
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.tensor(values, dtype) on `device`, asynchronously on a GPU."""
    return host_to_device(torch.tensor(values, dtype=dtype), device)
