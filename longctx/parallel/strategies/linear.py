"""Linear attention context parallelism (LASP-2 style): one all-gather of the shards' states.

With the contiguous layout rank ``r`` holds tokens ``[a_r, a_r + n)``.  Causal linear attention
(:mod:`longctx.kernels.linear`) needs, besides the local tokens, only the state that
enters the shard, which is a decayed sum of the earlier shards' own final states::

    forward on rank r
      1. s_r = sum_t lambda^(n-1-t) k_t^T v_t over the shard       # (rank 0: + from initial_state)
      2. s = all_gather(s_r)                                  # [P, B, H, Dk, Dv], the ONE collective
      3. P_r = sum_{j<r} W[r, j] s_j                          # the state entering rank r
         W[r, j] = prod_{j<i<r} A_i,  A_i = lambda^n if no document starts in shard i, else 0
      4. out_r = the one-device kernel from the initial state P_r
      final_state = sum_j W[P, j] s_j                          # the state after the last token

Steps 2-3 run in the middle of the local kernel: the kernel contract's ``forward_exchange``
(:func:`~longctx.kernels.linear.exchange.forward_with_exchange`) calls back once it has ``s_r``.
The Triton kernel sums ``s_r`` in parallel over segments of the shard and chains the segment
sums with a scan (no sequential walk); ``P_r`` then completes the start of every segment, whose
state walks run in parallel, so the rest of the call costs less than a one-device call's walk
(a kernel without the fused form gets the torch correction ``out[t] += scale * lambda^(t+1) q[t]
P_r`` after a zero-state forward).
The decays are not communicated: the per-head ``lambda`` and the document boundaries are known on
every rank, so ``W`` is a pure function of ``(cu_seqlens, seq_len, world_size)`` and the decay
(:func:`shards_passing`, :func:`carry_weights`).

The backward mirrors it with one all-gather, again inside the kernel
(``backward_exchange``): ``dP_r = sum_t scale lambda^(t+1) q_t^T dout_t`` over the shard's head,
the gradient of the entering state through the outputs, is summed in parallel; the ``dP`` of all
ranks (and each rank's gradient of the replicated final state) are gathered while the kernel
recomputes its chunk states, and rank ``j`` gets the gradient of its local final state
``ds_j = sum_{r>j} W[r, j] dP_r + W[P, j] sum_ranks dfinal``, which completes the starts of the
backward state walk's segments like a final-state gradient.

Documents (``cu_seqlens``, global boundaries ``[0, e_1, ..., S]``): the local kernel runs with the
boundaries that fall in the shard; a shard in which a document starts stops the earlier state
(``A = 0``), and only the tokens before the first boundary in a shard (its ``head``) see the
entering state, so a document's first token never sees the previous document, on whatever rank.

States: ``initial_state [B, H, Dk, Dv]`` is the state before global token 0.  It is used on rank 0
(the owner of token 0; pass the same tensor on every rank) and its gradient arrives on rank 0 only
(zeros elsewhere).  ``final_state`` is returned on every rank (replicated); the gradients it gets
on the ranks are summed, so a loss on it on one rank or on all (a sum of per-rank losses) is
handled alike.  Chaining CP calls with these conventions is exact.

Example (on each rank of a process group; ``q [B, S/P, H, Dk]`` contiguous shards)::

    from longctx.kernels.linear import retnet_log_decay
    from longctx.parallel.strategies.linear import linear_attention
    out = linear_attention(q, k, v, group, log_decay=retnet_log_decay(H, q.device),
                           cu_seqlens=cu_seqlens, kernel="triton")
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ...kernels.base import acc_dtype, host_to_device
from ...kernels.linear.base import (
    LinearArgs,
    LinearAttentionKernel,
    check_cu_seqlens,
    check_linear_inputs,
    check_state,
    get_linear_kernel,
)
from ...kernels.linear.exchange import backward_with_exchange, forward_with_exchange
from ...kernels.linear.triton import weighted_state_sum
from ...kernels.mask import Mask
from ..comm import GatherComm
from ..context import check_device, check_equal_shards, resolve_group
from ..layout import Layout
from .base import StrategySpec

__all__ = [
    "SPEC",
    "LinearCPAttention",
    "LinearCPContext",
    "ShardDocs",
    "StateGather",
    "build_linear_context",
    "carry_weights",
    "linear_attention",
    "linear_backward",
    "linear_forward",
    "shards_passing",
]


# --------------------------------------------------------------------------------------------------
# pure layout math: where documents cut the shards, and how states carry between shards
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardDocs:
    """How the documents of a packed sequence cut one contiguous shard (pure, host-side).

    Attributes:
        start: global position of the shard's first token; ``length``: its token count ``n``.
        local_cu: int64 ``[m + 1]`` boundaries in local positions for the local kernel (the
            global interior boundaries in ``[start, start + n)``, shifted), or None (no documents).
        head: leading tokens that continue the document of the previous shard and so see the
            entering state: ``n`` without boundaries, 0 on rank 0 and when a document starts at
            ``start``.
        passes: the entering state reaches the end of the shard (rank > 0, no document starts in
            it), decayed by ``lambda^n``.

    Example::

        >>> import torch
        >>> d = ShardDocs.build(torch.tensor([0, 5, 20, 24]), seq_len=24, world_size=3, rank=1)
        >>> d.start, d.length, d.local_cu.tolist(), d.head, d.passes
        (8, 8, [0, 8], 8, True)
        >>> d = ShardDocs.build(torch.tensor([0, 5, 20, 24]), seq_len=24, world_size=3, rank=2)
        >>> d.local_cu.tolist(), d.head, d.passes
        ([0, 4, 8], 4, False)
    """

    start: int
    length: int
    local_cu: Tensor | None
    head: int
    passes: bool

    @staticmethod
    def build(cu_seqlens: Tensor | None, seq_len: int, world_size: int, rank: int) -> ShardDocs:
        """Shard ``rank`` of ``world_size`` of a ``seq_len``-token sequence with global boundaries
        ``cu_seqlens`` (validated: ``[0, ..., seq_len]``, or None)."""
        Layout("contiguous").check(seq_len, world_size)
        n = seq_len // world_size
        start = rank * n
        if cu_seqlens is None:
            return ShardDocs(start, n, None, n if rank else 0, rank > 0)
        interior = cu_seqlens[1:-1].to(torch.int64)
        inside = interior[(interior >= start) & (interior < start + n)] - start  # local doc starts
        local_cu = torch.cat([inside.new_zeros(1), inside, inside.new_full((1,), n)])
        head = 0 if rank == 0 else (int(inside[0]) if inside.numel() else n)
        return ShardDocs(start, n, local_cu, head, rank > 0 and not inside.numel())


def shards_passing(cu_seqlens: Tensor | None, seq_len: int, world_size: int) -> tuple[bool, ...]:
    """``ShardDocs.build(..., rank=r).passes`` for every rank ``r`` at once, on the host (a tuple:
    without documents no tensor op runs, which keeps the per-call host time down)."""
    Layout("contiguous").check(seq_len, world_size)
    if cu_seqlens is None or cu_seqlens.numel() <= 2:  # one document: every shard but the first
        return tuple(r > 0 for r in range(world_size))
    n = seq_len // world_size
    interior = cu_seqlens[1:-1].to(torch.int64)
    starts = torch.arange(world_size, dtype=torch.int64) * n  # [P]
    # number of interior boundaries in [start, start + n) of each shard
    count = torch.searchsorted(interior, starts + n) - torch.searchsorted(interior, starts)
    return tuple(((torch.arange(world_size) > 0) & (count == 0)).tolist())


def carry_weights(passes: Sequence[bool] | Tensor, tokens_per_rank: int, log_decay: Tensor | None,
                  heads: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``W [P + 1, P, H]``: the state entering rank ``r`` is ``sum_j W[r, j] s_j`` (row ``P``: the
    final state), ``s_j`` being rank ``j``'s local final state.

    ``W[r, j] = prod_{j<i<r} A_i`` for ``j < r`` (else 0) with ``A_i = lambda^n`` where
    ``passes[i]`` (:func:`shards_passing`), else 0; computed as ``exp(g * n * (r - j - 1))`` so
    nothing overflows.  In ``dtype``, on ``log_decay``'s device (the CPU without decay), so a
    decay on the GPU needs no copy to the host.

    Example (4 ranks of 6 tokens, a document starting inside rank 2)::

        >>> W = carry_weights((False, True, False, True), 6, None, heads=1)
        >>> W[..., 0].tolist()  # rows: entering ranks 0..3, then the final state
        [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    """
    g = torch.zeros(heads, dtype=dtype) if log_decay is None else log_decay.detach().to(dtype)
    device = g.device
    passes = torch.as_tensor(passes, dtype=torch.bool, device=device)
    P = passes.numel()
    blocked = torch.cat([passes.new_zeros(1, dtype=torch.int64),
                         (~passes).to(torch.int64).cumsum(0)])
    r = torch.arange(P + 1, device=device)[:, None]  # [P + 1, 1]
    j = torch.arange(P, device=device)[None, :]  # [1, P]
    # shard j's state reaches the start of shard r iff every shard in between (j, r) passes it on
    between = blocked[r.clamp(max=P)] - blocked[(j + 1).clamp(max=P)]  # [P + 1, P]
    reach = (j < r) & (between == 0)
    hops = (r - j - 1).clamp(min=0).to(dtype) * tokens_per_rank  # [P + 1, P] decayed tokens
    return torch.where(reach[..., None], torch.exp(hops[..., None] * g), 0.0)  # [P + 1, P, H]


