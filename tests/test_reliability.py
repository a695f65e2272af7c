"""Surviving a cluster: stop requests (any number of signals, mid-accumulation, on every process), non-finite
steps, unreadable rows, checkpoint history and flags on resume, output-folder errors, exit codes.

Faults are injected through the test-only switches DIFFUSION_ALIGN_INJECT_NAN / DIFFUSION_ALIGN_INJECT_SIGNAL
(utils.train.guards.injected), so each lands at a known step and micro-step; the 2-process test sends a real
SIGTERM to the whole process group, as scancel and preemption do.
"""
import argparse
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_dpo
import train_draftp
from conftest import (REPO_ROOT, assert_resumed, deterministic_metrics, free_port, kill_process_group,
                      mark_rows_before_resume, run_command, run_main_in_process, run_script)
from utils import UsageError
from utils.data import ImagePairDataset, collate_images, select_pairs
from utils.toy.synthetic import synthetic_preference_rows, write_preference_set
from utils.train.checkpoints import (list_checkpoints, resume_from_checkpoint, run_state, save_checkpoint,
                                     save_unet_weights)
from utils.train.cli import add_common_args
from utils.train.guards import STOP_SIGNALS, StopRequest
from utils.train.metrics import read_metrics
from utils.train.optim import build_lr_scheduler, optimizer_update
from utils.train.outcome import EXIT_DIVERGED, EXIT_STOPPED, STATUS_FILE
from utils.train.run import make_accelerator


def parse_common(*flags):
    parser = add_common_args(argparse.ArgumentParser())
    return parser.parse_args(["--pretrained_model_name_or_path", "tiny-sd", "--report_to", "none",
                              "--mixed_precision", "no", *map(str, flags)])


@pytest.fixture
def restore_signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


# =========================================================================== flags
FLOAT_FLAGS = {
    train_draftp: ["--learning_rate", "--reward_scale", "--kl_coeff", "--max_grad_norm", "--guidance_scale", "--eta",
                   "--adam_beta1", "--adam_epsilon", "--lora_alpha"],
    train_dpo: ["--learning_rate", "--beta_dpo", "--max_grad_norm", "--guidance_scale", "--proportion_empty_prompts",
                "--noise_offset", "--adam_weight_decay"],
}


@pytest.mark.parametrize("script,flag,value", [(s, f, v) for s, flags in FLOAT_FLAGS.items() for f in flags
                                               for v in ("nan", "inf", "-inf")])
def test_every_float_flag_must_be_finite(script, flag, value, tmp_path):
    base = ["--pretrained_model_name_or_path", "tiny-sd", "--output_dir", str(tmp_path / "out")]
    if script is train_dpo:
        base += ["--dataset_name", str(tmp_path)]
    with pytest.raises(UsageError, match=f"^{flag} must be a finite number, got {value.replace('+', '')}"):
        script.parse_args([*base, f"{flag}={value}"])


# =========================================================================== signals
def test_repeated_sigterm_and_sigusr1_only_request_a_stop_and_a_second_ctrl_c_quits(restore_signal_handlers):
    stop = StopRequest()
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGUSR1, signal.SIGTERM):  # scancel + torchrun's forward
        os.kill(os.getpid(), sig)
    assert stop.requested
    os.kill(os.getpid(), signal.SIGINT)  # a first Ctrl-C is a stop request too
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


