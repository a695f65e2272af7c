"""Checkpoints that fail: a damaged newest checkpoint (its manifest of sizes and sha256 sums), and a disk that fills
while a checkpoint or the final weights are written (a real tmpfs of a few hundred KB, mounted by the test).

The runs are tiny-sd Diffusion-DPO with LoRA (train_dpo.py): one 4-step run, checkpointed every 2 steps, gives the
checkpoints that the tests copy and damage; the full-disk runs write into the small tmpfs.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import train_dpo
from conftest import (REPO_ROOT, assert_resumed, deterministic_metrics, mark_rows_before_resume, run_command,
                      run_main_in_process)
from utils import UsageError
from utils.toy.synthetic import synthetic_preference_rows, write_preference_set
from utils.train.checkpoints import MANIFEST_FILE, checkpoint_problem, list_checkpoints, newest_sound_checkpoint
from utils.train.metrics import read_metrics
from utils.train.outcome import EXIT_USAGE, STATUS_FILE

FAST = ["--resolution", "32", "--report_to", "none", "--lr_warmup_steps", "0", "--use_lora", "--lora_rank", "4",
        "--learning_rate", "1e-3", "--train_batch_size", "2", "--validation_steps", "1000", "--checkpointing_steps", "2"]
WEIGHTS = "pytorch_lora_weights.safetensors"


def dpo_flags(data, out, *extra):
    return ["--pretrained_model_name_or_path", "tiny-sd", "--dataset_name", data, "--output_dir", out, *FAST,
            *[str(e) for e in extra]]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_sd_path):
    root = tmp_path_factory.mktemp("integrity")
    return {"good": write_preference_set(synthetic_preference_rows(16, seed=0), str(root / "good")), "root": root}


@pytest.fixture(scope="module")
def finished(data):
    """A finished 4-step run: checkpoint-2, checkpoint-4 (each with its manifest) and the final weights."""
    out = data["root"] / "finished"
    run_main_in_process(train_dpo, dpo_flags(data["good"], out, "--max_train_steps", 4))
    return out


def copy_of(run, where):
    shutil.copytree(run, where)
    return where


def zero_bytes_inside(path, offset_from_end=4096, count=256):
    """Zero `count` bytes inside a file's data, leaving its size and (safetensors) header as they were."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - offset_from_end)
        f.write(bytes(count))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


# =========================================================================== a damaged newest checkpoint
def test_latest_skips_a_newest_checkpoint_with_zeroed_weights_and_resumes_the_one_before(data, finished, tmp_path):
    """Zeroed bytes inside the weights keep the file's size and header: only the sha256 in the manifest tells. `latest`
    skips checkpoint-4 with one warning line naming the file, moves it into abandoned-<time>/ (with the final weights
    written after it) and resumes checkpoint-2; the resumed steps 3-4 equal the first run's.

    Fails when resume_from_checkpoint's `latest` takes list_checkpoints(...)[-1] unverified (it then trains on the
    damaged weights from step 4), or when save_checkpoint does not call write_manifest (nothing tells the zeroed
    bytes apart)."""
    out = copy_of(finished, tmp_path / "run")
    first = read_metrics(str(out))
    zero_bytes_inside(out / "checkpoint-4" / WEIGHTS)
    mark_rows_before_resume(out)
    log = run_main_in_process(train_dpo, dpo_flags(data["good"], out, "--max_train_steps", 4,
                                                   "--resume_from_checkpoint", "latest"))
    resumed = assert_resumed(out, log, 2)
    warnings = [line for line in log.splitlines() if line.startswith("WARNING") and "checkpoint-4" in line]
    assert len(warnings) == 1 and f"skipped checkpoint-4, {WEIGHTS} does not match the sha256" in warnings[0], log
    (abandoned,) = [p for p in out.iterdir() if p.name.startswith("abandoned-")]
    assert sorted(p.name for p in abandoned.iterdir()) == ["checkpoint-4", WEIGHTS]
    assert list_checkpoints(str(out)) == [str(out / "checkpoint-2"), str(out / "checkpoint-4")]  # the new step 4
    assert checkpoint_problem(str(out / "checkpoint-4")) is None
    assert deterministic_metrics(resumed) == deterministic_metrics(first)


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "training_state.json", WEIGHTS])
def test_a_truncated_file_is_named_and_latest_takes_the_checkpoint_before(finished, tmp_path, name):
    """A truncated optimizer, scheduler, training-state or weights file fails the size in the manifest: the check
    names the file, and `latest` (newest_sound_checkpoint) takes checkpoint-2 and sets checkpoint-4 aside, so the next
    requeue does not meet it again.

    Fails when checkpoint_problem returns None for a checkpoint with a manifest (accelerate's load_state, or
    json.load of the truncated training_state.json, then gives a library traceback on every requeue)."""
    out = copy_of(finished, tmp_path / "run")
    truncate(out / "checkpoint-4" / name)
    assert checkpoint_problem(str(out / "checkpoint-4")).startswith(f"{name} has ")
    assert checkpoint_problem(str(out / "checkpoint-2")) is None
    assert newest_sound_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert list_checkpoints(str(out)) == [str(out / "checkpoint-2")]
    assert newest_sound_checkpoint(str(out)) == str(out / "checkpoint-2")  # verified again, nothing more moved


