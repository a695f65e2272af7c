"""How a run ends and what it writes about itself: exit codes, run_status.json, args.json, one-line errors."""
import errno
import json
import logging
import os
import signal
import socket
import sys
from typing import Optional

from .. import UsageError


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
    request exits 3 and a diverged run 4 (one line each). 0 means the final weights were written; `main` returns
    the step they are of (run_status.json's "step")."""
    from ..speed import keep_compile_cache

    args = None
    keep_compile_cache()  # before any torch.compile: compiled graphs survive the run (README "Start-up")
    try:
        args = parse_args()
        quiet_libraries(getattr(args, "verbose", False))
        final_step = main(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        write_status(args, "error", EXIT_USAGE, str(e))
        sys.exit(EXIT_USAGE)  # as argparse does for bad flags (sys.exit(str) would exit 1)
    except RunEnded as e:
        print(f"{'stopped' if e.exit_code == EXIT_STOPPED else 'error'}: {e}", file=sys.stderr)
        write_status(args, e.status, e.exit_code, str(e), e.step)
        sys.exit(e.exit_code)
    except BaseException as e:  # a crash (exit code 1, with its traceback) or a second Ctrl-C: not "running" any more
        if not isinstance(e, SystemExit) or e.code not in (None, 0):
            write_status(args, "error", EXIT_CRASH, f"{type(e).__name__}: {e}".strip())
        raise
    # The work is done and the file will say so: a stop signal from now on (a scheduler's SIGTERM while the
    # interpreter tears down) must not turn the exit code into 143 behind a "finished" status.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    write_status(args, "finished", EXIT_FINISHED, "final weights written", final_step)


LOCK_FILE = ".run.lock"
_held_locks = {}  # folder -> its open lock file, held by this process; the OS releases them when it exits


def lock_output_dir(output_dir: str):
    """Hold an exclusive lock on --output_dir for the life of this process, or refuse in one line: two runs in one
    folder would interleave metrics.jsonl and overwrite each other's checkpoints and weights. The OS drops the lock
    when the process ends, also by kill -9, so a crashed run's folder is free again at once."""
    import fcntl

    folder = os.path.realpath(output_dir)
    if folder in _held_locks:
        return
    handle = open(os.path.join(folder, LOCK_FILE), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"--output_dir {output_dir} is in use by a running training run ({holder}); wait for it to "
                         f"end, or choose another --output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _held_locks[folder] = handle


def release_output_dir(output_dir: str):
    """The run in this process is over (a process may run several, as the tests do)."""
    handle = _held_locks.pop(os.path.realpath(output_dir), None)
    if handle is not None:
        handle.close()


def folder_is_free_or_ours(output_dir: str) -> bool:
    """No other live run holds `output_dir` (this process may): its run_status.json may be written."""
    import fcntl

    if os.path.realpath(output_dir) in _held_locks:
        return True
    try:
        with open(os.path.join(output_dir, LOCK_FILE), "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
        return True
    except OSError:
        return False


def write_status(args, status: str, exit_code: Optional[int], message: str, step: Optional[int] = None):
    """--output_dir/run_status.json (main process): `accelerate launch` turns every non-zero exit code of the
    script into 1, so a requeue wrapper reads this file instead. "running" (exit_code null) from the start of a run
    until it ends; a run killed outright (kill -9, a lost node) leaves "running" behind, and then its folder's lock
    (utils.train.run.lock_output_dir) is free: `flock -n OUTPUT_DIR/.run.lock true` succeeds."""
    output_dir = getattr(args, "output_dir", None)
    if output_dir is None or int(os.environ.get("RANK", "0")) != 0 or not os.path.isdir(output_dir):
        return
    if not folder_is_free_or_ours(output_dir):  # a live run's folder (e.g. this run was refused for it): not ours
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


# The OS errors that writing into --output_dir meets, in words (a one-line error names them as such).
WRITE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}

# A writer's own error on a device with less than this free counts as a full disk (write_failure_reason).
NEARLY_FULL_BYTES = 1 << 20


def write_failure_reason(e: BaseException, path: str) -> Optional[str]:
    """Why writing under `path` failed, in words, when the device or the permissions are the cause; None for any other
    error (a bug, whose traceback should show). Call it when the error is caught, before anything is removed: it may
    look at the free space.

    The writers of a checkpoint raise their own errors, not OSError: torch.save's zip writer a RuntimeError (on a full
    tmpfs "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534", which names no cause), safetensors
    a SafetensorError ("I/O error: No space left on device (os error 28)"). So the message is searched for the OS
    error, and failing that, an error on a device with (nearly) no space left counts as a full disk."""
    if isinstance(e, OSError):
        return WRITE_ERRORS.get(e.errno, e.strerror or type(e).__name__)
    text = str(e)
    for code, reason in WRITE_ERRORS.items():
        if os.strerror(code) in text or f"os error {code})" in text:
            return reason
    if free_bytes(path) < NEARLY_FULL_BYTES:
        return WRITE_ERRORS[errno.ENOSPC]
    return None


def free_bytes(path: str) -> int:
    """Free space (for an unprivileged user) on the device of `path`, or of its nearest existing parent folder."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        stats = os.statvfs(path)
    except OSError:
        return NEARLY_FULL_BYTES  # unknown: not taken for a full disk
    return stats.f_bavail * stats.f_frsize


def output_error(output_dir: str, e: BaseException, what: str, reason: Optional[str] = None) -> UsageError:
    """An error while writing into --output_dir as one line: a full disk and a read-only folder named as such.
    `reason`: write_failure_reason's, when it was taken at the failure (it may depend on the free space then)."""
    reason = reason or write_failure_reason(e, output_dir) or str(e) or type(e).__name__
    return UsageError(f"--output_dir {output_dir}: {reason} while writing {what}")
