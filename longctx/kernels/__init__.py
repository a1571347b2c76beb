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
from .block_sparse_triton import BlockSparseTriton, BlockSparseTritonConfig  # "block_sparse"
from .dispatch import AutoKernel, select_kernel  # registers "auto"; after the kernels it picks
from .fa4 import FlashAttention4  # registers "fa4" (flash_attn itself is imported on first use)
from .linear import (
    LinearArgs,
    LinearAttentionKernel,
    LinearKernelFunction,
    LinearReference,
    LinearReferenceConfig,
    available_linear_kernels,
    get_linear_kernel,
    linear_attention_reference,
    retnet_log_decay,
)
from .mask import BlockSparse, BlockSummary, Mask, Positions, Segment
from .merge import merge_into, merge_partials
from .reference import ReferenceConfig, TorchReference
from .triton_flash import TileConfig, TritonFlash, TritonFlashConfig  # registers "triton"
from .vendor import VendorSDPA, vendor_mask_mode  # registers "sdpa"

__all__ = [
    "FlashAttention4",
    "LinearArgs",
    "LinearAttentionKernel",
    "LinearKernelFunction",
    "LinearReference",
    "LinearReferenceConfig",
    "available_linear_kernels",
    "get_linear_kernel",
    "linear_attention_reference",
    "retnet_log_decay",
    "AttentionKernel",
    "AutoKernel",
    "BlockSparse",
    "BlockSparseTriton",
    "BlockSparseTritonConfig",
    "BlockSummary",
    "Mask",
    "Positions",
    "ReferenceConfig",
    "Segment",
    "TileConfig",
    "TorchReference",
    "TritonFlash",
    "TritonFlashConfig",
    "VendorSDPA",
    "acc_dtype",
    "available_kernels",
    "check_qkv",
    "get_kernel",
    "merge_into",
    "merge_partials",
    "register_kernel",
    "select_kernel",
    "vendor_mask_mode",
]
