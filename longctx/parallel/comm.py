"""Small communication objects used by the context-parallel strategies.

The same code runs on gloo (CPU, the simulated mesh) and NCCL (GPU).  The strategies never call
``torch.distributed`` themselves: they hold one of these objects and ask it to move tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["AllToAllComm", "CommRequest", "GatherComm", "PackedSend", "RingComm"]

# torch 2.13 renamed the flat-tensor collectives; torch 2.11 has only the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GroupComm:
    """Rank and size within ``group``; ``group=None`` is a single process (no communication)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        # the group's own methods: dist.get_world_size / get_rank look the group up each call
        self.world_size = group.size() if group is not None else 1
        self.rank = group.rank() if group is not None else 0


class RingComm(_GroupComm):
    """Batched non-blocking point-to-point transfers by a fixed rank offset in one group.

    ``send_recv(tensors, offset)`` queues, for every tensor, a send to ``rank + offset`` and a
    receive of a same-shaped tensor from ``rank - offset``; ``commit()`` issues the batch (one
    ``batch_isend_irecv``) and ``wait()`` completes it.  Each tensor gets its own tag, so several
    batches may be in flight between the same pair of ranks.

    Example (one ring step, overlapped with compute)::

        comm = RingComm(group)
        next_k, next_v = comm.send_recv([k, v])
        comm.commit()
        ...  # compute on k, v
        comm.wait()
        k, v = next_k, next_v
    """

    def __init__(self, group: dist.ProcessGroup | None, tag_base: int = 0):
        super().__init__(group)  # None: a single process, every transfer is to oneself
        self.tag_base = tag_base
        self._ops: list[dist.P2POp] = []
        self._reqs: list = []

    def _peer(self, offset: int) -> int:
        return dist.get_global_rank(self.group, (self.rank + offset) % self.world_size)

    def send_recv(self, tensors: Sequence[Tensor], offset: int = 1) -> list[Tensor]:
        """Queue the exchange; returns the (not yet filled) receive buffers."""
        if offset % self.world_size == 0:  # sending to oneself
            return [t.clone() for t in tensors]
        dst, src = self._peer(offset), self._peer(-offset)
        received = []
        for i, t in enumerate(tensors):
            t = t.contiguous()
            buf = torch.empty_like(t)
            tag = self.tag_base + i
            self._ops.append(dist.P2POp(dist.isend, t, dst, self.group, tag))
            self._ops.append(dist.P2POp(dist.irecv, buf, src, self.group, tag))
            received.append(buf)
        return received

    def commit(self) -> None:
        if self._ops:
            self._reqs = dist.batch_isend_irecv(self._ops)
            self._ops = []

    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        self._reqs = []


class GatherComm(_GroupComm):
    """Collectives over one group: all-gather, reduce-scatter, broadcast and reduce to one rank."""

    def all_gather(self, x: Tensor) -> Tensor:
        """``x [...]`` on every rank -> ``[world_size, ...]`` (rank order)."""
        return self.all_gather_async(x).wait()

    def all_gather_async(self, x: Tensor) -> CommRequest:
        """:meth:`all_gather` in flight: ``wait()`` returns the ``[world_size, ...]`` tensor."""
        if self.group is None:
            return CommRequest(x.unsqueeze(0), [], [])
        x = x.contiguous()
        # [P * x.shape[0], ...] -> [P, ...]
        out = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        work = _all_gather_flat(out, x, group=self.group, async_op=True)
        return CommRequest(out.view(self.world_size, *x.shape), [work], [x])

    def reduce_scatter(self, x: Tensor) -> Tensor:
        """``x [world_size, ...]`` summed over ranks; rank r keeps ``sum[r]``."""
        if self.group is None:
            return x[0]
        out = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
        # [P, ...] -> [P * x.shape[1], ...]: the flat form every backend accepts
        _reduce_scatter_flat(out, x.contiguous().flatten(0, 1), group=self.group)
        return out

    def broadcast(self, x: Tensor, src: int) -> Tensor:
        """``x`` of rank ``src`` on every rank; the others pass a buffer of the same shape."""
        if self.group is not None:
            x = x.contiguous()
            dist.broadcast(x, src=dist.get_global_rank(self.group, src), group=self.group)
        return x

    def reduce(self, x: Tensor, dst: int) -> Tensor:
        """Sum of ``x`` over ranks, valid on rank ``dst`` only."""
        if self.group is not None:
            x = x.contiguous()
            dist.reduce(x, dst=dist.get_global_rank(self.group, dst), group=self.group)
        return x


class CommRequest:
    """Collectives in flight: :meth:`wait` returns what they receive once it may be read.

    It holds the send buffers until then (NCCL reads them on its own stream).  On NCCL ``wait()``
    makes the current stream wait for the transfer and returns at once; on gloo it blocks.
    """

    def __init__(self, received, works: list, sent: list[Tensor]):
        self._received = received
        self._works = works
        self._sent = sent

    def wait(self):
        """What was received (as the collective's method says); safe to read after this call."""
        for work in self._works:
            work.wait()
        self._works, self._sent = [], []
        return self._received


