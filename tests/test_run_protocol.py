"""The run protocol's promises that a requeue wrapper and a cluster rely on (utils/train/run.py, outcome.py): one run
per --output_dir, a run_status.json that says "running" while the run runs and agrees with the exit code after it, a
resume that refuses another method's checkpoint or another global batch and keeps the learning-rate schedule when the
batch is split otherwise, and a stop that does not wait for a validation grid to finish."""
import json
import os
import shutil
import signal

import pytest
import torch

import train_dpo
import train_draftp
from tests.conftest import assert_resumed, mark_rows_before_resume, run_main_in_process, run_script
from utils import UsageError
from utils.toy.synthetic import synthetic_preference_rows, write_preference_set
from utils.train.checkpoints import list_checkpoints
from utils.train.metrics import read_metrics
from utils.train.outcome import STATUS_FILE, Stopped, lock_output_dir, release_output_dir, run_main

FAST = ["--pretrained_model_name_or_path", "tiny-sd", "--resolution", "32", "--num_inference_steps", "2",
        "--num_validation_images", "1", "--report_to", "none", "--lr_warmup_steps", "0", "--use_lora", "--lora_rank",
        "4", "--learning_rate", "1e-3", "--validation_steps", "1000"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_sd_path):
    return write_preference_set(synthetic_preference_rows(16, seed=0), str(tmp_path_factory.mktemp("pairs") / "data"))


def dpo(pairs, out, *extra):
    return [*FAST, "--dataset_name", pairs, "--output_dir", out, *[str(e) for e in extra]]


def status(out):
    return json.loads((out / STATUS_FILE).read_text())


# --------------------------------------------------------------------------- one run per folder, a truthful status
def test_a_second_run_in_a_folder_in_use_is_refused_in_one_line(pairs, tmp_path):
    """Mutation: dropping lock_output_dir from make_accelerator fails here (the second run would start, exit 0, and
    interleave its metrics with the first's)."""
    out = tmp_path / "busy"
    out.mkdir()
    lock_output_dir(str(out))  # a run in progress, as this process holds the lock
    try:
        (out / STATUS_FILE).write_text(json.dumps({"status": "running", "exit_code": None}))
        proc = run_script(["train_dpo.py", *dpo(pairs, out, "--max_train_steps", 1)], expect_ok=False)
    finally:
        release_output_dir(str(out))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith(f"error: --output_dir {out} is in use by a running training run "
                                                    f"(pid {os.getpid()} on ")
    assert status(out)["status"] == "running"  # the refused run wrote nothing over the live run's status
    assert not (out / "args.json").exists()


def test_the_status_says_running_during_the_run(pairs, tmp_path, monkeypatch):
    """A requeue wrapper that finds "finished" beside a run that was killed outright would call the job done.
    Mutation: dropping the write_status("running") of make_accelerator fails here (the file would be missing, or
    hold an earlier run's verdict)."""
    import utils.train.run as run_module

    out, seen = tmp_path / "run", []
    out.mkdir()
    (out / STATUS_FILE).write_text(json.dumps({"status": "finished", "exit_code": 0, "step": 2}))  # an earlier verdict
    log_step = run_module.log_step

    def log_and_read_status(accelerator, metrics_log, progress, logs, shown):
        log_step(accelerator, metrics_log, progress, logs, shown)
        seen.append(status(out))

    monkeypatch.setattr(run_module, "log_step", log_and_read_status)
    run_main_in_process(train_dpo, dpo(pairs, out, "--max_train_steps", 2, "--overwrite_output_dir"))
    assert [(s["status"], s["exit_code"]) for s in seen] == [("running", None)] * 2