@functools.lru_cache(maxsize=64)
def _carry_weights_on(passes: tuple[bool, ...], tokens_per_rank: int,
                      log_decay: tuple[float, ...] | None, heads: int, dtype: torch.dtype,
                      device: str) -> Tensor:
    """:func:`carry_weights` of a host-side decay, built on the CPU and copied to ``device`` once
    per configuration (a copy per call would cost host time on every layer)."""
    decay = torch.tensor(log_decay, dtype=torch.float64) if log_decay is not None else None
    weights = carry_weights(passes, tokens_per_rank, decay, heads).to(dtype)
    return host_to_device(weights, torch.device(device))


# --------------------------------------------------------------------------------------------------
# the per-call context
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LinearCPContext:
    """Everything a linear CP call needs besides q, k, v and the state; built and checked per call.

    ``args`` are the *local* kernel arguments (this shard's boundaries); ``weights [P + 1, P, H]``
    come from :func:`carry_weights` (accumulation dtype, on q's device).
    """

    group: dist.ProcessGroup | None
    world_size: int
    rank: int
    seq_len: int
    kernel: LinearAttentionKernel
    args: LinearArgs
    docs: ShardDocs
    weights: Tensor
    return_final_state: bool


def _cu_from_mask(mask: Mask | None, cu_seqlens: Tensor | None) -> Tensor | None:
    """The document boundaries of a call given as ``mask=`` (for the generic entry) or directly."""
    if mask is None:
        return cu_seqlens
    if not mask.causal or mask.window is not None or mask.block_sparse is not None:
        raise ValueError(
            f"strategy 'linear' computes causal linear attention: the mask may only be causal with "
            f"documents (Mask(causal=True, cu_seqlens=...)); got {mask}. Sliding windows and "
            "block-sparse masks need a softmax strategy ('ring', 'zigzag', ...)"
        )
    if mask.cu_seqlens is not None and cu_seqlens is not None:
        raise ValueError("give the document boundaries once: as cu_seqlens= or in mask=, not both")
    return mask.cu_seqlens if mask.cu_seqlens is not None else cu_seqlens