def test_a_named_damaged_checkpoint_is_refused_in_one_line_naming_the_file(data, finished, tmp_path):
    """--resume_from_checkpoint PATH of a checkpoint whose optimizer state is cut short: one line (UsageError) naming
    the file, nothing moved.

    Fails when resume_from_checkpoint does not verify a named checkpoint (accelerate's load_state raises its own
    error from the truncated zip archive)."""
    out = copy_of(finished, tmp_path / "run")
    truncate(out / "checkpoint-4" / "optimizer.bin")
    with pytest.raises(UsageError) as e:
        run_main_in_process(train_dpo, dpo_flags(data["good"], out, "--max_train_steps", 4,
                                                 "--resume_from_checkpoint", out / "checkpoint-4"))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"--resume_from_checkpoint {out / 'checkpoint-4'}: optimizer.bin")
    assert len(list_checkpoints(str(out))) == 2 and not [p for p in out.iterdir() if p.name.startswith("abandoned-")]


def test_a_checkpoint_without_a_manifest_still_resumes_and_its_formats_are_checked(data, finished, tmp_path):
    """Checkpoints written without a manifest keep resuming; what their formats can tell is still checked: a truncated
    torch.save archive (optimizer.bin: its zip directory is cut off), a safetensors file shorter than its header says,
    an unreadable training_state.json.

    Fails when checkpoint_problem refuses a checkpoint for lacking a manifest (the resume from checkpoint-4 then falls
    back to checkpoint-2), or when _problem_without_manifest checks nothing (the damaged files below pass)."""
    out = copy_of(finished, tmp_path / "run")
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        (out / checkpoint / MANIFEST_FILE).unlink()
    mark_rows_before_resume(out)
    log = run_main_in_process(train_dpo, dpo_flags(data["good"], out, "--max_train_steps", 5,
                                                   "--resume_from_checkpoint", "latest"))
    assert_resumed(out, log, 4)

    for name, problem in [("optimizer.bin", "optimizer.bin is not a complete torch.save archive"),
                          (WEIGHTS, f"{WEIGHTS} has "), ("training_state.json", "training_state.json is not readable")]:
        legacy = copy_of(finished, tmp_path / f"legacy-{name}")
        (legacy / "checkpoint-4" / MANIFEST_FILE).unlink()
        assert checkpoint_problem(str(legacy / "checkpoint-4")) is None
        truncate(legacy / "checkpoint-4" / name)
        assert checkpoint_problem(str(legacy / "checkpoint-4")).startswith(problem)


# =========================================================================== a full disk
PAGE = 4096  # tmpfs counts whole pages


