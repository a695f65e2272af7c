"""bench/bench.py --smoke: the sections run the project's code paths on tiny models on the CPU, and in float32 the
plain loop, the project's path and each speed variant give the same images and losses (on the GPU they differ only
by bf16 rounding: BENCHMARKS.md). Three sections (about a minute) cover every step function and comparison the
others use; the rest only re-combine them. bench/e2e.py --smoke: the end-to-end harness runs the real scripts (and
diffusers' DPO example where its copy exists) as subprocesses and reads their results (about a minute)."""
import json
import math
import shutil

import pytest

from tests.conftest import REPO_ROOT, run_script


def test_bench_sections_run_and_the_compared_paths_agree(tmp_path):
    run_script(["bench/bench.py", "--smoke", "--out", tmp_path, "--sections", "sd15_kernels", "sdxl", "dpo", "dpo_kernels",
                "dpo_lora_casts", "vae_layout", "dpo_reference_graphs"], timeout=900)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert not [k for k in data["checks"] if "failed" in k], data["checks"]
    rows = data["rows"]
    for prefix in ("sd15 draftp", "sd15 sampling", "sdxl draftp", "sd15 dpo", "sdxl sft", "sd15 vae encode", "sd15 vae decode",
                   "sd15 dpo b2 project, input casts off"):
        assert any(k.startswith(prefix) for k in rows), prefix
    assert all(r["rate"] > 0 and r["seconds"] > 0 for r in rows.values())
    graphed = {k: c for k, c in data["checks"].items() if "vs reference" in k}
    assert len(graphed) == 2 and all(eager == graphed_loss for eager, graphed_loss in graphed.values()), graphed
    layouts = {k: c for k, c in data["checks"].items() if k.startswith("vae ")}
    assert len(layouts) == 4 and all(c < 1e-4 for c in layouts.values()), layouts  # float32 on the CPU: the same maths
    images_compared = {k: c for k, c in data["checks"].items() if isinstance(c, dict) and "image_max_abs_diff" in c}
    assert any("plain" in k and "project" in k for k in images_compared) and any("cuDNN" in k for k in images_compared)
    for key, check in images_compared.items():
        assert check["image_max_abs_diff"] < 1e-4, key
        if check["loss_a"] is not None:
            assert abs(check["loss_a"] - check["loss_b"]) < 1e-4, key
    for key, (plain_loss, project_loss) in ((k, c) for k, c in data["checks"].items() if "dpo loss" in k):
        # beta 5000 multiplies the float32 rounding of one batch-2B UNet call against two batch-B calls
        assert abs(plain_loss - project_loss) < 1e-3, key


# --------------------------------------------------------------------------- bench/e2e.py --smoke
# diffusers' DPO example (third-party, never copied into the project) lives beside the checkout, in ../shared/peers/,
# on the development machines; CI has no copy.
PEERS = REPO_ROOT.parent / "shared" / "peers"
PEER_SD15 = "diffusers_dpo_train_diffusion_dpo.py"


@pytest.fixture(scope="module")
def e2e_smoke(tmp_path_factory):
    """One smoke call: train_dpo.py (and, where its copy exists, diffusers' SD1.5 DPO example), train_draftp.py and
    the plain DRaFT+ loop (bench/plain_draftp.py), each a 3-step run on tiny-sd on the CPU, as subprocesses."""
    root = tmp_path_factory.mktemp("e2e")
    peers = root / "peers"
    peers.mkdir()
    if (PEERS / PEER_SD15).is_file():
        shutil.copy(PEERS / PEER_SD15, peers / PEER_SD15)
    flags = ["--peers", peers] if (peers / PEER_SD15).exists() else ["--no_peers"]
    run_script(["bench/e2e.py", "--smoke", "--out", root / "out", "--sections", "dpo4", "draftp4", *flags], timeout=600)
    return json.loads((root / "out" / "e2e.json").read_text()), (root / "out" / "e2e.md").read_text()


def test_e2e_smoke_runs_the_project_scripts_end_to_end(e2e_smoke):
    data, table = e2e_smoke
    ours = {r["script"]: r for r in data["rows"] if not r["script"].startswith(("diffusers", "plain"))}
    assert set(ours) == {"train_dpo.py", "train_draftp.py"}
    for row in ours.values():
        assert row["steps"] == 3 and row["rc"] == 0, row
        assert 0 < row["first_step_s"] < row["wall_s"] and row["step_seconds_median"] > 0 and row["data_seconds_median"] >= 0
    assert ours["train_dpo.py"]["first_loss"] == pytest.approx(math.log(2), abs=1e-4)  # DPO starts at log 2
    assert "| dpo4 | train_dpo.py |" in table and "| draftp4 | train_draftp.py |" in table