def build_linear_context(
    q: Tensor, k: Tensor, v: Tensor, group, *, log_decay: Tensor | None,
    cu_seqlens: Tensor | None, initial_state: Tensor | None,
    kernel: str | LinearAttentionKernel, layout: str | Layout, scale: float | None,
    mask: Mask | None = None, return_final_state: bool = False,
) -> LinearCPContext:
    """Check the local shards and the call (errors say what to change), bundle what it needs."""
    shape = check_linear_inputs(q, k, v)
    group = resolve_group(group)
    world = group.size() if group is not None else 1
    rank = group.rank() if group is not None else 0
    layout = Layout.parse(layout)
    if layout.kind != "contiguous":
        raise ValueError(
            f"strategy 'linear' runs on the contiguous layout (the state flows through the shards "
            f"in sequence order) but got layout {str(layout)!r}: shard q/k/v with "
            "longctx.parallel.shard(x, 'contiguous', world_size, rank) and pass layout='contiguous'"
        )
    check_device(q, group)
    check_state(initial_state, shape, q.device)
    seq_len = shape.seq * world
    cu = _cu_from_mask(mask, cu_seqlens)
    if cu is not None:
        if isinstance(cu, Tensor) and cu.dim() == 1 and cu.numel() >= 2 and int(cu[-1]) != seq_len:
            raise ValueError(
                f"cu_seqlens ends at {int(cu[-1])} but the {world} shards of {shape.seq} tokens "
                f"make {seq_len}: cu_seqlens must give the global (unsharded) document boundaries, "
                f"ending at the global length; pad the global sequence to a multiple of {world} "
                "with longctx.parallel.layout.pad_to_multiple and add the padding as a document"
            )
        cu = check_cu_seqlens(cu, seq_len)
    args = LinearArgs.build(q, k, v, log_decay=log_decay, scale=scale)  # checks decay and scale
    kern = get_linear_kernel(kernel)
    reason = getattr(kern, "unsupported_reason", None)
    if reason is not None and (why := reason(q, v)) is not None:
        raise ValueError(why)
    docs = ShardDocs.build(cu, seq_len, world, rank)
    acc = acc_dtype(q.dtype)
    passes = shards_passing(cu, seq_len, world)
    if log_decay is None or log_decay.device.type == "cpu":  # as the models pass it
        decay = tuple(log_decay.tolist()) if log_decay is not None else None
        weights = _carry_weights_on(passes, shape.seq, decay, shape.heads, acc, str(q.device))
    else:
        weights = carry_weights(passes, shape.seq, args.log_decay, shape.heads).to(acc)
    return LinearCPContext(
        group=group, world_size=world, rank=rank, seq_len=seq_len, kernel=kern,
        args=LinearArgs(args.scale, args.log_decay, docs.local_cu), docs=docs, weights=weights,
        return_final_state=return_final_state,
    )