def test_after_finished_is_written_a_stop_signal_cannot_change_the_exit_code(tmp_path):
    """run_main writes "finished" only once stop signals are ignored: a SIGTERM during the interpreter's teardown
    would otherwise exit 143 behind a "finished" status. Mutation: writing the status before ignoring them fails."""
    seen = {}

    def main(args):
        return 7

    def parse_args():
        return type("Args", (), {"output_dir": str(tmp_path), "verbose": False})()

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        run_main(main, parse_args)
        seen = {sig: signal.getsignal(sig) for sig in handlers}
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: this test process lives on
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert set(seen.values()) == {signal.SIG_IGN}
    assert status(tmp_path) == {"status": "finished", "exit_code": 0, "step": 7, "message": "final weights written"}


# --------------------------------------------------------------------------- what a resume accepts
@pytest.fixture(scope="module")
def split_run(pairs, tmp_path_factory):
    """4 steps of 1 process x batch 2 x accumulation 2 under a linear schedule, a checkpoint every 2 steps: the
    run that the resumes below continue."""
    out = tmp_path_factory.mktemp("split") / "run"
    run_main_in_process(train_dpo, dpo(pairs, out, "--max_train_steps", 4, "--checkpointing_steps", 2,
                                       "--train_batch_size", 2, "--gradient_accumulation_steps", 2,
                                       "--lr_scheduler", "linear"))
    return out


def test_a_checkpoint_of_another_method_is_refused(split_run, tmp_path):
    """Mutation: dropping the method check of Run._check_resumable fails here (the DPO checkpoint's LoRA resumed
    once the common flags matched)."""
    out = tmp_path / "other"
    os.symlink(split_run / "checkpoint-2", tmp_path / "checkpoint-2")
    flags = [*FAST[:2], "--reward_model", "color_match", "--prompts", "colored_animals", "--output_dir", out,
             "--resume_from_checkpoint", tmp_path / "checkpoint-2", "--max_train_steps", 4]
    with pytest.raises(UsageError, match=r"checkpoint-2 was written by a dpo run; this is a draftp run"):
        run_main_in_process(train_draftp, flags)


def test_another_global_batch_is_refused_and_the_same_one_split_otherwise_continues(split_run, pairs, tmp_path):
    """Batch 2 x accumulation 2 = 4 samples per step. Batch 4 x accumulation 2 (8 per step) would halve the number
    of epochs the schedule was made for: refused. Batch 4 x accumulation 1 keeps 4 per step: the run continues and
    its learning rates are the uninterrupted run's. Mutations: dropping the global-batch comparison fails the first
    part; a schedule counted per process and micro-step (the factor num_processes in build_lr_scheduler) fails
    the second on two processes, which tests/test_distributed.py runs; here the split is within one process."""
    out = tmp_path / "resumed"
    os.makedirs(out)
    shutil.copytree(split_run / "checkpoint-2", out / "checkpoint-2")
    for name in ("args.json", "metrics.jsonl"):
        shutil.copy(split_run / name, out / name)
    with pytest.raises(UsageError, match=r"its run took 4 samples per optimizer step \(1 processes x 2 x 2 "
                                         r"accumulation\), this one would take 8 \(1 x 4 x 2\)"):
        run_main_in_process(train_dpo, dpo(pairs, out, "--max_train_steps", 4, "--checkpointing_steps", 2,
                                           "--train_batch_size", 4, "--gradient_accumulation_steps", 2,
                                           "--lr_scheduler", "linear", "--resume_from_checkpoint", "latest"))
    mark_rows_before_resume(out)
    log = run_main_in_process(train_dpo, dpo(pairs, out, "--max_train_steps", 4, "--checkpointing_steps", 2,
                                             "--train_batch_size", 4, "--gradient_accumulation_steps", 1,
                                             "--lr_scheduler", "linear", "--resume_from_checkpoint", "latest"))
    rows = assert_resumed(out, log, 2)
    assert [r["lr"] for r in rows] == [r["lr"] for r in read_metrics(str(split_run))]


