"""evaluate.py on tiny-sd: a LoRA and a full-UNet output of train_draftp.py against the base model."""
import csv
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import evaluate
from utils import UsageError

STEPS, SEEDS = 5, 3
EVAL_PROMPTS = ["a red rabbit", "a red bear"]  # not among the training prompts below
TRAIN_PROMPTS = ["a red cat", "a red dog", "a red horse", "a red fox", "a red owl", "a red duck"]


def train(out, prompts_file, extra):
    """train_draftp.py in this process (conftest.run_main_in_process: what is tested here is evaluate.py, which
    runs as a subprocess; a training subprocess would spend most of its time importing)."""
    import train_draftp
    from tests.conftest import run_main_in_process

    run_main_in_process(train_draftp, [
        "--pretrained_model_name_or_path", "tiny-sd", "--reward_model", "color_match", "--prompts", prompts_file,
        "--num_inference_steps", STEPS, "--truncation_steps", 2, "--train_batch_size", 2,
        "--validation_prompts", "a red cat", "--num_validation_images", 1, "--validation_steps", 1000,
        "--report_to", "none", "--output_dir", out, *extra])
    return out


LORA = "lora.r16"  # a '.' in a model name: peft refuses it in adapter names, evaluate.py must not pass it on


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_sd_path):
    """Two trained outputs (LoRA, full UNet), the prompt files and a small LPIPS trunk file, built once."""
    root = tmp_path_factory.mktemp("evaluate")
    (root / "train.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (root / "eval.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    # LPIPS offline: a random AlexNet trunk passed with --lpips_weights (as tests/test_diversity.py does)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).features.state_dict(prefix="features."), root / "alexnet.pth")
    lora = train(root / "lora", root / "train.txt", ["--learning_rate", 3e-3, "--lora_rank", 16, "--max_train_steps", 3])
    # The full UNet moves the images' colour within a few steps; the tiny UNet's LoRA layers barely do (README).
    full = train(root / "full", root / "train.txt", ["--no-use_lora", "--learning_rate", 1e-3, "--max_train_steps", 8])
    return root, lora, full


def eval_flags(work, out, models=True, extra=()):
    root, lora, full = work
    return ["evaluate.py", "--pretrained_model_name_or_path", "tiny-sd", "--prompts", root / "eval.txt",
            "--num_seeds", SEEDS, "--num_inference_steps", STEPS, "--output_dir", out,
            *(["--models", f"{LORA}={lora}", f"full={full}"] if models else []), *extra]


@pytest.fixture(scope="module")
def evaluation(work):
    """evaluate.py in this process (conftest.run_main_in_process); its command line, accelerate launch and two
    processes are run as subprocesses below (test_same_seed_same_base_image_with_other_batch_size_and_two_processes,
    test_bad_input_is_one_line_on_stderr)."""
    from tests.conftest import run_main_in_process

    root = work[0]
    out = root / "eval"
    flags = eval_flags(work, out, extra=["--reward_models", "color_match", "brightness",
                                         "--lpips_weights", root / "alexnet.pth", "--batch_size", 4])
    run_main_in_process(evaluate, flags[1:])
    return out


def read_rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_every_file_is_written(evaluation):
    for name in ["results.csv", "results.md", "reward_vs_diversity.png", "scores.jsonl", "args.json",
                 "grids/base.png", f"grids/{LORA}.png", "grids/full.png", "comparison.png"]:
        assert (evaluation / name).is_file(), name
    records = [json.loads(line) for line in open(evaluation / "scores.jsonl")]
    assert len(records) == 3 * len(EVAL_PROMPTS) * SEEDS
    assert {(r["model"], r["prompt"], r["seed"]) for r in records} == {
        (m, p, s) for m in ["base", LORA, "full"] for p in EVAL_PROMPTS for s in range(SEEDS)}
    assert all({"color_match", "brightness", "image"} <= set(r) for r in records)
    assert all((evaluation / r["image"]).is_file() for r in records)


@pytest.mark.parametrize("stem, rows, cols", [
    (f"grids/{LORA}", EVAL_PROMPTS, [f"seed {s}" for s in range(SEEDS)]),  # one model: rows = prompts, columns = seeds
    ("comparison", ["base", LORA, "full"], EVAL_PROMPTS),  # rows = models, columns = prompts at seed 0
])
def test_grids_are_labelled_and_hold_the_saved_images(evaluation, stem, rows, cols):
    from tests.test_grids import inked
    from utils.grids import GAP, read_cells

    info = json.loads((evaluation / f"{stem}.json").read_text())
    assert (info["rows"], info["columns"]) == (rows, cols)
    g, grid = info["grid"], Image.open(evaluation / f"{stem}.png")
    # 64 px images scaled by 2; two caption lines (color_match, brightness) under each; plus the label margins
    assert (g["rows"], g["cols"], g["scale"], g["cell_width"]) == (len(rows), len(cols), 2, 128)
    assert grid.size == (g["left"] + len(cols) * (128 + GAP), g["top"] + len(rows) * g["pitch_y"])
    assert inked(grid, (g["left"], 0, g["width"], g["top"] - GAP))  # title and column labels
    assert inked(grid, (0, g["top"], g["left"] - GAP, g["height"]))  # row labels
    x0, y0, x1, y1 = g["left"], g["top"] + 128, g["left"] + 128, g["top"] + g["pitch_y"] - GAP
    assert inked(grid, (x0, y0, x1, y1))  # the scores under the first image
    cells = read_cells(grid, g)
    for k, image in enumerate(info["images"]):
        saved = np.asarray(Image.open(evaluation / image).convert("RGB"))
        np.testing.assert_array_equal(cells[divmod(k, len(cols))], saved)


def test_one_table_row_per_model(evaluation):
    rows = read_rows(evaluation)
    assert [r["model"] for r in rows] == ["base", LORA, "full"]
    for row in rows:
        assert int(row["images"]) == len(EVAL_PROMPTS) * SEEDS
        assert {"color_match_mean", "color_match_std", "brightness_mean", "brightness_std", "diversity_lpips"} <= set(row)
        assert float(row["diversity_lpips"]) > 0
    table = [line for line in (evaluation / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3 and [line.split("|")[1].strip() for line in table[1:]] == ["base", LORA, "full"]


def test_model_trained_toward_a_reward_scores_higher_on_it(evaluation):
    rows = {r["model"]: r for r in read_rows(evaluation)}
    assert float(rows["full"]["color_match_mean"]) > float(rows["base"]["color_match_mean"]) + 0.05, rows
    # ...and (the DRaFT+ trade-off) its images of one prompt are more alike than the base model's
    assert float(rows["full"]["diversity_lpips"]) < float(rows["base"]["diversity_lpips"])


def test_lora_output_was_applied(evaluation):
    base = np.asarray(Image.open(evaluation / "images" / "base" / "p0000_s0.png"), dtype=np.int16)
    lora = np.asarray(Image.open(evaluation / "images" / LORA / "p0000_s0.png"), dtype=np.int16)
    assert np.abs(base - lora).max() > 0


def test_base_images_are_those_of_stock_diffusers_with_the_same_seed(evaluation, tiny_sd_path):
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for seed in [0, 2]:
        expected = pipe(EVAL_PROMPTS[1], num_inference_steps=STEPS, guidance_scale=7.5,
                        generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
        ours = np.asarray(Image.open(evaluation / "images" / "base" / f"p0001_s{seed}.png"), dtype=np.float32) / 255
        assert np.abs(expected - ours).max() <= 1 / 255 + 1e-6  # PNG rounding only


def test_same_seed_same_base_image_with_other_batch_size_and_two_processes(evaluation, work, run_script):
    """A second run, base only, batch size 1, prompts split over 2 processes: the same base images and scores.
    Its output streams: the results table, once, is all of stdout (`evaluate.py ... > results.md`); logs go to stderr."""
    from conftest import free_port

    out = work[0] / "eval2"
    proc = run_script(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", 2, "--num_machines", 1,
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
                *eval_flags(work, out, models=False, extra=["--reward_models", "color_match", "--diversity", "pixel",
                                                            "--batch_size", 1])],
               env={"ACCELERATE_USE_CPU": "true"})
    first = {(r["prompt_index"], r["seed"]): r for r in map(json.loads, open(evaluation / "scores.jsonl")) if r["model"] == "base"}
    second = [json.loads(line) for line in open(out / "scores.jsonl")]
    assert [(r["prompt_index"], r["seed"]) for r in second] == sorted(first)  # gathered from both processes, in order
    for r in second:
        a = np.asarray(Image.open(evaluation / r["image"]), dtype=np.int16)
        b = np.asarray(Image.open(out / r["image"]), dtype=np.int16)
        # Another batch size sums in another order: a pixel may round to the next uint8 level, nothing more.
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01, r["image"]
        assert r["color_match"] == pytest.approx(first[(r["prompt_index"], r["seed"])]["color_match"], abs=1e-3)
    assert [row["model"] for row in read_rows(out)] == ["base"]
    assert proc.stdout == (out / "results.md").read_text()
    assert "| model |" not in proc.stderr and "INFO evaluate:" in proc.stderr


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("flags, message", [
    (["--models", "x=does/not/exist"], "not a folder"),
    (["--models", "x=EMPTY"], "neither pytorch_lora_weights.safetensors"),
    (["--models", "base=EMPTY"], "not 'base'"),
    (["--reward_models", "no_such_reward"], "unknown reward 'no_such_reward'"),
    (["--num_seeds", "1"], "--num_seeds must be >= 2"),
    (["--judges", "no_such_judge"], "unknown judge 'no_such_judge'; registered judges: toyworld_acc, toyvideo_acc"),
    (["--models", "novalue"], "NAME=PATH"),
    (["--toyworld_accuracy", "--prompts", "animals"], "the toyworld_acc judge reads toy-world prompts"),
])
def test_bad_input_is_a_usage_error(flags, message, tmp_path):
    flags = [f.replace("EMPTY", str(tmp_path)) for f in flags]  # an existing folder without weights
    with pytest.raises(UsageError, match=message):
        evaluate.parse_args(["--pretrained_model_name_or_path", "tiny-sd", "--reward_models", "brightness", *flags])


def test_toyworld_accuracy_is_the_judge_of_each_saved_image(tmp_path):
    from tests.conftest import run_main_in_process
    from utils.toy.world import prompt_accuracy

    out, prompts = tmp_path / "eval", tmp_path / "prompts.txt"
    prompts.write_text("two red circles\ntwo blue circles\nthree yellow circles\ntwo orange squares\n"
                       "three purple circles\ntwo green circles\n")
    # in this process, as the `evaluation` fixture: what is tested is what evaluate.py writes
    run_main_in_process(evaluate, ["--pretrained_model_name_or_path", "toy-sd", "--prompts", prompts,
                                   "--num_seeds", 4, "--num_inference_steps", 8, "--reward_models", "toyclip",
                                   "--diversity", "pixel", "--toyworld_accuracy", "--output_dir", out])
    records = [json.loads(line) for line in open(out / "scores.jsonl")]
    # toy-sd gets some right (8 of the 24 at 8 steps, 4 at 20: the judge sees both outcomes either way)
    assert len(records) == 24 and {r["toyworld_acc"] for r in records} == {0.0, 1.0}
    for r in records:
        image = np.asarray(Image.open(out / r["image"]).convert("RGB"))
        assert r["toyworld_acc"] == prompt_accuracy(image, r["prompt"])["all"]
    row = read_rows(out)[0]
    assert float(row["toyworld_acc_mean"]) == pytest.approx(np.mean([r["toyworld_acc"] for r in records]))


def test_one_seed_is_fine_without_diversity():
    args = evaluate.parse_args(["--pretrained_model_name_or_path", "tiny-sd", "--num_seeds", "1", "--diversity", "none",
                                "--reward_models", "brightness"])
    assert args.num_seeds == 1


def test_help_names_every_offline_pipeline_and_family(monkeypatch, capsys):
    from utils.toy import TINY_NAMES, TOY_NAMES

    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal width, also inside 'tiny-sdxl'
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--help"])
    assert exit_info.value.code == 0
    options = capsys.readouterr().out.split("\n  --pretrained_model_name_or_path", 1)[1]
    help_text = " ".join(options.split("\n  --revision", 1)[0].split())
    for name in (*TINY_NAMES, *TOY_NAMES, "SD1.5", "SDXL", "SD3 / SD3.5", "FLUX.1", "model_index.json"):
        assert name in help_text, help_text


@pytest.mark.parametrize("flags, line", [
    (["--num_seed", "2"], "error: unrecognized argument --num_seed; did you mean --num_seeds?"),  # no abbreviations
    (["--reward_model", "brightness"], "error: unrecognized argument --reward_model; did you mean --reward_models?"),
])
def test_misspelled_flag_is_one_line_naming_the_closest_flag(flags, line, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--pretrained_model_name_or_path", "tiny-sd", *flags])
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines() == [line]


def test_bad_input_is_one_line_on_stderr(run_script, tmp_path):
    proc = run_script(["evaluate.py", "--pretrained_model_name_or_path", "tiny-sd", "--models", f"x={tmp_path}"],
                      expect_ok=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --models:")
    assert "Traceback" not in proc.stderr
