"""The test helpers that start processes: a stuck command must fail its test, not hold the suite."""
import os
import signal
import time

import pytest

from conftest import run_command
from utils.train.guards import STOP_SIGNALS, StopRequest

HANDLERS_AT_COLLECTION = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}


def test_a_command_past_its_timeout_fails_and_its_whole_process_group_is_killed(tmp_path):
    """A launcher whose child outlives it and keeps the output pipe open, as a stuck torchrun worker does: the test
    fails within seconds of the timeout, and the child is gone. Mutation this fails under: in conftest.run_command,
    the kill of the process group replaced by `proc.kill()` (the direct child only): the read after the kill waits
    for the grandchild's 60 s sleep."""
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="timed out after 1 s"):
        run_command(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], 1)
    assert time.monotonic() - started < 30
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while running(child) and time.monotonic() < deadline:  # SIGKILL is delivered asynchronously
        time.sleep(0.05)
    assert not running(child)


def running(pid) -> bool:
    """Whether process `pid` exists and is not a zombie (an orphan's zombie lasts until init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_finished_command_returns_its_output_and_exit_code():
    proc = run_command(["bash", "-c", "echo out; echo err >&2; exit 3"], 30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")


def test_a_test_may_install_the_stop_handlers_as_a_run_does():
    StopRequest()  # what Run() does: SIGTERM, SIGUSR1 and SIGINT now only set a flag
    assert signal.getsignal(signal.SIGTERM) != HANDLERS_AT_COLLECTION[signal.SIGTERM]


def test_the_next_test_finds_the_handlers_as_they_were():
    """conftest.stop_signal_handlers_put_back, after the test above (a file's tests run in order): a SIGTERM left
    caught would keep a later test's forked pool workers alive through Pool.terminate. Mutation this fails under:
    the fixture's loop that puts the handlers back removed."""
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == HANDLERS_AT_COLLECTION
