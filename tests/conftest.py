"""Shared test set-up: an offline world, the tiny pipelines, and a helper that runs a repository script.

The tiny pipelines are cached in the default folder (~/.cache/diffusion-align, or $DIFFUSION_ALIGN_CACHE),
not in a per-session temporary one, so that they are built once and then reused by every test process and
by the training scripts that the script tests start in subprocesses.
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

# Before anything imports huggingface_hub / transformers (they read these at import): no test may reach a hub,
# and the tokenizers' thread pool must not fight torch for the 2 cores (or warn after a fork).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# One thread per process unless told otherwise (subprocesses inherit it). The tiny models' ops take
# milliseconds, so a second thread gains little, while on a shared 2-core machine (parallel test runs, other
# jobs) OpenMP threads that wait on a descheduled partner made the suite ~6x slower (measured: 200 s vs 33 s
# for test_foundation.py at a load average of 5).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The multi-process tests run every process on this machine: gloo's connections go over the loopback interface.
# Left to itself gloo binds the address the host name resolves to, which on some machines is not this one's, and
# its connections then wait out gloo's 30-minute timeout.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parent.parent
# `python -m pytest` puts the working directory on sys.path; a bare `pytest` or a run from elsewhere does not.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# The test files that run for a minute or more on one core, longest first. `-n 2 --dist loadfile` gives each worker
# whole files, by default those with the most tests first: the few-test files that run the scripts end to end (the
# bench smoke runs, one test each) came last, and one worker finished them alone while the other idled. Started
# first, the long files leave only short ones for the end, when the two workers even out.
LONG_FILES_FIRST = ["test_draftp.py", "test_reliability.py", "test_toyworld_models.py", "test_dpo.py",
                    "test_toyworld_trends.py", "test_evaluate.py", "test_bench_dpo.py", "test_bench.py",
                    "test_bench_e2e.py", "test_distributed.py", "test_flow.py", "test_fp8.py", "test_speed.py", "test_cli.py"]


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: hand out files in collection order (below)
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


@pytest.fixture(autouse=True)
def stop_signal_handlers_put_back():
    """Every test leaves SIGTERM, SIGUSR1 and SIGINT as it found them. A test that builds a Run (utils/train/run.py)
    installs the stop handlers, which only set a flag; left in place, they made a process pool that a later test
    forked (datasets' num_proc) survive Pool.terminate's SIGTERM, and the pool's join waited for ever (seen: a worker
    stuck on the pool's queue lock, the suite hung)."""
    import signal

    from utils.train.guards import STOP_SIGNALS

    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="session")
