"""Causal linear attention with per-head decay on one device: contract, kernels, state exchange.

- :mod:`~longctx.kernels.linear.base`: the kernel contract (:class:`LinearAttentionKernel`,
  :class:`LinearArgs`), its input checks, the decays and the kernel registry.
- :mod:`~longctx.kernels.linear.reference`: the torch reference (``"reference"``).
- :mod:`~longctx.kernels.linear.triton`: the Triton kernels (``"triton"``) and
  :func:`weighted_state_sum`.
- :mod:`~longctx.kernels.linear.exchange`: a state handed over in the middle of a call, what
  context parallelism (:mod:`longctx.parallel.strategies.linear`) builds on.

Every module imports :mod:`~longctx.kernels.linear.base` and none imports another kernel; the
kernels register their names when imported here.
"""

from .base import (
    LinearArgs,
    LinearAttentionKernel,
    LinearKernelFunction,
    LinearShape,
    StateExchange,
    available_linear_kernels,
    check_cu_seqlens,
    check_linear_inputs,
    check_state,
    get_linear_kernel,
    register_linear_kernel,
    resolve_state,
    retnet_log_decay,
)
from .exchange import (
    apply_state_reference,
    backward_with_exchange,
    entering_weight,
    forward_with_exchange,
    state_grad_reference,
)
from .reference import (  # registers "reference"
    LinearReference,
    LinearReferenceConfig,
    chunked_linear_attention,
    linear_attention_reference,
    recurrent_linear_attention,
)
from .triton import (  # registers "triton"
    MAX_HEAD_DIM,
    LinearBlocks,
    LinearTriton,
    LinearTritonConfig,
    linear_attention_triton,
    weighted_state_sum,
)

__all__ = [
    "LinearArgs",
    "LinearAttentionKernel",
    "LinearKernelFunction",
    "LinearShape",
    "StateExchange",
    "available_linear_kernels",
    "check_cu_seqlens",
    "check_linear_inputs",
    "check_state",
    "get_linear_kernel",
    "register_linear_kernel",
    "resolve_state",
    "retnet_log_decay",
    "apply_state_reference",
    "backward_with_exchange",
    "entering_weight",
    "forward_with_exchange",
    "state_grad_reference",
    "LinearReference",
    "LinearReferenceConfig",
    "chunked_linear_attention",
    "linear_attention_reference",
    "recurrent_linear_attention",
    "MAX_HEAD_DIM",
    "LinearBlocks",
    "LinearTriton",
    "LinearTritonConfig",
    "linear_attention_triton",
    "weighted_state_sum",
]
