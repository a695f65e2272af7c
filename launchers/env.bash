# Sourced by every launcher after it has changed to the repository root; not a launcher itself.
# Sets PYTHON and ACCELERATE_LAUNCH so that a launcher runs as written from any shell: the project's .venv (what
# the README's set-up line makes) when it exists, so no `source .venv/bin/activate` is needed; otherwise the
# `python` and `accelerate` found on PATH. Either can be set from the environment instead
# (PYTHON=/path/to/python, or ACCELERATE_LAUNCH="accelerate launch").
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  PYTHON=.venv/bin/python
fi
if [ -n "${PYTHON:-}" ]; then
  # the accelerate of that interpreter, even where its bin/ is not on PATH
  ACCELERATE_LAUNCH=${ACCELERATE_LAUNCH:-$PYTHON -m accelerate.commands.launch}
else
  PYTHON=python
  ACCELERATE_LAUNCH=${ACCELERATE_LAUNCH:-accelerate launch}
fi