# =========================================================================== the update
def _tiny_training(args):
    accelerator = make_accelerator(args, "test")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    scheduler = build_lr_scheduler(args, optimizer)
    return (accelerator, *accelerator.prepare(model, optimizer, scheduler))


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_an_infinite_gradient_skips_the_update_and_counts(max_grad_norm, tmp_path, fresh_accelerate_state):
    args = parse_common("--output_dir", tmp_path, "--max_grad_norm", max_grad_norm, "--lr_scheduler", "linear",
                        "--max_train_steps", 10)
    accelerator, model, optimizer, scheduler = _tiny_training(args)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()  # a finite loss ...
    model.weight.grad[0, 0] = float("inf")  # ... with an infinite gradient
    grad_norm, skipped = optimizer_update(accelerator, args, model, optimizer, scheduler, skipped=False)
    assert skipped and not torch.isfinite(grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scheduler.scheduler.last_epoch == 0 and all(p.grad is None for p in model.parameters())
    model(torch.ones(1, 3)).sum().backward()  # a finite gradient steps, and its norm is logged without clipping too
    grad_norm, skipped = optimizer_update(accelerator, args, model, optimizer, scheduler, skipped=False)
    assert not skipped and grad_norm.item() == pytest.approx(8 ** 0.5)  # d(sum)/dW = ones(2, 3), d/db = ones(2)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# =========================================================================== checkpoints
@pytest.fixture
def small_accelerator(tmp_path, fresh_accelerate_state):
    args = parse_common("--output_dir", tmp_path)
    accelerator, *_ = _tiny_training(args)
    return accelerator


def test_a_full_disk_at_checkpoint_time_is_one_line_and_leaves_no_partial(small_accelerator, tmp_path, monkeypatch):
    def full_disk(output_dir):
        os.makedirs(output_dir, exist_ok=True)
        (open(os.path.join(output_dir, "optimizer.bin"), "wb")).write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(small_accelerator, "save_state", full_disk)
    with pytest.raises(UsageError, match=r"no space left on device while writing checkpoint-3; the partial") as e:
        save_checkpoint(small_accelerator, str(tmp_path), 3)
    assert "\n" not in str(e.value) and f"--output_dir {tmp_path}" in str(e.value)
    assert not [p for p in os.listdir(tmp_path) if "checkpoint" in p]


def test_an_unwritable_output_dir_is_one_line(tmp_path, fresh_accelerate_state, monkeypatch):
    def read_only(*a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("utils.train.run.save_args", read_only)
    with pytest.raises(UsageError, match=f"--output_dir {tmp_path}: read-only file system while writing args.json"):
        make_accelerator(parse_common("--output_dir", tmp_path), "test")


def test_resume_refuses_changed_flags_keeps_each_runs_args_and_sets_the_abandoned_branch_aside(
        small_accelerator, tmp_path):
    first = parse_common("--output_dir", tmp_path, "--learning_rate", 1e-3)
    (tmp_path / "args.json").write_text(json.dumps(vars(first)))
    for step in (2, 4, 6):
        save_checkpoint(small_accelerator, str(tmp_path), step, extra=run_state(first))
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"the abandoned run's final weights")

    changed = parse_common("--output_dir", tmp_path, "--learning_rate", 5e-4, "--lora_rank", 4,
                           "--resume_from_checkpoint", tmp_path / "checkpoint-4")
    with pytest.raises(UsageError) as e:
        resume_from_checkpoint(small_accelerator, changed)
    assert "--learning_rate 0.001 -> 0.0005" in str(e.value) and "--lora_rank 8 -> 4" in str(e.value)
    assert len(list_checkpoints(str(tmp_path))) == 3  # nothing moved by a refused resume

    safe = parse_common("--output_dir", tmp_path, "--learning_rate", 1e-3, "--max_train_steps", 50,
                        "--checkpointing_steps", 7, "--validation_steps", 3, "--resume_from_checkpoint",
                        tmp_path / "checkpoint-4")
    assert resume_from_checkpoint(small_accelerator, safe) == 4
    assert list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-4")]
    (abandoned,) = [p for p in tmp_path.iterdir() if p.name.startswith("abandoned-")]
    assert sorted(p.name for p in abandoned.iterdir()) == ["checkpoint-6", "pytorch_lora_weights.safetensors"]
    assert json.loads((tmp_path / "args.json").read_text())["max_train_steps"] == 1000  # the first run's
    assert json.loads((tmp_path / "args-resume-4.json").read_text())["max_train_steps"] == 50
    safe.resume_from_checkpoint = "latest"  # now the newest: checkpoint-4, not the abandoned 6
    assert resume_from_checkpoint(small_accelerator, safe) == 4


def test_weights_get_the_umasks_permissions(tiny_sd_path, tmp_path):
    from diffusers import UNet2DConditionModel

    from utils.models import add_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    old = os.umask(0o022)
    try:
        save_unet_weights(unet, str(tmp_path / "full"), is_sdxl=False)
        add_lora(unet, 4, None, seed=0)
        save_unet_weights(unet, str(tmp_path / "lora"), is_sdxl=False)
    finally:
        os.umask(old)
    for path in [tmp_path / "lora" / "pytorch_lora_weights.safetensors",
                 *(tmp_path / "full" / "unet").iterdir()]:
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path


# =========================================================================== bad rows in the data set
def truncated_png(data: bytes) -> bytes:
    return data[: len(data) // 2]  # the header reads, the pixels do not: PIL's "image file is truncated"


def test_an_unreadable_row_is_replaced_by_the_next_readable_one(tmp_path):
    import datasets

    rows = synthetic_preference_rows(6, seed=0)
    rows[1]["jpg_0"] = truncated_png(rows[1]["jpg_0"])
    rows[2]["caption"] = None
    ds = datasets.Dataset.from_list(rows)
    picked, winner_first, _ = select_pairs(ds, "label_0")
    dataset = ImagePairDataset(ds, ["jpg_0", "jpg_1"], "caption", picked, winner_first, 32, seed=0)
    item = dataset[(1, 0, 5)]  # rows 1 and 2 are bad: row 3 stands in, with the draws of key (1, 0, 5)
    assert item["row"] == 3 and item["bad_rows"] == [1]  # the drawn row; row 2 counts when it is drawn itself
    again = dataset[(1, 0, 5)]
    assert torch.equal(item["pixels"], again["pixels"])  # a function of the key, as every item
    assert dataset[(3, 0, 5)]["bad_rows"] == [] and torch.equal(dataset[(3, 0, 5)]["pixels"], item["pixels"])
    assert "column 'jpg_0' is not a readable image" in dataset.row_problem(1)
    assert "column 'caption' holds NoneType" in dataset.row_problem(2)
    assert dataset.row_problem(0) is None
    assert collate_images([item, dataset[(0, 0, 4)]])["bad_rows"] == [[1], []]


# =========================================================================== end to end (train_dpo.py, tiny-sd)
FAST = ["--resolution", "32", "--num_inference_steps", "2", "--num_validation_images", "1", "--report_to", "none",
        "--lr_warmup_steps", "0", "--use_lora", "--lora_rank", "4", "--learning_rate", "1e-3",
        "--train_batch_size", "2", "--validation_steps", "1000", "--checkpointing_steps", "1000"]


def dpo(data, out, *extra):
    return ["train_dpo.py", "--pretrained_model_name_or_path", "tiny-sd", "--dataset_name", data,
            "--output_dir", out, *FAST, *[str(e) for e in extra]]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_sd_path):
    root = tmp_path_factory.mktemp("reliability")
    good = write_preference_set(synthetic_preference_rows(16, seed=0), str(root / "good"))
    rows = synthetic_preference_rows(16, seed=0)
    rows[5]["jpg_1"] = truncated_png(rows[5]["jpg_1"])
    bad = write_preference_set(rows, str(root / "bad"))
    return {"good": good, "bad": bad, "root": root}


ACCUMULATE = ["--gradient_accumulation_steps", 3, "--max_train_steps", 5]


@pytest.fixture(scope="module")
def straight(data):
    """5 uninterrupted steps of 3 micro-steps: what every stopped-and-resumed run must reproduce. In this process
    (conftest.run_main_in_process): the runs that stop, fail and resume are the subprocesses under test."""
    out = data["root"] / "straight"
    run_main_in_process(train_dpo, dpo(data["good"], out, *ACCUMULATE)[1:])
    return read_metrics(str(out))


def resume(flags):
    """A resume after a failed subprocess, in this process (conftest.run_main_in_process): what is tested is the
    metrics it writes (equal to the straight run's); the failure is the subprocess under test. main() alone writes no
    run_status.json (the entry point, utils.train.run_main, does): a test that reads the status after a resume
    resumes through run_script. Returns the run's log."""
    return run_main_in_process(train_dpo, flags[1:])


def run_dpo(flags, env=None):
    """The script directly (not through accelerate launch, which turns every non-zero exit code into 1)."""
    return run_command([sys.executable, *flags], 600, env={**os.environ, **(env or {})})


def last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


def test_a_stop_mid_accumulation_checkpoints_the_last_step_and_resumes_exactly(data, straight):
    out = data["root"] / "stopped_mid_step"
    proc = run_dpo(dpo(data["good"], out, *ACCUMULATE), env={"DIFFUSION_ALIGN_INJECT_SIGNAL": "5.1"})
    assert proc.returncode == EXIT_STOPPED, proc.stderr[-3000:]
    assert last_line(proc).startswith("stopped: stop requested; stopped after step 4") and "Traceback" not in proc.stderr
    assert list_checkpoints(str(out)) == [str(out / "checkpoint-4")]  # the partial step 5 was dropped
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((out / STATUS_FILE).read_text())["status"] == "stopped"
    assert deterministic_metrics(read_metrics(str(out))) == deterministic_metrics(straight[:4])

    # a subprocess through the entry point: run_main, not main(), writes the "finished" status. It continues from
    # checkpoint-4 (conftest.assert_resumed says the mutation this fails under) and equals the straight run
    # bit for bit: batches, noise and timesteps follow (seed, step, micro-step)
    mark_rows_before_resume(out)
    proc = run_script(dpo(data["good"], out, *ACCUMULATE, "--resume_from_checkpoint", "latest"), launch=True)
    resumed = assert_resumed(out, proc.stdout + proc.stderr, 4)
    assert deterministic_metrics(resumed) == deterministic_metrics(straight)
    status = json.loads((out / STATUS_FILE).read_text())
    assert (status["status"], status["step"]) == ("finished", len(straight))  # the step the final weights are of
    assert f"; weights in {out.resolve()}" in proc.stderr.strip().splitlines()[-1]  # the run's last line says where


def test_a_stop_at_the_end_of_the_last_step_still_writes_the_final_weights(data, straight):
    out = data["root"] / "stopped_at_the_end"
    proc = run_dpo(dpo(data["good"], out, *ACCUMULATE), env={"DIFFUSION_ALIGN_INJECT_SIGNAL": "5.end"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "pytorch_lora_weights.safetensors").exists() and (out / "checkpoint-5").exists()
    assert not (out / "samples" / "validation-step-000005.png").exists()  # no time spent on the last validation
    assert deterministic_metrics(read_metrics(str(out))) == deterministic_metrics(straight)


def test_three_non_finite_steps_checkpoint_the_last_good_one_and_exit_4_then_resume(data, straight):
    out = data["root"] / "diverged"
    proc = run_dpo(dpo(data["good"], out, *ACCUMULATE), env={"DIFFUSION_ALIGN_INJECT_NAN": "2.2,3,4.1"})
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith("error: non-finite loss or gradient in 3 steps in a row (steps 2-4)") and "checkpoint-1" in line
    assert "Traceback" not in proc.stderr
    assert list_checkpoints(str(out)) == [str(out / "checkpoint-1")]
    metrics = read_metrics(str(out))
    assert [m["skipped"] for m in metrics] == [0, 1, 1, 1]
    assert json.loads((out / STATUS_FILE).read_text()) == {"status": "diverged", "exit_code": 4, "step": 1,
                                                           "message": line.removeprefix("error: ")}
    mark_rows_before_resume(out)
    log = resume(dpo(data["good"], out, *ACCUMULATE, "--resume_from_checkpoint", "latest"))
    # from checkpoint-1 (conftest.assert_resumed says the mutation this fails under): the three skipped rows go
    resumed = assert_resumed(out, log, 1)
    assert deterministic_metrics(resumed) == deterministic_metrics(straight)


def test_one_truncated_png_is_skipped_counted_and_reported(data):
    out = data["root"] / "bad_row"
    proc = run_script(dpo(data["bad"], out, "--max_train_steps", 8), launch=True)
    metrics = read_metrics(str(out))
    assert len(metrics) == 8 and sum(m["bad_rows"] for m in metrics) == 1  # 8 x 2 = one epoch: drawn once
    log = proc.stdout + proc.stderr
    assert "row 5: column 'jpg_1' is not a readable image" in log
    assert "finished 8 steps; 0 updates skipped (non-finite), 1 unreadable rows skipped in this run" in log
    assert (out / "pytorch_lora_weights.safetensors").exists()


def test_more_bad_rows_than_the_limit_is_one_line_and_the_scan_lists_them(data):
    """The limit ends the run after a completed step, which is checkpointed first (mutation: dropping the
    save_checkpoint_of of Run.end_step's step checks fails here: the steps since the last checkpoint would be lost)."""
    proc = run_dpo(dpo(data["bad"], data["root"] / "limit", "--max_train_steps", 8, "--max_bad_rows", 0))
    assert proc.returncode == 2 and last_line(proc).startswith("error: 1 unreadable rows skipped, more than "
                                                                 "--max_bad_rows 0")
    held = re.search(r"; (\S+checkpoint-(\d+)) holds step (\d+): resume from it", last_line(proc))
    assert held and held.group(2) == held.group(3), last_line(proc)
    assert list_checkpoints(str(data["root"] / "limit")) == [held.group(1)]
    proc = run_dpo(dpo(data["bad"], data["root"] / "scan", "--max_train_steps", 8, "--scan_data", "exit",
                       "--dataloader_num_workers", 2))
    assert proc.returncode == 2 and "--scan_data: row 5: column 'jpg_1' is not a readable image" in proc.stderr
    assert last_line(proc) == "error: --scan_data: 1 of 16 rows are unreadable (listed above)"


# =========================================================================== two processes (gloo, CPU)
def two_processes(flags, port):
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), *map(str, flags)]


