"""Training plumbing both scripts share: arguments, accelerator, optimizer, checkpoints, metrics, validation.

The scripts keep their method (sampling + loss) and their loop; everything here is method-agnostic.
"""
import argparse
import contextlib
import errno
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

import torch

from . import UsageError
from .fp8 import check_float8_device
from .grids import format_score, save_grid

logger = logging.getLogger(__name__)

LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete


# --------------------------------------------------------------------------- arguments
DEFAULTS_NOTE = ("Defaults marked 'from ...' follow that source; the other defaults are this project's own choices\n"
                 "(README.md, 'Where the defaults come from').")
EARLIER_RUN_FILES = ("args.json", "metrics.jsonl", "samples", "pytorch_lora_weights.safetensors", "unet", "transformer")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout (its launch commands) and shows each flag's default and its source.

    A default is shown unless it is None, False or empty (the help line then says what the flag does when unset);
    `describe_defaults` names where a default comes from."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "%(default)" in text or default is None or default is False
                or default is argparse.SUPPRESS or default in ([], "")):
            return text
        source = getattr(action, "default_source", None)
        source = f", from {source}".replace("%", "%%") if source else ""
        return f"{text} (default: %(default)s{source})"


def describe_defaults(parser: argparse.ArgumentParser, source: str, **defaults):
    """parser.set_defaults(**defaults), with --help naming `source` beside each of these defaults."""
    parser.set_defaults(**defaults)
    for action in parser._actions:  # argparse keeps no public list of actions
        if action.dest in defaults:
            action.default_source = source


def set_help(parser: argparse.ArgumentParser, dest: str, text: str):
    """Replace the help line of a flag defined in add_common_args whose default one script resolves itself."""
    next(a for a in parser._actions if a.dest == dest).help = text


def add_common_args(parser: argparse.ArgumentParser):
    """The flags both scripts take (names follow the diffusers examples and the Diffusion-DPO train.py)."""
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="hub id or local diffusers pipeline folder (SD1.5 or SDXL, read from model_index.json); "
                        "'tiny-sd' / 'tiny-sdxl' build tiny offline pipelines")
    g.add_argument("--revision", default=None, help="hub revision of the pipeline (default: the main branch)")
    g.add_argument("--variant", default=None, help="weight variant to load, e.g. fp16 (default: the full-precision files)")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="a separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix (default: the pipeline's)")

    g = parser.add_argument_group("output and logging")
    g.add_argument("--output_dir", default="outputs/run", help="where weights, checkpoints, metrics and samples go")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start over in an --output_dir that holds an earlier run: first delete its args.json, "
                        "metrics.jsonl, samples/, weights, checkpoints and tracker logs (other files stay)")
    g.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "all", "none"],
                   help="where the metrics and validation images go besides metrics.jsonl and samples/")
    g.add_argument("--tracker_project_name", default=None, help="tracker project (default: the script's name)")
    g.add_argument("--push_to_hub", action="store_true", help="upload --output_dir to the hub at the end")
    g.add_argument("--hub_model_id", default=None, help="hub repo for --push_to_hub (default: output_dir's name)")
    g.add_argument("--verbose", action="store_true",
                   help="show the libraries' warnings and weight-loading progress bars (hidden by default)")

    g = parser.add_argument_group("training")
    g.add_argument("--seed", type=int, default=0, help="seeds noise, prompts, timesteps and LoRA init")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="dtype of the frozen parts and of autocast; fp16 needs a GPU (default: what `accelerate config` "
                        "says, else no)")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--train_batch_size", type=int, default=1, help="per GPU and per accumulation micro-step")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-steps per optimizer step (effective batch = GPUs x batch x this)")
    g.add_argument("--max_train_steps", type=int, default=1000, help="optimizer steps")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute UNet activations in backward")
    g.add_argument("--use_lora", action=argparse.BooleanOptionalAction, default=True,
                   help="train a LoRA adapter (--no-use_lora: the full UNet)")
    g.add_argument("--lora_rank", type=int, default=8, help="LoRA rank of the UNet's attention projections")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: equal to --lora_rank, scale 1)")

    g = parser.add_argument_group("optimizer")
    g.add_argument("--learning_rate", type=float, default=1e-4,
                   help="peak learning rate (multiplied by the effective batch with --scale_lr)")
    g.add_argument("--scale_lr", action="store_true",
                   help="multiply the lr by GPUs x train_batch_size x gradient_accumulation_steps")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="diffusers' get_scheduler")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="optimizer steps")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1 (also of 8-bit AdamW)")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2 (also of 8-bit AdamW)")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2,
                   help="decoupled weight decay of AdamW (and of Adafactor)")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (CUDA)")
    g.add_argument("--use_adafactor", action="store_true", help="transformers Adafactor (less optimizer memory)")

    g = parser.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="keep at most this many checkpoints (default: keep all)")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (of --output_dir; none there: start fresh) or a checkpoint-N folder "
                        "(default: a new run)")

    g = parser.add_argument_group("validation")
    g.add_argument("--validation_prompts", nargs="*", default=None,
                   help="prompts drawn every --validation_steps (default: the first two training prompts). Validation "
                        "grids are drawn at the multiples of --validation_steps up to --max_train_steps and at the end, "
                        "and only when asked for: --validation_prompts given or --validation_steps <= --max_train_steps")
    g.add_argument("--validation_steps", type=int, default=100,
                   help="optimizer steps between validation images (above --max_train_steps and without "
                        "--validation_prompts: no validation images at all)")
    g.add_argument("--num_validation_images", type=int, default=2, help="seeds per validation prompt")
    return parser


