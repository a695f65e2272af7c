"""`Run`: the one object a training script's loop talks to.

It owns the accelerator, the optimizer and its schedule, `accelerator.prepare`, resume, stop requests, the
non-finite guard, the step clock, metrics.jsonl and the trackers, and the checkpoint and validation cadence. A
script keeps its method (sampling, loss) and reads:

    run = Run(args, "dpo", "DPO", safe_on_resume=...)
    model = run.prepare(model, frozen, is_sdxl=...)
    for step in run.steps():
        for micro in run.micro_steps():
            batch = ...
            with run.accumulate():
                loss, logs = method_step(...)
                run.backward(loss, logs)
        run.end_step()
    return run.finish()
"""
import contextlib
import logging
import os
import signal
from typing import Callable, Iterable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .. import UsageError
from ..ema import WeightAverage
from .checkpoints import (SAFE_TO_CHANGE_ON_RESUME, check_same_flags, register_checkpoint_hooks, resume_from_checkpoint,
                          save_checkpoint, save_checkpoint_of, run_state, save_outputs, save_unet_weights)
from .cli import clear_earlier_run
from .distributed import (check_distributed_setup, check_mixed_precision, compute_dtype, prepare_for_training,
                          shards_parameters, strategy_name, unet_is_wrapped)
from .guards import NonFiniteGuard, StopRequest, any_process, defers_loss_check, injected
from .metrics import MetricsLog, StepClock, log_step, reduce_step_metrics
from .optim import build_lr_scheduler, build_optimizer, optimizer_update, scaled_learning_rate
from .outcome import Diverged, Stopped, lock_output_dir, output_error, release_output_dir, save_args, write_status
from .validation import validation_due, validation_wanted

logger = logging.getLogger(__name__)

EMA_FOLDER = "ema"  # --ema_decay's average of the weights, in the same format as the final weights beside it


