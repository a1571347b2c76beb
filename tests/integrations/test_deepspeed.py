"""DeepSpeed adapter on CPU over gloo, 2 processes: ZeRO with CP=2 vs the plain engine, Ulysses
(DistributedAttention) and ALST (UlyssesSPAttentionHF) with longctx's attention inside.

Test-only setup in the workers: the environment torchrun would set (LOCAL_RANK, ...), and
DeepSpeed's shared-memory CPU op marked unavailable, so that DeepSpeed does not JIT-compile it
(tens of seconds on first start) and uses gloo alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from integration_support import require_or_skip, run_readme_example

require_or_skip("deepspeed")

from longctx.testing import SimulatedMesh  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _deepspeed_worker_setup(group) -> int:
    import deepspeed.ops
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build in tests
    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.update(
        LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world)
    )
    return world


class TinyCausalLM(torch.nn.Module):
    """Embedding, one causal GQA attention through longctx, a head; returns the token-loss sum."""

    def __init__(self, vocab: int = 32, dim: int = 16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 32)
        self.o = torch.nn.Linear(16, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids, labels, group=None):
        import longctx

        x = self.emb(ids)  # [b, s, dim]
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([16, 8, 8], dim=-1)
        q, k, v = q.view(b, s, 4, 4), k.view(b, s, 2, 4), v.view(b, s, 2, 4)
        a = longctx.attention(
            q, k, v, group, strategy="zigzag" if group is not None else "ring",
            mask=longctx.Mask(causal=True),
        )
        logits = self.head(x + self.o(a.reshape(b, s, 16)))
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), reduction="sum"
        )


def zero_cp_vs_plain(group, stage: int, steps: int = 3, seq: int = 16):
    """Losses of `steps` SGD steps: the plain engine (full rows) and ZeRO-`stage` with CP=2."""
    import torch.distributed as dist

    from longctx.integrations.deepspeed import ContextParallelMPU, initialize_engine
    from longctx.parallel.layout import shard

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 32, (1, seq + 1), generator=g) for _ in range(steps)]
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10_000,
    }

    def train(mpu):
        torch.manual_seed(0)
        model = TinyCausalLM()
        engine = initialize_engine(
            model, config, mpu=mpu, optimizer=torch.optim.SGD(model.parameters(), lr=0.5)
        )
        losses = []
        for row in rows:
            ids, labels = row[:, :-1], row[:, 1:]  # labels shifted before sharding
            if mpu is None:  # both ranks train on the same full row: data parallel of copies
                loss = engine(ids, labels) / seq
                reported = loss.detach().clone()
            else:
                P, r = mpu.get_context_parallel_world_size(), mpu.get_context_parallel_rank()
                ids, labels = (shard(x, "zigzag", P, r) for x in (ids, labels))
                loss = mpu.loss(engine(ids, labels, mpu.get_context_parallel_group()), seq)
                reported = loss.detach().clone()
                dist.all_reduce(reported, group=mpu.get_context_parallel_group())
                reported /= P
            engine.backward(loss)
            engine.step()
            losses.append(float(reported))
        return losses

    return train(None), train(ContextParallelMPU.build(cp_size=2))


class TiedHidden(torch.nn.Module):
    """TinyCausalLM's body returning hidden states; its output weight is the embedding (tied),
    read by the loss outside forward, as in longctx's LlamaModel."""

    def __init__(self, vocab: int = 32, dim: int = 16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 32)
        self.o = torch.nn.Linear(16, dim)

    @property
    def output_weight(self):
        return self.emb.weight

    def forward(self, ids, group=None):
        import longctx

        x = self.emb(ids)
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([16, 8, 8], dim=-1)
        a = longctx.attention(
            q.view(b, s, 4, 4), k.view(b, s, 2, 4), v.view(b, s, 2, 4), group,
            strategy="zigzag" if group is not None else "ring", mask=longctx.Mask(causal=True),
        )
        return x + self.o(a.reshape(b, s, 16))  # [b, s, dim]


def _token_loss_sum(hidden, weight, labels):
    return torch.nn.functional.cross_entropy(
        (hidden @ weight.T).flatten(0, 1), labels.flatten(), reduction="sum"
    )