def pages(folder) -> int:
    return sum(-(-os.path.getsize(os.path.join(root, name)) // PAGE) for root, _, names in os.walk(folder)
               for name in names)


@pytest.fixture
def small_disk(tmp_path):
    """mount(kb) mounts a tmpfs of that size at tmp_path/disk (or resizes it, keeping its files); unmounted after the
    test. Skipped where mounting is not permitted (not root, no CAP_SYS_ADMIN, a container without it)."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = []

    def mount(kb: int):
        options = f"{'remount,' if mounted else ''}size={kb}k"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            if not mounted:
                pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
            pytest.fail(f"mount -o {options}: {proc.stderr}")
        mounted.append(kb)
        return where

    try:
        yield mount
    finally:
        # a run that failed in this process may still hold files open there (its lock, metrics.jsonl): detach lazily
        if mounted and subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)


def no_partial_left(out):
    return not [p.name for p in out.iterdir() if p.name.endswith(".partial")]


def test_a_checkpoint_that_fills_the_disk_exits_2_in_one_line_and_keeps_the_last_good_one(data, finished, small_disk):
    """A tmpfs with room for checkpoint-2 and half of checkpoint-4: the LoRA weights of checkpoint-4 fit, the
    optimizer state does not, and torch.save's zip writer raises its own RuntimeError (not OSError). The script
    (a real process) exits 2 with one line naming --output_dir and "no space left on device" and the checkpoint that
    holds the last saved state; the partial folder is gone; checkpoint-2 verifies and, once the disk is larger,
    resumes to the end.

    Fails when save_checkpoint catches only OSError around accelerator.save_state (exit 1 with torch's traceback,
    .checkpoint-4.partial left filling the disk)."""
    checkpoint = pages(finished / "checkpoint-2")
    disk = small_disk((checkpoint + 8 + checkpoint // 2) * PAGE // 1024)  # 8 pages: args.json, metrics, status, lock
    out = disk / "run"
    proc = run_command([sys.executable, "train_dpo.py", *dpo_flags(data["good"], out, "--max_train_steps", 4)], 600)
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line == (f"error: --output_dir {out}: no space left on device while writing checkpoint-4; the partial "
                    f"checkpoint was removed; checkpoint-2 holds the last saved state, step 2 (steps 3-4 are lost): "
                    f"continue from it with --resume_from_checkpoint latest"), line
    assert no_partial_left(out)
    assert list_checkpoints(str(out)) == [str(out / "checkpoint-2")]
    assert checkpoint_problem(str(out / "checkpoint-2")) is None
    assert json.loads((out / STATUS_FILE).read_text())["exit_code"] == EXIT_USAGE

    small_disk(4096)
    mark_rows_before_resume(out)
    log = run_main_in_process(train_dpo, dpo_flags(data["good"], out, "--max_train_steps", 4,
                                                   "--resume_from_checkpoint", "latest"))
    resumed = assert_resumed(out, log, 2)
    assert deterministic_metrics(resumed) == deterministic_metrics(read_metrics(str(finished)))
    assert (out / WEIGHTS).is_file() and checkpoint_problem(str(out / "checkpoint-4")) is None


def test_final_weights_that_fill_the_disk_are_one_line_naming_the_last_checkpoint(data, finished, small_disk):
    """A tmpfs with room for checkpoint-2 but not for the final weights after step 3: safetensors raises its own
    SafetensorError. The error is one line naming --output_dir, "no space left on device" and checkpoint-2 as the last
    saved state; no truncated weights file is left where the result belongs, no partial folder; checkpoint-2
    verifies and resumes to the end once the disk is larger.

    Fails when save_outputs catches only OSError (SafetensorError escapes: a traceback, exit 1)."""
    checkpoint, weights = pages(finished / "checkpoint-2"), pages(finished / WEIGHTS)
    disk = small_disk((checkpoint + 8 + weights // 2) * PAGE // 1024)
    out = disk / "run"
    with pytest.raises(UsageError) as e:
        run_main_in_process(train_dpo, dpo_flags(data["good"], out, "--max_train_steps", 3))
    assert str(e.value) == (f"--output_dir {out}: no space left on device while writing the final weights; the "
                            f"partial files were removed; checkpoint-2 holds the last saved state, step 2 (step 3 is "
                            f"lost): continue from it with --resume_from_checkpoint latest")
    assert not (out / WEIGHTS).exists() and no_partial_left(out)
    assert list_checkpoints(str(out)) == [str(out / "checkpoint-2")]
    assert checkpoint_problem(str(out / "checkpoint-2")) is None

    small_disk(4096)
    mark_rows_before_resume(out)
    log = run_main_in_process(train_dpo, dpo_flags(data["good"], out, "--max_train_steps", 3,
                                                   "--resume_from_checkpoint", "latest"))
    resumed = assert_resumed(out, log, 2)
    assert deterministic_metrics(resumed) == deterministic_metrics(read_metrics(str(finished))[:3])
    assert (out / WEIGHTS).is_file()