def check_common_args(args):
    """Checks that need no model, run right after parsing."""
    check_finite(args)
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
    packages = {"wandb": ["wandb"], "tensorboard": ["tensorboard", "tensorboardX"]}.get(args.report_to, [])
    if packages and not any(importlib.util.find_spec(p) for p in packages):  # accelerate would skip it silently
        raise UsageError(f"--report_to {args.report_to} needs the {packages[0]} package: pip install {packages[0]}, "
                         f"or pass --report_to none")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UsageError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a folder; "
                         f"pass 'latest' or a checkpoint-N folder from an earlier run")
    check_output_dir(args)


def check_output_dir(args):
    """--output_dir must be a folder (or not exist yet) and hold no earlier run, unless this run resumes it or is
    told to overwrite it. Only the first process looks: later processes may start after it has written args.json."""
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir} is a file; pass a folder (it is made if missing)")
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        raise UsageError("--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint would continue; "
                         "pass one of them")
    if args.overwrite_output_dir or args.resume_from_checkpoint is not None or os.environ.get("RANK", "0") != "0":
        return
    if list_checkpoints(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir} already holds checkpoints of an earlier run; pass "
                         f"--resume_from_checkpoint latest to continue it, --overwrite_output_dir to start over, "
                         f"or choose another --output_dir")
    found = earlier_run_files(args.output_dir)
    if found:
        raise UsageError(f"--output_dir {args.output_dir} already holds an earlier run ({', '.join(found)}); pass "
                         f"--overwrite_output_dir to replace it, or choose another --output_dir")


def earlier_run_files(output_dir: str):
    """The names in `output_dir` that a training run writes (a run writes args.json first)."""
    return [name for name in EARLIER_RUN_FILES if os.path.exists(os.path.join(output_dir, name))]


def clear_earlier_run(args):
    """--overwrite_output_dir: delete what an earlier run wrote into --output_dir, and nothing else."""
    names = earlier_run_files(args.output_dir) + [
        name for name in os.listdir(args.output_dir) if CHECKPOINT_RE.match(name.removeprefix(".").removesuffix(".partial"))]
    if not os.path.isabs(args.logging_dir) and ".." not in Path(args.logging_dir).parts:  # only inside --output_dir
        names.append(args.logging_dir)
    for name in names:
        path = os.path.join(args.output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    if names:
        logger.info(f"--overwrite_output_dir: deleted the earlier run's {', '.join(sorted(set(names)))}")


def check_finite(args):
    """NaN passes every `<= 0` check and inf every `> 0` one, so each float flag (of both scripts, whatever
    group added it) must be finite: one check over the parsed values instead of one per flag."""
    for name, value in vars(args).items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"--{name} must be a finite number, got {v}")


def parse_name_paths(items, flag: str = "--reward_model_paths") -> dict:
    """["pickscore=/models/ps", ...] -> {"pickscore": "/models/ps"}: local weights of scoring models by name."""
    paths = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{flag} expects NAME=PATH, got {item!r}")
        paths[name] = path
    return paths


# Exit codes (README "Preemption, bad data and exit codes"): what a requeue wrapper needs to tell apart.
EXIT_FINISHED, EXIT_CRASH, EXIT_USAGE, EXIT_STOPPED, EXIT_DIVERGED = 0, 1, 2, 3, 4
STATUS_FILE = "run_status.json"  # the same verdict in --output_dir, for launchers that hide the exit code


