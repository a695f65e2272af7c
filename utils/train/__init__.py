"""The run protocol every training script shares.

`Run` (run.py) is its face: one object owning a run's accelerator, optimizer, resume, stop requests, non-finite
guard, metrics and checkpoint / validation cadence. Beside it: the common flags (cli.py), how a run ends and its
exit codes (outcome.py), the distributed strategies (distributed.py), the optimizer (optim.py), weights and
checkpoints (checkpoints.py), the guards (guards.py), metrics (metrics.py) and validation grids (validation.py).
"""
from .outcome import run_main
from .run import Run

__all__ = ["Run", "run_main"]
