"""Weights in the diffusers format, resumable checkpoints, resume, and the final save."""
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from .. import UsageError
from ..models import LORA_WEIGHT_NAME, has_lora, load_lora_into_unet, save_lora, weights_subfolder
from .distributed import full_state_dict
from .outcome import output_error, save_args, write_failure_reason

logger = logging.getLogger(__name__)


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


STATE_FILE = "training_state.json"  # its presence marks a checkpoint complete (list_checkpoints)
MANIFEST_FILE = "manifest.json"  # written last into a checkpoint: every other file's size and sha256
FINAL_PARTIAL = ".final-weights.partial"  # the final weights are written here, then moved into --output_dir


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

    Written into a hidden temporary folder, which gets a manifest (every file's size and sha256, `write_manifest`,
    everything fsync'ed) and is then renamed into place, so a crash mid-save never leaves a checkpoint-N that looks
    complete, and a file damaged later is found on resume (`checkpoint_problem`). Old checkpoints are removed only
    after the new one is on disk. A write that fails on any process (a full disk, a read-only folder: an OSError, or
    torch's or safetensors' own error) removes the partial folder and becomes one line naming the cause and the last
    complete checkpoint (UsageError); any other error keeps its traceback.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = os.path.join(output_dir, f".checkpoint-{step}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    what, removed = f"checkpoint-{step}", "the partial checkpoint was removed"
    failure = None
    try:
        accelerator.save_state(partial)
    except Exception as e:  # every process must reach the all-reduce below, whatever failed
        failure = (e, write_failure_reason(e, output_dir))
    _raise_if_any_failed(accelerator, failure, partial, output_dir, what, removed, step)
    if accelerator.is_main_process:
        try:
            with open(os.path.join(partial, STATE_FILE), "w") as f:
                json.dump({"global_step": step, **(extra or {})}, f)
            write_manifest(partial)
            if os.path.exists(final):  # a resumed run saving the same step again
                shutil.rmtree(final)
            os.rename(partial, final)
            fsync_folder(output_dir)  # the rename itself is on disk
        except Exception as e:
            failure = (e, write_failure_reason(e, output_dir))
    _raise_if_any_failed(accelerator, failure, partial, output_dir, what, removed, step)
    if accelerator.is_main_process:
        checkpoints = list_checkpoints(output_dir)
        if total_limit is not None:
            for old in checkpoints[: max(0, len(checkpoints) - total_limit)]:
                shutil.rmtree(old)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()
    return final


def _raise_if_any_failed(accelerator, failure: Optional[tuple], partial: str, output_dir: str, what: str,
                         removed: str, step: int):
    """Every process learns whether any failed (one all-reduce), so none waits forever at the next barrier.
    `failure`: this process's (error, write_failure_reason) or None. A failed write becomes one line: what was being
    written, that the partial files were removed (`removed`) and which checkpoint holds the steps up to `step`."""
    failed = torch.tensor(float(failure is not None), device=accelerator.device)
    if accelerator.reduce(failed, reduction="sum").item() == 0:
        return
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # partial files must not fill what space is left
    where = f"{removed}; {last_saved_state(output_dir, step)}"
    if failure is None:
        raise UsageError(f"--output_dir {output_dir}: another process could not write {what}; {where}")
    error, reason = failure
    if reason is None:  # not the device or the permissions: a bug, with its traceback
        raise error
    raise output_error(output_dir, error, f"{what}; {where}", reason) from None


def last_saved_state(output_dir: str, step: int) -> str:
    """Which checkpoint holds the steps up to `step` after a write failed, for the one-line error."""
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return f"no checkpoint holds steps 1-{step}: rerun once the folder can be written"
    last = os.path.basename(checkpoints[-1])
    saved = int(CHECKPOINT_RE.match(last).group(1))
    if saved >= step:
        return f"{last} holds step {step}: continue from it with --resume_from_checkpoint latest"
    lost = f"step {step} is lost" if saved + 1 == step else f"steps {saved + 1}-{step} are lost"
    return f"{last} holds the last saved state, step {saved} ({lost}): continue from it with --resume_from_checkpoint latest"


# The cost of the manifest: sha256 of every file at each save, read back from the page cache the save just filled, at
# about 1-2 GB/s on one core (0.9 GB/s measured on a loaded 2-core test machine), the files hashed in parallel
# threads (hashlib releases the GIL). An SD1.5 full fine-tune's checkpoint (3.4 GB of fp32 weights, 6.9 GB of Adam
# moments) costs about 5-10 s, a LoRA one well under a second. Measured on the tiny model: 5-12 ms per save for a
# tiny-sd LoRA rank-4 checkpoint (0.4 MB, mostly the fsyncs), 25-40 ms for a full tiny-sd one (17 MB); verifying on
# resume 1 ms and 13 ms. The fsyncs in the same pass are owed anyway: the rotation may delete an older checkpoint only
# once the new one is on disk.
def write_manifest(folder: str):
    """Hash and fsync every file under `folder`, then write MANIFEST_FILE (sizes and sha256 sums) last, fsync it and
    the folders."""
    files = files_under(folder)
    digests = _in_threads(lambda rel: file_digest(os.path.join(folder, rel), sync=True), files)
    manifest = {"algorithm": "sha256",
                "files": {rel: {"size": size, "sha256": digest} for rel, (size, digest) in zip(files, digests)}}
    with open(os.path.join(folder, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for root, _, _ in os.walk(folder):
        fsync_folder(root)


def files_under(folder: str) -> list:
    """Every file under `folder` but the manifest, as sorted '/'-separated relative paths."""
    return sorted(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
                  for root, _, names in os.walk(folder) for name in names
                  if not (root == folder and name == MANIFEST_FILE))


def file_digest(path: str, sync: bool = False) -> tuple:
    """(size, sha256 hex) of a file; `sync`: fsync it too (a read-only descriptor flushes the file's pages as well)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if sync:
            os.fsync(f.fileno())
        return os.fstat(f.fileno()).st_size, digest


def _in_threads(function, items: list) -> list:
    """[function(item) for item in items], the items in parallel threads (file hashing releases the GIL)."""
    if len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(function, items))


def fsync_folder(folder: str):
    """Make the names in `folder` (a new file, a rename) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str):
    """Make every file under `folder`, and the folders' names, durable."""
    for root, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(root)


def checkpoint_problem(path: str) -> Optional[str]:
    """What makes the checkpoint at `path` unusable, in words naming the file; None when it verifies. With a manifest,
    every listed file must have its size (checked first: a truncated file costs no reading) and its sha256. Without
    one (checkpoints written before manifests existed keep resuming), see _problem_without_manifest."""
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.exists(manifest_path):
        return _problem_without_manifest(path)
    try:
        with open(manifest_path) as f:
            listed = {rel: (int(entry["size"]), str(entry["sha256"])) for rel, entry in json.load(f)["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST_FILE} is not a readable manifest"
    for rel, (size, _) in sorted(listed.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"{rel} is missing"
        if os.path.getsize(file) != size:
            return f"{rel} has {os.path.getsize(file)} bytes, its manifest says {size}"
    names = sorted(listed)
    digests = _in_threads(lambda rel: file_digest(os.path.join(path, rel))[1], names)
    for rel, digest in zip(names, digests):
        if digest != listed[rel][1]:
            return f"{rel} does not match the sha256 in its manifest (its bytes changed after the save)"
    return None


def _problem_without_manifest(path: str) -> Optional[str]:
    """A checkpoint without a manifest has no checksums to compare, so only what its formats tell is verified:
    training_state.json parses and holds the step; a .safetensors file's header accounts for its size exactly (a
    truncated file fails); torch.save's files (.bin, .pkl, .pt: zip archives holding the optimizer, scheduler and RNG
    states) keep the directory that truncation cuts off, and each record matches its CRC-32. Changed bytes inside a
    safetensors file's tensors, and files of other formats, go unnoticed."""
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is not readable JSON holding the global_step"
    for rel in files_under(path):
        file = os.path.join(path, rel)
        if rel.endswith(".safetensors"):
            problem = _safetensors_problem(file)
        elif rel.endswith((".bin", ".pkl", ".pt")):
            problem = _torch_archive_problem(file)
        else:
            continue
        if problem:
            return f"{rel} {problem}"
    return None


def _safetensors_problem(path: str) -> Optional[str]:
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if header_size > size - 8:
                raise ValueError("header larger than the file")
            header = json.loads(f.read(header_size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "has no readable safetensors header"
    if 8 + header_size + end != size:
        return f"has {size} bytes, its safetensors header describes {8 + header_size + end}"
    return None


def _torch_archive_problem(path: str) -> Optional[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return "is not a complete torch.save archive"
    return f"fails the CRC-32 of its record {bad}" if bad else None


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


def check_same_flags(args, state: dict, path: str, safe=SAFE_TO_CHANGE_ON_RESUME):
    """Refuse a resume whose flags differ from those of the run that wrote the checkpoint, except the `safe` ones."""
    changed = changed_flags(state.get("args", {}), args, safe)
    if changed:
        raise UsageError(f"--resume_from_checkpoint {path}: flags differ from the run that wrote it (" + ", ".join(
            f"--{k} {state['args'][k]!r} -> {getattr(args, k)!r}" for k in changed) + "); a resume restores that "
            "run's optimizer and scheduler, so resume with its values or start a new run")


def resume_from_checkpoint(accelerator, args, check=None) -> int:
    """Load the state named by --resume_from_checkpoint; returns the optimizer step to continue from (0 = fresh).
    `check(state, path)` sees the checkpoint's training_state.json before anything loads, and raises UsageError for
    a checkpoint this run must not continue (default: `check_same_flags`).

    The main process picks the checkpoint and broadcasts its path, so every process resumes from the same one
    even if a save lands in between. Resuming from an older checkpoint than the newest moves the newer ones
    (the abandoned branch) into abandoned-<time>/, so `latest` cannot continue that branch later.

    The checkpoint is verified first (`checkpoint_problem`: its manifest's sizes and sha256 sums). `latest` skips
    one that fails, with one warning line naming the file, moves it into abandoned-<time>/ (so the next requeue does
    not verify it again) and takes the newest one before it; a named one that fails is refused in one line.
    """
    if args.resume_from_checkpoint is None:
        return 0
    from accelerate.utils import broadcast_object_list

    chosen = [None, None]  # the checkpoint, and what fails in it (a named one only)
    if accelerator.is_main_process:
        if args.resume_from_checkpoint == "latest":
            chosen = [newest_sound_checkpoint(args.output_dir), None]
        else:
            path = args.resume_from_checkpoint
            chosen = [path, checkpoint_problem(path) if os.path.isfile(os.path.join(path, STATE_FILE)) else None]
    path, problem = broadcast_object_list(chosen, from_process=0)
    if path is None:
        logger.info(f"--resume_from_checkpoint latest: no usable checkpoint in {args.output_dir}, starting fresh")
        return 0
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise UsageError(f"--resume_from_checkpoint {path} is not a complete checkpoint (no {STATE_FILE})")
    if problem:
        raise UsageError(f"--resume_from_checkpoint {path}: {problem}; name an earlier checkpoint, or pass latest, "
                         f"which skips a checkpoint that fails its check")
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    step = state["global_step"]
    (check or functools.partial(check_same_flags, args))(state, path)
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


def newest_sound_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint that verifies (None: none does). The newer ones that fail are set aside with
    the final weights written after them (set_aside_newer), each named in one warning line with the file that fails."""
    failed = {}
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            break
        failed[path] = problem
    else:
        path = None
    if failed:
        set_aside_newer(output_dir, step_of(path) if path else 0, failed)
    return path


def step_of(checkpoint: str) -> int:
    return int(CHECKPOINT_RE.match(os.path.basename(checkpoint)).group(1))


def set_aside_newer(output_dir: str, step: int, failed: Optional[dict] = None):
    """Move checkpoints after `step`, and final weights written after it, into abandoned-<time>/. `failed`: those of
    them that failed their check (path -> what fails), each named in a warning line of its own."""
    failed = failed or {}
    newer = [p for p in list_checkpoints(output_dir) if step_of(p) > step]
    if not newer:
        return
    finals = [os.path.join(output_dir, name) for name in (LORA_WEIGHT_NAME, "unet", "transformer", "ema")]
    finals = [p for p in finals if os.path.exists(p)]
    target = os.path.join(output_dir, time.strftime("abandoned-%Y%m%d-%H%M%S"))
    os.makedirs(target, exist_ok=True)
    for p in newer + finals:
        shutil.move(p, os.path.join(target, os.path.basename(p)))
    resumed = f"resuming from checkpoint-{step}" if step else "starting fresh"
    for p, problem in failed.items():
        logger.warning(f"--resume_from_checkpoint latest: skipped {os.path.basename(p)}, {problem}; {resumed}; "
                       f"moved it into {target}")
    rest = [os.path.basename(p) for p in newer + finals if p not in failed]
    if rest:
        logger.warning(f"resuming from step {step}: moved {', '.join(rest)} of the abandoned later run into {target}")


def save_outputs(accelerator, args, unet, is_sdxl: bool):
    """The end of a run: the trained weights in the diffusers format (main process), and the upload if asked.

    The weights are written into a hidden folder, fsync'ed and then moved into --output_dir, so a failed write leaves
    no truncated weights file that looks like the result (nor replaces an earlier run's). A failed write (a full disk:
    an OSError, or torch's or safetensors' own error) removes the partial files and becomes one line naming the cause
    and the checkpoint that holds the last saved state: the steps after it cannot be kept once nothing more can be
    written, and a resume from it repeats them."""
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, unet)
    partial = os.path.join(args.output_dir, FINAL_PARTIAL)
    failure = None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(partial, ignore_errors=True)
            save_unet_weights(accelerator.unwrap_model(unet), partial, is_sdxl, state_dict)
            fsync_tree(partial)
            for name in os.listdir(partial):
                move_into_place(os.path.join(partial, name), os.path.join(args.output_dir, name))
            os.rmdir(partial)
            fsync_folder(args.output_dir)
        except Exception as e:  # every process must reach the all-reduce below, whatever failed
            failure = (e, write_failure_reason(e, args.output_dir))
    _raise_if_any_failed(accelerator, failure, partial, args.output_dir, "the final weights",
                         "the partial files were removed", args.max_train_steps)
    if accelerator.is_main_process and args.push_to_hub:
        push_output_to_hub(args)


def move_into_place(source: str, target: str):
    """Move a file or folder onto `target`, replacing what is there (a folder: set aside, then deleted)."""
    if os.path.isdir(target) and not os.path.islink(target):
        old = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(source, target)
        shutil.rmtree(old)
    else:
        os.replace(source, target)


def push_output_to_hub(args):
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or Path(args.output_dir).name
    repo_id = create_repo(repo_id, exist_ok=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, ignore_patterns=["checkpoint-*", ".checkpoint-*", "abandoned-*"])
