"""Start a run's processes on this machine when ``longctx train`` is not under torchrun.

A config that asks for ``N = dp x cp x tp > 1`` processes (``dp=null`` counts as 1) gets ``N``
processes from torch's elastic launcher (:func:`torch.distributed.launcher.api.elastic_launch`,
what torchrun runs): one node, a c10d rendezvous on ``127.0.0.1`` (a free port), no restarts.
Each process runs :func:`longctx.train.entry.run_rank` with the environment torchrun gives
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so the training
code cannot tell the difference: gloo on CPU (a simulated mesh, threads split evenly over the
cores), NCCL with one GPU each when CUDA has ``N`` devices.  For more than one machine use
torchrun (``launch/train_multi_node.sh``).

Signals and failures, as under torchrun:

- SIGTERM here: the launcher passes it on to every process; they save a checkpoint at the next
  step boundary and exit with 143, which is the launcher's code too.
- Ctrl-C: the terminal sends SIGINT to every process (each saves at the next step boundary, as for
  SIGTERM); the launcher does not pass on that SIGINT (a second one makes the processes stop at
  once) but SIGTERM, which they take as the same request.  A second Ctrl-C stops them at once.
- A process that fails (exits non-zero) stops the others: the launcher sends them SIGTERM.
- In both cases processes still running after ``shutdown_timeout`` seconds are killed: by
  default :data:`SHUTDOWN_TIMEOUT_S`, time for a step and a checkpoint of a large model (None:
  torch's default, ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` or 30 s).  The launcher has one timeout for
  both: ranks left waiting in an NCCL collective by a failed rank are killed after it.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from .entry import EXIT_BAD_CONFIG, EXIT_INTERRUPTED, run_rank

__all__ = ["SHUTDOWN_TIMEOUT_S", "exit_code_of", "launch_local"]

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 300  # seconds between SIGTERM to the processes and SIGKILL
# exit codes a rank chooses (see longctx.train.cli), preferred over crash and kill codes
_CHOSEN_CODES = (EXIT_BAD_CONFIG, EXIT_INTERRUPTED)


def exit_code_of(codes: list[int]) -> int:
    """The run's exit code from its processes' codes (negative: killed by that signal).

    >>> exit_code_of([0, 0]), exit_code_of([1, 143, -15]), exit_code_of([-9, 2]), exit_code_of([-9])
    (0, 143, 2, 1)
    """
    bad = [c for c in codes if c != 0]
    if not bad:
        return 0
    for chosen in (c for c in bad if c in _CHOSEN_CODES):
        return chosen
    positive = [c for c in bad if c > 0]
    return positive[0] if positive else 1


@contextmanager
def _restored_signal_handlers() -> Iterator[None]:
    """The agent installs its signal handlers (and notes them in the environment) for good; a
    caller that goes on (tests, notebooks) gets its own back."""
    signals = [getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
               if hasattr(signal, n)]
    handlers = {s: signal.getsignal(s) for s in signals}
    env_key = "TORCHELASTIC_SIGNALS_TO_HANDLE"
    env = os.environ.get(env_key)
    try:
        yield
    finally:
        for s, h in handlers.items():
            if h is not None:
                signal.signal(s, h)
        if env is None:
            os.environ.pop(env_key, None)
        else:
            os.environ[env_key] = env


@contextmanager
def _torch_launcher_logs_off() -> Iterator[None]:
    """Silence torch's launcher loggers (a rank that exits with 2 or 143 already said why; other
    failures are reported from the :class:`ChildFailedError`, with the rank's traceback)."""
    names = [n for n in logging.root.manager.loggerDict
             if n.startswith(("torch.distributed.elastic", "torch.distributed.launcher",
                              "torch.multiprocessing"))]
    previous = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for n, level in previous.items():
            logging.getLogger(n).setLevel(level)


def launch_local(config: Any, world_size: int, *, device_type: str = "cpu", quiet: bool = False,
                 shutdown_timeout: int | None = SHUTDOWN_TIMEOUT_S,
                 entrypoint: Callable[[Any, int, bool], None] = run_rank) -> int:
    """Run ``config`` on ``world_size`` local processes; returns the run's exit code.

    Every process calls ``entrypoint(config, threads, quiet)`` (default
    :func:`~longctx.train.entry.run_rank`: train; a module-level function, pickled to the
    processes), which returns on success and raises ``SystemExit(code)`` otherwise.
    """
    if device_type == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"the config asks for {world_size} processes but this machine has "
            f"{torch.cuda.device_count()} GPU(s); launch with torchrun across nodes "
            "(launch/train_multi_node.sh) or lower parallel.dp/cp/tp"
        )
    cores = os.cpu_count() or 1
    threads = max(1, cores // world_size) if device_type == "cpu" else 1
    error_files = tempfile.TemporaryDirectory(prefix="longctx-launch-")  # the ranks' tracebacks
    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=world_size,
        logs_specs=DefaultLogsSpecs(log_dir=error_files.name),
        run_id=f"longctx-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", local_addr="127.0.0.1",
        max_restarts=0, monitor_interval=0.1, start_method="spawn",
        # Ctrl-C reaches every process from the terminal already: the launcher leaves SIGINT to
        # Python (KeyboardInterrupt), and the agent then sends SIGTERM, not a second SIGINT
        signals_to_handle="SIGTERM,SIGHUP,SIGQUIT",
        shutdown_timeout=shutdown_timeout,
    )
    try:
        with error_files, _restored_signal_handlers(), _torch_launcher_logs_off():
            elastic_launch(launch, entrypoint)(config, threads, quiet)
    except ChildFailedError as e:  # (its message was read from the error files)
        code = exit_code_of([f.exitcode for f in e.failures.values()])
        if code not in _CHOSEN_CODES:
            logger.error("longctx train: a process failed; the others were stopped\n%s",
                         e.format_msg())
        return code
    except SignalException as e:  # the processes were sent the same signal and stopped
        logger.debug("launcher stopped by %s", e.sigval)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # Ctrl-C: the processes were sent SIGTERM and stopped
        return EXIT_INTERRUPTED
    return 0
