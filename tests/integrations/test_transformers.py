"""transformers adapter: a tiny Llama (LlamaConfig, no download) at CP=2 over gloo vs the plain model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from integration_support import require_or_skip, run_readme_example

require_or_skip("transformers")

from longctx.testing import SimulatedMesh  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-10  # float64


def _tiny_llama(attn_implementation: str, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    import longctx.integrations.transformers  # noqa: F401  (registers longctx_*)

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation=attn_implementation, **extra,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double()


def cp_vs_plain(group, impl: str, layout: str, packed: bool, seq: int = 16, batch: int = 2):
    """Logits, loss and gradients of the CP model on this rank vs the plain model."""
    import torch.distributed as dist

    from longctx.integrations.transformers import cp_all_reduce_grads, shard_batch
    from longctx.parallel.layout import shard

    rank, P = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, 5] = -100  # an ignored label
    pos = torch.arange(seq).expand(batch, seq)
    if packed:  # documents of 5, 7 and 4 tokens, crossing the shards
        pos = torch.cat([torch.arange(5), torch.arange(7), torch.arange(4)]).expand(batch, seq)

    # the reference: sdpa stays in float64 (eager's softmax runs in float32)
    plain = _tiny_llama("sdpa")
    model = _tiny_llama(impl, longctx_cp_size=P)
    model.load_state_dict(plain.state_dict())
    local = shard_batch(ids, labels, pos, group=group, layout=layout)
    w = torch.randn(batch, seq, 64, generator=g, dtype=torch.float64)  # a float64 objective

    def grads(m):
        return [p.grad.clone() for p in m.parameters()]

    # the plain model runs each document on its own (its sdpa path does not split packed rows)
    docs = [(0, 5), (5, 12), (12, 16)] if packed else [(0, seq)]
    logits_ref = torch.cat([plain(input_ids=ids[:, lo:hi]).logits for lo, hi in docs], dim=1)
    (logits_ref * w).sum().backward(retain_graph=True)
    g_ref = grads(plain)
    plain.zero_grad()
    shift = torch.cat([labels[:, 1:], torch.full((batch, 1), -100)], dim=1)  # [b, s]
    loss_ref = torch.nn.functional.cross_entropy(
        logits_ref.float().flatten(0, 1), shift.flatten(), ignore_index=-100, reduction="sum"
    ) / (shift != -100).sum()  # transformers' float32 loss over the whole batch
    loss_ref.backward()
    g_loss_ref = grads(plain)

    out = model(**local)
    (out.logits * shard(w, layout, P, rank)).sum().backward(retain_graph=True)
    cp_all_reduce_grads(model, group)
    g_cp = grads(model)
    model.zero_grad()
    out.loss.backward()
    cp_all_reduce_grads(model, group)
    g_loss_cp = grads(model)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=group)  # the global mean: the ranks' shares summed

    exact = [float((out.logits - shard(logits_ref, layout, P, rank)).abs().max())]
    exact += [float((a - b).abs().max()) for a, b in zip(g_cp, g_ref)]
    f32 = [float((loss - loss_ref).abs() / loss_ref.abs())]
    f32 += [float((a - b).abs().max() / b.abs().max()) for a, b in zip(g_loss_cp, g_loss_ref)]
    return exact, f32


def wrong_group_size(group):
    from longctx.integrations.transformers import shard_batch

    model = _tiny_llama("longctx_zigzag", longctx_cp_size=4)
    try:
        model(**shard_batch(torch.zeros(1, 8, dtype=torch.long), group=group))
    except ValueError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def mesh():
    with SimulatedMesh(2) as m:
        yield m


@pytest.mark.parametrize(
    "impl,layout,packed",
    [
        ("longctx_zigzag", "zigzag", False),
        ("longctx_zigzag", "zigzag", True),
        ("longctx_ring", "contiguous", True),
        ("longctx_ulysses", "zigzag", False),
        ("longctx_allgather", "striped", False),
        ("longctx_striped", "striped", True),
    ],
)
def test_cp2_matches_plain_llama(mesh, impl, layout, packed):
    for exact, f32 in mesh.run(cp_vs_plain, impl, layout, packed):
        assert len(exact) > 10 and max(exact) < TOL, exact  # logits, gradients: float64
        assert max(f32) < 1e-5, f32  # transformers' loss (float32) and its gradients


def test_group_that_does_not_match_config_is_refused(mesh):
    for msg in mesh.run(wrong_group_size):
        assert msg is not None and "longctx_cp_size=4" in msg and "2 ranks" in msg


def test_one_process_and_errors():
    from longctx.integrations.transformers import document_bounds, shard_batch

    model = _tiny_llama("longctx_zigzag", longctx_cp_size=2)
    with pytest.raises(ValueError, match="longctx_cp_size=2"):
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    model = _tiny_llama("longctx")
    ids = torch.randint(0, 64, (1, 8))
    with pytest.raises(ValueError, match="padding masks"):
        model(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="different document boundaries"):
        document_bounds(torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]]))
    plain = _tiny_llama("sdpa")
    out = model(**shard_batch(ids))  # one process, no group
    ref = plain(input_ids=ids, labels=ids)
    assert torch.allclose(out.logits, ref.logits, atol=TOL)
    assert torch.allclose(out.loss, ref.loss, atol=TOL)


def test_readme_example(tmp_path):
    """The README's transformers example, as written, under torchrun with 2 gloo processes."""
    run_readme_example("transformers", tmp_path)
