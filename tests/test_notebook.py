"""notebooks/quick_samples.ipynb: runs top to bottom on tiny-sd against a tiny trained LoRA, and is stored clean."""
import json
import sys

import nbformat
import pytest

from tests.conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "quick_samples.ipynb"
KERNEL = "diffusion-align-test"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"saved outputs in cell:\n{cell.source[:200]}"


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory, tiny_sd_path):
    """A LoRA output of a 2-step train_draftp.py run on tiny-sd (in this process: the notebook is what is tested)."""
    import train_draftp
    from tests.conftest import run_main_in_process

    out = tmp_path_factory.mktemp("nb") / "lora"
    run_main_in_process(train_draftp, [
        "--pretrained_model_name_or_path", "tiny-sd", "--reward_model", "color_match", "--prompts", "colored_animals",
        "--num_inference_steps", 3, "--truncation_steps", 1, "--train_batch_size", 1, "--learning_rate", 1e-2,
        "--lora_rank", 4, "--max_train_steps", 2, "--validation_prompts", "a red cat", "--num_validation_images", 1,
        "--report_to", "none", "--output_dir", out])
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


def test_notebook_runs_top_to_bottom_on_tiny_sd(tiny_lora, kernel_of_this_interpreter, monkeypatch):
    from nbclient import NotebookClient

    for key, value in {"QS_BASE": "tiny-sd", "QS_TRAINED": str(tiny_lora), "QS_PROMPTS": "a red cat;a blue dog",
                       "QS_SEEDS": "0,1", "QS_STEPS": "3", "QS_REWARD": "color_match"}.items():
        monkeypatch.setenv(key, value)  # the kernel process inherits this environment
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figure as image/png
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel_of_this_interpreter, timeout=300,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"trained: {tiny_lora} (lora)" in text
    assert "base     mean color_match:" in text and "trained  mean color_match:" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was shown"
    # the file on disk is untouched by the run
    test_notebook_is_stored_without_outputs()
