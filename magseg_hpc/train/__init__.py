"""Training: AugSeg and the supervised baseline.

``run_training(cfg, output_dir) -> dict`` is the in-process entry point used by
``magseg-hpc train``, torchrun and ``python -m magseg_hpc.submit``.
"""

from magseg_hpc.train.loop import run_training

__all__ = ["run_training"]