TWO_ENV = {"ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}


def test_a_nan_on_one_process_skips_the_update_on_both(data, straight, tmp_path, monkeypatch):
    """Step 2's loss is NaN on process 1 only: both must skip (one process stepping alone would leave the two
    models apart, and the run would not match the one-process run that skips step 2)."""
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--max_train_steps", 3]
    with monkeypatch.context() as patch:  # the one-process reference, in this process
        patch.setenv("DIFFUSION_ALIGN_INJECT_NAN", "2")
        run_main_in_process(train_dpo, dpo(data["good"], one, *flags)[1:])
    two_flags = dpo(data["good"], two, *flags)
    two_flags[two_flags.index("--train_batch_size") + 1] = "1"
    proc = run_command(two_processes(two_flags, free_port()), 600, env={**os.environ, **TWO_ENV, "DIFFUSION_ALIGN_INJECT_NAN": "2@1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = read_metrics(str(one)), read_metrics(str(two))
    assert [m["skipped"] for m in a] == [m["skipped"] for m in b] == [0, 1, 0]
    # A skip on process 1 alone would hang process 0 in the gradient all-reduce of its backward, so finishing
    # already says both skipped. And step 3 sees the weights of one update, as with one process: model_mse (a
    # mean of errors near 1) to float32 rounding of the all-reduce (rel 1e-6), grad_norm to rel 1e-3 since the
    # DPO gradient carries sigmoid(-inside), inside = -2500 x (error difference), which turns 1e-7 rounding of
    # the errors into ~1e-4 (measured 4e-5). Had step 2 updated, step 3 would read model_mse 7.5e-5 higher and
    # grad_norm 27.8 instead of 32.4 (measured).
    assert b[2]["model_mse"] == pytest.approx(a[2]["model_mse"], rel=1e-6)
    assert b[2]["grad_norm"] == pytest.approx(a[2]["grad_norm"], rel=1e-3)


def test_one_bad_row_over_two_processes_is_counted_once_and_trips_max_bad_rows(tmp_path):
    """Two processes x batch 1 over 4 pairs, pair 1 unreadable, --max_bad_rows 0: the process that draws pair 1 counts
    1 and the other 0, and the step's bad_rows must be their sum, 1 (reduce_step_metrics all-reduces the mean and
    multiplies it by the number of processes), more than the limit: the run ends with the one-line error. 2 steps
    are one epoch, so pair 1 is drawn exactly once. Mutation this fails under: in utils/train/metrics.py
    reduce_step_metrics, `int(round(out[k] * accelerator.num_processes))` made `int(round(out[k]))`: the mean 0.5
    rounds to 0, so bad_rows reads 0 and --max_bad_rows never trips."""
    rows = synthetic_preference_rows(4, seed=0)
    rows[1]["jpg_0"] = truncated_png(rows[1]["jpg_0"])
    out = tmp_path / "run"
    flags = dpo(write_preference_set(rows, str(tmp_path / "data")), out, "--max_train_steps", 2, "--max_bad_rows", 0)
    flags[flags.index("--train_batch_size") + 1] = "1"
    proc = run_command(two_processes(flags, free_port()), 600, env={**os.environ, **TWO_ENV})
    assert proc.returncode != 0 and "error: 1 unreadable rows skipped, more than --max_bad_rows 0" in proc.stderr, \
        proc.stderr[-4000:]
    assert sum(m["bad_rows"] for m in read_metrics(str(out))) == 1


def test_sigterm_to_the_whole_process_group_stops_every_process_with_a_checkpoint(data, tmp_path):
    """As scancel and preemption: SIGTERM to the launcher and both workers at once; torchrun then forwards a
    second SIGTERM to each worker. Both must stop cleanly with one checkpoint, and the run resumes."""
    out = tmp_path / "run"
    flags = dpo(data["good"], out, "--max_train_steps", 1000)
    flags[flags.index("--train_batch_size") + 1] = "1"
    log = open(tmp_path / "log.txt", "w")
    launcher = subprocess.Popen(two_processes(flags, free_port()), cwd=REPO_ROOT, stdout=log, stderr=log,
                                env={**os.environ, **TWO_ENV}, start_new_session=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 400
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert launcher.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-4000:]
            time.sleep(0.2)
        os.killpg(launcher.pid, signal.SIGTERM)
        until = time.time() + 120  # torchrun SIGKILLs its workers 30 s after its SIGTERM; the tiny save takes ~1 s
        while True:  # the workers may outlive the launcher for a moment: wait for the whole group
            launcher.poll()  # reap the launcher, or its zombie keeps the group alive
            try:
                os.killpg(launcher.pid, 0)
            except ProcessLookupError:
                break
            assert time.time() < until, (tmp_path / "log.txt").read_text()[-4000:]
            time.sleep(0.2)
    finally:  # a failed wait must not leave a 1000-step run behind on the test machine
        kill_process_group(launcher.pid, signal.SIGKILL)
        launcher.wait()
    text = (tmp_path / "log.txt").read_text()
    assert text.count("stopped: stop requested; stopped after step") == 2, text[-4000:]  # each process: one line
    assert "KeyboardInterrupt" not in text
    (checkpoint,) = list_checkpoints(str(out))
    step = int(checkpoint.rsplit("-", 1)[1])
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(checkpoint))  # saved by both processes
    assert [m["step"] for m in read_metrics(str(out))][:step] == list(range(1, step + 1))

    flags[flags.index("--max_train_steps") + 1] = str(step + 1)
    mark_rows_before_resume(out)
    proc = run_command(two_processes([*flags, "--resume_from_checkpoint", "latest"], free_port()), 600,
                       env={**os.environ, **TWO_ENV})
    assert proc.returncode == 0, proc.stderr[-4000:]
    # it continues from the stop's checkpoint (conftest.assert_resumed says the mutation this fails under)
    assert [m["step"] for m in assert_resumed(out, proc.stdout + proc.stderr, step)] == list(range(1, step + 2))
