"""The embedded default job: context-parallel attention on a simulated CPU mesh vs. the reference.

Runs every strategy on a 4-process gloo mesh over one sequence, forward and backward, and prints
how far each is from the single-process reference (float64), and how long it took.

    longctx demo                      # the embedded default: configs/demo.yaml's values
    longctx demo --config configs/demo.yaml --set world_size=8 --set tokens_per_rank=128
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

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
    header = f"{'strategy':<10} {'layout':<11} {'mask':<12} {'max |err| out':>14} {'max |err| grads':>16} {'check s':>8}"
    ok = True
    start = time.perf_counter()
    with SimulatedMesh(config.world_size) as mesh:
        print(f"(mesh of {config.world_size} processes up in {time.perf_counter() - start:.1f}s)\n")
        print(header)
        print("-" * len(header))
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


def _with_values(config: DemoConfig, values: dict, source: str) -> DemoConfig:
    """``config`` with ``values`` applied, each checked against DemoConfig's fields."""
    kinds = {f.name: f.type for f in fields(DemoConfig)}
    updates = {}
    for key, value in values.items():
        if key not in kinds:
            raise ValueError(f"{source}: unknown key {key!r}; allowed keys: {sorted(kinds)}")
        if key == "masks":
            value = tuple([value] if isinstance(value, str) else value)
            bad = [m for m in value if m not in MASK_KINDS]
            if bad:
                raise ValueError(f"{source}: masks {bad} unknown; allowed: {list(MASK_KINDS)}")
        elif key == "tolerance":
            value = float(value)
        else:
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{source}: {key} must be an integer, got {value!r}") from None
        updates[key] = value
    return replace(config, **updates)


def load_config(path: str | None, overrides: list[str]) -> DemoConfig:
    """DemoConfig from an optional YAML file, then ``key=value`` overrides."""
    config = DemoConfig()
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of DemoConfig keys, got {type(values).__name__}")
        config = _with_values(config, values, path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        parsed = value.split(",") if key == "masks" else value
        config = _with_values(config, {key: parsed}, "--set")
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with DemoConfig keys (e.g. configs/demo.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one key, e.g. --set world_size=8 --set masks=causal,window",
    )


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return load_config(args.config, args.set)
