"""One rank of a training run: what every process of ``longctx train`` runs.

The modules call each other in one direction: :mod:`.cli` (arguments, config) starts
:mod:`.launcher` (local processes, when not under torchrun), whose processes run
:func:`run_rank` here; under torchrun (or with one process) :mod:`.cli` calls
:func:`run_training` directly.  The exit codes (:func:`run_training` returns one,
:func:`run_rank` exits with it): 0 done, 2 bad config or data, 143 stopped by SIGTERM / Ctrl-C
after saving a checkpoint.

:func:`setup_console_logging` is the console output of the command: ``logging`` records of the
``longctx`` loggers as plain lines, INFO on stdout from rank 0 only, warnings and errors on
stderr from every rank.  The command calls it once per process; library code only logs.

Example (on a logger of its own; the command's is ``longctx``): installed once, whatever the
number of calls; records below WARNING go to stdout::

    >>> import logging
    >>> from longctx.train.entry import setup_console_logging
    >>> setup_console_logging(name="example") is setup_console_logging(name="example")
    True
    >>> logging.getLogger("example.sub").info("step 1/10 | loss 5.1")
    step 1/10 | loss 5.1
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

__all__ = [
    "EXIT_BAD_CONFIG",
    "EXIT_INTERRUPTED",
    "log_error",
    "run_rank",
    "run_training",
    "setup_console_logging",
]

logger = logging.getLogger(__name__)

EXIT_BAD_CONFIG = 2  # a bad config or data: the message names the key and what to change
EXIT_INTERRUPTED = 143  # 128 + SIGTERM: stopped by a signal after saving a checkpoint


# -- console output -------------------------------------------------------------------------------
def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _ConsoleHandler(logging.Handler):
    """Plain message lines: below WARNING to stdout (rank 0 only), the rest to stderr.

    The streams are looked up when a record is written (``sys.stdout`` may be replaced, e.g. by
    pytest's capture), and flushed after every line so that a launcher's output interleaves in
    order.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and _rank() != 0:
            return
        stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 (logging's own convention)
            self.handleError(record)


def setup_console_logging(level: int = logging.INFO, name: str = "longctx") -> logging.Handler:
    """Install the command's console handler on logger ``name`` (once per process); its records
    do not propagate further (a root handler that a dependency installed would print them
    twice)."""
    root = logging.getLogger(name)
    for handler in root.handlers:
        if isinstance(handler, _ConsoleHandler):
            return handler
    handler = _ConsoleHandler()
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return handler


def log_error(message: str) -> None:
    """``longctx train: error: <message>`` on stderr (``[rank N]`` added on ranks other than 0)."""
    rank = _rank()
    where = f" [rank {rank}]" if rank != 0 else ""
    logger.error("longctx train: error%s: %s", where, message)


# -- one rank -------------------------------------------------------------------------------------
def run_training(config: Any, quiet: bool = False) -> int:
    """Train ``config`` in this process (one rank of the run); returns an exit code."""
    from .trainer import Trainer, TrainingInterrupted

    trainer = None
    try:
        trainer = Trainer(config, quiet=quiet)
        trainer.train()
        return 0
    except TrainingInterrupted as e:
        if trainer is not None and trainer.env.is_main and not quiet:
            logger.warning("longctx train: %s", e)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        log_error(str(e))
        return EXIT_BAD_CONFIG
    finally:
        if trainer is not None:
            trainer.close()


def run_rank(config: Any, threads: int, quiet: bool = False) -> None:
    """The entry point of a locally launched process (the launcher set ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    Returns normally on success; otherwise exits with the run's code, so that the launcher sees a
    failed process and stops the others (they would wait forever in a collective).
    """
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    setup_console_logging()
    code = run_training(config, quiet=quiet)
    if code:
        raise SystemExit(code)
