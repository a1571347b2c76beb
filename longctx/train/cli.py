"""``longctx train`` / ``python -m longctx.train``: train from a YAML config.

    longctx train                                    # the embedded default: configs/tiny.yaml
    longctx train --config configs/tiny.yaml --set train.steps=200 --set optim.lr=1e-3
    longctx train --config configs/llama_1b_128k.yaml --print-config
    torchrun --nproc-per-node 4 -m longctx.train --config configs/llama_1b_128k.yaml

Not under torchrun, a config that needs ``N > 1`` processes starts them here (a simulated CPU
mesh over gloo, or one process per local GPU) with torch's elastic launcher, as torchrun would:
see :mod:`longctx.train.launcher`.  Under torchrun (or ``launch/*.sh``) every process trains
directly (:mod:`longctx.train.entry`); ``parallel.dp: null`` takes the ranks left.  Progress goes
to stdout from rank 0, warnings and errors to stderr (``logging``, plain lines).

Exit codes: 0 done; 2 bad config or data (the message says which key and what to change);
143 stopped by SIGTERM / Ctrl-C after saving a checkpoint (run the same command to resume).
"""

from __future__ import annotations

import argparse
import logging

from .entry import EXIT_BAD_CONFIG, log_error, run_training, setup_console_logging

__all__ = ["add_arguments", "main", "run_from_args"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", metavar="YAML",
        help="run config (default: the embedded tiny CPU run, the values of configs/tiny.yaml)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
        help="override a config value by its dotted key, e.g. --set parallel.cp=2 optim.lr=3e-4 "
        "(repeatable; values are YAML: 2, 3e-4, true, null, [0.9, 0.95])",
    )
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config (every key, defaults filled in) and exit",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Load the config, then train here (torchrun / one process) or start local processes."""
    import torch

    from .config import load_config
    from .distributed import launched_by_torchrun

    setup_console_logging()
    overrides = [item for group in args.overrides for item in group]
    try:
        config = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        log_error(str(e))
        return EXIT_BAD_CONFIG
    if args.print_config:
        print(config.to_yaml(), end="")  # the command's output (pipe it to a file), not a log line
        return 0
    if launched_by_torchrun():
        return run_training(config)
    n = config.parallel.world_size()
    if n == 1:
        return run_training(config)
    from .launcher import launch_local

    device = config.train.device
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    logger.info(
        "longctx train: not under torchrun; starting %d local processes (%s) for "
        "dp x cp x tp = %d x %d x %d", n,
        "one GPU each, NCCL" if use_cuda else "CPU, gloo: a simulated mesh",
        config.parallel.dp or 1, config.parallel.cp, config.parallel.tp,
    )
    try:
        return launch_local(config, n, device_type="cuda" if use_cuda else "cpu")
    except ValueError as e:
        log_error(str(e))
        return EXIT_BAD_CONFIG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m longctx.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
