"""Training plumbing both scripts share: arguments, accelerator, optimizer, checkpoints, metrics, validation.

The scripts keep their method (sampling + loss) and their loop; everything here is method-agnostic.
"""
import argparse
import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Optional

import torch

from . import UsageError
from .grids import format_score, save_grid

logger = logging.getLogger(__name__)

LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete


# --------------------------------------------------------------------------- arguments
def add_common_args(parser: argparse.ArgumentParser):
    """The flags both scripts take (names follow the diffusers examples and the Diffusion-DPO train.py)."""
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="hub id or local diffusers pipeline folder (SD1.5 or SDXL, read from model_index.json); "
                        "'tiny-sd' / 'tiny-sdxl' build tiny offline pipelines")
    g.add_argument("--revision", default=None, help="hub revision of the pipeline")
    g.add_argument("--variant", default=None, help="weight variant to load, e.g. fp16")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="a separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix")

    g = parser.add_argument_group("output and logging")
    g.add_argument("--output_dir", default="outputs/run", help="where weights, checkpoints, metrics and samples go")
    g.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "all", "none"])
    g.add_argument("--tracker_project_name", default=None, help="tracker project (default: the script's name)")
    g.add_argument("--push_to_hub", action="store_true", help="upload --output_dir to the hub at the end")
    g.add_argument("--hub_model_id", default=None, help="hub repo for --push_to_hub (default: output_dir's name)")

    g = parser.add_argument_group("training")
    g.add_argument("--seed", type=int, default=0, help="seeds noise, prompts, timesteps and LoRA init")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: what `accelerate config` says")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--train_batch_size", type=int, default=1, help="per GPU and per accumulation micro-step")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=1000, help="optimizer steps")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute UNet activations in backward")
    g.add_argument("--use_lora", action=argparse.BooleanOptionalAction, default=True,
                   help="train a LoRA adapter (--no-use_lora: the full UNet)")
    g.add_argument("--lora_rank", type=int, default=8)
    g.add_argument("--lora_alpha", type=float, default=None, help="default: equal to --lora_rank (scale 1)")

    g = parser.add_argument_group("optimizer")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true",
                   help="multiply the lr by GPUs x train_batch_size x gradient_accumulation_steps")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="optimizer steps")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (CUDA)")
    g.add_argument("--use_adafactor", action="store_true", help="transformers Adafactor (less optimizer memory)")

    g = parser.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N folder")

    g = parser.add_argument_group("validation")
    g.add_argument("--validation_prompts", nargs="*", default=None, help="prompts drawn every --validation_steps")
    g.add_argument("--validation_steps", type=int, default=100, help="optimizer steps between validation images")
    g.add_argument("--num_validation_images", type=int, default=2, help="seeds per validation prompt")
    return parser


def check_common_args(args):
    """Checks that need no model, run right after parsing."""
    positive = ["train_batch_size", "gradient_accumulation_steps", "max_train_steps", "lora_rank",
                "checkpointing_steps", "validation_steps", "num_validation_images"]
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.lr_warmup_steps < 0 or args.max_grad_norm < 0:
        raise UsageError("--lr_warmup_steps and --max_grad_norm must be >= 0")
    if args.use_8bit_adam and args.use_adafactor:
        raise UsageError("--use_8bit_adam and --use_adafactor are alternatives; pick one")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UsageError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a folder; "
                         f"pass 'latest' or a checkpoint-N folder from an earlier run")
    if args.resume_from_checkpoint is None and list_checkpoints(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir} already holds checkpoints of an earlier run; pass "
                         f"--resume_from_checkpoint latest to continue it, or choose another --output_dir")


def parse_name_paths(items, flag: str = "--reward_model_paths") -> dict:
    """["pickscore=/models/ps", ...] -> {"pickscore": "/models/ps"}: local weights of scoring models by name."""
    paths = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{flag} expects NAME=PATH, got {item!r}")
        paths[name] = path
    return paths


def run_main(main, parse_args):
    """Entry point: bad input (UsageError) becomes one line on stderr and exit code 2, not a traceback."""
    import sys

    try:
        main(parse_args())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # as argparse does for bad flags (sys.exit(str) would exit 1)


