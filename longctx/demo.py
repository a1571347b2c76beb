"""The embedded default job: context-parallel attention on a simulated CPU mesh vs. the reference.

Runs every strategy on a 4-process gloo mesh over one sequence, forward and backward, and prints
how far each is from the single-process reference (float64), and how long it took.

    longctx demo                      # 4 ranks, 2048 tokens
    longctx demo --world-size 8 --tokens-per-rank 128 --mask documents
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from .testing import MASK_KINDS, CPCase, SimulatedMesh, check_cp_case

DEMO_COMBOS = [
    ("ring", "contiguous"),
    ("zigzag", "zigzag"),
    ("striped", "striped"),
    ("allgather", "contiguous"),
]


@dataclass(frozen=True)
class DemoConfig:
    world_size: int = 4
    tokens_per_rank: int = 512
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 32
    masks: tuple[str, ...] = ("causal", "documents")
    tolerance: float = 1e-10


def run_demo(config: DemoConfig = DemoConfig()) -> bool:
    """Run the demo; returns True when every strategy agrees with the reference."""
    seq = config.world_size * config.tokens_per_rank
    print(
        f"longctx demo: {config.world_size} CPU processes (gloo), sequence {seq} tokens, "
        f"H={config.heads} H_kv={config.kv_heads} D={config.head_dim}, float64\n"
    )
    header = f"{'strategy':<10} {'layout':<11} {'mask':<12} {'max |err| out':>14} {'max |err| grads':>16} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    ok = True
    with SimulatedMesh(config.world_size) as mesh:
        for mask in config.masks:
            for strategy, layout in DEMO_COMBOS:
                case = CPCase(
                    strategy, layout, mask, world_size=config.world_size, batch=1,
                    tokens_per_rank=config.tokens_per_rank, heads=config.heads,
                    kv_heads=config.kv_heads, head_dim=config.head_dim,
                )
                start = time.perf_counter()
                err = check_cp_case(mesh, case)
                seconds = time.perf_counter() - start
                e_out = max(err["out"], err["lse"])
                e_grad = max(err["dq"], err["dk"], err["dv"])
                ok &= max(e_out, e_grad) < config.tolerance
                print(
                    f"{strategy:<10} {layout:<11} {mask:<12} {e_out:>14.2e} {e_grad:>16.2e} "
                    f"{seconds:>8.2f}"
                )
    verdict = "agree with" if ok else "DISAGREE with"
    print(f"\nall strategies {verdict} the single-process reference (tolerance {config.tolerance:g})")
    return ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--world-size", type=int, default=d.world_size)
    parser.add_argument("--tokens-per-rank", type=int, default=d.tokens_per_rank)
    parser.add_argument("--heads", type=int, default=d.heads)
    parser.add_argument("--kv-heads", type=int, default=d.kv_heads)
    parser.add_argument("--head-dim", type=int, default=d.head_dim)
    parser.add_argument(
        "--mask", action="append", choices=MASK_KINDS, help="repeatable; default: causal, documents"
    )


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(
        world_size=args.world_size,
        tokens_per_rank=args.tokens_per_rank,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        masks=tuple(args.mask) if args.mask else DemoConfig.masks,
    )