class RunEnded(Exception):
    """The run ended early on purpose, after writing what it could; run_main prints one line and exits with
    `exit_code`."""
    exit_code, status = EXIT_CRASH, "error"

    def __init__(self, message: str, step: Optional[int] = None):
        super().__init__(message)
        self.step = step


class Stopped(RunEnded):
    """A stop request (SIGTERM, SIGUSR1, Ctrl-C): checkpoint written; resume with --resume_from_checkpoint latest."""
    exit_code, status = EXIT_STOPPED, "stopped"


class Diverged(RunEnded):
    """Non-finite loss or gradients `patience` steps in a row: the last good step is checkpointed."""
    exit_code, status = EXIT_DIVERGED, "diverged"


def run_main(main, parse_args):
    """Entry point: bad input (UsageError) becomes one line on stderr and exit code 2, not a traceback; a stop
    request exits 3 and a diverged run 4 (one line each). 0 means the final weights were written."""
    import sys

    from .speed import keep_compile_cache

    args = None
    keep_compile_cache()  # before any torch.compile: compiled graphs survive the run (README "Start-up")
    try:
        args = parse_args()
        quiet_libraries(getattr(args, "verbose", False))
        main(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        write_status(args, "error", EXIT_USAGE, str(e))
        sys.exit(EXIT_USAGE)  # as argparse does for bad flags (sys.exit(str) would exit 1)
    except RunEnded as e:
        print(f"{'stopped' if e.exit_code == EXIT_STOPPED else 'error'}: {e}", file=sys.stderr)
        write_status(args, e.status, e.exit_code, str(e), e.step)
        sys.exit(e.exit_code)
    write_status(args, "finished", EXIT_FINISHED, "final weights written")


def write_status(args, status: str, exit_code: int, message: str, step: Optional[int] = None):
    """--output_dir/run_status.json (main process): `accelerate launch` turns every non-zero exit code of the
    script into 1, so a requeue wrapper reads this file instead."""
    output_dir = getattr(args, "output_dir", None)
    if output_dir is None or int(os.environ.get("RANK", "0")) != 0 or not os.path.isdir(output_dir):
        return
    try:
        with open(os.path.join(output_dir, STATUS_FILE), "w") as f:
            json.dump({"status": status, "exit_code": exit_code, "step": step, "message": message}, f)
    except OSError:
        pass  # a full or read-only disk: the exit code and the printed line still say it


def quiet_libraries(verbose: bool = False):
    """Hide what the libraries print on every run and that needs no action: transformers' and diffusers' weight-
    loading progress bars and warnings (e.g. "modules ... should be kept in float32: []" on every `.to(dtype)`),
    datasets' progress bars, and bitsandbytes' "pip install kernels" warning (diffusers imports bitsandbytes
    whenever it is installed; its CPU backend warns at import). Errors still show. --verbose keeps the defaults."""
    if verbose:
        return
    import datasets
    import diffusers
    import transformers

    for library in (transformers, diffusers, datasets):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # before the import, which happens on the first load


def save_args(args, output_dir, name: str = "args.json"):
    with open(os.path.join(output_dir, name), "w") as f:
        json.dump(vars(args), f, indent=2, sort_keys=True)


def output_error(output_dir: str, e: OSError, what: str) -> UsageError:
    """An OSError while writing into --output_dir as one line: a full disk and a read-only folder named as such."""
    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied"}.get(e.errno, e.strerror or type(e).__name__)
    return UsageError(f"--output_dir {output_dir}: {reason} while writing {what}")


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
    check_mixed_precision(accelerator)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
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


# --------------------------------------------------------------------------- distributed strategies
def strategy_name(accelerator) -> str:
    """'DDP', 'FSDP2', 'DeepSpeed ZeRO-2', ... for logs and errors."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return {DistributedType.NO: "one process"}.get(kind, "DDP")


def shards_parameters(accelerator) -> bool:
    """True where the trained UNet's weights are split across processes (FSDP; ZeRO-3 is refused at start): every
    process must then take part in each of its forward passes and in gathering its state dict."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def unet_is_wrapped(accelerator) -> bool:
    """FSDP and DeepSpeed take the UNet over (sharding or casting its weights, which must then be contiguous);
    DDP and one process leave the module as it is."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def check_distributed_setup(accelerator, args):
    """Refuse, before any model is loaded, the strategies that cannot train these models."""
    from accelerate.utils import DistributedType

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and getattr(args, "use_adafactor", False):
        # Measured on an H200: transformers' Adafactor mixes its factored row/column statistics (plain tensors) with
        # FSDP2's sharded gradients (DTensors) and fails at the first step; a row mean over a shard is not Adafactor.
        raise UsageError("--use_adafactor under FSDP (launchers/accelerate/fsdp.yaml) is not supported: its factored "
                         "statistics need whole weight matrices; use AdamW (drop --use_adafactor) under FSDP, or "
                         "Adafactor with launchers/accelerate/deepspeed_zero2.yaml or ddp.yaml")
    if fsdp and accelerator.state.fsdp_plugin.fsdp_version != 2:
        # FSDP1 flattens each wrapped module's weights into one tensor of one dtype: a frozen bf16 UNet beside fp32
        # LoRA weights cannot be flattened, and a frozen reference called outside the root wrapper breaks it.
        raise UsageError("the accelerate config sets fsdp_version: 1, which cannot train these models; use "
                         "fsdp_version: 2 (launchers/accelerate/fsdp.yaml)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise UsageError("the accelerate config sets DeepSpeed zero_stage: 3, which this project does not support "
                         "(its frozen LoRA reference and sampler call the UNet outside the engine); use ZeRO-2 "
                         "(launchers/accelerate/deepspeed_zero2.yaml) or FSDP2 (launchers/accelerate/fsdp.yaml)")
    if getattr(args, "compile_unet", "off") != "off" and unet_is_wrapped(accelerator):
        raise UsageError(f"--compile_unet {args.compile_unet} works with one process or DDP, not with "
                         f"{strategy_name(accelerator)}: drop it")
    if getattr(args, "fp8_sampler", False):
        if unet_is_wrapped(accelerator):
            raise UsageError(f"--fp8_sampler works with one process or DDP, not with {strategy_name(accelerator)}: "
                             f"drop it")
        check_float8_device(accelerator.device)
    if getattr(args, "compile_sampler", "off") not in ("auto", "off") and shards_parameters(accelerator):
        raise UsageError(f"--compile_sampler {args.compile_sampler} cannot compile a UNet that {strategy_name(accelerator)} "
                         f"shards; pass --compile_sampler off (or auto, which is off under FSDP and DeepSpeed)")


def prepare_for_training(accelerator, args, unet, optimizer, lr_scheduler, frozen_unet=None):
    """accelerator.prepare, after telling DeepSpeed what it cannot learn from a prepared data loader (the
    scripts draw their own batches) and what accelerate would otherwise fill in with its own defaults
    (gradient clipping 1.0 whatever --max_grad_norm says)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=args.train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            train_batch_size=args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes,
            gradient_clipping=args.max_grad_norm,
            zero_allow_untested_optimizer=True,  # Adafactor and 8-bit AdamW are not on ZeRO's list of tested ones
        )
        # The engine casts the UNet to bf16/fp16 and runs its forward with autocast switched off (accelerate's
        # autocast is a no-op under DeepSpeed): floating inputs (fp32 latents and noise) must arrive in the weights'
        # dtype. The frozen copy gets the same hook and no autocast either, so that the reference computes exactly
        # what the trained UNet computes (DPO's first loss is log 2 only if the two agree bit for bit).
        for model in filter(None, (unet, frozen_unet)):
            model.register_forward_pre_hook(cast_inputs_to(compute_dtype(accelerator)), with_kwargs=True)
    if getattr(accelerator.state, "fsdp_plugin", None) is not None and accelerator.mixed_precision in ("fp16", "bf16"):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # Compute in the mixed-precision dtype, but reduce gradients in fp32 as DDP does (accelerate's default
        # reduces them in bf16). This did not cure the LoRA failure under FSDP2 (LoRA is refused there instead);
        # the full-UNet FSDP2 run of BENCHMARKS.md "Distributed" ran with it.
        dtype = compute_dtype(accelerator)
        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=dtype)
    prepared = accelerator.prepare(unet, optimizer, lr_scheduler)
    if frozen_unet is not None and shards_parameters(accelerator):
        # The full-UNet reference sharded with the trained UNet's policy (in place; accelerate neither trains nor saves
        # it): both then compute from FSDP2's all-gathered bf16 weights, so that they agree at step 0. An unsharded
        # copy gave DPO's first loss 0.702 instead of log 2 on an H200 (BENCHMARKS.md "Distributed"). It also divides
        # the reference's memory by the number of processes.
        from accelerate.utils import fsdp2_prepare_model

        fsdp2_prepare_model(accelerator, frozen_unet)
    return prepared