# --------------------------------------------------------------------------- stopping
def test_a_stop_during_a_validation_grid_ends_the_run_at_once_with_a_checkpoint(pairs, tmp_path, monkeypatch):
    """SIGUSR1 at the start of step 2's grid: the pipeline is interrupted at its next denoising step, no grid is
    written, step 2 is checkpointed and the run stops (exit code 3 through run_main). Mutation: dropping the
    callback_on_step_end of train_dpo.validation or Run's stop check after the grid fails here (the grid is drawn,
    and the run goes on to step 3)."""
    out = tmp_path / "run"
    monkeypatch.setenv("DIFFUSION_ALIGN_INJECT_SIGNAL", "2.validation")
    with pytest.raises(Stopped, match="stopped after step 2"):
        run_main_in_process(train_dpo, dpo(pairs, out, "--max_train_steps", 4, "--validation_steps", 2,
                                           "--validation_prompts", "a red cat"))
    assert list_checkpoints(str(out)) == [str(out / "checkpoint-2")]
    assert not (out / "samples" / "validation-step-000002.png").exists()
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2]



# --------------------------------------------------------------------------- the average of the weights
def lora_b(path):
    """The LoRA up (B) matrices of a saved adapter: zeros at the start, so the average of steps is theirs alone."""
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path / "pytorch_lora_weights.safetensors")).items() if "lora_B" in k
            or "lora.up" in k}


def test_ema_of_the_weights_is_saved_validated_with_and_resumed_exactly(pairs, tmp_path):
    """--ema_decay 0.5 over 3 steps, a checkpoint each: ema/ holds 0.5 w3 + 0.25 w2 + 0.125 w1 (+ 0.125 w0, zero for
    LoRA's B matrices); a resume from step 2 ends with the same average bit for bit (it is in the checkpoint).
    Mutations: the average not updated after each step (ema = w0), or not restored on resume, fail here."""
    out = tmp_path / "run"
    flags = dpo(pairs, out, "--max_train_steps", 3, "--checkpointing_steps", 1, "--ema_decay", 0.5)
    run_main_in_process(train_dpo, flags)
    w = [lora_b(out / f"checkpoint-{k}") for k in (1, 2, 3)]
    ema = lora_b(out / "ema")
    assert ema.keys() == w[0].keys() and len(ema) > 0
    for key in ema:
        want = 0.125 * w[0][key] + 0.25 * w[1][key] + 0.5 * w[2][key]
        torch.testing.assert_close(ema[key], want, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(ema[k], w[2][k]) for k in ema)  # not the final weights
    straight = {k: v.clone() for k, v in ema.items()}
    shutil.rmtree(out / "checkpoint-3")
    mark_rows_before_resume(out)
    log = run_main_in_process(train_dpo, [*flags, "--resume_from_checkpoint", "latest"])
    assert_resumed(out, log, 2)
    resumed = lora_b(out / "ema")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_log_tflops_counts_the_first_step_once_and_divides_by_each_steps_time(pairs, tmp_path):
    """Each row's tflops is the first step's FLOP count over that row's step_seconds: the count (tflops x seconds) is
    the same in every row, and a DPO step of tiny-sd counts its three UNet passes (model and reference forward, the
    model's backward) as more than zero. Without the flag no such column."""
    out = tmp_path / "run"
    run_main_in_process(train_dpo, dpo(pairs, out, "--max_train_steps", 3, "--log_tflops"))
    rows = read_metrics(str(out))
    counts = [r["tflops"] * r["step_seconds"] for r in rows]
    assert all(c > 0 for c in counts)
    assert max(counts) / min(counts) < 1.05  # one count; tflops has 4 significant digits, step_seconds 3 decimals
    assert "mfu" not in rows[0]  # a CPU: no peak to compare with
    plain = tmp_path / "plain"
    run_main_in_process(train_dpo, dpo(pairs, plain, "--max_train_steps", 1))
    assert "tflops" not in read_metrics(str(plain))[0]
