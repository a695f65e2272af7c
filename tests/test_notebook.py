"""notebooks/quick_samples.ipynb: stored clean, and runs top to bottom with the README's offline recipe (its QS_*
variables, read from the README's code block) on a short run of the README's quickstart command; and, for a video
model (tiny-wan), on evaluate.py's --num_frames output: animated grids, per-frame rewards, the judge's accuracy."""
import base64
import io
import json
import re
import shlex
import sys

import nbformat
import numpy as np
import pytest

from tests.conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "quick_samples.ipynb"
README = REPO_ROOT / "README.md"
KERNEL = "diffusion-align-test"
VIDEO_PROMPTS, VIDEO_SEEDS, VIDEO_FRAMES, VIDEO_SIZE = 2, 2, 5, 32


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


def execute_notebook(kernel, monkeypatch, env: dict) -> list:
    """The notebook run top to bottom in a kernel of this interpreter with `env` set; its outputs, in order."""
    from nbclient import NotebookClient

    for key, value in env.items():
        monkeypatch.setenv(key, str(value))  # the kernel process inherits this environment
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figure as image/png
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def printed(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def shown(outputs, mime: str) -> list:
    return [o["data"][mime] for o in outputs if mime in o.get("data", {})]


def test_notebook_runs_the_readme_recipe(quickstart_lora, kernel_of_this_interpreter, monkeypatch):
    recipe = readme_notebook_recipe()
    assert {"QS_BASE", "QS_TRAINED", "QS_REWARD"} <= recipe.keys()
    outputs = execute_notebook(kernel_of_this_interpreter, monkeypatch, {**recipe, "QS_TRAINED": quickstart_lora})
    text = printed(outputs)
    reward = recipe["QS_REWARD"]
    assert f"trained: {quickstart_lora} (lora)" in text
    assert f"base     mean {reward}:" in text and f"trained  mean {reward}:" in text
    assert shown(outputs, "image/png"), "no figure was shown"
    assert not shown(outputs, "image/gif")  # the video cells draw nothing for an image model
    # the file on disk is untouched by the run
    test_notebook_is_stored_without_outputs()


@pytest.fixture(scope="module")
def video_evaluation(tmp_path_factory):
    """A one-step tiny-wan LoRA of train_draftp.py, then evaluate.py --num_frames on it and the base (a per-frame
    reward and a whole-video judge), both in this process, as tests/test_evaluate_video.py runs them."""
    import evaluate
    import train_draftp
    from tests.conftest import run_main_in_process

    root = tmp_path_factory.mktemp("nb_video")
    size = ["--num_frames", VIDEO_FRAMES, "--resolution", VIDEO_SIZE, "--num_inference_steps", 2]
    run_main_in_process(train_draftp, [
        "--pretrained_model_name_or_path", "tiny-wan", "--reward_model", "brightness", "--prompts", "toyvideo", *size,
        "--reward_frames", 2, "--truncation_steps", 1, "--train_batch_size", 2, "--learning_rate", 1e-2,
        "--lora_rank", 4, "--max_train_steps", 1, "--validation_steps", 1000, "--report_to", "none",
        "--output_dir", root / "lora"])
    run_main_in_process(evaluate, [
        "--pretrained_model_name_or_path", "tiny-wan", "--models", f"lora={root / 'lora'}", "--prompts", "toyvideo",
        "--max_prompts", VIDEO_PROMPTS, "--num_seeds", VIDEO_SEEDS, *size, "--reward_models", "brightness",
        "--reward_frames", 3, "--judges", "toyvideo_acc", "--diversity", "pixel", "--output_dir", root / "eval"])
    return root


def test_notebook_shows_a_video_models_evaluation(video_evaluation, kernel_of_this_interpreter, monkeypatch):
    """tiny-wan: the image cells draw nothing; printed: each model's mean reward and its mean at each scored frame,
    and the judge's accuracy, all equal to scores.jsonl's; shown per prompt: an animated grid whose frame k holds frame
    k of each of evaluate.py's videos (rows = seeds, base then the LoRA) and a per-frame reward plot."""
    from PIL import Image

    from utils.grids import format_score, grid_geometry, read_cells, read_gif

    lora, out = video_evaluation / "lora", video_evaluation / "eval"
    outputs = execute_notebook(kernel_of_this_interpreter, monkeypatch,
                               {"QS_BASE": "tiny-wan", "QS_TRAINED": lora, "QS_EVAL": out})
    text = printed(outputs)
    assert f"trained: {lora} (lora in {out}); {VIDEO_FRAMES} frames, {VIDEO_SEEDS} seeds" in text
    assert f"trained: {lora} (lora)" not in text  # the image path did not run
    records = [json.loads(line) for line in open(out / "scores.jsonl")]
    for role, name in (("base", "base"), ("trained", "lora")):
        mine = [r for r in records if r["model"] == name]
        per_frame = [sum(r["brightness_frames"][k] for r in mine) / len(mine) for k in range(3)]
        assert (f"{role:8s} mean brightness: {sum(per_frame) / 3:.4f}; at frames [0, 2, 4]: "
                + " ".join(f"{v:.4f}" for v in per_frame)) in text
        accuracy = sum(r["toyvideo_acc"] for r in mine) / len(mine)
        assert f"{role:8s} toyvideo_acc: {accuracy:.3f} over {VIDEO_PROMPTS * VIDEO_SEEDS} videos" in text

    gifs = shown(outputs, "image/gif")
    assert len(gifs) == VIDEO_PROMPTS and len(shown(outputs, "image/png")) == VIDEO_PROMPTS
    by_key = {(r["model"], r["prompt_index"], r["seed"]): r for r in records}
    for p, data in enumerate(gifs):
        keys = [(name, p, seed) for seed in range(VIDEO_SEEDS) for name in ("base", "lora")]
        captions = ["\n".join(f"{c} {format_score(by_key[k][c])}" for c in ("brightness", "toyvideo_acc"))
                    for k in keys]
        geometry = grid_geometry(VIDEO_SIZE, VIDEO_SIZE, [f"seed {s}" for s in range(VIDEO_SEEDS)], ["base", "lora"],
                                 captions, by_key[keys[0]]["prompt"]).to_dict()
        grid = read_gif(io.BytesIO(base64.b64decode(data)))  # (F, H, W, 3)
        frames = [read_cells(Image.fromarray(frame), geometry) for frame in grid]
        assert len(frames) == VIDEO_FRAMES
        cells = np.stack(frames, axis=2).reshape(len(keys), VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3).astype(int)
        videos = np.stack([read_gif(out / by_key[key]["video"]) for key in keys]).astype(int)
        # each cell (all its frames) nearest to its own video: two GIF palettes in between, and a one-step LoRA's
        # videos differ from the base's by about 0.5 of 255 on average, so nearest rather than equal
        distance = np.abs(cells[:, None] - videos[None]).mean(axis=(2, 3, 4, 5))  # (cell, video)
        assert distance.argmin(axis=1).tolist() == list(range(len(keys))), distance
    test_notebook_is_stored_without_outputs()
