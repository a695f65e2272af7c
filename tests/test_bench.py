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


# --------------------------------------------------------------------------- bench/e2e.py --smoke
# diffusers' DPO example (third-party, never copied into the project) lives beside the checkout, in ../shared/peers/,
# on the development machines; CI has no copy.
PEERS = REPO_ROOT.parent / "shared" / "peers"
PEER_SD15 = "diffusers_dpo_train_diffusion_dpo.py"


@pytest.fixture(scope="module")
def e2e_smoke(tmp_path_factory):
    """One smoke call: train_dpo.py (and, where its copy exists, diffusers' SD1.5 DPO example) and train_draftp.py,
    each a 2-step and a 1-step run on tiny-sd on the CPU, as subprocesses."""
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
    ours = {r["script"]: r for r in data["rows"] if not r["script"].startswith("diffusers")}
    assert set(ours) == {"train_dpo.py", "train_draftp.py"}
    for row in ours.values():
        assert [r["steps"] for r in row["runs"]] == [2, 1] and all(r["rc"] == 0 for r in row["runs"]), row
        assert row["first_step_s"] > 0 and row["step_seconds_median"] > 0 and row["data_seconds_median"] >= 0
    assert ours["train_dpo.py"]["first_loss"] == pytest.approx(math.log(2), abs=1e-4)  # DPO starts at log 2
    assert "| dpo4 | train_dpo.py |" in table and "| draftp4 | train_draftp.py |" in table


def test_e2e_smoke_runs_diffusers_dpo_example_on_the_same_data(e2e_smoke):
    if not (PEERS / PEER_SD15).is_file():
        pytest.skip(f"diffusers' DPO example is not in {PEERS} (third-party code kept outside the repository; "
                    f"CI has no copy): only the project's scripts were run")
    data, _ = e2e_smoke
    (peer,) = [r for r in data["rows"] if r["script"].startswith("diffusers")]
    assert peer["section"] == "dpo4" and all(r["rc"] == 0 for r in peer["runs"]), peer
    assert peer["first_step_s"] > 0  # its tqdm bar reached 1/N
