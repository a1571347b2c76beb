"""Does an all-to-all overlap an attention kernel?  NCCL against copy-engine peer copies.

Ulysses can pipeline its exchanges with the kernel by head chunks (``ulysses:layout:N`` in
``bench_cp.py``), but on NVLink two chunks measured slower than one.  This script isolates why.
On every GPU of one node (torchrun, one process each) it times, with a fixed repeat count:

- the kernel alone: cuDNN SDPA, causal, forward or forward+backward, ``[1, heads, S, D]`` bf16
  (one Ulysses head chunk: ``heads`` of the ``H/P`` a rank holds, over the whole sequence);
- one all-to-all alone: ``3 x [P, S/P, heads, D]`` bf16 (a chunk's q, k and v), by
  - ``nccl``: ``all_to_all_single`` on the default NCCL communicator,
  - ``nccl-ctasN``: on a communicator limited to N CTAs (``ProcessGroupNCCL.Options``),
  - ``ce``: symmetric-memory peer buffers written by ``copy_`` (cudaMemcpy, the copy engines:
    no SMs taken), one stream per peer, a barrier before (the receive buffer is free) and after;
- the two started together (the exchange on its own stream), so
  ``hidden = (kernel + comm - both) / comm`` says how much of the exchange the kernel absorbs
  (1: all of it; below 0: running them together is slower than one after the other).

    torchrun --standalone --nproc-per-node 4 benchmarks/bench_a2a_overlap.py --seq 32768 --heads 2

Prints a markdown table on rank 0 (and writes it to ``--out`` if given).
"""

from __future__ import annotations

import argparse
import os
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timing import time_synced_ms  # benchmarks/timing.py, beside this script
from torch.nn.attention import SDPBackend, sdpa_kernel


def nccl_a2a(group):
    """``exchange(send, recv)`` by NCCL, returning something with ``wait()``."""

    def exchange(send, recv):
        return dist.all_to_all_single(recv, send, group=group, async_op=True)

    return exchange


def nccl_group_with_ctas(ctas: int):
    """A new NCCL communicator over every rank whose kernels use at most ``ctas`` CTAs."""
    options = dist.ProcessGroupNCCL.Options()
    options.config.max_ctas = ctas
    options.config.min_ctas = 1
    return dist.new_group(list(range(dist.get_world_size())), pg_options=options,
                          backend="nccl")


class CopyEngineA2A:
    """All-to-all by writing into the peers' symmetric-memory receive buffers with ``copy_``
    (device-to-device cudaMemcpy over NVLink, done by the copy engines), one stream per peer."""

    def __init__(self, numel: int, dtype: torch.dtype, group):
        import torch.distributed._symmetric_memory as symm_mem

        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed by older torch
            symm_mem.enable_symm_mem_for_group(group.group_name)
        self.recv = symm_mem.empty(numel, dtype=dtype, device="cuda")
        self.handle = symm_mem.rendezvous(self.recv, group.group_name)
        self.P, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.dtype = dtype
        self.streams = [torch.cuda.Stream() for _ in range(self.P)]
        self.comm = torch.cuda.Stream()

    def __call__(self, send: torch.Tensor, recv: torch.Tensor):
        """``send [P(dst), n]`` -> ``recv [P(src), n]``, queued on ``self.comm``; returns an object
        whose ``wait()`` makes the current stream wait for it."""
        P, me, n = self.P, self.rank, send.shape[1]
        comm = self.comm
        comm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(comm):
            self.handle.barrier(channel=0)  # every receive buffer is free
            for s in self.streams:
                s.wait_stream(comm)
            for j in range(P):
                with torch.cuda.stream(self.streams[j]):
                    peer = self.handle.get_buffer((me + j) % P, (P, n), self.dtype, 0)
                    peer[me].copy_(send[(me + j) % P])  # my slot in the peer's buffer
            for s in self.streams:
                comm.wait_stream(s)
            self.handle.barrier(channel=1)  # every write into my buffer has landed
            recv.copy_(self.recv[: P * n].view(P, n))
        return _StreamWait(comm)


class _StreamWait:
    def __init__(self, stream):
        self.stream = stream

    def wait(self):
        torch.cuda.current_stream().wait_stream(self.stream)


def attention_step(q, k, v, backward: bool):
    """One cuDNN SDPA call (causal) on ``[1, heads, S, D]``, with its backward if asked."""

    def step():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if backward:
            out.backward(torch.ones_like(out))

    return step


def exchange_steps(exchange, send, recv, kernel):
    """The exchange alone, and the exchange started before ``kernel`` and waited after it."""

    def alone():
        exchange(send, recv).wait()

    def together():
        work = exchange(send, recv)
        kernel()
        work.wait()

    return alone, together


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=32768, help="total sequence length S")
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 2, 4],
                        help="query heads per chunk (kv heads the same: MHA)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ctas", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    P, rank = dist.get_world_size(), dist.get_rank()
    world = dist.group.WORLD

    def barrier():
        dist.barrier()

    def ms(fn):
        for _ in range(2):
            fn()
        return time_synced_ms(fn, args.repeats, barrier)

    rows = [
        (f"{torch.cuda.get_device_name()} x{P}, torch {torch.__version__}, S={args.seq}, "
         f"D={args.dim}, bf16, cuDNN SDPA causal; exchange = 3 x [P, S/P, heads, D]; "
         f"{args.repeats} repeats (median), the slowest rank"),
        "",
        "| heads | kernel | kernel ms | exchange | exchange ms | together ms | hidden |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    exchanges = {"nccl": nccl_a2a(world)}
    for c in args.ctas:
        try:
            exchanges[f"nccl-ctas{c}"] = nccl_a2a(nccl_group_with_ctas(c))
        except Exception:  # noqa: BLE001 -- reported
            rows.append(f"| | | | nccl-ctas{c} | failed: "
                        f"{traceback.format_exc(limit=1).splitlines()[-1][:100]} | | |")
    for heads in args.heads:
        n = 3 * (args.seq // P) * heads * args.dim  # per destination
        send = torch.randn(P, n, device="cuda", dtype=torch.bfloat16)
        recv = torch.empty_like(send)
        q, k, v = (torch.randn(1, heads, args.seq, args.dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        variants = dict(exchanges)
        try:
            variants["ce"] = CopyEngineA2A(P * n, torch.bfloat16, world)
        except Exception:  # noqa: BLE001 -- reported
            rows.append(f"| {heads} | | | ce | failed: "
                        f"{traceback.format_exc(limit=1).splitlines()[-1][:100]} | | |")

        for backward in (False, True):
            kernel = attention_step(q, k, v, backward)
            kernel_ms = ms(kernel)
            for name, exchange in variants.items():
                try:
                    times = [ms(step) for step in exchange_steps(exchange, send, recv, kernel)]
                    err = None
                except Exception:  # noqa: BLE001 -- reported
                    times, err = [float("nan")] * 2, traceback.format_exc(limit=1).splitlines()[-1]
                worst = torch.tensor([kernel_ms, *times], device="cuda")
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                k_ms, c_ms, b_ms = worst.tolist()
                hidden = (k_ms + c_ms - b_ms) / c_ms
                label = "fwd+bwd" if backward else "fwd"
                rows.append(f"| {heads} | {label} | {k_ms:.3f} | {name} | {c_ms:.3f} | "
                            f"{b_ms:.3f} | {hidden:.2f} |" + (f" failed: {err[:80]}" if err else ""))
                if rank == 0:
                    print(rows[-1], flush=True)
    if rank == 0:
        text = "\n".join(rows) + "\n"
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
