"""metrics.jsonl, the reduction of a step's metrics over micro-steps and processes, and the step clock."""
import contextlib
import json
import os
import time
from typing import Optional

import torch


# The columns of metrics.jsonl that follow the wall clock (no two runs share them); every other column is a function
# of the seed, the data and the flags.
WALL_CLOCK_KEYS = ("step_seconds", "data_seconds", "tflops", "mfu")


class MetricsLog:
    """metrics.jsonl: one JSON object per optimizer step, flushed at once.

    On resume, lines after the resumed step (written by the interrupted run after its last checkpoint) are
    dropped, so the file continues exactly as an uninterrupted run would have written it.
    """

    def __init__(self, output_dir: str, start_step: int, enabled: bool = True):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if start_step > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # blank, or the last line torn by the crash being resumed from
                        continue
                    if row["step"] <= start_step:
                        kept.append(line.rstrip("\n") + "\n")
        with open(self.path, "w") as f:
            f.writelines(kept)
        self.file = open(self.path, "a")

    def write(self, metrics: dict):
        if self.enabled:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()

    def close(self):
        if self.enabled:
            self.file.close()


def read_metrics(output_dir: str):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def reduce_step_metrics(accelerator, micro_metrics, grad_norm, counts: Optional[dict] = None) -> dict:
    """One metrics dict per optimizer step: each value averaged over the micro-steps, then over processes;
    `counts` (this process's integers, e.g. bad rows) are summed over processes, in the same all-reduce."""
    logs = {k: torch.stack([m[k].float() for m in micro_metrics]).mean() for k in micro_metrics[0]} if micro_metrics else {}
    logs["grad_norm"] = torch.as_tensor(grad_norm, device=accelerator.device).float()
    counts = counts or {}
    logs.update({k: torch.tensor(float(v), device=accelerator.device) for k, v in counts.items()})
    reduced = accelerator.reduce(torch.stack(list(logs.values())), "mean").tolist()  # one transfer, one host sync
    out = dict(zip(logs, reduced))
    out.update({k: int(round(out[k] * accelerator.num_processes)) for k in counts})  # mean x processes = sum
    if torch.cuda.is_available():  # this process's peak since the start: what decides the GPU a run needs
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


class StepClock:
    """The wall-clock fields of a step's metrics. step_seconds runs from the end of the previous step's log (or the
    loop's start) to the end of this step's metrics, whose reduction waits for the GPU: data loading, host work and
    GPU work all count, and the sum over steps is the loop's wall time less the validation grids and checkpoint
    saves (`paused`), which are not steps. data_seconds: the part spent waiting for the batch (`data`)."""

    def __init__(self):
        self.last, self.data_total = time.perf_counter(), 0.0

    def data(self):
        """Time spent waiting for a batch: counted as data_seconds."""
        return self._timed("data_total")

    def paused(self):
        """Time that is not the step's (a checkpoint, a grid): left out of step_seconds."""
        return self._timed("last")

    @contextlib.contextmanager
    def _timed(self, field: str):
        """Add the block's duration to `field`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, field, getattr(self, field) + time.perf_counter() - started)

    def lap(self) -> dict:
        now = time.perf_counter()
        out = {"step_seconds": round(now - self.last, 3), "data_seconds": round(self.data_total, 3)}
        self.last, self.data_total = now, 0.0
        return out


def log_step(accelerator, metrics_log: "MetricsLog", progress, logs: dict, shown=("loss",)):
    """The one metrics dict of a step goes to metrics.jsonl, the trackers and the progress bar alike."""
    metrics_log.write(logs)
    accelerator.log(logs, step=logs["step"])
    progress.set_postfix({k: f"{logs[k]:.4g}" for k in shown if k in logs})