# --------------------------------------------------------------------------------------------------
# communication: the two all-gathers, as the callbacks the kernel makes between its passes
# --------------------------------------------------------------------------------------------------
class StateGather:
    """One call's state exchange (forward) and state-gradient exchange (backward).

    :meth:`forward` gets this rank's local final state ``s_r`` and returns the entering state
    ``P_r`` (None where no token sees it) and keeps the global final state in ``final``;
    :meth:`backward` gets ``dP_r`` and returns ``ds_r`` (see the module docstring).
    """

    def __init__(self, cp: LinearCPContext, dfinal: Tensor | None = None):
        self.cp = cp
        self.dfinal = dfinal  # this rank's gradient of the replicated final state
        self.final: Tensor | None = None

    def forward(self, local_final: Tensor) -> Tensor | None:
        cp = self.cp
        # [B, H, Dk, Dv] on every rank -> [P, B, H, Dk, Dv]
        states = GatherComm(cp.group).all_gather(local_final.to(cp.weights.dtype))
        P = cp.world_size
        # rows rank and P of the weights (a strided view: no index tensor to copy to the device)
        # [2, P, H] x [P, B, H, Dk, Dv] -> [2, B, H, Dk, Dv]: the entering and the final state
        entering, self.final = weighted_state_sum(cp.weights[cp.rank::P - cp.rank], states)
        if not cp.docs.head:  # rank 0, or a document starts at the shard's first token
            return None
        return entering

    def backward(self, d_entering: Tensor) -> Callable[[], Tensor | None]:
        """Starts the all-gather and returns the pending ``ds_r`` (the kernel recomputes its
        chunk states while it runs)."""
        cp = self.cp
        d_prefix = d_entering.to(cp.weights.dtype)  # [B, H, Dk, Dv]
        if not cp.docs.head:  # no token saw an entering state
            d_prefix = torch.zeros_like(d_prefix)
        if cp.return_final_state:
            d_final = self.dfinal.to(d_prefix.dtype) if self.dfinal is not None else (
                torch.zeros_like(d_prefix))
            # [2, B, H, Dk, Dv] on every rank -> [P, 2, B, H, Dk, Dv]
            request = GatherComm(cp.group).all_gather_async(torch.stack([d_prefix, d_final]))
        else:
            request = GatherComm(cp.group).all_gather_async(d_prefix)  # -> [P, B, H, Dk, Dv]

        def finish() -> Tensor | None:
            got = request.wait()
            # this rank's local final state feeds the entering state of every later rank (and
            # the final)
            if cp.return_final_state:
                # [P + 1, B, H, Dk, Dv]: every rank's entering-state grad, then the summed final
                d_entering_all = torch.cat([got[:, 0], got[:, 1].sum(0, keepdim=True)])
                return weighted_state_sum(cp.weights[:, cp.rank], d_entering_all)
            if cp.rank == cp.world_size - 1:
                return None  # the last rank's local final state feeds nothing
            return weighted_state_sum(cp.weights[:-1, cp.rank], got)

        return finish


