"""Weights in the diffusers format, resumable checkpoints, resume, and the final save."""
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from .. import UsageError
from ..models import LORA_WEIGHT_NAME, has_lora, load_lora_into_unet, save_lora, weights_subfolder
from .distributed import full_state_dict
from .outcome import output_error, save_args

logger = logging.getLogger(__name__)


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


STATE_FILE = "training_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete


def save_unet_weights(unet, output_dir: str, is_sdxl: bool, state_dict: Optional[dict] = None):
    """LoRA: pytorch_lora_weights.safetensors (diffusers format). Full: unet/ (SD3 / FLUX: transformer/; from_pretrained
    format). `state_dict`: the gathered weights of a sharded UNet (`full_state_dict`), written instead of the UNet's own."""
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


# The common flags that may differ between a run and its resume: they change neither the numbers of a step nor what
# the restored optimizer, scheduler and data stream mean. Any other difference is refused (the restored scheduler
# would silently override e.g. a new --learning_rate, while args.json would record it). A script adds its own such
# flags (Run's `safe_on_resume`).
SAFE_TO_CHANGE_ON_RESUME = frozenset({
    "output_dir", "resume_from_checkpoint", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit",
    "validation_steps", "validation_prompts", "num_validation_images", "report_to", "tracker_project_name",
    "logging_dir", "push_to_hub", "hub_model_id", "gradient_checkpointing", "allow_tf32",
})


def changed_flags(saved_args: dict, args, safe=SAFE_TO_CHANGE_ON_RESUME) -> list:
    """Flags whose value differs from the checkpoint's run, except the `safe` ones (flags one of the two runs did
    not know are skipped)."""
    current = run_state(args)["args"]
    return sorted(k for k in saved_args.keys() & current.keys() if k not in safe and saved_args[k] != current[k])


def resume_from_checkpoint(accelerator, args, safe=SAFE_TO_CHANGE_ON_RESUME) -> int:
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
    changed = changed_flags(state.get("args", {}), args, safe)
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
    finals = [os.path.join(output_dir, name) for name in (LORA_WEIGHT_NAME, "unet", "transformer")]
    finals = [p for p in finals if os.path.exists(p)]
    target = os.path.join(output_dir, time.strftime("abandoned-%Y%m%d-%H%M%S"))
    os.makedirs(target, exist_ok=True)
    for p in newer + finals:
        shutil.move(p, os.path.join(target, os.path.basename(p)))
    logger.warning(f"resuming from step {step}: moved {', '.join(os.path.basename(p) for p in newer + finals)} "
                   f"of the abandoned later run into {target}")


def save_outputs(accelerator, args, unet, is_sdxl: bool):
    """The end of a run: the trained weights in the diffusers format (main process), and the upload if asked."""
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, unet)
    if accelerator.is_main_process:
        save_unet_weights(accelerator.unwrap_model(unet), args.output_dir, is_sdxl, state_dict)
        if args.push_to_hub:
            push_output_to_hub(args)


def push_output_to_hub(args):
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or Path(args.output_dir).name
    repo_id = create_repo(repo_id, exist_ok=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, ignore_patterns=["checkpoint-*", ".checkpoint-*", "abandoned-*"])
