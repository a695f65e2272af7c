"""The command-line flags every training script takes, their checks, and --help's layout."""
import argparse
import importlib.util
import logging
import math
import os
import shutil
from pathlib import Path

from .. import UsageError
from ..data import prompt_sets
from ..models import named_pipelines
from ..rewards import list_rewards
from .checkpoints import CHECKPOINT_RE, list_checkpoints
from .optim import LR_SCHEDULERS

logger = logging.getLogger(__name__)


DEFAULTS_NOTE = ("Defaults marked 'from ...' follow that source; the other defaults are this project's own choices\n"
                 "(README.md, 'Where the defaults come from').")


EARLIER_RUN_FILES = ("args.json", "metrics.jsonl", "samples", "pytorch_lora_weights.safetensors", "unet", "transformer",
                     "ema")


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


GIVEN = "_given_flags"  # where RecordGiven notes the flags given on the command line (removed by check_common_args)


def note_given(namespace, option_string):
    setattr(namespace, GIVEN, getattr(namespace, GIVEN, []) + [option_string])


class RecordGiven(argparse.Action):
    """Store the value, and note that the flag was given: a flag whose default is a value cannot tell otherwise
    (`--lora_rank 8` without `--use_lora` would silently train the full model)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        note_given(namespace, option_string)


class RecordGivenSwitch(argparse.BooleanOptionalAction):
    """--flag / --no-flag, noting that one of them was given (RecordGiven)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        note_given(namespace, option_string)


def add_model_args(parser: argparse.ArgumentParser, group: str = "model", role: str = ""):
    """The pipeline to load (every script): `role` starts the first help line (e.g. what the pipeline is for)."""
    g = parser.add_argument_group(group)
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help=f"{role}hub id or local diffusers pipeline folder: SD1.5, SDXL, SD3 / SD3.5 or FLUX.1, the "
                        f"family read from its model_index.json; or a registered offline name: "
                        f"{', '.join(named_pipelines())}")
    g.add_argument("--revision", default=None, help="hub revision of the pipeline (default: the main branch)")
    g.add_argument("--variant", default=None, help="weight variant to load, e.g. fp16 (default: the full-precision files)")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="a separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix (default: the pipeline's)")
    return g


def add_prompt_args(parser: argparse.ArgumentParser, group: str = "prompts"):
    """--prompts and where in it the prompts are (the scripts that sample from prompts)."""
    g = parser.add_argument_group(group)
    g.add_argument("--prompts", default="animals",
                   help=f"built-in set ({', '.join(prompt_sets())}), a .txt/.jsonl file, or a datasets id / folder")
    g.add_argument("--prompt_column", default="prompt", help="column of --prompts (jsonl field or dataset column)")
    g.add_argument("--prompt_split", default="train", help="split of a --prompts dataset")
    return g


def add_reward_model_paths(group):
    """--reward_model_paths NAME=PATH: local weights of scoring models, for every script that loads one."""
    group.add_argument("--reward_model_paths", nargs="*", default=[], metavar="NAME=PATH",
                       help="local folder or file for a scoring model instead of its hub id, e.g. "
                            "pickscore=/models/pickscore")


def add_reward_args(parser: argparse.ArgumentParser, what: str = ""):
    """--reward_model (a name or a weighted sum; `what` says which kinds the script takes) and its local weights."""
    g = parser.add_argument_group("reward")
    g.add_argument("--reward_model", default="pickscore",
                   help=f"a scoring model ({', '.join(list_rewards())}), or a weighted sum such as "
                        f"'pickscore:1.0,aesthetic:0.05'{what}")
    add_reward_model_paths(g)
    return g


def add_video_args(parser: argparse.ArgumentParser, reward_frames_help: str):
    """--num_frames and --reward_frames (video models only), `reward_frames_help` saying which frames a script scores."""
    from ..flow import DEFAULT_NUM_FRAMES

    g = parser.add_argument_group("video (Wan 2.1)")
    g.add_argument("--num_frames", type=int, default=None,
                   help=f"frames per video, 1 + 4k (Wan's VAE keeps the first frame and packs each 4 after it into one "
                        f"latent frame); default: the pipeline's ({DEFAULT_NUM_FRAMES['wan']}). Video models only")
    g.add_argument("--reward_frames", type=int, default=None, help=reward_frames_help + ". Video models only")
    return g


def parse_int_pair(text: str):
    """"A,B" -> (A, B), two integers (--truncation_steps_random MIN,MAX, --sde_window START,END)."""
    try:
        first, second = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers separated by a comma, got {text!r}") from None
    return first, second


def add_common_args(parser: argparse.ArgumentParser):
    """The flags every training script takes (names follow the diffusers examples and the Diffusion-DPO train.py)."""
    add_model_args(parser)

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
    g.add_argument("--log_tflops", action="store_true",
                   help="count the first step's floating-point operations (PyTorch's FlopCounterMode) and log each "
                        "step's model TFLOP/s and, on a known GPU in bf16 / fp16, its share of the bf16 peak (tflops, "
                        "mfu in metrics.jsonl). Counting may route that step's attention through another kernel: its "
                        "numbers can then differ in the last bits from a run without the flag")
    g.add_argument("--ema_decay", type=float, default=None,
                   help="keep an exponential moving average of the trained weights (LoRA: the adapters), updated "
                        "after each optimizer step with this decay, e.g. 0.9999 (NeMo-Aligner's); the validation "
                        "grids use it, it is saved in ema/ beside the final weights and resumed exactly (default: off)")
    g.add_argument("--use_lora", action=RecordGivenSwitch, default=True,
                   help="train a LoRA adapter (--no-use_lora: the full UNet)")
    g.add_argument("--lora_rank", type=int, default=8, action=RecordGiven,
                   help="LoRA rank of the adapted layers (with --use_lora)")
    g.add_argument("--lora_alpha", type=float, default=None, action=RecordGiven,
                   help="LoRA alpha (with --use_lora; default: equal to --lora_rank, scale 1)")
    g.add_argument("--lora_targets", default="diffusers", action=RecordGiven, metavar="{diffusers,attention,NAMES}",
                   help="the layers LoRA adapts (with --use_lora): diffusers = what diffusers' LoRA training scripts "
                        "adapt for the family (SD1.5 / SDXL / SD3: the attention projections; FLUX.1: also the "
                        "feed-forward layers and the single blocks' proj_mlp); attention = the attention projections "
                        "only; or module names separated by commas, e.g. attn.to_q,attn.to_v,ff.net.2")

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
    given = vars(args).pop(GIVEN, [])
    check_finite(args)
    lora_flags = [f for f in ("--lora_rank", "--lora_alpha", "--lora_targets") if f in given]
    if lora_flags and not args.use_lora and "--no-use_lora" not in given:  # an explicit --no-use_lora means full
        raise UsageError(f"{' and '.join(lora_flags)} given, but this script trains the full model unless told "
                         f"--use_lora: add --use_lora to train a LoRA adapter, or --no-use_lora to train the full "
                         f"model (the LoRA flags are then unused)")
    positive = ["train_batch_size", "gradient_accumulation_steps", "max_train_steps", "lora_rank",
                "checkpointing_steps", "validation_steps", "num_validation_images"]
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.lr_warmup_steps < 0 or args.max_grad_norm < 0:
        raise UsageError("--lr_warmup_steps and --max_grad_norm must be >= 0")
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        raise UsageError(f"--ema_decay must be in (0, 1), e.g. 0.9999, got {args.ema_decay}")
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
