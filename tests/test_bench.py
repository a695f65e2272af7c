"""bench/bench.py --smoke: the sections run the project's code paths on tiny models on the CPU, and in float32 the
plain loop, the project's path and each speed variant give the same images and losses (on the GPU they differ only
by bf16 rounding: BENCHMARKS.md). The sections that cover every step function and comparison the others use run
here and in tests/test_bench_dpo.py (about a minute each, so that two test workers share them); the rest only
re-combine them. bench/e2e.py --smoke: tests/test_bench_e2e.py."""
import json

import pytest

from tests.conftest import REPO_ROOT, run_script


SECTIONS_A = ["sd15_kernels", "sdxl", "vae_layout", "dpo_lora_casts"]  # about 50 s on one CPU core
SECTIONS_B = ["dpo", "dpo_kernels", "dpo_reference_graphs"]  # about 60 s: tests/test_bench_dpo.py


def run_bench_smoke(out, sections):
    """bench/bench.py --smoke on `sections`; returns bench.json, after the checks every section's results must pass:
    no section failed, every row timed, and every compared pair of paths equal to float32 rounding.

    bench.py's main() runs in this process (what is tested is the bench.json that its sections write, not its
    process), without a subprocess's ~15 s of imports: a fresh copy of the module each call, its command line in
    sys.argv (main() reads it there), and dynamo's caches cleared afterwards, so that the UNets it compiled leave no
    guards or recompile counts to the later tests of this test process that compile a UNet."""
    import importlib.util
    import sys

    import torch

    spec = importlib.util.spec_from_file_location("bench_smoke_bench", REPO_ROOT / "bench" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    argv = sys.argv
    sys.argv = [str(a) for a in ["bench/bench.py", "--smoke", "--out", out, "--sections", *sections]]
    try:
        spec.loader.exec_module(bench)
        bench.main()
    finally:
        sys.argv = argv
        torch._dynamo.reset()
    data = json.loads((out / "bench.json").read_text())
    assert not [k for k in data["checks"] if "failed" in k], data["checks"]
    assert all(r["rate"] > 0 and r["seconds"] > 0 for r in data["rows"].values())
    graphed = {k: c for k, c in data["checks"].items() if "vs reference" in k}
    assert all(eager == graphed_loss for eager, graphed_loss in graphed.values()), graphed
    for key, check in data["checks"].items():
        if isinstance(check, dict) and "image_max_abs_diff" in check and "(changes results)" not in key:
            assert check["image_max_abs_diff"] < 1e-4, key
            if check["loss_a"] is not None:
                assert abs(check["loss_a"] - check["loss_b"]) < 1e-4, key
    for key, (plain_loss, project_loss) in ((k, c) for k, c in data["checks"].items() if "dpo loss" in k):
        # beta 5000 multiplies the float32 rounding of one batch-2B UNet call against two batch-B calls
        assert abs(plain_loss - project_loss) < 1e-3, key
    return data


def test_bench_sections_run_and_the_compared_paths_agree(tmp_path):
    """The DRaFT+, VAE and LoRA-cast sections (the DPO ones: tests/test_bench_dpo.py, so that the two halves of the
    one-minute-plus smoke run can go to two test workers)."""
    data = run_bench_smoke(tmp_path, SECTIONS_A)
    rows = data["rows"]
    for prefix in ("sd15 draftp", "sd15 sampling", "sdxl draftp", "sd15 vae encode", "sd15 vae decode",
                   "sd15 dpo b2 project, input casts off"):
        assert any(k.startswith(prefix) for k in rows), prefix
    layouts = {k: c for k, c in data["checks"].items() if k.startswith("vae ")}
    assert len(layouts) == 4 and all(c < 1e-4 for c in layouts.values()), layouts  # float32 on the CPU: the same maths
    images_compared = {k: c for k, c in data["checks"].items() if isinstance(c, dict) and "image_max_abs_diff" in c}
    assert any("plain" in k and "project" in k for k in images_compared) and any("cuDNN" in k for k in images_compared)
    assert any("dpo" in k and "loss" in k for k in data["checks"])  # dpo_lora_casts: casts on vs off


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
