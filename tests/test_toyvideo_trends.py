"""experiments/toyvideo_trends.py end to end on tiny-wan at a smoke size (5 frames at 32 px, two training prompts and
one held-out, 2 steps per method, --jobs 2): the judge's pairs, each run through its own script with the video flags,
the evaluation on the held-out prompt, the summary's tables and trend lines, and a re-run that keeps everything."""
import csv
import json
import re

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.test_toyworld_trends import assert_a_rerun_keeps, load_script, run_in_process
from utils import UsageError

SCRIPT = "experiments/toyvideo_trends.py"
RUNS = {"draftp-0.1": "train_draftp.py", "dpo": "train_dpo.py", "flow_grpo": "train_online.py"}
FRAMES, SIZE, REWARD_FRAMES = 5, 32, 3
# tiny-wan gets no video right, so its pairs are ranked by the attributes judged right (--pair_verdict attributes)
FLAGS = ["--pretrained_model_name_or_path", "tiny-wan", "--max_prompts", 3, "--heldout_prompts",
         "--methods", "draftp", "dpo", "flow_grpo", "--seeds", 0, "--max_train_steps", 2, "--num_frames", FRAMES,
         "--reward_frames", REWARD_FRAMES, "--resolution", SIZE, "--num_inference_steps", 2, "--train_batch_size", 2,
         "--online_prompts", 1, "--group_size", 2, "--num_pairs", 3, "--pair_candidates", 2,
         "--pair_verdict", "attributes", "--eval_seeds", 2, "--batch_size", 4, "--jobs", 2]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """The experiment's main in this process; its pre-encoding, training runs and evaluation are its subprocesses."""
    out = tmp_path_factory.mktemp("video_trends") / "out"
    run_in_process(SCRIPT, [*FLAGS, "--output_dir", out])
    return out


def run_args(experiment, name):
    return json.loads((experiment / "seed0" / name / "args.json").read_text())


def test_every_file_is_written(experiment):
    for name in ["trends.md", "trends.csv", "trends.json", "prompts.txt", "eval_prompts.txt", "args.json",
                 "seed0/pairs/pairs.jsonl", "seed0/pairs_encoded/manifest.json", "seed0/eval/results.csv",
                 "seed0/eval/scores.jsonl"]:
        assert (experiment / name).is_file(), name
    for name in RUNS:  # each run in its own folder: 2 steps, its LoRA, its log and wall time
        run = experiment / "seed0" / name
        assert (run / "metrics.jsonl").read_text().count("\n") == 2, name
        assert (run / "pytorch_lora_weights.safetensors").is_file() and (run / "train.log").is_file(), name
        assert json.loads((run / "wall_time.json").read_text())["wall_seconds"] > 0, name


def test_each_run_is_its_scripts_with_the_reward_and_the_video_flags(experiment):
    methods = json.loads((experiment / "trends.json").read_text())["methods"]
    assert {name: methods[name.split("-")[0]][0] for name in RUNS} == RUNS
    for name in RUNS:
        args = run_args(experiment, name)
        assert (args["seed"], args["max_train_steps"], args["use_lora"], args["lora_rank"]) == (0, 2, True, 8), name
    draftp, dpo, online = (run_args(experiment, name) for name in RUNS)
    assert "kl_coeff" in draftp and "beta_dpo" in dpo and "group_size" in online  # each script's own arguments
    assert (draftp["reward_model"], draftp["kl_coeff"]) == ("toyclip", 0.1)
    assert (online["method"], online["reward_model"]) == ("flow_grpo", "toyvideo_judge")
    for args in (draftp, online):
        assert (args["num_frames"], args["reward_frames"], args["resolution"]) == (FRAMES, REWARD_FRAMES, SIZE)
        assert args["prompts"] == str(experiment / "prompts.txt")
    # DPO, not SFT, on the pre-encoded pairs, labelled by the judge (no choice model)
    assert dpo["dataset_name"] == str(experiment / "seed0" / "pairs_encoded") and not dpo["sft"]
    assert not dpo.get("choice_model")
    assert re.search(r"training on \d+ pairs .* \(pre-encoded\)", (experiment / "seed0" / "dpo" / "train.log").read_text())


