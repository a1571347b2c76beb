"""Moving small host tensors to the GPU without making the host wait for it."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["host_to_device"]


def host_to_device(x: Tensor, device: torch.device) -> Tensor:
    """``x`` on ``device`` without stalling the host: a CPU tensor goes through pinned memory
    with a non-blocking copy (a copy from pageable memory waits for the device's queue).

    Example::

        >>> import torch
        >>> host_to_device(torch.ones(3), torch.device("cpu")).tolist()
        [1.0, 1.0, 1.0]
    """
    device = torch.device(device)
    if x.device == device:
        return x
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