def save_args(args, output_dir):
    with open(os.path.join(output_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2, sort_keys=True)


# --------------------------------------------------------------------------- accelerator
def make_accelerator(args, project_name: str):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        save_args(args, args.output_dir)
        if report_to:
            config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
            accelerator.init_trackers(args.tracker_project_name or project_name, config=config)
    effective = accelerator.num_processes * args.train_batch_size * args.gradient_accumulation_steps
    logger.info(f"processes {accelerator.num_processes} x batch {args.train_batch_size} x accumulation "
                f"{args.gradient_accumulation_steps} = {effective} samples per optimizer step; "
                f"{args.max_train_steps} steps; mixed precision {accelerator.mixed_precision}")
    return accelerator


def compute_dtype(accelerator) -> torch.dtype:
    """dtype of the frozen parts: the mixed-precision dtype (trainable weights stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def scaled_learning_rate(args, num_processes: int) -> float:
    """--scale_lr as the diffusers examples and Diffusion-DPO define it: lr x GPUs x batch x accumulation."""
    if not args.scale_lr:
        return args.learning_rate
    return args.learning_rate * num_processes * args.train_batch_size * args.gradient_accumulation_steps


def build_optimizer(args, params, learning_rate: float):
    params = [p for p in params if p.requires_grad]
    if args.use_adafactor:
        from transformers.optimization import Adafactor

        # Fixed lr (no relative step), as the Diffusion-DPO recipe uses Adafactor for the full SDXL UNet.
        return Adafactor(params, lr=learning_rate, weight_decay=args.adam_weight_decay, clip_threshold=1.0,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(params, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                         weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def build_lr_scheduler(args, optimizer, num_processes: int):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=args.max_train_steps * num_processes)


# --------------------------------------------------------------------------- saving weights
def save_unet_weights(unet, output_dir: str, is_sdxl: bool):
    """LoRA: pytorch_lora_weights.safetensors (diffusers format). Full: unet/ (from_pretrained format)."""
    from .models import has_lora, save_lora

    if has_lora(unet):
        save_lora(unet, output_dir, is_sdxl)
    else:
        unet.save_pretrained(os.path.join(output_dir, "unet"))


def register_checkpoint_hooks(accelerator, is_sdxl: bool):
    """Make accelerate's save_state/load_state write the UNet in the diffusers format (LoRA: adapters only),
    so every checkpoint-N folder is also a loadable output."""
    from diffusers import UNet2DConditionModel

    from .models import has_lora, load_lora_into_unet

    def save_hook(models, weights, output_dir):
        for model in models:
            if accelerator.is_main_process:
                save_unet_weights(accelerator.unwrap_model(model), output_dir, is_sdxl)
            if weights:
                weights.pop()  # written above; accelerate need not write a second, full copy

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            if has_lora(model):
                load_lora_into_unet(model, input_dir)
            else:
                loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
                model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# --------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: str):
    """Complete checkpoints (checkpoint-N holding the state file), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        if m and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: Optional[int] = None, extra=None):
    """Save everything needed to resume into checkpoint-<step>.

    Written into a hidden temporary folder and renamed into place once complete, so a crash mid-save never
    leaves a checkpoint-N that looks complete. Old checkpoints are removed only after the new one exists.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = os.path.join(output_dir, f".checkpoint-{step}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(partial, STATE_FILE), "w") as f:
            json.dump({"global_step": step, **(extra or {})}, f)
        if os.path.exists(final):  # a resumed run saving the same step again
            shutil.rmtree(final)
        os.rename(partial, final)
        checkpoints = list_checkpoints(output_dir)
        if total_limit is not None:
            for old in checkpoints[: max(0, len(checkpoints) - total_limit)]:
                shutil.rmtree(old)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()
    return final


def resume_from_checkpoint(accelerator, args) -> int:
    """Load the state named by --resume_from_checkpoint; returns the optimizer step to continue from (0 = fresh)."""
    if args.resume_from_checkpoint is None:
        return 0
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        if not checkpoints:
            logger.info(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}, starting fresh")
            return 0
        path = checkpoints[-1]
    else:
        path = args.resume_from_checkpoint
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise UsageError(f"--resume_from_checkpoint {path} is not a complete checkpoint (no {STATE_FILE})")
    accelerator.load_state(path)
    with open(os.path.join(path, STATE_FILE)) as f:
        step = json.load(f)["global_step"]
    logger.info(f"resumed from {path} at step {step}")
    return step


# --------------------------------------------------------------------------- the end of a step
def reduce_step_metrics(accelerator, micro_metrics, grad_norm) -> dict:
    """One metrics dict per optimizer step: each value averaged over the micro-steps, then over processes."""
    logs = {k: torch.stack([m[k].float() for m in micro_metrics]).mean() for k in micro_metrics[0]}
    logs["grad_norm"] = torch.as_tensor(grad_norm, device=accelerator.device).float()
    reduced = accelerator.reduce(torch.stack(list(logs.values())), "mean")
    return {k: v.item() for k, v in zip(logs, reduced)}


def checkpoint_or_stop(accelerator, args, global_step: int, stop: "StopRequest") -> bool:
    """Save a checkpoint when one is due or a stop was requested; True means: leave the loop now."""
    stopping = stop.any_process(accelerator)
    if global_step % args.checkpointing_steps == 0 or stopping:
        save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
    if stopping:
        logger.warning(f"stopped at step {global_step}; continue with --resume_from_checkpoint latest")
    return stopping


def log_step(accelerator, metrics_log: "MetricsLog", progress, logs: dict, shown=("loss",)):
    """The one metrics dict of a step goes to metrics.jsonl, the trackers and the progress bar alike."""
    metrics_log.write(logs)
    accelerator.log(logs, step=logs["step"])
    progress.set_postfix({k: f"{logs[k]:.4g}" for k in shown if k in logs})


def save_outputs(accelerator, args, unet, is_sdxl: bool):
    """The end of a run: the trained weights in the diffusers format (main process), and the upload if asked."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_unet_weights(unet, args.output_dir, is_sdxl)
        if args.push_to_hub:
            push_output_to_hub(args)


