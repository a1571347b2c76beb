"""megatron-core adapter: LongctxCoreAttention vs megatron's DotProductAttention, CP=2 over gloo.

megatron's DotProductAttention reaches for CUDA on a CPU-only torch (a scratch buffer on
``torch.cuda.current_device()``, the CUDA RNG tracker around dropout): the workers here point
both at the CPU. That workaround lives in this test only; the adapter never patches megatron.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from integration_support import require_or_skip, run_readme_example

require_or_skip("megatron.core")

from longctx.testing import SimulatedMesh  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-10  # float64 throughout


class _NoRng:
    def fork(self, *args, **kwargs):
        return contextlib.nullcontext()


def _megatron_on_cpu() -> None:
    """Test-only: let megatron's DotProductAttention run on a CPU-only torch."""
    from megatron.core import tensor_parallel
    from megatron.core.fusions import fused_softmax

    def sliding_window_mask_on_cpu(sq, skv, window_size):  # megatron's, without device="cuda"
        m = torch.ones(sq, skv, dtype=torch.bool)
        return ~torch.tril(torch.triu(m, skv - sq - window_size[0]), skv - sq + window_size[1])

    torch.cuda.current_device = lambda: torch.device("cpu")
    tensor_parallel.get_cuda_rng_tracker = lambda *a, **k: _NoRng()
    fused_softmax.get_sliding_window_causal_mask = sliding_window_mask_on_cpu


def _causal_mask(seq: int) -> torch.Tensor:
    """megatron's mask convention, True = masked out: ``[1, 1, s, s]`` (its default is on CUDA)."""
    return torch.ones(seq, seq, dtype=torch.bool).triu(1)[None, None]


def _init(group):
    from megatron.core import parallel_state

    _megatron_on_cpu()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1, context_parallel_size=2)
    return parallel_state.get_context_parallel_world_size()


def _config(cp: int, heads=4, kv_heads=2, head_dim=8, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=kw.pop("num_layers", 1),
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=head_dim,
        context_parallel_size=cp,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        params_dtype=torch.float64,
        use_cpu_initialization=True,
        **kw,
    )


def core_vs_dpa(group, strategy: str | None, window=None, seq: int = 16, batch: int = 2):
    """Each CP rank's LongctxCoreAttention output and q/k/v grads vs megatron's DPA, plain."""
    import torch.distributed as dist
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from longctx.integrations.megatron import LongctxCoreAttention, LongctxSettings
    from longctx.parallel.layout import shard

    rank, P = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq, batch, 4, 8, generator=g, dtype=torch.float64)  # [s, b, np, hn]
    k = torch.randn(seq, batch, 2, 8, generator=g, dtype=torch.float64)  # [s, b, ng, hn]
    v = torch.randn(seq, batch, 2, 8, generator=g, dtype=torch.float64)
    dout = torch.randn(seq, batch, 32, generator=g, dtype=torch.float64)  # [s, b, np*hn]

    ref = DotProductAttention(_config(1, window_size=window), 1, AttnMaskType.causal, "self")
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    out_ref = ref(qr, kr, vr, _causal_mask(seq))
    out_ref.backward(dout)

    ours = LongctxCoreAttention(
        _config(P, window_size=window), 1, AttnMaskType.causal, "self",
        settings=LongctxSettings(strategy=strategy),
    )
    local = [shard(x, "zigzag", P, rank, dim=0).requires_grad_() for x in (q, k, v)]
    out = ours(*local, None)
    out.backward(shard(dout, "zigzag", P, rank, dim=0))
    pairs = [(out, out_ref)] + [(x.grad, y.grad) for x, y in zip(local, (qr, kr, vr))]
    return ours.strategy, [
        float((a - shard(b, "zigzag", P, rank, dim=0)).abs().max()) for a, b in pairs
    ]


def gpt_cp_vs_plain(group, seq: int = 16, batch: int = 2, vocab: int = 64):
    """megatron GPTModel with gpt_layer_spec() at CP=2 vs the local spec (DPA) on one rank."""
    import torch.distributed as dist
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from longctx.integrations.megatron import gpt_layer_spec
    from longctx.parallel.layout import shard

    rank, P = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    pos = torch.arange(seq).expand(batch, seq)
    kw = {"vocab_size": vocab, "max_sequence_length": seq,
          "position_embedding_type": "learned_absolute"}

    torch.manual_seed(0)
    plain = GPTModel(_config(1, num_layers=2), get_gpt_layer_local_spec(), **kw).double()
    cp_model = GPTModel(_config(P, num_layers=2), gpt_layer_spec(), **kw).double()
    cp_model.load_state_dict(plain.state_dict())

    loss_ref = plain(ids, pos, _causal_mask(seq), labels=labels)  # [b, s] per-token loss
    loss_ref.sum().backward()
    local = [shard(x, "zigzag", P, rank) for x in (ids, pos, labels)]
    loss = cp_model(*local[:2], None, labels=local[2])  # [b, s/P]
    loss.sum().backward()
    errs = [float((loss - shard(loss_ref, "zigzag", P, rank)).abs().max())]
    for p, p_ref in zip(cp_model.parameters(), plain.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)  # the dp x cp gradient reduction
        errs.append(float((grad - p_ref.grad).abs().max()))
    return errs