def cast_inputs_to(dtype: torch.dtype):
    """A forward pre-hook that casts the floating-point tensors among a module's inputs (nested in dicts, e.g.
    SDXL's added_cond_kwargs) to `dtype`."""
    def cast(value):
        if torch.is_tensor(value) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        return value

    def hook(module, args, kwargs):
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    return hook


def full_state_dict(accelerator, model):
    """The whole state dict of a UNet whose weights are sharded (a collective: every process must call it), or
    None where each process holds the whole model and the model itself can be saved."""
    return accelerator.get_state_dict(model) if shards_parameters(accelerator) else None


def check_mixed_precision(accelerator):
    """fp16 on a CPU: accelerate turns autocast off there, so fp16 frozen models would meet fp32 inputs in the
    first forward pass (a dtype-mismatch traceback after every model has loaded). Say so before loading."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UsageError("--mixed_precision fp16 (or fp16 in `accelerate config`) needs a GPU, and this run is on the "
                         "CPU; pass --mixed_precision bf16 or no")


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
            raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or pip install -r "
                             "requirements-extra.txt)") from None
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
def save_unet_weights(unet, output_dir: str, is_sdxl: bool, state_dict: Optional[dict] = None):
    """LoRA: pytorch_lora_weights.safetensors (diffusers format). Full: unet/ (SD3 / FLUX: transformer/; from_pretrained
    format). `state_dict`: the gathered weights of a sharded UNet (`full_state_dict`), written instead of the UNet's own."""
    from .models import LORA_WEIGHT_NAME, has_lora, save_lora, weights_subfolder

    folder = os.path.join(output_dir, weights_subfolder(unet))
    if has_lora(unet):
        save_lora(unet, output_dir, is_sdxl, state_dict)
        written = [os.path.join(output_dir, LORA_WEIGHT_NAME)]
    else:
        if state_dict is None:
            unet.save_pretrained(folder)
        else:
            from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
            from safetensors.torch import save_file

            unet.save_config(folder)
            save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))
        written = [os.path.join(folder, f) for f in os.listdir(folder)]
    give_umask_permissions(written)


