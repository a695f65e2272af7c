"""experiments/toyworld_trends.py end to end on tiny-sd with a weight-free reward (the toy-world prompts, so the
prompt-accuracy judge runs too): every file of the summary, each run's own output, and a re-run that keeps them."""
import csv
import importlib.util
import json
import math
import os

import pytest

from tests.conftest import REPO_ROOT, run_main_in_process

SCRIPT = "experiments/toyworld_trends.py"
METHODS = ["draft", "dpo"]  # SFT runs the same script as DPO; two runs keep the test near a minute
FLAGS = ["--pretrained_model_name_or_path", "tiny-sd", "--reward_model", "color_match", "--prompts", "toyworld",
         "--max_prompts", 3, "--methods", *METHODS, "--seeds", 0, "--max_train_steps", 2, "--train_batch_size", 1,
         "--num_inference_steps", 3, "--num_pairs", 3, "--pair_candidates", 3, "--num_heldout_pairs", 4, "--implicit_acc_draws", 2,
         "--eval_seeds", 2, "--batch_size", 8, "--jobs", 2]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_sd_path):
    """The experiment, its main in this process (run_in_process below): its training runs and evaluations are the
    subprocesses that it starts, as for users; what is tested is the files they and the summary write."""
    out = tmp_path_factory.mktemp("trends") / "out"
    run_in_process(SCRIPT, [*FLAGS, "--output_dir", out])
    return out


def load_script(script=SCRIPT):
    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], REPO_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(script, flags):
    """The script's main in this process (conftest.run_main_in_process), without a subprocess's ~15 s of imports.
    The experiment's training runs and evaluations are subprocesses either way (the script starts them); its command
    line's usage errors are parse_args' (test_bad_flags_are_usage_errors)."""
    run_main_in_process(load_script(script), flags)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_file_is_written(experiment):
    for name in ["trends.md", "trends.csv", "trends.json", "reward_vs_diversity.png", "prompts.txt", "args.json",
                 "seed0/eval/results.csv", "seed0/eval/scores.jsonl", "seed0/pairs/state.json", "seed0/heldout/state.json"]:
        assert (experiment / name).is_file(), name
    for method in METHODS:  # each run through its own script, into its own folder, with its wall time
        run = experiment / "seed0" / method
        assert (run / "metrics.jsonl").read_text().count("\n") == 2, method
        assert (run / "pytorch_lora_weights.safetensors").is_file() and (run / "train.log").is_file(), method
        assert json.loads((run / "wall_time.json").read_text())["wall_seconds"] > 0, method
    dpo_args = json.loads((experiment / "seed0" / "dpo" / "args.json").read_text())
    assert dpo_args["choice_model"] == "color_match" and dpo_args["use_lora"] and not dpo_args["sft"]  # AI feedback