def test_the_pairs_labels_are_the_judges_verdicts_on_training_prompts(experiment):
    """Each pair's preferred video has more of its prompt's attributes judged right than the other, read back from
    the mp4 files that the pre-encoder read; no pair is a tie; captions are training prompts only."""
    from utils.toy.video_world import clip_accuracy, read_mp4

    folder = experiment / "seed0" / "pairs"
    rows = [json.loads(line) for line in open(folder / "pairs.jsonl")]
    trained_on = (experiment / "prompts.txt").read_text().splitlines()
    assert 2 <= len(rows) <= 3
    for r in rows:
        assert r["caption"] in trained_on
        frames = [read_mp4(folder / r[f"video_{k}"]) for k in (0, 1)]
        assert all(f.shape == (FRAMES, SIZE, SIZE, 3) for f in frames)
        scores = [np.mean([v for key, v in clip_accuracy(f, r["caption"]).items() if key != "all"]) for f in frames]
        assert scores[0] != scores[1] and r["label_0"] == float(scores[0] > scores[1]), r
        assert [r["verdict_0"], r["verdict_1"]] == scores
    manifest = json.loads((experiment / "seed0" / "pairs_encoded" / "manifest.json").read_text())
    assert manifest["pairs"] is True


def test_evaluation_is_on_the_heldout_prompt_with_judge_and_per_frame_reward(experiment):
    trained_on = (experiment / "prompts.txt").read_text().splitlines()
    evaluated_on = (experiment / "eval_prompts.txt").read_text().splitlines()
    assert len(trained_on) == 2 and len(evaluated_on) == 1 and not set(trained_on) & set(evaluated_on)
    records = [json.loads(line) for line in open(experiment / "seed0" / "eval" / "scores.jsonl")]
    assert {r["prompt"] for r in records} == set(evaluated_on)
    assert sorted({r["model"] for r in records}) == sorted(["base", *RUNS])
    for r in records:
        assert r["toyvideo_acc"] in (0.0, 1.0) and len(r["toyclip_frames"]) == REWARD_FRAMES, r


def test_tables_and_trend_lines_follow_the_numbers(experiment):
    with open(experiment / "trends.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["base", *RUNS]
    for r in rows.values():
        for key in ("all", "count", "color", "shape", "direction"):
            assert 0 <= float(r[f"prompt_acc_{key}_mean"]) <= 1, (r["method"], key)
    markdown = (experiment / "trends.md").read_text()
    assert [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| ")][1:] == ["base", *RUNS]
    checks = json.loads((experiment / "trends.json").read_text())["trend_check"]
    expected = {"draftp-0.1": ("raises toyclip over base", "reward"),
                "dpo": ("raises the judge's accuracy", "prompt_acc_all"),
                "flow_grpo": ("raises the judge's accuracy", "prompt_acc_all")}
    assert len(checks) == len(expected)
    for line, (name, (claim, key)) in zip(checks, expected.items()):
        holds = float(rows[name][f"{key}_mean"]) > float(rows["base"][f"{key}_mean"])
        assert line.startswith(f"- {name} {claim}: {str(holds).lower()} ("), line
        assert "direction of motion" in line and line in markdown


def test_a_rerun_keeps_pairs_runs_and_evaluation(experiment):
    kept = [experiment / "seed0" / name / "pytorch_lora_weights.safetensors" for name in RUNS]
    kept += [experiment / "seed0" / "eval" / "results.csv", experiment / "seed0" / "pairs" / "pairs.jsonl",
             experiment / "seed0" / "pairs_encoded" / "manifest.json"]
    assert_a_rerun_keeps(SCRIPT, FLAGS, experiment, kept)


@pytest.mark.parametrize("flags, message", [
    (["--num_frames", "6"], "--num_frames must be 1 \\+ 4k"),
    (["--reward_frames", "1"], "--reward_frames must be in"),
    (["--pair_candidates", "1"], "--pair_candidates must be >= 2"),
    (["--kl_coeffs", "0"], "--kl_coeffs must be distinct and > 0"),
    (["--group_size", "1"], "--group_size must be >= 2"),
    (["--reward_model_paths", "toyclip"], "--reward_model_paths expects NAME=PATH"),
])
def test_bad_flags_are_usage_errors(flags, message):
    with pytest.raises(UsageError, match=message):
        load_script(SCRIPT).parse_args(flags)


@pytest.mark.skipif((REPO_ROOT / "utils/toy/assets/toy-wan").is_dir(), reason="toy-wan is built")
def test_the_default_base_names_the_script_that_builds_it():
    with pytest.raises(UsageError, match="toy-wan is not built yet: experiments/toyworld_pretrain_wan.sh"):
        load_script(SCRIPT).parse_args([])