def give_umask_permissions(paths):
    """safetensors' save_file creates its files with mode 0600 whatever the umask (measured: 0600 under umask
    0022, where torch.save gives 0644), so a run's weights were unreadable to the rest of a group; give them
    what open() gives any other file: 0666 & ~umask."""
    mode = 0o666 & ~current_umask()
    for path in paths:
        if os.path.isfile(path):
            os.chmod(path, mode)


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def register_checkpoint_hooks(accelerator, is_sdxl: bool):
    """Make accelerate's save_state/load_state write the UNet in the diffusers format (LoRA: adapters only),
    so every checkpoint-N folder is also a loadable output."""
    from .models import has_lora, load_lora_into_unet, weights_subfolder

    def save_hook(models, weights, output_dir):
        for model in models:
            state_dict = full_state_dict(accelerator, model)  # every process, before the main one writes
            if accelerator.is_main_process:
                save_unet_weights(accelerator.unwrap_model(model), output_dir, is_sdxl, state_dict)
            if weights:
                weights.pop()  # written above; accelerate need not write a second, full copy

    # Under FSDP and DeepSpeed accelerate saves and loads the model itself (the files above are then an extra,
    # loadable copy) and hands this hook no models.
    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            if has_lora(model):
                load_lora_into_unet(model, input_dir)
            else:
                loaded = type(model).from_pretrained(input_dir, subfolder=weights_subfolder(model))
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
    An OSError on any process (a full disk, a read-only folder) removes the partial folder on every process
    and becomes one line naming the cause (UsageError).
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = os.path.join(output_dir, f".checkpoint-{step}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(partial)
    except OSError as e:
        error = e
    _raise_if_any_failed(accelerator, error, partial, output_dir, f"checkpoint-{step}")
    error = None
    if accelerator.is_main_process:
        try:
            with open(os.path.join(partial, STATE_FILE), "w") as f:
                json.dump({"global_step": step, **(extra or {})}, f)
            if os.path.exists(final):  # a resumed run saving the same step again
                shutil.rmtree(final)
            os.rename(partial, final)
        except OSError as e:
            error = e
    _raise_if_any_failed(accelerator, error, partial, output_dir, f"checkpoint-{step}")
    if accelerator.is_main_process:
        checkpoints = list_checkpoints(output_dir)
        if total_limit is not None:
            for old in checkpoints[: max(0, len(checkpoints) - total_limit)]:
                shutil.rmtree(old)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()
    return final


def _raise_if_any_failed(accelerator, error: Optional[OSError], partial: str, output_dir: str, what: str):
    """Every process learns whether any failed (one all-reduce), so none waits forever at the next barrier."""
    failed = torch.tensor(float(error is not None), device=accelerator.device)
    if accelerator.reduce(failed, reduction="sum").item() == 0:
        return
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # a partial checkpoint must not fill what space is left
    if error is None:
        raise UsageError(f"--output_dir {output_dir}: another process could not write {what}; the partial "
                         f"checkpoint was removed")
    raise output_error(output_dir, error, f"{what}; the partial checkpoint was removed") from None


def save_checkpoint_of(accelerator, args, step: int, extra=None) -> Optional[str]:
    """The checkpoint of a completed step, unless it exists already (a periodic one) or nothing was trained."""
    path = os.path.join(args.output_dir, f"checkpoint-{step}")
    if step == 0 or os.path.isfile(os.path.join(path, STATE_FILE)):
        return path if step > 0 else None
    return save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, run_state(args, extra))