def tiny_sd_path() -> str:
    """Folder of the saved tiny SD1.5-style pipeline (built on first use, then cached on disk)."""
    from utils.toy.tiny import tiny_pipeline_path

    return tiny_pipeline_path("tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_path() -> str:
    """Folder of the saved tiny SDXL-style pipeline (built on first use, then cached on disk)."""
    from utils.toy.tiny import tiny_pipeline_path

    return tiny_pipeline_path("tiny-sdxl")


def frozen_tiny_parts(name: str):
    """The tiny pipeline `name` loaded as the scripts load it, frozen on the CPU in float32 (its name kept on it)."""
    from utils.models import freeze_frozen_parts, load_pipeline_parts

    parts = load_pipeline_parts(name)
    freeze_frozen_parts(parts, "cpu", torch.float32)
    parts.tiny_name = name
    return parts


@pytest.fixture
def fresh_accelerate_state():
    """Accelerator state is a process-wide singleton: give each test its own, as a new process would have."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def deterministic_metrics(metrics):
    """The rows of metrics.jsonl without the wall-clock columns (step_seconds, data_seconds, tflops, mfu), which no two
    runs share."""
    from utils.train.metrics import WALL_CLOCK_KEYS

    return [{k: v for k, v in m.items() if k not in WALL_CLOCK_KEYS} for m in metrics]


# A key that no run writes into metrics.jsonl: the resume tests tag the interrupted run's rows with it.
RESUME_MARK = "test_row_before_resume"


def mark_rows_before_resume(output_dir):
    """Tag every row of output_dir/metrics.jsonl with RESUME_MARK, before a test resumes the run: a resume keeps the
    rows up to its checkpoint's step as they are (the run's MetricsLog) and writes the later ones itself, while a
    fresh start rewrites the file from step 1. See assert_resumed."""
    import json

    path = Path(output_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps({**row, RESUME_MARK: True}) + "\n" for row in rows))


def assert_resumed(output_dir, log: str, step: int) -> list:
    """Proof that a run given --resume_from_checkpoint continued from checkpoint-<step> instead of starting over.
    With the same seed, a fresh start writes the same numbers as a resume, so equal metrics alone cannot tell the
    two apart: the run's log says "resumed from .../checkpoint-<step> at step <step>", args-resume-<step>.json
    sits next to args.json, and in metrics.jsonl exactly the rows up to <step> still carry the tag that
    mark_rows_before_resume put there before the resume (a fresh start would have rewritten them all).
    Returns the rows of metrics.jsonl without the tag.

    Mutation the callers fail under: in utils/train/checkpoints.py resume_from_checkpoint,
    `if args.resume_from_checkpoint is None:` made `if True:` (every resume starts fresh)."""
    import json
    import re

    assert re.search(rf"resumed from \S*checkpoint-{step} at step {step}\b", log), log[-3000:]
    assert (Path(output_dir) / f"args-resume-{step}.json").is_file()
    path = Path(output_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert [RESUME_MARK in row for row in rows] == [row["step"] <= step for row in rows], rows
    return [{k: v for k, v in row.items() if k != RESUME_MARK} for row in rows]


def run_command(cmd, timeout, cwd=REPO_ROOT, env=None) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` in a process group of its own, which is killed whole
    when the command outlives `timeout` (the test then fails with the end of its output) or when the test is
    interrupted. subprocess.run's own timeout kills only the direct child: an `accelerate launch` or torchrun
    launcher's workers kept the output pipes open, so the read after the kill waited on them for ever, and a stuck
    distributed run hung the whole suite instead of failing one test. `env` is the whole environment (None: this
    process's)."""
    import signal

    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout} s (its process group was killed):\n  {' '.join(map(str, cmd))}\n"
                    f"--- stdout (end) ---\n{stdout[-3000:]}\n--- stderr (end) ---\n{stderr[-6000:]}", pytrace=False)
    finally:
        kill_process_group(proc.pid, signal.SIGKILL)  # workers that outlived their launcher
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def kill_process_group(pgid, sig) -> None:
    """Send `sig` to every process of group `pgid`, if any is left."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_script(args, cwd=REPO_ROOT, expect_ok=True, timeout=600, launch=False, env=None) -> subprocess.CompletedProcess:
    """Run a repository script in a subprocess with this interpreter and return the finished process.

    `args` is the script (relative to `cwd`) followed by its flags, e.g. ["train_dpo.py", "--max_train_steps", "2"].
    `launch=True` runs it through `accelerate launch` (one CPU/GPU process, no mixed precision unless the
    script's own flags say otherwise), as users do. `expect_ok=True` fails the test on a non-zero exit,
    `expect_ok=False` on a zero exit; either way the failure message holds the command and the end of its
    output. `env` adds to (or overrides) this process's environment, which already holds the offline settings.
    """
    cmd = [sys.executable]
    if launch:
        cmd += ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(a) for a in args]
    proc = run_command(cmd, timeout, cwd=cwd, env={**os.environ, **(env or {})})
    if bool(expect_ok) != (proc.returncode == 0):
        expected = "exit code 0" if expect_ok else "a non-zero exit code"
        pytest.fail(f"expected {expected}, got {proc.returncode} from:\n  {' '.join(cmd)}\n"
                    f"--- stdout (end) ---\n{proc.stdout[-3000:]}\n--- stderr (end) ---\n{proc.stderr[-6000:]}",
                    pytrace=False)
    return proc


def write_square_clip(path, height: int, width: int, frames: int, background: int, k: int) -> None:
    """An mp4 (MPEG-4, PyAV) of `frames` frames: a white square moving right over a background in channel k % 3 of
    value `background` + 40 per frame, so that clips of other k or background differ in colour."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[:, :, k % 3] = 40 * i + background
            frame[8:16, 4 * i:4 * i + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_jsonl(path, rows) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def free_port() -> int:
    """A TCP port that is free now, for a multi-process run's --main_process_port: a fixed one can collide with
    another job's on the same machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _KeepLogRecords(logging.Handler):
    """Keeps the message of every record it is handed (run_main_in_process's log)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def run_main_in_process(script, flags) -> str:
    """`script.main(script.parse_args(flags))` in this process: a training run without the ~15 s that a subprocess
    spends importing torch, diffusers and transformers (most of a tiny run). As a new process would, it starts from a
    fresh accelerate state; the stop-signal handlers that main() installs are put back afterwards. `script` is the
    imported module (train_draftp, train_dpo, evaluate, an experiment script), `flags` its command line without the
    script name. Tests that are about the command line itself (exit codes, stderr, accelerate launch, several
    processes) use run_script.

    Returns the run's log: every record of level INFO and above that this process logged during the run, one line
    each ("LEVEL logger: message"), what the scripts' logging.basicConfig would have printed to stderr in a process
    of their own (the root logger is set to INFO for the run, as basicConfig does, and put back afterwards)."""
    import signal

    from accelerate.state import AcceleratorState, GradientState

    from utils.train.guards import STOP_SIGNALS

    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    root, keep = logging.getLogger(), _KeepLogRecords()
    root_level = root.level
    root.addHandler(keep)
    if root_level > logging.INFO:  # NOTSET (0) on the root logger already lets everything through
        root.setLevel(logging.INFO)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        script.main(script.parse_args([str(f) for f in flags]))
    finally:
        root.removeHandler(keep)
        root.setLevel(root_level)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return "\n".join(keep.lines)


@pytest.fixture(name="run_script")
def run_script_fixture():
    """The `run_script` helper above, as a fixture (no import of conftest needed)."""
    return run_script
