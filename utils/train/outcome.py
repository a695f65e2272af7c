"""How a run ends and what it writes about itself: exit codes, run_status.json, args.json, one-line errors."""
import errno
import json
import logging
import os
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
    write_status(args, "finished", EXIT_FINISHED, "final weights written", final_step)


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