def run_state(args, extra=None) -> dict:
    """What a checkpoint records besides accelerate's state: the arguments of the run that wrote it, so a resume
    can refuse flags that would silently not apply."""
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}  # as JSON reads them back
    return {"args": {k: v for k, v in plain.items() if isinstance(v, (int, float, str, bool, list, type(None)))},
            **(extra or {})}


# Flags that may differ between a run and its resume: they change neither the numbers of a step nor what the
# restored optimizer, scheduler and data stream mean. Any other difference is refused (the restored scheduler
# would silently override e.g. a new --learning_rate, while args.json would record it).
SAFE_TO_CHANGE_ON_RESUME = {
    "output_dir", "resume_from_checkpoint", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit",
    "validation_steps", "validation_prompts", "num_validation_images", "report_to", "tracker_project_name",
    "logging_dir", "push_to_hub", "hub_model_id", "dataloader_num_workers", "cache_dir", "reward_model_paths",
    "reward_paths", "max_bad_rows", "scan_data", "gradient_checkpointing", "allow_tf32",
    "channels_last", "compile_sampler", "vae_gradient_checkpointing",  # speed only (utils/speed.py)
    "defer_loss_check", "compile_unet", "latent_cache",
}


def changed_flags(saved_args: dict, args) -> list:
    """Flags whose value differs from the checkpoint's run (flags one of the two runs did not know are skipped)."""
    current = run_state(args)["args"]
    return sorted(k for k in saved_args.keys() & current.keys()
                  if k not in SAFE_TO_CHANGE_ON_RESUME and saved_args[k] != current[k])


def resume_from_checkpoint(accelerator, args) -> int:
    """Load the state named by --resume_from_checkpoint; returns the optimizer step to continue from (0 = fresh).

    The main process picks the checkpoint and broadcasts its path, so every process resumes from the same one
    even if a save lands in between. Resuming from an older checkpoint than the newest moves the newer ones
    (the abandoned branch) into abandoned-<time>/, so `latest` cannot continue that branch later.
    """
    if args.resume_from_checkpoint is None:
        return 0
    from accelerate.utils import broadcast_object_list

    chosen = [None]
    if accelerator.is_main_process:
        if args.resume_from_checkpoint == "latest":
            checkpoints = list_checkpoints(args.output_dir)
            chosen = [checkpoints[-1] if checkpoints else None]
        else:
            chosen = [args.resume_from_checkpoint]
    path = broadcast_object_list(chosen, from_process=0)[0]
    if path is None:
        logger.info(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}, starting fresh")
        return 0
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise UsageError(f"--resume_from_checkpoint {path} is not a complete checkpoint (no {STATE_FILE})")
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    step = state["global_step"]
    changed = changed_flags(state.get("args", {}), args)
    if changed:
        raise UsageError(f"--resume_from_checkpoint {path}: flags differ from the run that wrote it (" + ", ".join(
            f"--{k} {state['args'][k]!r} -> {getattr(args, k)!r}" for k in changed) + "); a resume restores that "
            "run's optimizer and scheduler, so resume with its values or start a new run")
    accelerator.load_state(path)
    if accelerator.is_main_process:
        set_aside_newer(args.output_dir, step)
        try:
            save_args(args, args.output_dir, f"args-resume-{step}.json")
        except OSError as e:
            raise output_error(args.output_dir, e, f"args-resume-{step}.json") from None
    accelerator.wait_for_everyone()
    logger.info(f"resumed from {path} at step {step}")
    return step


