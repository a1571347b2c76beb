"""Local attention kernels on one device: the contract, masks, the LSE merge and the kernels.

Never imports ``torch.distributed``: context parallelism lives in :mod:`longctx.parallel`.
"""

from .base import (
    AttentionKernel,
    acc_dtype,
    available_kernels,
    check_qkv,
    get_kernel,
    register_kernel,
)
from .mask import BlockSparse, Mask, Positions, Segment
from .merge import merge_into, merge_partials
from .reference import ReferenceConfig, TorchReference

__all__ = [
    "AttentionKernel",
    "BlockSparse",
    "Mask",
    "Positions",
    "ReferenceConfig",
    "Segment",
    "TorchReference",
    "acc_dtype",
    "available_kernels",
    "check_qkv",
    "get_kernel",
    "merge_into",
    "merge_partials",
    "register_kernel",
]