def packed_sbhd_cp(group, seq: int = 16):
    """sbhd rows packed with global cu_seqlens (packed_seq_params) under CP=2 vs each document."""
    import torch.distributed as dist
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from longctx.integrations.megatron import LongctxCoreAttention
    from longctx.parallel.layout import shard

    rank, P = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(seq, 1, 4, 8, generator=g, dtype=torch.float64)  # [s, b, np, hn]
    k = torch.randn(seq, 1, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(seq, 1, 2, 8, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 7, 16], dtype=torch.int32)  # a document boundary inside rank 0's chunk
    params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    attn = LongctxCoreAttention(_config(P), 1, AttnMaskType.causal, "self")
    local = [shard(x, "zigzag", P, rank, dim=0) for x in (q, k, v)]
    out = attn(*local, None, packed_seq_params=params)  # [s/P, 1, np*hn]
    ref = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            q[lo:hi, 0].transpose(0, 1), k[lo:hi, 0].repeat_interleave(2, 1).transpose(0, 1),
            v[lo:hi, 0].repeat_interleave(2, 1).transpose(0, 1), is_causal=True,
        ).transpose(0, 1).reshape(hi - lo, 1, 32)  # [np, t, hn] -> [t, 1, np*hn]
        for lo, hi in [(0, 7), (7, 16)]
    ])
    return float((out - shard(ref, "zigzag", P, rank, dim=0)).abs().max())


def thd_cp(group, lengths=(8, 12, 4)):
    """THD under CP=2 in Transformer Engine's layout (each document zigzag-split) vs each
    document alone."""
    import torch.distributed as dist
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from longctx.integrations.megatron import LongctxCoreAttention
    from longctx.parallel.layout import shard

    rank, P = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(5)
    t = sum(lengths)
    q = torch.randn(t, 4, 8, generator=g, dtype=torch.float64)  # [t, np, hn]
    k = torch.randn(t, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(t, 2, 8, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    docs = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    # TE's THD CP layout: every document split in 2P chunks, rank r keeps chunks r and 2P-1-r
    local = [torch.cat([shard(x[lo:hi], "zigzag", P, rank, dim=0) for lo, hi in docs])
             for x in (q, k, v)]
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu,
    )
    out = LongctxCoreAttention(_config(P), 1, AttnMaskType.causal, "self")(
        *local, None, packed_seq_params=params
    )  # [t/P, np*hn]
    ref = [
        torch.nn.functional.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1), k[lo:hi].repeat_interleave(2, 1).transpose(0, 1),
            v[lo:hi].repeat_interleave(2, 1).transpose(0, 1), is_causal=True,
        ).transpose(0, 1).reshape(hi - lo, 32)
        for lo, hi in docs
    ]
    ref_local = torch.cat([shard(r, "zigzag", P, rank, dim=0) for r in ref])
    return float((out - ref_local).abs().max())


def mismatched_group(group):
    """A config whose context_parallel_size differs from the CP group must be refused."""
    from megatron.core.transformer.enums import AttnMaskType

    from longctx.integrations.megatron import LongctxCoreAttention

    try:
        LongctxCoreAttention(_config(4), 1, AttnMaskType.causal, "self")
    except ValueError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def mesh():
    with SimulatedMesh(2) as m:
        assert m.run(_init) == [2, 2]
        yield m


@pytest.mark.parametrize(
    "strategy,window",
    [(None, None), ("ring", None), ("ulysses", None), ("allgather", None), ("zigzag", (3, 0))],
)
def test_core_attention_matches_dot_product_attention(mesh, strategy, window):
    for used, errs in mesh.run(core_vs_dpa, strategy, window):
        assert used == (strategy or "zigzag")  # cp_comm_type None -> p2p -> zigzag
        assert max(errs) < TOL, errs