def make_accelerator(args, project_name: str, passes_per_update: int = None):
    """The Accelerator of a run (what `accelerate config` and the common flags say), --output_dir made and args.json
    written by the main process, the trackers started, and the strategies that cannot train refused."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=passes_per_update or args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        step_scheduler_with_optimizer=False,  # once per optimizer step, not once per process (build_lr_scheduler)
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_mixed_precision(accelerator)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            lock_output_dir(args.output_dir)  # before anything in it changes: one run per folder
            write_status(args, "running", None, f"started by process {os.getpid()}")
            if args.overwrite_output_dir:
                clear_earlier_run(args)
            # args.json stays the first run's; each resume adds args-resume-<step>.json (resume_from_checkpoint)
            if not (args.resume_from_checkpoint and os.path.exists(os.path.join(args.output_dir, "args.json"))):
                save_args(args, args.output_dir)
        except OSError as e:
            raise output_error(args.output_dir, e, "args.json") from None
        if report_to:
            config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
            accelerator.init_trackers(args.tracker_project_name or project_name, config=config)
    check_distributed_setup(accelerator, args)
    effective = accelerator.num_processes * args.train_batch_size * args.gradient_accumulation_steps
    logger.info(f"processes {accelerator.num_processes} x batch {args.train_batch_size} x accumulation "
                f"{args.gradient_accumulation_steps} = {effective} samples per optimizer step; "
                f"{args.max_train_steps} steps; mixed precision {accelerator.mixed_precision}; "
                f"{strategy_name(accelerator)}")
    return accelerator


# bf16 dense tensor-core peak per GPU, for the utilisation in metrics.jsonl (vendors' data sheets; SXM parts)
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def throughput_logs(step_flops, step_seconds: float, accelerator) -> dict:
    """tflops: this process's model FLOPs of a step (counted in the run's first step: the forward and backward
    passes of every model, recomputation included) over the step's wall-clock seconds, in TFLOP/s; mfu: that over
    the GPU's bf16 peak (BF16_PEAK_TFLOPS), where the GPU is known and the run is in bf16 or fp16. Wall-clock
    derived, as step_seconds. With a step that varies (AlignProp's K drawn per step), the first step's count."""
    if not step_flops or step_seconds <= 0:
        return {}
    tflops = step_flops / step_seconds / 1e12
    out = {"tflops": float(f"{tflops:.4g}")}
    if accelerator.device.type == "cuda" and accelerator.mixed_precision in ("bf16", "fp16"):
        name = torch.cuda.get_device_name(accelerator.device)
        peak = next((value for key, value in BF16_PEAK_TFLOPS.items() if key in name), None)
        if peak:
            out["mfu"] = float(f"{tflops / peak:.4g}")
    return out


class Run:
    """One training run of a script, from the accelerator to the final weights.

    args: the parsed flags; only the common ones (utils.train.cli.add_common_args) are read here.
    project: the tracker project's default name (--tracker_project_name overrides it).
    label: the progress bar's label; shown: the metrics shown on it.
    safe_on_resume: the script's own flags that a resume may change (besides the common ones).
    """

    def __init__(self, args, project: str, label: str, shown: Iterable[str] = ("loss",),
                 safe_on_resume: Iterable[str] = (), passes_per_batch: int = 1, updates_per_step: int = 1):
        self.args, self.label, self.shown = args, label, tuple(shown)
        # backward passes per optimizer update (a batch may be backpropagated several times, e.g. once per trained
        # timestep in online RL) and optimizer updates per step (one sampling epoch of online RL may feed several)
        self.passes_per_update = args.gradient_accumulation_steps * passes_per_batch
        self.updates_per_step = updates_per_step
        self.update_hooks = []  # called after each optimizer update that was not skipped (`after_update`)
        self.safe_on_resume = SAFE_TO_CHANGE_ON_RESUME | set(safe_on_resume)
        self.project = project
        self.accelerator = make_accelerator(args, project_name=project, passes_per_update=self.passes_per_update)
        self.device, self.dtype = self.accelerator.device, compute_dtype(self.accelerator)
        self.stop = StopRequest()
        self.validate: Optional[Callable[[int], None]] = None  # draws a validation grid after a step (`on_validation`)
        self.step_checks = []  # called with each step's logs after they are written (`add_step_check`)
        self.totals = {}  # the per-step counts (end_step's `counts`) summed over the steps of this run
        self.start_step, self.stopping = 0, False

    # ---- the layout of a global batch: every process draws the whole batch and takes its rows
    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def global_batch(self) -> int:
        """Samples per micro-step over all processes."""
        return self.num_processes * self.args.train_batch_size

    @property
    def rows(self) -> slice:
        """This process's rows of a global batch."""
        size = self.args.train_batch_size
        return slice(self.process_index * size, (self.process_index + 1) * size)

    # ---- the strategy `accelerate config` chose
    @property
    def strategy(self) -> str:
        return strategy_name(self.accelerator)

    @property
    def wraps_model(self) -> bool:
        """FSDP or DeepSpeed takes the model over (its weights must stay contiguous, no compiled views)."""
        return unet_is_wrapped(self.accelerator)

    @property
    def shards_model(self) -> bool:
        """The model's weights are split across processes: every process takes part in each of its forwards."""
        return shards_parameters(self.accelerator)

    @property
    def micro_steps_per_step(self) -> int:
        return self.passes_per_update * self.updates_per_step

    def after_update(self, hook: Callable[[], None]):
        """`hook()` runs after each optimizer update that was applied (e.g. an EMA of the weights)."""
        self.update_hooks.append(hook)

    def on_validation(self, validate: Callable[[int], None]):
        """`validate(step)` draws the validation grid after `step`; called at the multiples of --validation_steps and
        after the final save (when grids were asked for)."""
        self.validate = validate

    def add_step_check(self, check: Callable[[dict], None]):
        """`check(logs)` runs after each step's metrics are written, and may end the run by raising (e.g. a limit)."""
        self.step_checks.append(check)

    def stop_requested(self) -> bool:
        """A stop was asked for (validation checks this between its batches, and returns early). Where every process
        draws the grid (a sharded model) they agree through one all-reduce; elsewhere only the main process draws."""
        return self.stop.any_process(self.accelerator) if self.shards_model else self.stop.requested

    @property
    def validation_wanted(self) -> bool:
        return validation_wanted(self.args)

    # ---- set-up
    def prepare(self, model, frozen=None, *, is_sdxl: bool, defer_loss_check: bool = False, checkpointed=()):
        """Optimizer and lr schedule over `model`'s trainable weights, checkpoint hooks writing the weights in the
        diffusers format, `accelerator.prepare` (`frozen`: a full fine-tune's reference copy, prepared beside it
        where the strategy needs that), then resume and the metrics log. `checkpointed`: more objects with
        state_dict / load_state_dict that every checkpoint holds and a resume restores (e.g. an average of the
        weights). Returns the prepared model; `self.trained` is the unwrapped one."""
        args, accelerator = self.args, self.accelerator
        learning_rate = scaled_learning_rate(args, self.num_processes)
        optimizer = build_optimizer(args, model.parameters(), learning_rate)
        lr_scheduler = build_lr_scheduler(args, optimizer, self.updates_per_step)
        register_checkpoint_hooks(accelerator, is_sdxl)
        self.ema = None
        if args.ema_decay is not None:  # an average of the trained weights: validated with, saved, in checkpoints
            self.ema = WeightAverage([p for p in model.parameters() if p.requires_grad], lambda _: args.ema_decay)
            self.after_update(self.ema.update)
            checkpointed = [self.ema, *checkpointed]
        for obj in checkpointed:
            accelerator.register_for_checkpointing(obj)
        self.model, self.optimizer, self.lr_scheduler = prepare_for_training(accelerator, args, model, optimizer,
                                                                             lr_scheduler, frozen)
        self.trained, self.is_sdxl = accelerator.unwrap_model(self.model), is_sdxl
        self.start_step = resume_from_checkpoint(accelerator, args, check=self._check_resumable)
        # accelerate's micro-step count decides which micro-step syncs: counted in this run's accumulation (a resume
        # on another number of processes may have adjusted it)
        accelerator.step = self.start_step * self.micro_steps_per_step
        self.metrics_log = MetricsLog(args.output_dir, self.start_step, enabled=accelerator.is_main_process)
        self.guard = NonFiniteGuard(start_step=self.start_step, defer=defers_loss_check(defer_loss_check, accelerator))
        return self.model

    @property
    def checkpoint_info(self) -> dict:
        """What a checkpoint records about the run that wrote it, besides its flags (checked on resume)."""
        return {"method": self.project, "num_processes": self.num_processes}

    def _check_resumable(self, state: dict, path: str):
        """Refuse, in one line, a checkpoint this run must not continue: another method's (a train_dpo.py checkpoint
        given to train_draftp.py), another global batch, or other flags. A different number of processes is fine when
        the global batch (processes x --train_batch_size x --gradient_accumulation_steps) is the same: the schedule
        counts optimizer steps and the batches are drawn per step, so the run continues as it would have."""
        saved = state.get("args", {})
        method = state.get("method")
        if method is not None and method != self.project:
            raise UsageError(f"--resume_from_checkpoint {path} was written by a {method} run; this is a "
                             f"{self.project} run: resume it with the script and method that wrote it, or start a "
                             f"new run in another --output_dir")
        batch_flags = ("train_batch_size", "gradient_accumulation_steps")
        safe = set(self.safe_on_resume)
        if all(k in saved for k in batch_flags):
            processes = state.get("num_processes", self.num_processes)
            then = processes * saved["train_batch_size"] * saved["gradient_accumulation_steps"]
            now = self.num_processes * self.args.train_batch_size * self.args.gradient_accumulation_steps
            if then != now:
                raise UsageError(
                    f"--resume_from_checkpoint {path}: its run took {then} samples per optimizer step ({processes} "
                    f"processes x {saved['train_batch_size']} x {saved['gradient_accumulation_steps']} accumulation), "
                    f"this one would take {now} ({self.num_processes} x {self.args.train_batch_size} x "
                    f"{self.args.gradient_accumulation_steps}); keep {then} with --train_batch_size and "
                    f"--gradient_accumulation_steps, or start a new run")
            safe |= set(batch_flags)  # the same global batch, split otherwise
        check_same_flags(self.args, state, path, safe)

    # ---- the loop
    def steps(self):
        """The optimizer steps still to run (0-based), with a progress bar. After each, the script calls end_step."""
        self.progress = tqdm(range(self.start_step, self.args.max_train_steps), initial=self.start_step,
                             total=self.args.max_train_steps, disable=not self.accelerator.is_local_main_process,
                             desc=self.label)
        self.clock, self.step_flops = StepClock(), None
        for step in self.progress:
            self.model.train()
            self.step, self.micro_metrics, self.grad_norm = step, [], None
            self.skipped, self.skipped_update = False, False  # any update of the step skipped; the current one
            # --log_tflops: the first step's floating-point operations, counted once (throughput_logs)
            counting = self.args.log_tflops and self.step_flops is None
            with FlopCounterMode(display=False) if counting else contextlib.nullcontext() as counter:
                self.flop_counter = counter
                yield step

    def micro_steps(self):
        """The accumulation micro-steps of the current step. A stop request drops a partial accumulation at once (a
        long step need not finish before the launcher kills the run): the last completed step is checkpointed and
        Stopped raised (exit code 3)."""
        for micro in range(self.micro_steps_per_step):
            self.micro = micro
            yield micro
            if self.stopping:
                self._stop(completed_step=self.step)

    @contextlib.contextmanager
    def accumulate(self):
        """The forward and backward of a micro-step: accelerate's gradient accumulation and autocast."""
        with self.accelerator.accumulate(self.model), self.accelerator.autocast():
            yield

    def waiting_for_data(self):
        """A context around fetching a batch: its time is the step's data_seconds in metrics.jsonl."""
        return self.clock.data()

    def backward(self, loss: torch.Tensor, logs: dict):
        """Backward of a micro-step's loss, and the update at the end of an accumulation. An update is skipped on
        every process if any loss or gradient of it is not finite; `logs` (this micro-step's metrics, tensors) are
        averaged into the step's."""
        accelerator = self.accelerator
        finite, self.stopping = self.guard.check(accelerator, loss, self.stop, self.step + 1, self.micro)
        if self.stopping:
            self.optimizer.zero_grad(set_to_none=True)
            return
        if finite:
            accelerator.backward(loss)
        else:
            self.skipped_update = True
        if accelerator.sync_gradients:
            self.grad_norm, skipped = optimizer_update(accelerator, self.args, self.model, self.optimizer,
                                                       self.lr_scheduler, self.skipped_update, self.guard.take_pending())
            self.skipped, self.skipped_update = self.skipped or skipped, False  # the next update starts clean
            if not skipped:
                for hook in self.update_hooks:
                    hook()
        self.micro_metrics.append(logs)

    def end_step(self, counts: Optional[dict] = None, **logs) -> dict:
        """One metrics dict for the step (averaged over micro-steps and processes; `counts`, integers such as bad
        rows, summed) with `logs` added, to metrics.jsonl, the trackers and the progress bar; then the guards, the
        checkpoint (or a requested stop) and the validation grid that are due. Returns the metrics dict."""
        accelerator, args = self.accelerator, self.args
        global_step = self.step + 1
        out = reduce_step_metrics(accelerator, self.micro_metrics, self.grad_norm, counts)
        out.update(step=global_step, lr=self.lr_scheduler.get_last_lr()[0], **logs, skipped=int(self.skipped),
                   **self.clock.lap())
        if self.flop_counter is not None:
            self.step_flops, self.flop_counter = self.flop_counter.get_total_flops(), None
        out.update(throughput_logs(self.step_flops, out["step_seconds"], accelerator))
        log_step(accelerator, self.metrics_log, self.progress, out, (*self.shown, "tflops", "mfu"))
        for key in counts or {}:
            self.totals[key] = self.totals.get(key, 0) + out[key]
        try:
            for check in self.step_checks:
                check(out)
        except UsageError as e:  # a limit reached: this step completed, so it is checkpointed before the run ends
            path = save_checkpoint_of(accelerator, args, global_step, self.checkpoint_info)
            self._close_logs()
            raise UsageError(f"{e}; {path} holds step {global_step}: resume from it with "
                             f"--resume_from_checkpoint latest once the cause is fixed") from None
        if self.guard.end_step(global_step, self.skipped):
            path = save_checkpoint_of(accelerator, args, self.guard.last_good, self.checkpoint_info)
            self._close_logs()
            raise Diverged(self.guard.diverged_message(global_step, path), self.guard.last_good)
        with self.clock.paused():  # checkpoints and grids are not steps
            self._checkpoint_or_stop(global_step)
            if validation_due(args, global_step) and self.validate is not None:
                if injected("SIGNAL", accelerator, global_step, "validation"):  # a stop while the grid is drawn
                    os.kill(os.getpid(), signal.SIGUSR1)
                self._draw_validation(global_step)
                # a stop asked for during the grid (which stops between its batches) ends the run now
                self._checkpoint_or_stop(global_step, only_if_stopping=True)
        return out

    def _draw_validation(self, step: int):
        """The validation grid, drawn with the average of the weights where --ema_decay keeps one."""
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            self.validate(step)

    def _checkpoint_or_stop(self, global_step: int, only_if_stopping: bool = False):
        """Save a checkpoint when one is due or a stop was requested. A stop before the last step ends the run
        (Stopped, exit code 3); at the last step the run goes on to write its final weights (exit code 0), without
        the last validation grid."""
        if not only_if_stopping and injected("SIGNAL", self.accelerator, global_step, "end"):
            os.kill(os.getpid(), signal.SIGUSR1)
        self.stopping = self.stop.any_process(self.accelerator)
        if only_if_stopping and not self.stopping:
            return
        if global_step % self.args.checkpointing_steps == 0 or self.stopping:
            save_checkpoint(self.accelerator, self.args.output_dir, global_step, self.args.checkpoints_total_limit,
                            run_state(self.args, self.checkpoint_info))
        if self.stopping and global_step < self.args.max_train_steps:
            self._stop(completed_step=global_step)

    def _stop(self, completed_step: int):
        """A stop request: checkpoint the last completed step (batches depend only on (seed, step, micro-step), so
        the resume redraws a dropped partial accumulation), close the logs, raise Stopped."""
        # accelerate counts micro-steps to know which one syncs, and saves the count: rewind the dropped ones, or the
        # resumed run would step its optimizer in the middle of an accumulation
        self.accelerator.step = completed_step * self.micro_steps_per_step
        path = save_checkpoint_of(self.accelerator, self.args, completed_step, self.checkpoint_info)
        self._close_logs()
        where = f"{path} holds it; continue with --resume_from_checkpoint latest" if path else \
            "no step was completed, nothing to save; rerun with --resume_from_checkpoint latest"
        raise Stopped(f"stop requested; stopped after step {completed_step}: {where}", completed_step)

    def any_process(self, flag: bool) -> bool:
        """True where `flag` is True on some process."""
        return any_process(self.accelerator, flag)

    def abort(self, error: Exception = None):
        """End the run on an error met inside a step (e.g. a reward server that stays down), on every process: the
        last completed step is checkpointed first, and the error becomes one line that says where the state is.
        Every process must call it (the checkpoint is collective): agree first with `any_process`."""
        path = save_checkpoint_of(self.accelerator, self.args, self.step, self.checkpoint_info)
        self._close_logs()
        where = f"{path} holds step {self.step}: resume from it with --resume_from_checkpoint latest" if path else \
            "no step was completed, nothing to save"
        raise UsageError(f"{error or 'another process failed'}; {where}") from None

    def _close_logs(self):
        self.metrics_log.close()
        self.accelerator.end_training()
        if self.is_main_process:
            release_output_dir(self.args.output_dir)

    # ---- the end
    def finish(self, summary: str = "") -> int:
        """The final weights (LoRA in the diffusers format, or unet/ / transformer/), the upload if asked, a last
        validation grid (not when told to stop), and one line saying where the weights are. Returns the last step."""
        args = self.args
        save_outputs(self.accelerator, args, self.trained, self.is_sdxl)
        if self.ema is not None and self.is_main_process:
            os.makedirs(os.path.join(args.output_dir, EMA_FOLDER), exist_ok=True)
            with self.ema.swapped_in():
                save_unet_weights(self.trained, os.path.join(args.output_dir, EMA_FOLDER), self.is_sdxl)
        if not self.stopping and self.validation_wanted and self.validate is not None:
            self._draw_validation(args.max_train_steps)
        logger.info(f"finished {args.max_train_steps} steps; {self.guard.total} updates skipped (non-finite)"
                    f"{', ' + summary if summary else ''}; weights in {os.path.abspath(args.output_dir)}")
        self._close_logs()
        return args.max_train_steps