def loss_engine_cp_vs_plain(group, stage: int, steps: int = 2, accum: int = 2, seq: int = 16):
    """DeepSpeedLossEngine with 2 micro-batches per step: plain (dp copies) vs CP=2."""
    import torch.distributed as dist

    from longctx.integrations.deepspeed import ContextParallelMPU, DeepSpeedLossEngine
    from longctx.parallel.layout import shard

    g = torch.Generator().manual_seed(6)
    rows = [torch.randint(0, 32, (1, seq + 1), generator=g) for _ in range(accum)] * steps
    config = {  # every step sees the same micro-batches: its loss must fall
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": stage}, "steps_per_print": 10_000,
    }

    def train(mpu, cp):
        torch.manual_seed(0)
        model = TiedHidden()
        eng = DeepSpeedLossEngine(
            model, config, mpu=mpu, loss_fn=_token_loss_sum,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.02),
        )
        world = dist.get_world_size()
        losses = []
        for i in range(steps):
            total = torch.zeros(())
            for row in rows[i * accum : (i + 1) * accum]:
                ids, labels = row[:, :-1], row[:, 1:]
                if cp is not None:
                    P, r = dist.get_world_size(cp), dist.get_rank(cp)
                    ids, labels = (shard(x, "zigzag", P, r) for x in (ids, labels))
                loss_sum = eng.forward(ids, cp, labels=labels)
                # the step's label tokens over all ranks: copies count twice without CP
                eng.backward(loss_sum, accum * seq * (world if cp is None else 1))
                total += loss_sum.detach()
            eng.step()
            dist.all_reduce(total)
            losses.append(float(total) / (accum * seq * (world if cp is None else 1)))
        return losses

    mpu = ContextParallelMPU.build(cp_size=2)
    plain = train(ContextParallelMPU.build(cp_size=1), None)
    return plain, train(mpu, mpu.get_context_parallel_group())


def ulysses_distributed_attention(group, seq: int = 16):
    """DeepSpeed's DistributedAttention around UlyssesLocalAttention vs one process, with grads."""
    import torch.distributed as dist
    from deepspeed.sequence.layer import DistributedAttention

    import longctx
    from longctx.integrations.deepspeed import UlyssesLocalAttention
    from longctx.parallel.layout import shard

    rank, P = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(seq, 2, 4, 8, generator=g, dtype=torch.float64)  # [s, b, h, d]
    k = torch.randn(seq, 2, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(seq, 2, 2, 8, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 6, 16])
    mask = longctx.Mask(causal=True, cu_seqlens=cu)
    ref_q, ref_k, ref_v = (x.transpose(0, 1).clone().requires_grad_() for x in (q, k, v))
    ref = longctx.attention(ref_q, ref_k, ref_v, mask=mask)  # [b, s, h, d]
    ref.square().sum().backward()

    attn = DistributedAttention(UlyssesLocalAttention(causal=True), group)
    local = [shard(x, "contiguous", P, rank, dim=0).requires_grad_() for x in (q, k, v)]
    out = attn(*local, 1, cu_seqlens=cu)  # batch_dim_idx=1: [s/P, b, h, d]
    out.square().sum().backward()
    pairs = [(out, ref.transpose(0, 1))] + [
        (x.grad, y.grad.transpose(0, 1)) for x, y in zip(local, (ref_q, ref_k, ref_v))
    ]
    return [float((a - shard(b, "contiguous", P, rank, dim=0)).abs().max()) for a, b in pairs]


def alst_llama(group, seq: int = 16):
    """ALST (UlyssesSPAttentionHF) over longctx's core attention: a tiny Llama's logits."""
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from longctx.integrations.deepspeed import register_ulysses_hf
    from longctx.parallel.layout import shard

    rank, P = dist.get_rank(group), dist.get_world_size(group)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config).double()
    ids = torch.randint(0, 64, (1, seq), generator=torch.Generator().manual_seed(2))
    pos = torch.cat([torch.arange(6), torch.arange(10)])[None]  # two packed documents
    ref = torch.cat([plain(input_ids=ids[:, :6]).logits, plain(input_ids=ids[:, 6:]).logits], 1)

    model = LlamaForCausalLM(config).double()
    model.load_state_dict(plain.state_dict())
    register_ulysses_hf(model, sequence_parallel_size=P, micro_batch_size=1)
    local_ids, local_pos = (shard(x, "contiguous", P, rank) for x in (ids, pos))
    logits = model(input_ids=local_ids, position_ids=local_pos).logits
    return float((logits - shard(ref, "contiguous", P, rank)).abs().max())