def set_aside_newer(output_dir: str, step: int):
    """Move checkpoints after `step`, and final weights written after it, into abandoned-<time>/."""
    newer = [p for p in list_checkpoints(output_dir) if int(CHECKPOINT_RE.match(os.path.basename(p)).group(1)) > step]
    if not newer:
        return
    from .models import LORA_WEIGHT_NAME

    finals = [os.path.join(output_dir, name) for name in (LORA_WEIGHT_NAME, "unet", "transformer")]
    finals = [p for p in finals if os.path.exists(p)]
    target = os.path.join(output_dir, time.strftime("abandoned-%Y%m%d-%H%M%S"))
    os.makedirs(target, exist_ok=True)
    for p in newer + finals:
        shutil.move(p, os.path.join(target, os.path.basename(p)))
    logger.warning(f"resuming from step {step}: moved {', '.join(os.path.basename(p) for p in newer + finals)} "
                   f"of the abandoned later run into {target}")


# --------------------------------------------------------------------------- the end of a step
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


def optimizer_update(accelerator, args, model, optimizer, lr_scheduler, skipped: bool, nonfinite_loss=None):
    """The update at the end of an accumulation: clip, then step unless the loss or the gradient was not finite.

    The gradient norm is computed even with clipping off (max norm inf: the gradients are multiplied by 1), so a
    finite loss with an infinite gradient skips the step (on every process: its flag is all-reduced) instead of
    writing inf into the weights. `nonfinite_loss`: NonFiniteGuard's deferred flag (a device tensor, any loss of
    the accumulation not finite), checked in the same host sync as the gradient. Returns (grad_norm, skipped)."""
    from accelerate.utils import DistributedType

    grad_norm = torch.zeros((), device=accelerator.device)
    if not skipped:
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            norm = model.get_global_grad_norm()  # the engine clipped (--max_grad_norm) and stepped in backward
        else:
            norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2's norm of sharded gradients is a DTensor
            norm = norm.full_tensor()
        grad_norm = grad_norm if norm is None else torch.as_tensor(norm, device=accelerator.device).float()
        if accelerator.scaler is None:  # fp16's GradScaler skips overflowing steps itself, and must see them to
            # lower its scale (a few at the start are normal), so only unscaled runs check here
            bad = (~torch.isfinite(grad_norm).all()).float()  # on the device: the .item() below is the one sync
            if nonfinite_loss is not None:
                bad = torch.maximum(bad, nonfinite_loss.float())
            skipped = accelerator.reduce(bad, reduction="sum").item() > 0
        if not skipped:
            optimizer.step()
            lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def checkpoint_or_stop(accelerator, args, global_step: int, stop: "StopRequest", metrics_log=None) -> bool:
    """Save a checkpoint when one is due or a stop was requested. A stop before the last step ends the run
    (Stopped, exit code 3); at the last step the run goes on to write its final weights (exit code 0) and
    this returns True (skip what is not needed, e.g. the last validation)."""
    if injected("SIGNAL", accelerator, global_step, "end"):
        os.kill(os.getpid(), signal.SIGUSR1)
    stopping = stop.any_process(accelerator)
    if global_step % args.checkpointing_steps == 0 or stopping:
        save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, run_state(args))
    if stopping and global_step < args.max_train_steps:
        stop_run(accelerator, args, global_step, metrics_log)
    return stopping


def stop_run(accelerator, args, completed_step: int, metrics_log=None):
    """A stop request: checkpoint the last completed step (a partial accumulation is dropped by the caller; batches
    depend only on (seed, step, micro-step), so the resume redraws them), close the logs, raise Stopped."""
    # accelerate counts micro-steps to know which one syncs, and saves the count: rewind the dropped ones, or the
    # resumed run would step its optimizer in the middle of an accumulation
    accelerator.step = completed_step * args.gradient_accumulation_steps
    path = save_checkpoint_of(accelerator, args, completed_step)
    end_logs(accelerator, metrics_log)
    where = f"{path} holds it; continue with --resume_from_checkpoint latest" if path else \
        "no step was completed, nothing to save; rerun with --resume_from_checkpoint latest"
    raise Stopped(f"stop requested; stopped after step {completed_step}: {where}", completed_step)


