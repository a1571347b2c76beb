"""Cross-entropy over the vocabulary in chunks of tokens: the ``[tokens, vocab]`` logits never
exist whole.

At long context the logits are the largest tensor of a step (128k tokens x 128k vocab x 4 bytes
is 64 GiB), so :func:`chunked_cross_entropy` fuses the output projection with the loss (the
"fused linear cross-entropy" of Liger-Kernel / Apple's cut-cross-entropy, written here in plain
torch): its forward walks the tokens ``chunk_size`` at a time, computes that chunk's logits
``h_c W^T``, its log-sum-exp and the label's logit, and — when gradients are needed — right away
the chunk's gradients ``dh_c = (softmax - onehot) W`` and ``dW += (softmax - onehot)^T h_c``;
backward only scales those by the incoming gradient.  Memory: one chunk of logits plus the
gradients ``[tokens, hidden]`` and ``[vocab, hidden]`` (which backward would produce anyway);
compute: three matmuls per chunk, the same as unfused forward + backward.

The loss is a **sum** over the tokens whose label is not ``ignore_index``; the trainer divides by
the global label count over dp x cp x accumulation, so gradients summed over ranks are those of
the global mean.

Example::

    >>> import torch
    >>> from longctx.train.loss import chunked_cross_entropy, cross_entropy_sum
    >>> g = torch.Generator().manual_seed(0)
    >>> h = torch.randn(10, 8, dtype=torch.float64, generator=g, requires_grad=True)
    >>> w = torch.randn(32, 8, dtype=torch.float64, generator=g, requires_grad=True)
    >>> y = torch.randint(0, 32, (10,), generator=g); y[3] = -100
    >>> a = chunked_cross_entropy(h, w, y, chunk_size=4)
    >>> b = cross_entropy_sum(h, w, y)
    >>> bool(torch.allclose(a, b))
    True
    >>> a.backward(); gh, gw = h.grad.clone(), w.grad.clone(); h.grad = w.grad = None
    >>> b.backward()
    >>> bool(torch.allclose(gh, h.grad) and torch.allclose(gw, w.grad))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import IGNORE_INDEX

__all__ = ["chunked_argmax", "chunked_cross_entropy", "cross_entropy_sum"]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum_t CE(hidden[t] @ weight.T, labels[t])`` over labelled tokens, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int,
                ignore_index: int) -> Tensor:
        # hidden [N, h], weight [V, h], labels [N] int64
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax / sums: >= float32
        N = hidden.shape[0]
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for lo in range(0, N, chunk_size):
            hi = min(lo + chunk_size, N)
            h_c, y_c = hidden[lo:hi], labels[lo:hi]  # [n, h], [n]
            logits = (h_c @ weight.T).to(acc)  # [n, V]
            valid = y_c != ignore_index  # [n]
            target = torch.where(valid, y_c, 0)  # [n]
            lse = torch.logsumexp(logits, dim=-1)  # [n]
            picked = logits.gather(1, target[:, None])[:, 0]  # [n]
            total += torch.where(valid, lse - picked, 0).sum()
            if need_h or need_w:
                # d(sum CE)/d logits = softmax - onehot(label), zero on unlabelled rows (in place)
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(hi - lo, device=g.device), target] -= 1
                g.mul_(valid[:, None])
                g = g.to(hidden.dtype)
                if need_h:
                    grad_h[lo:hi] = g @ weight  # [n, h]
                if need_w:
                    grad_w += (g.T @ h_c).to(acc)  # [V, h]
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * grad_out.to(grad_w.dtype)).to(ctx.weight_dtype)
        return dh, dw, None, None, None


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int = 2048,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels``, ``chunk_size`` tokens at
    a time.

    Args:
        hidden: ``[..., h]`` final hidden states (flattened to ``[N, h]``).
        weight: ``[V, h]`` the output projection (``model.output_weight``).
        labels: ``[...]`` int64 next-token ids, ``ignore_index`` where there is none.
        chunk_size: tokens per chunk; the largest temporary is ``[chunk_size, V]`` in float32.

    Returns:
        a scalar (float32, or float64 for float64 inputs): the **sum** of the per-token losses.
        Differentiable in ``hidden`` and ``weight``; matmuls run in their dtype (e.g. bf16),
        softmax and sums in at least float32.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must agree on every "
            "dim but the last"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [vocab, {hidden.shape[-1]}], got {tuple(weight.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(device=h.device, dtype=torch.int64)
    return _ChunkedLinearCrossEntropy.apply(h, weight, y, int(chunk_size), int(ignore_index))


def cross_entropy_sum(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """The plain version (full ``[N, V]`` logits) of :func:`chunked_cross_entropy`, for tests and
    short sequences."""
    h = hidden.reshape(-1, hidden.shape[-1])
    logits = (h @ weight.T).to(torch.promote_types(h.dtype, torch.float32))
    return F.cross_entropy(
        logits, labels.reshape(-1).to(h.device), ignore_index=ignore_index, reduction="sum"
    )


@torch.no_grad()
def chunked_argmax(hidden: Tensor, weight: Tensor, chunk_size: int = 2048) -> Tensor:
    """``argmax(hidden @ weight.T, -1)`` (greedy next-token ids ``[...]``, int64), computed
    ``chunk_size`` tokens at a time like :func:`chunked_cross_entropy`.

    >>> h, w = torch.eye(3), torch.tensor([[0., 1, 0], [1, 0, 0], [0, 0, 1]])
    >>> chunked_argmax(h[None], w, chunk_size=2).tolist()
    [[1, 0, 2]]
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(h.shape[0], dtype=torch.int64, device=h.device)
    for lo in range(0, h.shape[0], chunk_size):
        out[lo : lo + chunk_size] = (h[lo : lo + chunk_size] @ weight.T).argmax(-1)
    return out.view(hidden.shape[:-1])
