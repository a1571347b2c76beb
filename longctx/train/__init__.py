"""The pretraining path: ``longctx train --config configs/<run>.yaml`` (see :mod:`.trainer`).

- :mod:`.config`: :class:`TrainConfig`, YAML + ``--set`` overrides, typed checks.
- :mod:`.trainer`: :class:`Trainer`, the loop; :mod:`.loss`: chunked cross-entropy;
  :mod:`.optim`: AdamW + schedule; :mod:`.checkpoint`: DCP; :mod:`.metrics`: TensorBoard, MFU.
- :mod:`.distributed`: process-group start-up; :mod:`.launcher`: a local CPU/GPU mesh of
  processes when not under torchrun (torch's elastic launcher); :mod:`.entry`: what each process
  runs, and the console logging; :mod:`.cli`: the command line (cli -> launcher -> entry).
"""

from .config import TrainConfig, load_config
from .loss import chunked_cross_entropy, cross_entropy_sum
from .trainer import GracefulStop, Trainer, TrainingInterrupted, TrainSummary

__all__ = [
    "GracefulStop",
    "TrainConfig",
    "TrainSummary",
    "Trainer",
    "TrainingInterrupted",
    "chunked_cross_entropy",
    "cross_entropy_sum",
    "load_config",
]