def end_logs(accelerator, metrics_log=None):
    if metrics_log is not None:
        metrics_log.close()
    accelerator.end_training()


class StepClock:
    """The wall-clock fields of a step's metrics. step_seconds runs from the end of the previous step's log (or the
    loop's start) to the end of this step's metrics, whose reduction waits for the GPU: data loading, host work and
    GPU work all count, and the sum over steps is the loop's wall time less the validation grids and checkpoint
    saves (`paused`), which are not steps. data_seconds: the part spent waiting for the batch (`data`)."""

    def __init__(self):
        self.last, self.data_total = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def data(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.data_total += time.perf_counter() - started

    @contextlib.contextmanager
    def paused(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.last += time.perf_counter() - started

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


def save_outputs(accelerator, args, unet, is_sdxl: bool):
    """The end of a run: the trained weights in the diffusers format (main process), and the upload if asked."""
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, unet)
    if accelerator.is_main_process:
        save_unet_weights(accelerator.unwrap_model(unet), args.output_dir, is_sdxl, state_dict)
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
        if accelerator.num_processes == 1:  # nothing to all-reduce: no host sync with the GPU
            self.stopping = self.requested
            return self.stopping
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        self.stopping = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        return self.stopping


def injected(name: str, accelerator, step: int, micro) -> bool:
    """Test-only fault injection, read here only: DIFFUSION_ALIGN_INJECT_NAN (the loss becomes NaN) and
    DIFFUSION_ALIGN_INJECT_SIGNAL (the process sends itself SIGUSR1) hold comma-separated `STEP[.MICRO][@RANK]`:
    STEP the metrics.jsonl step (from 1); MICRO the micro-step (from 0; default 0), or `end` for the step's end,
    after its update (signals only); RANK one process (default: all)."""
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

    def end_step(self, accelerator, args, global_step: int, skipped: bool, metrics_log=None):
        """Count the step; `patience` skipped steps in a row: checkpoint the last good one and raise Diverged."""
        if not skipped:
            self.in_a_row, self.last_good = 0, global_step
            return
        self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
        logger.warning(f"step {global_step}: non-finite loss or gradient; update skipped ({self.in_a_row} in a row)")
        if self.in_a_row < self.patience:
            return
        path = save_checkpoint_of(accelerator, args, self.last_good)
        end_logs(accelerator, metrics_log)
        saved = f"{path} holds the last good step" if path else "no step was good, nothing saved"
        raise Diverged(f"non-finite loss or gradient in {self.in_a_row} steps in a row (steps "
                       f"{self.last_good + 1}-{global_step}); {saved}. Lower --learning_rate, use bf16 instead of "
                       f"fp16, or check the reward / data (see metrics.jsonl)", self.last_good)


def defers_loss_check(args, accelerator) -> bool:
    """--defer_loss_check applies: one process (stop flags from others need a collective each micro-step), no fp16
    GradScaler (it would see a non-finite loss's gradients and lower its scale) and no DeepSpeed (its engine steps
    inside backward, before the deferred flag is read)."""
    from accelerate.utils import DistributedType

    return (getattr(args, "defer_loss_check", False) and accelerator.num_processes == 1 and accelerator.scaler is None
            and accelerator.distributed_type != DistributedType.DEEPSPEED)


def step_generator(seed: int, *indices: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step, micro-step, ...): noise that depends only on the step, so
    resuming and changing the number of processes reproduce the same samples."""
    g = torch.Generator()
    g.manual_seed(hash((seed,) + tuple(indices)) % (2**63))
    return g


# --------------------------------------------------------------------------- validation images
def validation_wanted(args) -> bool:
    """Validation grids were asked for: --validation_prompts given, or --validation_steps within the run."""
    return bool(args.validation_prompts) or args.validation_steps <= args.max_train_steps


def validation_due(args, global_step: int) -> bool:
    """A grid after this step, inside the loop: a multiple of --validation_steps before the last step (the last
    one is drawn after the final weights are saved, when `validation_wanted`)."""
    return validation_wanted(args) and global_step % args.validation_steps == 0 and global_step < args.max_train_steps


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
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, ignore_patterns=["checkpoint-*", ".checkpoint-*", "abandoned-*"])
