"""Stop requests (signals) and the non-finite guard: what ends or skips a step on purpose."""
import logging
import os
import signal

import torch

logger = logging.getLogger(__name__)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGUSR1: SLURM's early warning, --signal=USR1@N


class StopRequest:
    """SIGTERM, SIGUSR1 and Ctrl-C set a flag; the loop checks it at every micro-step and stops with a checkpoint.

    Any number of SIGTERM / SIGUSR1 only set the flag again: scancel and preemption signal every process, and
    torchrun forwards a second SIGTERM to its workers. Only a second Ctrl-C quits at once (KeyboardInterrupt).
    DataLoader workers forked afterwards inherit the handler, so they keep serving batches until the stop.
    """

    def __init__(self):
        self.requested = False
        self.stopping = False  # set by the all-reduced checks: some process asked
        self.interrupts = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:  # a second Ctrl-C from a terminal: quit now
                raise KeyboardInterrupt
        if not self.requested:
            logger.warning(f"signal {signal.Signals(signum).name}: stopping with a checkpoint at the next micro-step")
        self.requested = True

    def any_process(self, accelerator) -> bool:
        self.stopping = any_process(accelerator, self.requested)
        return self.stopping


def any_process(accelerator, flag: bool) -> bool:
    """True where `flag` is True on some process: one all-reduce with several processes, none with one (no host
    sync with the GPU)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0)


def injected(name: str, accelerator, step: int, micro) -> bool:
    """Test-only fault injection, read here only: DIFFUSION_ALIGN_INJECT_NAN (the loss becomes NaN) and
    DIFFUSION_ALIGN_INJECT_SIGNAL (the process sends itself SIGUSR1) hold comma-separated `STEP[.MICRO][@RANK]`:
    STEP the metrics.jsonl step (from 1); MICRO the micro-step (from 0; default 0), or (signals only) `end` for the
    step's end, after its update, or `validation` for the start of the step's validation grid; RANK one process
    (default: all)."""
    for item in filter(None, os.environ.get(f"DIFFUSION_ALIGN_INJECT_{name}", "").split(",")):
        where, _, rank = item.partition("@")
        at_step, _, at_micro = where.partition(".")
        if (int(at_step), at_micro or "0") == (step, str(micro)) and rank in ("", str(accelerator.process_index)):
            return True
    return False


class NonFiniteGuard:
    """Skip updates whose loss (any micro-step) or gradient is not finite on any process; after `patience`
    such steps in a row, checkpoint the last good step and stop (Diverged, exit code 4).

    `check` is the one collective of a micro-step: it all-reduces the loss's finiteness and the stop flag, which
    waits for the GPU to finish the forward before the host may queue the backward. `defer=True` (one process, see
    `defers_loss_check`) waits for nothing: the loss's finiteness is kept on the device (`pending`) for the update's
    one host sync, and the stop flag is this process's own."""

    def __init__(self, patience: int = 3, start_step: int = 0, defer: bool = False):
        self.patience, self.in_a_row, self.total, self.last_good = patience, 0, 0, start_step
        self.defer, self.pending = defer, None

    def check(self, accelerator, loss: torch.Tensor, stop: StopRequest, step: int, micro: int = 0):
        """(every process's loss is finite, some process asked to stop); `step` is the step being computed (from 1)."""
        if injected("SIGNAL", accelerator, step, micro):
            os.kill(os.getpid(), signal.SIGUSR1)  # the real handler, at a known micro-step
        if injected("NAN", accelerator, step, micro):
            loss.detach().fill_(float("nan"))  # the loss and its logged value; its update is then skipped
        if self.defer:  # the update is skipped through `take_pending`; the gradients of this backward are dropped
            bad = ~torch.isfinite(loss.detach()).all()
            self.pending = bad if self.pending is None else self.pending | bad
            stop.stopping = stop.requested
            return True, stop.stopping
        flags = torch.tensor([float(not torch.isfinite(loss.detach()).all()), float(stop.requested)],
                             device=accelerator.device)
        bad, stopping = accelerator.reduce(flags, reduction="sum").tolist()
        stop.stopping = stopping > 0
        return bad == 0, stop.stopping

    def take_pending(self):
        """The deferred flag of the accumulation now ending (None when not deferred); reset for the next one."""
        pending, self.pending = self.pending, None
        return pending

    def end_step(self, global_step: int, skipped: bool) -> bool:
        """Count the step; True once `patience` steps in a row were skipped (the run must end: Run checkpoints the
        last good step and raises Diverged with `diverged_message`)."""
        if not skipped:
            self.in_a_row, self.last_good = 0, global_step
            return False
        self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
        logger.warning(f"step {global_step}: non-finite loss or gradient; update skipped ({self.in_a_row} in a row)")
        return self.in_a_row >= self.patience

    def diverged_message(self, global_step: int, checkpoint) -> str:
        saved = f"{checkpoint} holds the last good step" if checkpoint else "no step was good, nothing saved"
        return (f"non-finite loss or gradient in {self.in_a_row} steps in a row (steps {self.last_good + 1}-"
                f"{global_step}); {saved}. Lower --learning_rate, use bf16 instead of fp16, or check the reward / "
                f"data (see metrics.jsonl)")


def defers_loss_check(requested: bool, accelerator) -> bool:
    """A deferred loss check (`requested`, e.g. --defer_loss_check) applies: one process (stop flags from others
    need a collective each micro-step), no fp16 GradScaler (it would see a non-finite loss's gradients and lower its
    scale) and no DeepSpeed (its engine steps inside backward, before the deferred flag is read)."""
    from accelerate.utils import DistributedType

    return (requested and accelerator.num_processes == 1 and accelerator.scaler is None
            and accelerator.distributed_type != DistributedType.DEEPSPEED)
