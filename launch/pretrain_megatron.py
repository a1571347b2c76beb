"""Pretrain megatron-core's GPTModel with longctx's context-parallel attention (synthetic tokens).

Each batch is cut with megatron's own ``get_batch_on_this_cp_rank`` (longctx's zigzag layout),
the core attention is :class:`longctx.integrations.megatron.LongctxCoreAttention`, the loss is
the sum of token losses over the data x context parallel ranks divided by their token count, and
gradients are summed over that group. On GPUs (NCCL) the model uses RoPE; on CPUs (gloo) learned
absolute positions, because megatron's RoPE moves its tables to CUDA.

    # smoke test on a laptop: 2 CPU processes, CP=2
    torchrun --nproc-per-node 2 launch/pretrain_megatron.py --cp 2 --steps 5
    # 8 GPUs: CP=4 x DP=2, ulysses
    torchrun --nproc-per-node 8 launch/pretrain_megatron.py --cp 4 --strategy ulysses \\
        --seq-len 32768 --layers 8 --hidden 1024 --heads 16 --kv-heads 4 --steps 100
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cp", type=int, default=1, help="context-parallel size")
    p.add_argument("--strategy", default=None,
                   help="longctx strategy (default: from cp_comm_type p2p -> zigzag)")
    p.add_argument("--kernel", default="auto")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2, help="sequences per data-parallel rank")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def synthetic_batch(step: int, args, dp_rank: int, device) -> dict[str, torch.Tensor]:
    """Learnable sequences ``t_i = (a * i + b) mod vocab``; the label of token i is t_{i+1}."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + step * 1009 + dp_rank)
    a = torch.randint(1, 8, (args.batch, 1), generator=g)
    b = torch.randint(0, args.vocab, (args.batch, 1), generator=g)
    i = torch.arange(args.seq_len + 1)
    seq = (a * i + b) % args.vocab  # [batch, seq_len + 1]
    return {
        "tokens": seq[:, :-1].to(device),
        "labels": seq[:, 1:].to(device),  # shifted before sharding
        "position_ids": i[:-1].expand(args.batch, -1).contiguous().to(device),
    }


def main(argv=None) -> list[float]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.utils import get_batch_on_this_cp_rank

    from longctx.integrations.megatron import gpt_layer_spec

    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=args.cp)
    torch.manual_seed(args.seed)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    config = TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_query_groups=args.kv_heads,
        context_parallel_size=args.cp,
        attention_dropout=0.0,  # longctx attention has no dropout
        hidden_dropout=0.0,
        use_cpu_initialization=not cuda,
    )
    model = GPTModel(
        config,
        gpt_layer_spec(strategy=args.strategy, kernel=args.kernel),
        vocab_size=args.vocab,
        max_sequence_length=args.seq_len,
        position_embedding_type="rope" if cuda else "learned_absolute",
    ).to(device)
    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dp_rank = parallel_state.get_data_parallel_rank()
    for p in model.parameters():  # same start on every rank
        dist.broadcast(p.data, src=dist.get_global_rank(dp_cp, 0), group=dp_cp)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    total_tokens = args.batch * args.seq_len * parallel_state.get_data_parallel_world_size()

    losses = []
    for step in range(args.steps):
        batch = get_batch_on_this_cp_rank(synthetic_batch(step, args, dp_rank, device))
        token_loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        loss = token_loss.float().sum() / total_tokens  # this rank's share of the global mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad, group=dp_cp)
        opt.step()
        reported = loss.detach().clone()
        dist.all_reduce(reported, group=dp_cp)
        losses.append(float(reported))
        if dist.get_rank() == 0:
            print(f"step {step} loss {losses[-1]:.4f} cp {args.cp} "
                  f"dp {parallel_state.get_data_parallel_world_size()} "
                  f"strategy {model.decoder.layers[0].self_attention.core_attention.strategy}",
                  flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