# --------------------------------------------------------------------------------------------------
# forward / backward
# --------------------------------------------------------------------------------------------------
def linear_forward(
    q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None, cp: LinearCPContext
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Local shards ``q [B, n, H, Dk]``, ``k [B, n, H_kv, Dk]``, ``v [B, n, H_kv, Dv]`` ->
    ``out [B, n, H, Dv]`` (q.dtype), the global ``final_state`` and this rank's entering state
    (both ``[B, H, Dk, Dv]``, accumulation dtype; the entering state None where no token sees
    it)."""
    if cp.world_size == 1:  # nothing to exchange: the one-device kernel as it is
        out, final = cp.kernel.forward(q, k, v, cp.args, initial_state)
        return out, final, None
    own_initial = initial_state if cp.rank == 0 else None  # rank 0 owns token 0
    gather = StateGather(cp)
    out, _, entering = forward_with_exchange(cp.kernel, q, k, v, cp.args, own_initial,
                                             gather.forward)
    return out, gather.final, entering


def linear_backward(
    dout: Tensor, dfinal: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
    initial_state: Tensor | None, entering: Tensor | None, cp: LinearCPContext,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of the local shards (in q's dtype) and of ``initial_state`` (rank 0, zeros
    elsewhere; accumulation dtype).  ``dfinal`` is this rank's gradient of the replicated final
    state."""
    if cp.world_size == 1:
        return cp.kernel.backward(dout, dfinal, q, k, v, cp.args, initial_state,
                                  grad_dtype=q.dtype)
    own_initial = initial_state if cp.rank == 0 else None
    dq, dk, dv, dh0 = backward_with_exchange(
        cp.kernel, dout, q, k, v, cp.args, own_initial, entering,
        StateGather(cp, dfinal).backward, grad_dtype=q.dtype,
    )
    if initial_state is not None and dh0 is None:
        dh0 = torch.zeros(initial_state.shape, dtype=acc_dtype(q.dtype), device=q.device)
    return dq, dk, dv, dh0


class LinearCPAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None,
                cp: LinearCPContext):
        out, final, entering = linear_forward(q, k, v, initial_state, cp)
        ctx.save_for_backward(q, k, v, initial_state, entering)
        ctx.cp = cp
        ctx.set_materialize_grads(False)
        return out, final

    @staticmethod
    def backward(ctx, dout: Tensor | None, dfinal: Tensor | None):
        q, k, v, initial_state, entering = ctx.saved_tensors
        if dout is None:  # only the final state was used on this rank
            dout = q.new_zeros(*q.shape[:3], v.shape[-1])
        dq, dk, dv, dh0 = linear_backward(dout, dfinal, q, k, v, initial_state, entering, ctx.cp)
        dh0 = dh0.to(initial_state.dtype) if initial_state is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dh0, None


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, group=None, *, log_decay: Tensor | None = None,
    cu_seqlens: Tensor | None = None, initial_state: Tensor | None = None,
    kernel: str | LinearAttentionKernel = "reference", layout: str | Layout = "contiguous",
    scale: float | None = None, mask: Mask | None = None, return_final_state: bool = False,
    check_shards: bool = False,
):
    """Context-parallel causal linear attention with per-head decay on contiguous shards.

    Args:
        q: ``[B, S/P, H, Dk]`` this rank's queries (contiguous layout).
        k, v: ``[B, S/P, H_kv, Dk]`` / ``[B, S/P, H_kv, Dv]`` (``H % H_kv == 0``).
        group: the context-parallel ProcessGroup or a 1-D DeviceMesh; None = one process.
        log_decay: ``[H]`` per-head log-decays ``<= 0`` (``lambda = exp(g)``); None: no decay.
        cu_seqlens: global document boundaries ``[0, e_1, ..., S]`` (the same on every rank).
        initial_state: ``[B, H, Dk, Dv]`` state before global token 0 (used on rank 0).
        kernel: ``"reference"``, ``"triton"``, ``"auto"`` (Triton on GPUs, the reference on
            CPUs) or a LinearAttentionKernel.
        layout: must be ``"contiguous"``.
        scale: multiplies q; default ``Dk ** -0.5``.
        mask: alternative to ``cu_seqlens`` for the generic entry: ``Mask(causal=True,
            cu_seqlens=...)`` (linear attention is causal; windows are refused).
        return_final_state: also return the global final state (on every rank).
        check_shards: first compare the ranks' shard shapes (one small all-gather).

    Returns:
        ``out [B, S/P, H, Dv]`` in q's dtype (and ``final_state [B, H, Dk, Dv]`` in the
        accumulation dtype if asked), differentiable in q, k, v and ``initial_state``.
    """
    if kernel == "auto":
        kernel = "triton" if q.is_cuda else "reference"
    cp = build_linear_context(
        q, k, v, group, log_decay=log_decay, cu_seqlens=cu_seqlens, initial_state=initial_state,
        kernel=kernel, layout=layout, scale=scale, mask=mask,
        return_final_state=return_final_state,
    )
    if check_shards:
        check_equal_shards(q, k, cp.group)
    out, final = LinearCPAttention.apply(q, k, v, initial_state, cp)
    return (out, final) if return_final_state else out


SPEC = StrategySpec(
    name="linear",
    summary="causal linear attention with per-head decay: each rank's final state all-gathered "
    "and prefix-combined with the decay (LASP-2 style)",
    layouts=("contiguous",),
    masks=frozenset({"causal", "documents"}),
    requires_causal=True,
    return_lse=False,
    kernels="linear",
    options=("log_decay", "cu_seqlens", "initial_state", "return_final_state"),
    entry=linear_attention,
)