# --------------------------------------------------------------------------- metrics
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


# --------------------------------------------------------------------------- robustness
class StopRequest:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(f"signal {signum}: saving a checkpoint at the end of this step, then exiting")

    def any_process(self, accelerator) -> bool:
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class NonFiniteGuard:
    """Skip updates whose loss is not finite on any process; stop after `patience` in a row."""

    def __init__(self, patience: int = 3):
        self.patience = patience
        self.in_a_row = 0

    def all_finite(self, accelerator, loss: torch.Tensor) -> bool:
        bad = torch.tensor(float(not torch.isfinite(loss.detach()).all()), device=accelerator.device)
        finite = accelerator.reduce(bad, reduction="sum").item() == 0  # every process must agree (DDP)
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if self.in_a_row >= self.patience:
            raise RuntimeError(f"non-finite loss in {self.in_a_row} steps in a row; stopping. Lower --learning_rate, "
                               f"use bf16 instead of fp16, or check the reward / data (see metrics.jsonl)")
        return finite


def step_generator(seed: int, *indices: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step, micro-step, ...): noise that depends only on the step, so
    resuming and changing the number of processes reproduce the same samples."""
    g = torch.Generator()
    g.manual_seed(hash((seed,) + tuple(indices)) % (2**63))
    return g


# --------------------------------------------------------------------------- validation images
def log_validation(accelerator, output_dir, step, images, rows, prompts, info: dict, scores=None, score_name="reward",
                   tag="validation"):
    """Write samples/<tag>-step-N.png: `images` (len(rows) * len(prompts), 3, H, W) in [0,1], one row per name of
    `rows`, labelled with each prompt over its column, the row names beside the rows and, where `scores` ({row
    name: [score per prompt]}) has the row, "<score_name> <score>" under each image. A sidecar json holds step,
    rows, prompts, `info` (seeds, rewards or scores) and the grid's geometry (utils.grids.read_cells gets the
    exact images back). The trackers get the same labelled grid."""
    captions = None  # no caption line at all without scores (DPO without --choice_model)
    if scores:
        captions = [f"{score_name} {format_score(scores[name][k])}" if name in scores else ""
                    for name in rows for k in range(len(prompts))]
    grid = save_grid(os.path.join(output_dir, "samples", f"{tag}-step-{step:06d}"), images, rows, prompts, captions,
                     sidecar={"step": step, "rows": rows, "prompts": prompts, **info})
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Image(grid)}, step=step)


def push_output_to_hub(args):
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or Path(args.output_dir).name
    repo_id = create_repo(repo_id, exist_ok=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, ignore_patterns=["checkpoint-*", ".checkpoint-*"])