def test_one_row_per_method_in_every_table(experiment):
    rows = read_csv(experiment / "trends.csv")
    assert [r["method"] for r in rows] == ["base", *METHODS]
    for r in rows:
        assert 0 <= float(r["reward_mean"]) <= 1 and float(r["diversity_mean"]) > 0, r
        assert 0 <= float(r["prompt_acc_all_mean"]) <= 1 and "prompt_acc_color_mean" in r, r  # toy-world prompts
    markdown = (experiment / "trends.md").read_text()
    table = [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| ")]
    assert table[1:] == ["base", *METHODS]
    summary = json.loads((experiment / "trends.json").read_text())
    assert [r["method"] for r in summary["summary"]] == ["base", *METHODS]
    assert set(summary["per_seed"]["0"]) == {"base", *METHODS}
    assert len(summary["trend_check"]) == 4 and "## Trend check" in markdown


def test_implicit_accuracy_is_measured_for_dpo(experiment):
    rows = {r["method"]: r for r in read_csv(experiment / "trends.csv")}
    assert float(rows["base"]["implicit_acc_mean"]) == 0.5
    assert rows["draft"]["implicit_acc_mean"] == ""
    per_seed = json.loads((experiment / "trends.json").read_text())["per_seed"]["0"]
    assert_implicit_accuracy_of_a_trained_model(float(rows["dpo"]["implicit_acc_mean"]), per_seed["dpo"])


def assert_implicit_accuracy_of_a_trained_model(accuracy, seed_results):
    """The held-out implicit accuracy of a DPO output against its reference: a fraction of the 4 held-out pairs
    (--num_heldout_pairs) ranked as their labels, k / 4 with no half-counted tie (a tie needs bit-equal errors of
    model and reference), and the held-out DPO loss off log 2, the value of a model that is its reference. Mutation
    this fails under: in experiments/toyworld_trends.py implicit_accuracy, the trained model's errors replaced by the
    reference's (`model = reference`: accuracy 0.5 of ties, loss log 2)."""
    assert seed_results["heldout_pairs"] == 4
    assert accuracy * 4 == round(accuracy * 4)
    assert abs(seed_results["heldout_dpo_loss"] - math.log(2)) > 1e-6


def assert_a_rerun_keeps(script, flags, experiment, kept):
    """The same command again on a finished experiment: none of the `kept` files is written again, and the summary
    (trends.csv) is the same."""
    before = [os.path.getmtime(p) for p in kept]
    old_csv = (experiment / "trends.csv").read_text()
    run_in_process(script, [*flags, "--output_dir", experiment])
    assert [os.path.getmtime(p) for p in kept] == before
    assert (experiment / "trends.csv").read_text() == old_csv


def test_a_rerun_keeps_finished_runs_and_evaluations(experiment):
    kept = [experiment / "seed0" / m / "pytorch_lora_weights.safetensors" for m in METHODS]
    kept += [experiment / "seed0" / "eval" / "results.csv", experiment / "seed0" / "pairs" / "state.json"]
    assert_a_rerun_keeps(SCRIPT, FLAGS, experiment, kept)


@pytest.mark.parametrize("flags, message", [
    (["--kl_coeffs", "0"], "--kl_coeffs must be distinct and > 0"),
    (["--eval_seeds", "1"], "--eval_seeds must be >= 2"),
    (["--seeds", "1", "1"], "--seeds must be distinct"),
    (["--methods", "dpo", "--num_pairs", "2", "--train_batch_size", "4"], "--num_pairs"),
    (["--reward_model", "no_such_reward"], "unknown reward"),
    (["--pair_candidates", "1"], "--pair_candidates must be >= 2"),
    (["--num_pairs", "100000", "--pair_candidates", "8"], "would overlap"),
])
def test_bad_flags_are_usage_errors(flags, message):
    from utils import UsageError

    with pytest.raises(UsageError, match=message):
        load_script().parse_args(flags)


def test_extreme_pairs_take_the_best_and_worst_candidate_in_seed_order():
    trends = load_script()
    # groups of 3: worst first then best; best first; all equal (a tie); 2 candidates = the pair as sampled
    assert trends.extreme_pairs([1, 3, 2, 9, 0, 4, 5, 5, 5], 3) == [(0, 1, 0.0), (3, 4, 1.0), (6, 7, 0.5)]
    assert trends.extreme_pairs([2, 1, 0, 3], 2) == [(0, 1, 1.0), (2, 3, 0.0)]


def test_toyworld_pairs_writes_the_experiments_training_pairs(experiment, tmp_path, run_script):
    """experiments/toyworld_pairs.py (the DPO quickstart's pairs) with the experiment's sampling flags writes exactly
    the pairs of its seed0/pairs: the same seeds, sampler, scorer and choice of best and worst."""
    import datasets

    flags = ["--pretrained_model_name_or_path", "tiny-sd", "--reward_model", "color_match", "--max_prompts", 3,
             "--num_pairs", 3, "--pair_candidates", 3, "--num_inference_steps", 3, "--batch_size", 8, "--seed", 0]
    run_in_process("experiments/toyworld_pairs.py", [*flags, "--output_dir", tmp_path / "pairs"])
    ours, theirs = datasets.load_from_disk(str(tmp_path / "pairs")), datasets.load_from_disk(str(experiment / "seed0" / "pairs"))
    assert ours.column_names == theirs.column_names and len(ours) == 3
    assert ours.to_list() == theirs.to_list()
    assert json.loads((tmp_path / "pairs" / "args.json").read_text())["pair_candidates"] == 3
    proc = run_script(["experiments/toyworld_pairs.py", "--pair_candidates", "1", "--output_dir", tmp_path / "x"],
                      expect_ok=False)
    assert proc.returncode == 2 and "error: --pair_candidates must be >= 2" in proc.stderr


def test_a_flow_model_runs_through_the_experiment_with_its_own_noising(tmp_path):
    """tiny-sd3: pairs, DPO and the held-out implicit accuracy use train_dpo.py's flow-matching timesteps and velocity
    target (a DDPM add_noise on SD3's scheduler would fail)."""
    flags = [str(f) for f in FLAGS]
    flags[flags.index("tiny-sd")] = "tiny-sd3"
    flags[flags.index("--methods") + 1: flags.index("--methods") + 1 + len(METHODS)] = ["dpo"]
    run_in_process(SCRIPT, [*flags, "--output_dir", tmp_path / "out"])
    rows = {r["method"]: r for r in read_csv(tmp_path / "out" / "trends.csv")}
    assert set(rows) == {"base", "dpo"} and float(rows["base"]["implicit_acc_mean"]) == 0.5
    per_seed = json.loads((tmp_path / "out" / "trends.json").read_text())["per_seed"]["0"]
    assert_implicit_accuracy_of_a_trained_model(float(rows["dpo"]["implicit_acc_mean"]), per_seed["dpo"])
    assert json.loads((tmp_path / "out" / "seed0" / "dpo" / "args.json").read_text())["weighting_scheme"] == "logit_normal"


def test_online_methods_train_on_the_judge_and_are_evaluated_on_held_out_prompts_with_a_curve(tmp_path):
    """flow_grpo and nft through train_online.py on the pixel judge (a reward without gradient), trained on two of
    three prompts and evaluated on the third, with checkpoint-1 evaluated beside the final weights (curve.md). Mutation
    this fails under: in experiments/toyworld_trends.py main, the evaluation list set to the training list (the
    held-out prompt would then be trained on)."""
    flags = [str(f) for f in FLAGS]
    flags[flags.index("tiny-sd")] = "tiny-sd3"
    flags[flags.index("--methods") + 1: flags.index("--methods") + 1 + len(METHODS)] = ["flow_grpo", "nft"]
    out = tmp_path / "out"
    run_in_process(SCRIPT, [*flags, "--heldout_prompts", "--curve_every", "1", "--online_prompts", "1",
                            "--group_size", "2", "--output_dir", out])
    trained_on = (out / "prompts.txt").read_text().splitlines()
    evaluated_on = (out / "eval_prompts.txt").read_text().splitlines()
    assert len(trained_on) == 2 and len(evaluated_on) == 1 and not set(trained_on) & set(evaluated_on)
    scored = {json.loads(line)["prompt"] for line in open(out / "seed0" / "eval" / "scores.jsonl")}
    assert scored == set(evaluated_on)
    for method in ("flow_grpo", "nft"):
        run_args = json.loads((out / "seed0" / method / "args.json").read_text())
        assert (run_args["method"], run_args["reward_model"]) == (method, "toyworld_judge")
        assert run_args["lora_alpha"] == run_args["lora_rank"]  # the same LoRA scale as the other methods
    curve = json.loads((out / "curve.json").read_text())
    assert [(r["method"], r["step"]) for r in curve] == [("base", 0), ("flow_grpo", 1), ("flow_grpo", 2), ("nft", 1),
                                                         ("nft", 2)]
    assert all(0 <= r["accuracy"][0] <= 1 for r in curve)
    assert curve[1]["minutes"] < curve[2]["minutes"]  # the time up to each checkpoint
    assert (out / "accuracy_vs_minutes.png").is_file()
    rows = {r["method"]: r for r in read_csv(out / "trends.csv")}
    assert set(rows) == {"base", "flow_grpo", "nft"}


def test_a_stop_signal_checkpoints_every_run_in_flight_and_a_rerun_resumes_them(tmp_path):
    """SIGTERM to the experiment (a scheduler's, or a GPU call's time limit) while its online run trains: the run
    gets it too, checkpoints its last completed step and exits 3, and the experiment exits 3 with one line saying how
    to resume, leaving no process behind; the same command's training task then resumes from that checkpoint.
    Mutation this fails under: InFlight.stop not signalling the groups (the run trains its 500 steps, the test's
    time limit kills it, and no checkpoint exists)."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import kill_process_group

    flags = [str(f) for f in FLAGS]
    flags[flags.index("tiny-sd")] = "tiny-sd3"
    flags[flags.index("--methods") + 1: flags.index("--methods") + 1 + len(METHODS)] = ["flow_grpo"]
    flags[flags.index("--max_train_steps") + 1] = "500"
    flags += ["--online_prompts", "1", "--group_size", "2", "--output_dir", str(tmp_path / "out")]
    run = tmp_path / "out" / "seed0" / "flow_grpo"
    proc = subprocess.Popen([sys.executable, SCRIPT, *flags], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 1):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no step"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # the experiment only, as a scheduler signals the job's main process
        _, stderr = proc.communicate(timeout=120)
    finally:
        kill_process_group(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, stderr[-3000:]
    assert "stopped: the experiment was told to stop" in stderr and "run the same command again" in stderr
    status = json.loads((run / "run_status.json").read_text())
    assert status["status"] == "stopped" and status["exit_code"] == 3
    checkpoints = sorted(p.name for p in run.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{status['step']}"], checkpoints

    module = load_script()
    args = module.parse_args(flags)
    args.prompts_file = args.eval_prompts_file = str(tmp_path / "out" / "prompts.txt")  # what main sets
    label, cmd, _ = module.training_task(args, "flow_grpo", 0)
    assert label.endswith("(resumed)") and cmd[-2:] == ["--resume_from_checkpoint", "latest"]