def test_e2e_smoke_runs_the_plain_draftp_loop_beside_train_draftp(e2e_smoke):
    """The DRaFT+ section's baseline: bench/plain_draftp.py on the same model, reward and batch, timed by the same
    tqdm counts, and the ratio of the two."""
    data, table = e2e_smoke
    (plain,) = [r for r in data["rows"] if r["script"].startswith("plain")]
    assert plain["section"] == "draftp4" and plain["rc"] == 0 and plain["steps"] == 3, plain
    assert 0 < plain["first_step_s"] < plain["wall_s"] and plain["rate"] > 0
    ours = next(r for r in data["rows"] if r["script"] == "train_draftp.py")
    assert data["ratios"]["draftp4"]["speedup"] == pytest.approx(ours["rate"] / plain["rate"], rel=1e-2)
    assert "| draftp4 | plain loop (bench/plain_draftp.py) |" in table


def test_e2e_smoke_runs_diffusers_dpo_example_on_the_same_data(e2e_smoke):
    if not (PEERS / PEER_SD15).is_file():
        pytest.skip(f"diffusers' DPO example is not in {PEERS} (third-party code kept outside the repository; "
                    f"CI has no copy): only the project's scripts were run")
    data, _ = e2e_smoke
    (peer,) = [r for r in data["rows"] if r["script"].startswith("diffusers")]
    assert peer["section"] == "dpo4" and peer["rc"] == 0, peer
    assert 0 < peer["first_step_s"] < peer["wall_s"]  # its tqdm bar reached 1/N


def test_steady_rate_times_the_window_between_step_counts():
    """bench/e2e.py's throughput: from the first count seen at or after M to the last count seen (tqdm may skip
    counts), not from the start of the run."""
    import sys

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from e2e import steady_rate

    seen_at = {1: 13.0, 2: 13.4, 4: 14.0, 5: 14.3, 10: 15.8}  # a slow first step, counts 3 and 6-9 not shown
    rate, per_step = steady_rate(seen_at, 3, items=4)
    assert per_step == pytest.approx((15.8 - 14.0) / 6) and rate == pytest.approx(4 / per_step)
    assert steady_rate({1: 2.0, 2: 2.0}, 1, 4) == (None, None)  # both counts read in one poll: no rate
    assert steady_rate({10: 5.0}, 1, 4) == (None, None)


def test_profile_steps_profiles_the_asked_steps_of_a_real_run(tmp_path):
    """bench/profile_steps.py runs train_dpo.py through its own entry point and profiles optimizer steps 3-4 only;
    the run itself finishes as usual (5 steps logged, weights saved)."""
    import sys

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import distributed

    data = distributed.build_pairs(str(tmp_path / "pairs"), 32, 8, "parquet")
    run = tmp_path / "run"
    run_script(["bench/profile_steps.py", "--out", tmp_path / "profile", "--steps", "2", "4", "--", "train_dpo.py",
                "--pretrained_model_name_or_path", "tiny-sd", "--dataset_name", data, "--resolution", "32",
                "--train_batch_size", "2", "--max_train_steps", "5", "--use_lora", "--lora_rank", "4",
                "--report_to", "none", "--output_dir", run], timeout=600)
    profile = json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert profile["profiled_steps"] == "3-4" and profile["steps"] == 2 and profile["wall_s_per_step"] > 0
    assert any(op["name"].startswith("aten::") for op in profile["top_cpu_ops"])  # the UNet's operators were seen
    assert (tmp_path / "profile" / "trace.json.gz").stat().st_size > 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 5 and (run / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
def test_distributed_bench_command_lines_parse_in_both_scripts(sdxl):
    """bench/distributed.py's rows run the scripts on the GPU only: their flags (LoRA and full, SD1.5 and SDXL) must
    at least be the scripts' flags, so that a row fails on the strategy and not on a renamed flag."""
    import sys

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import distributed
    import train_dpo
    import train_draftp

    parse = {"train_dpo.py": train_dpo.parse_args, "train_draftp.py": train_draftp.parse_args}
    for script in ("draftp", "dpo"):
        for lora in (True, False):
            flags = distributed.script_flags(script, lora, "/models", "/data", sdxl=sdxl, sdxl_optimizer="adamw")
            args = parse[flags[0]]([*flags[1:], "--output_dir", "/tmp/out", "--max_train_steps", "3"])
            assert args.use_lora == lora and args.resolution == (1024 if sdxl else 512)