class PackedSend:
    """The send side of one exchange: a buffer per dtype, with a ``[P, ...]`` slot per tensor.

    Made by :meth:`AllToAllComm.send_buffer`. Write each of :attr:`slots` (slot ``j`` goes to
    rank ``j``), for example with an indexed copy that also reorders, then :meth:`start`: tensors
    of one dtype travel packed in one collective, with no copy into a separate send buffer.
    """

    def __init__(self, comm: AllToAllComm, slots: list[Tensor], buffers: list[Tensor],
                 members: list[list[int]]):
        self.slots = slots
        self._comm = comm
        self._buffers = buffers  # [P(dst), packed] per dtype
        self._members = members  # the slots each buffer holds, in packing order

    def start(self) -> CommRequest:
        """Start the exchange; ``wait()`` returns, per slot, ``[P(src), ...]`` of its shape."""
        group = self._comm.group
        if group is None:
            return CommRequest(list(self.slots), [], [])
        received: list[Tensor | None] = [None] * len(self.slots)
        works = []
        for send, idx in zip(self._buffers, self._members):
            recv = torch.empty_like(send)  # [P(src), packed]
            works.append(dist.all_to_all_single(recv, send, group=group, async_op=True))
            offset = 0
            for i in idx:
                n = self.slots[i].numel() // self._comm.world_size
                received[i] = recv[:, offset : offset + n].view(self.slots[i].shape)
                offset += n
        return CommRequest(received, works, self._buffers)


class AllToAllComm(_GroupComm):
    """Equal-split all-to-all along dim 0, for Ulysses' sequence <-> heads exchange.

    Example (several tensors in one exchange, overlapped with compute)::

        comm = AllToAllComm(group)
        req = comm.all_to_all_async([a, b])   # a [P, ...], b [P, ...]
        ...                                   # compute that does not touch a, b or the results
        a_recv, b_recv = req.wait()           # [P(src), ...] each

    Or write straight into the packed send buffer (no staging copy)::

        send = comm.send_buffer([((P, n, d), torch.bfloat16)], device)
        send.slots[0].copy_(x)                 # any op that writes the slot
        (x_recv,) = send.start().wait()
    """

    def all_to_all(self, x: Tensor) -> Tensor:
        """``x [P, ...]``: slot ``j`` goes to rank ``j``; slot ``j`` of the result came from rank ``j``."""
        return self.all_to_all_async([x]).wait()[0]

    def _check_slots(self, shapes: Sequence[Sequence[int]]) -> None:
        for shape in shapes:
            if len(shape) == 0 or shape[0] != self.world_size:
                raise ValueError(
                    f"all-to-all tensors must have shape [{self.world_size}, ...] (one slot per "
                    f"rank); got {tuple(shape)}"
                )

    def send_buffer(
        self, specs: Sequence[tuple[Sequence[int], torch.dtype]], device: torch.device | str
    ) -> PackedSend:
        """Send slots of the given ``(shape, dtype)``s (each shape ``[P, ...]``), packed per dtype
        in the given order.  Every rank must build the same exchanges in the same order."""
        P = self.world_size
        self._check_slots([shape for shape, _ in specs])
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, (_, dtype) in enumerate(specs):
            by_dtype.setdefault(dtype, []).append(i)
        slots: list[Tensor | None] = [None] * len(specs)
        buffers, members = [], []
        for dtype, idx in by_dtype.items():
            sizes = [math.prod(specs[i][0]) // P for i in idx]
            buffer = torch.empty(P, sum(sizes), dtype=dtype, device=device)  # [P(dst), packed]
            offset = 0
            for i, n in zip(idx, sizes):
                slots[i] = buffer[:, offset : offset + n].view(tuple(specs[i][0]))
                offset += n
            buffers.append(buffer)
            members.append(idx)
        return PackedSend(self, slots, buffers, members)

    def all_to_all_async(self, tensors: Sequence[Tensor]) -> CommRequest:
        """Start exchanging ``tensors`` (each ``[P, ...]``, as in :meth:`all_to_all`); don't wait.

        Tensors of one dtype travel packed in one collective (copied into a
        :meth:`send_buffer`; a lone contiguous tensor is sent as it is): slot ``j`` of each goes
        to rank ``j``.  ``wait()`` on the result returns, per tensor, ``[P(src), ...]`` of its
        shape (views into the receive buffer).  Every rank must start the same exchanges in the
        same order, and must not change the inputs before ``wait()``.
        """
        if self.group is None:
            return CommRequest(list(tensors), [], [])
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(f"all_to_all_async needs tensors on one device; got {devices}")
        self._check_slots([t.shape for t in tensors])
        if len(tensors) == len({t.dtype for t in tensors}) and all(
            t.is_contiguous() for t in tensors
        ):  # one tensor per dtype, already laid out: sent as it is
            buffers = [t.view(self.world_size, -1) for t in tensors]
            return PackedSend(self, list(tensors), buffers, [[i] for i in range(len(tensors))]).start()
        send = self.send_buffer([(t.shape, t.dtype) for t in tensors], tensors[0].device)
        for slot, t in zip(send.slots, tensors):
            slot.copy_(t)
        return send.start()
