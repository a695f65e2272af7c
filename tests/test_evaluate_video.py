"""evaluate.py on tiny-wan (5 frames at 32 px): a LoRA of train_draftp.py against the base model on toy-video prompts,
videos scored frame by frame and judged whole, animated grids."""
import csv
import json

import numpy as np
import pytest

import evaluate
from tests.conftest import run_main_in_process
from utils import UsageError
from utils.grids import read_gif

PROMPTS, SEEDS, FRAMES = 2, 2, 5


def eval_flags(out, models=(), batch_size=2, extra=()):
    return ["--pretrained_model_name_or_path", "tiny-wan", "--prompts", "toyvideo", "--max_prompts", PROMPTS,
            "--num_seeds", SEEDS, "--num_frames", FRAMES, "--resolution", 32, "--num_inference_steps", 2,
            "--reward_models", "brightness", "--reward_frames", 3, "--judges", "toyvideo_acc", "--diversity", "pixel",
            "--batch_size", batch_size, "--output_dir", out, *(["--models", *models] if models else []), *extra]


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """A one-step LoRA of train_draftp.py, then evaluate.py on it and the base, both in this process."""
    import train_draftp

    root = tmp_path_factory.mktemp("evaluate_video")
    run_main_in_process(train_draftp, [
        "--pretrained_model_name_or_path", "tiny-wan", "--reward_model", "brightness", "--prompts", "toyvideo",
        "--num_frames", FRAMES, "--resolution", 32, "--reward_frames", 2, "--num_inference_steps", 2,
        "--truncation_steps", 1, "--train_batch_size", 2, "--learning_rate", 1e-2, "--lora_rank", 4,
        "--max_train_steps", 1, "--validation_steps", 1000, "--report_to", "none", "--output_dir", root / "lora"])
    run_main_in_process(evaluate, eval_flags(root / "eval", models=[f"lora={root / 'lora'}"]))
    return root


def records_of(out):
    return [json.loads(line) for line in open(out / "scores.jsonl")]


def test_every_file_is_written(evaluation):
    out = evaluation / "eval"
    for name in ["results.csv", "results.md", "reward_vs_diversity.png", "args.json", "comparison.gif",
                 "grids/p0000.gif", "grids/p0001.gif"]:
        assert (out / name).is_file(), name
    records = records_of(out)
    assert len(records) == 2 * PROMPTS * SEEDS
    for r in records:
        assert r["frames"] == [0, 2, 4] and len(r["brightness_frames"]) == 3 and r["toyvideo_acc"] in (0.0, 1.0)
        assert read_gif(out / r["video"]).shape == (FRAMES, 32, 32, 3)
    base, lora = (read_gif(out / "videos" / name / "p0000_s0.gif").astype(int) for name in ("base", "lora"))
    assert np.abs(base - lora).max() > 0  # the LoRA was applied


def test_frame_averaged_reward_is_the_mean_of_the_per_frame_rewards(evaluation):
    out = evaluation / "eval"
    records = records_of(out)
    with open(out / "results.csv") as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    for name in ("base", "lora"):
        per_frame = [v for r in records if r["model"] == name for v in r["brightness_frames"]]
        assert float(rows[name]["brightness_mean"]) == pytest.approx(np.mean(per_frame))
        judged = [r["toyvideo_acc"] for r in records if r["model"] == name]
        assert float(rows[name]["toyvideo_acc_mean"]) == pytest.approx(np.mean(judged))
        assert float(rows[name]["diversity_pixel"]) > 0


def test_prompt_grid_shows_base_and_trained_side_by_side_in_step(evaluation):
    out = evaluation / "eval"
    info = json.loads((out / "grids" / "p0000.json").read_text())
    assert info["columns"] == ["base", "lora"] and info["rows"] == [f"seed {s}" for s in range(SEEDS)]
    assert info["videos"] == [f"videos/{m}/p0000_s{s}.gif" for s in range(SEEDS) for m in ("base", "lora")]
    grid = read_gif(out / "grids" / "p0000.gif")
    g = info["grid"]
    assert grid.shape == (FRAMES, g["height"], g["width"], 3)
    x0, y0 = g["left"], g["top"]
    cells = grid[:, y0 : y0 + g["cell_height"] : g["scale"], x0 : x0 + g["cell_width"] : g["scale"]].astype(int)
    video = read_gif(out / info["videos"][0]).astype(int)
    assert np.abs(cells - video).mean() < 8  # frame k of the grid holds frame k of each video (GIF palettes aside)


def test_same_seed_same_base_video_at_another_batch_size(evaluation):
    out = evaluation / "eval1"
    run_main_in_process(evaluate, eval_flags(out, batch_size=1))
    first = {(r["prompt_index"], r["seed"]): r for r in records_of(evaluation / "eval") if r["model"] == "base"}
    second = records_of(out)
    assert sorted(first) == [(r["prompt_index"], r["seed"]) for r in second]
    for r in second:
        assert r["brightness_frames"] == pytest.approx(first[(r["prompt_index"], r["seed"])]["brightness_frames"],
                                                       abs=1e-3)
        a, b = read_gif(out / r["video"]).astype(int), read_gif(evaluation / "eval" / r["video"]).astype(int)
        assert np.abs(a - b).mean() < 1


@pytest.mark.parametrize("model, flags, message", [
    ("tiny-sd", ["--num_frames", 5], "--num_frames is for video models"),
    ("tiny-sd", ["--reward_frames", 2], "--reward_frames is for video models"),
    ("tiny-wan", ["--num_frames", 6], "--num_frames: 6 frames: .* takes 1 \\+ 4 k frames"),
])
def test_bad_video_flags_are_usage_errors_naming_the_flag(tmp_path, model, flags, message):
    with pytest.raises(UsageError, match=message):
        run_main_in_process(evaluate, ["--pretrained_model_name_or_path", model, "--reward_models", "brightness",
                                       "--diversity", "none", "--output_dir", tmp_path, *flags])