def test_gpt_model_cp2_matches_plain(mesh):
    for errs in mesh.run(gpt_cp_vs_plain):
        assert len(errs) > 10 and max(errs) < TOL, errs


def test_packed_sbhd_documents_cp2(mesh):
    for err in mesh.run(packed_sbhd_cp):
        assert err < TOL, err


def test_thd_documents_cp2(mesh):
    for err in mesh.run(thd_cp):
        assert err < TOL, err


def test_group_config_mismatch_is_refused(mesh):
    for msg in mesh.run(mismatched_group):
        assert msg is not None and "context_parallel_size=4" in msg and "2 ranks" in msg


def test_thd_packed_documents_cp1():
    """THD + cu_seqlens: each document attends causally inside itself (no process group)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from longctx.integrations.megatron import LongctxCoreAttention

    g = torch.Generator().manual_seed(2)
    q = torch.randn(12, 4, 8, generator=g, dtype=torch.float64)  # [t, np, hn]
    k = torch.randn(12, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(12, 2, 8, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    attn = LongctxCoreAttention(_config(1), 1, AttnMaskType.causal, "self")
    out = attn(q, k, v, None, packed_seq_params=params)  # [t, np*hn]
    assert out.shape == (12, 32)
    for lo, hi in [(0, 5), (5, 12)]:  # each document alone through SDPA
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1),
            k[lo:hi].repeat_interleave(2, 1).transpose(0, 1),
            v[lo:hi].repeat_interleave(2, 1).transpose(0, 1),
            is_causal=True,
        )  # [np, t_doc, hn]
        assert torch.allclose(out[lo:hi], ref.transpose(0, 1).reshape(hi - lo, 32), atol=TOL)


def test_bad_settings_are_refused():
    from megatron.core.transformer.enums import AttnMaskType

    from longctx.integrations.megatron import LongctxCoreAttention, LongctxSettings

    with pytest.raises(ValueError, match="attention_dropout=0.0"):
        LongctxCoreAttention(
            _config(1), 1, AttnMaskType.causal, "self", attention_dropout=0.1
        )
    with pytest.raises(ValueError, match="cp_comm_type='a2a\\+p2p'"):
        LongctxCoreAttention(_config(1), 1, AttnMaskType.causal, "self", cp_comm_type="a2a+p2p")
    with pytest.raises(ValueError, match="causal windows"):
        LongctxCoreAttention(_config(1, window_size=(4, 2)), 1, AttnMaskType.causal, "self")
    with pytest.raises(ValueError, match="unknown layout"):
        LongctxSettings(layout="diagonal")


def test_transformer_engine_spec():
    """The TE spec swaps in the same core attention; without TE the error says what to do."""
    from megatron.core.models.gpt import gpt_layer_specs

    from longctx.integrations.megatron import LongctxCoreAttention, gpt_layer_spec

    if not gpt_layer_specs.HAVE_TE:
        with pytest.raises(ImportError, match="transformer_engine=False"):
            gpt_layer_spec(transformer_engine=True)
        spec = gpt_layer_spec()
    else:
        spec = gpt_layer_spec(transformer_engine=True)
    core = spec.submodules.self_attention.submodules.core_attention
    assert issubclass(core, LongctxCoreAttention) and core.settings.layout == "zigzag"


def test_non_zigzag_layout_under_cp_is_refused(mesh):
    for msg in mesh.run(_contiguous_layout_error):
        assert msg is not None and "get_pos_emb_on_this_cp_rank" in msg


def _contiguous_layout_error(group):
    from megatron.core.transformer.enums import AttnMaskType

    from longctx.integrations.megatron import LongctxCoreAttention, LongctxSettings

    try:
        LongctxCoreAttention(
            _config(2), 1, AttnMaskType.causal, "self",
            settings=LongctxSettings(strategy="ring", layout="contiguous"),
        )
    except ValueError as exc:
        return str(exc)
    return None


def test_readme_example(tmp_path):
    """The README's megatron example, as written, under torchrun with 2 gloo processes."""
    run_readme_example("megatron", tmp_path)


def test_pretrain_script_cp2():
    """launch/pretrain_megatron.py under torchrun: 2 gloo processes, CP=2, finite losses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "launch/pretrain_megatron.py", "--cp", "2", "--steps", "3"],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split() for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [int(s[1]) for s in steps] == [0, 1, 2], proc.stdout
    assert all(s[5] == "2" and s[9] == "zigzag" for s in steps), proc.stdout
    assert all(torch.isfinite(torch.tensor(float(s[3]))) for s in steps), proc.stdout
