"""notebooks/quick_samples.ipynb: stored clean, and runs top to bottom with the README's offline recipe (its QS_*
variables, read from the README's code block) on a short run of the README's quickstart command."""
import json
import re
import shlex
import sys

import nbformat
import pytest

from tests.conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "quick_samples.ipynb"
README = REPO_ROOT / "README.md"
KERNEL = "diffusion-align-test"


def readme_commands():
    """Every command line of the README's bash code blocks, line continuations joined, split as the shell would."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [words for words in (shlex.split(line, comments=True) for line in lines) if words]


def readme_notebook_recipe() -> dict:
    """The QS_* assignments of the README's command that runs the notebook."""
    command = next(words for words in readme_commands() if "notebooks/quick_samples.ipynb" in words)
    return dict(word.split("=", 1) for word in command if re.fullmatch(r"QS_[A-Z]+=.*", word))


def readme_quickstart_flags() -> list:
    """The flags of the README's quickstart training command (the train_draftp.py line that trains on toy-sd)."""
    command = next(words for words in readme_commands()
                   if "train_draftp.py" in words and "toy-sd" in words and "--output_dir" in words)
    return command[command.index("train_draftp.py") + 1:]


def replace_flag(flags: list, name: str, value=None) -> list:
    """`flags` without `name` and its values; then `name value` appended where a value is given."""
    out, skipping = [], False
    for word in flags:
        if word.startswith("--"):
            skipping = word == name
        if not skipping:
            out.append(word)
    return out + ([name, str(value)] if value is not None else [])


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"saved outputs in cell:\n{cell.source[:200]}"


def test_readme_notebook_recipe_uses_the_quickstart_output():
    recipe, flags = readme_notebook_recipe(), readme_quickstart_flags()
    assert recipe["QS_TRAINED"] == flags[flags.index("--output_dir") + 1]
    assert recipe["QS_BASE"] == flags[flags.index("--pretrained_model_name_or_path") + 1]


@pytest.fixture(scope="module")
def quickstart_lora(tmp_path_factory):
    """The README's quickstart command, shortened to 2 steps without validation grids, into a temporary folder
    (in this process: the notebook is what is tested). Its LoRA has the quickstart's base model and rank."""
    import train_draftp
    from tests.conftest import run_main_in_process

    out = tmp_path_factory.mktemp("nb") / "quickstart"
    flags = replace_flag(readme_quickstart_flags(), "--validation_prompts")
    flags = replace_flag(replace_flag(flags, "--max_train_steps", 2), "--output_dir", out)
    run_main_in_process(train_draftp, flags)
    return out


@pytest.fixture
def kernel_of_this_interpreter(tmp_path, monkeypatch):
    """A kernelspec whose kernel is this very interpreter (the venv's), found first through JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def test_notebook_runs_the_readme_recipe(quickstart_lora, kernel_of_this_interpreter, monkeypatch):
    from nbclient import NotebookClient

    recipe = readme_notebook_recipe()
    assert {"QS_BASE", "QS_TRAINED", "QS_REWARD"} <= recipe.keys()
    for key, value in {**recipe, "QS_TRAINED": str(quickstart_lora)}.items():
        monkeypatch.setenv(key, value)  # the kernel process inherits this environment
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figure as image/png
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel_of_this_interpreter, timeout=300,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    reward = recipe["QS_REWARD"]
    assert f"trained: {quickstart_lora} (lora)" in text
    assert f"base     mean {reward}:" in text and f"trained  mean {reward}:" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was shown"
    # the file on disk is untouched by the run
    test_notebook_is_stored_without_outputs()