@pytest.fixture(scope="module")
def mesh():
    with SimulatedMesh(2) as m:
        assert m.run(_deepspeed_worker_setup) == [2, 2]
        yield m


@pytest.mark.parametrize("stage", [3, 1])
def test_zero_cp2_matches_plain_engine(mesh, stage):
    for plain, cp in mesh.run(zero_cp_vs_plain, stage):
        assert len(plain) == 3 and plain[-1] < plain[0]
        assert max(abs(a - b) for a, b in zip(plain, cp)) < 1e-5, (plain, cp)


@pytest.mark.parametrize("stage", [3, 2])
def test_loss_engine_cp2_with_accumulation_matches_plain(mesh, stage):
    for plain, cp in mesh.run(loss_engine_cp_vs_plain, stage):
        assert len(plain) == 2 and plain[1] < plain[0]
        assert max(abs(a - b) for a, b in zip(plain, cp)) < 1e-5, (plain, cp)


def test_ulysses_local_attention(mesh):
    for errs in mesh.run(ulysses_distributed_attention):
        assert max(errs) < 1e-12, errs


def test_alst_core_attention(mesh):
    require_or_skip("transformers")
    for err in mesh.run(alst_llama):
        assert err < 1e-10, err


def test_trainer_config_errors():
    from longctx.integrations.deepspeed import trainer_deepspeed_config
    from longctx.train.config import TrainConfig

    cfg = TrainConfig.from_dict({
        "parallel": {"cp": 2, "fsdp": True}, "checkpoint": {"enabled": True},
        "eval": {"num_samples": 4},
    })
    with pytest.raises(ValueError, match="parallel.fsdp: false.*checkpoint.enabled: false"):
        trainer_deepspeed_config(cfg)
    ok = TrainConfig.from_dict({
        "parallel": {"cp": 2}, "checkpoint": {"enabled": False}, "eval": {"num_samples": 0},
        "train": {"grad_accum_steps": 2, "clip_grad_norm": 0.5},
    })
    ds = trainer_deepspeed_config(ok)
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 1


def test_readme_example(tmp_path):
    """The README's deepspeed example, as written, under torchrun with 2 gloo processes."""
    run_readme_example("deepspeed", tmp_path)


def trainer_losses(group, engine: str, tmp: str, stage: int = 3, steps: int = 3):
    """``longctx train``'s Trainer on this mesh (CP=2): per-step losses and gradient norms."""
    from longctx.train import Trainer, load_config

    overrides = [
        f"output_dir={tmp}", f"name={engine}{stage}", "parallel.cp=2", "parallel.dp=1",
        f"train.steps={steps}", "train.grad_accum_steps=2", "model.num_layers=2",
        "model.seq_length=128", "data.synthetic.num_samples=16", "data.synthetic.max_length=120",
        "data.synthetic.min_length=60", f"data.synthetic_path={tmp}/syn.jsonl",
        "logging.tensorboard=false", "checkpoint.enabled=false", "eval.num_samples=0",
        f"train.engine={engine}",
    ]
    if engine == "deepspeed":
        overrides.append(f"train.deepspeed.zero_optimization.stage={stage}")
    trainer = Trainer(load_config(None, overrides), quiet=True)
    try:
        out = []
        for _ in range(steps):
            m = trainer.train_step(trainer.next_micro_batches())
            out.append((m.loss, m.grad_norm))
        return out
    finally:
        trainer.close()


def test_longctx_train_engine_deepspeed_zero3_matches_torch(mesh, tmp_path):
    """``longctx train`` with train.engine: deepspeed (ZeRO-3, CP=2, 2 micro-batches per step)
    gives the torch engine's losses and gradient norms."""
    torch_run = mesh.run(trainer_losses, "torch", str(tmp_path))
    ds_run = mesh.run(trainer_losses, "deepspeed", str(tmp_path))
    assert torch_run[0] == torch_run[1] and ds_run[0] == ds_run[1]  # every rank logs the same
    (l0, _), (l_last, _) = torch_run[0][0], torch_run[0][-1]
    assert l_last < l0
    for (loss, norm), (loss_ds, norm_ds) in zip(torch_run[0], ds_run[0]):
        assert abs(loss - loss_ds) < 1e-5 * loss and abs(norm - norm_ds) < 1e-4 * norm
