"""bench/bench.py --smoke: the sections run the project's code paths on tiny models on the CPU, and in float32 the
plain loop, the project's path and each speed variant give the same images and losses (on the GPU they differ only
by bf16 rounding: BENCHMARKS.md). Three sections (about a minute) cover every step function and comparison the
others use; the rest only re-combine them."""
import json

from tests.conftest import run_script


def test_bench_sections_run_and_the_compared_paths_agree(tmp_path):
    run_script(["bench/bench.py", "--smoke", "--out", tmp_path, "--sections", "sd15_kernels", "sdxl", "dpo"], timeout=900)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert not [k for k in data["checks"] if "failed" in k], data["checks"]
    rows = data["rows"]
    for prefix in ("sd15 draftp", "sd15 sampling", "sdxl draftp", "sd15 dpo", "sdxl sft"):
        assert any(k.startswith(prefix) for k in rows), prefix
    assert all(r["rate"] > 0 and r["seconds"] > 0 for r in rows.values())
    images_compared = {k: c for k, c in data["checks"].items() if "image_max_abs_diff" in c}
    assert any("plain" in k and "project" in k for k in images_compared) and any("cuDNN" in k for k in images_compared)
    for key, check in images_compared.items():
        assert check["image_max_abs_diff"] < 1e-4, key
        if check["loss_a"] is not None:
            assert abs(check["loss_a"] - check["loss_b"]) < 1e-4, key
    for key, (plain_loss, project_loss) in ((k, c) for k, c in data["checks"].items() if "dpo loss" in k):
        # beta 5000 multiplies the float32 rounding of one batch-2B UNet call against two batch-B calls
        assert abs(plain_loss - project_loss) < 1e-3, key
