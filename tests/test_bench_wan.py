"""bench/wan.py --tiny: the Wan 2.1 benchmark's every section end to end on tiny-wan on the CPU (the real pre-encoder,
train_dpo.py --sft with the single-GPU and FSDP accelerate configs, the plain SFT loop, train_draftp.py, train_dpo.py
DPO, each a subprocess), and what the harness reads back from them (about two minutes on a 2-core machine)."""
import json
import math
import sys

import pytest

from tests.conftest import REPO_ROOT, run_command

sys.path.insert(0, str(REPO_ROOT / "bench"))  # bench/wan.py's summarize and write_clip

ROWS = [("sft", "single_gpu"), ("sft", "fsdp"), ("plain", "plain loop"), ("dpo", "single_gpu"), ("draftp", "single_gpu")]


@pytest.fixture(scope="module")
def tiny_call(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    done = run_command([sys.executable, "bench/wan.py", "--tiny", "--out", root / "out", "--work", root / "work",
                        "--deadline", "500"], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "out", done.stdout


def test_every_section_gives_a_finite_step_time_and_a_table_row(tiny_call):
    out, stdout = tiny_call
    data = json.loads((out / "wan.json").read_text())
    rows = {(r["section"], r["run"]): r for r in data["rows"]}
    assert list(rows) == ROWS
    for row in rows.values():
        assert row["status"] == "ok" and row["exit_code"] == 0, row
        assert row["steps_logged"] == 3 and row["warmup_used"] == 1, row
        assert math.isfinite(row["s_per_step"]) and row["s_per_step"] > 0 and row["per_s"] > 0, row
        assert 0 < row["first_step_s"] < row["wall_s"] and row["wall_s_per_step"] >= 0, row
    assert rows[("dpo", "single_gpu")]["first_loss"] == pytest.approx(math.log(2), abs=1e-4)  # DPO starts at log 2
    plain = rows[("plain", "plain loop")]
    assert plain["ours_over_plain"] == pytest.approx(rows[("sft", "single_gpu")]["s_per_step"] / plain["s_per_step"],
                                                     abs=1e-3)
    assert rows[("sft", "single_gpu")]["strategy"] == "one process"
    table = (out / "wan.md").read_text()
    for section, run in ROWS:
        assert f"| {section} | {run} | ok |" in table
    assert "| encoded_pairs | ok |" in table and "| model | ok (tiny-wan) |" in table
    assert "| sft | single_gpu | ok |" in stdout  # the final table is printed too


def test_the_output_folder_is_flat_and_holds_every_runs_log(tiny_call):
    """The device tool brings back files at most two folders down and 8 of them: OUT holds three files."""
    out, _ = tiny_call
    assert sorted(p.name for p in out.iterdir()) == ["wan.json", "wan.md", "wan_logs.txt"]
    logs = (out / "wan_logs.txt").read_text()
    for name in ["preencode-pairs", "sft-single_gpu", "sft-fsdp", "plain-plain loop", "draftp-single_gpu",
                 "dpo-single_gpu"]:
        assert f"===== {name} (exit 0," in logs


def test_summarize_takes_the_median_after_warmup_and_the_harness_clock():
    from wan import summarize

    metrics = [{"loss": 0.5, "step_seconds": 9.0}, {"step_seconds": 2.0}, {"step_seconds": 3.0},
               {"step_seconds": 2.5, "peak_mem_gib": 7.5}, {"step_seconds": 2.2, "peak_mem_gib": 7.0}]
    stamps = [20.0, 22.1, 25.0, 27.4, 29.7]
    row = summarize({}, metrics, stamps, 2, 1, 0, "unused.log")
    assert row["s_per_step"] == 2.5 and row["per_s"] == 0.4 and row["warmup_used"] == 2  # median of 3.0, 2.5, 2.2
    assert row["wall_s_per_step"] == round((29.7 - 22.1) / 3, 3)  # from the end of step 2 to the end of step 5
    assert row["peak_gib_torch"] == 7.5 and row["first_step_s"] == 20.0 and row["status"] == "ok"
    # a run stopped by its timeout after 2 steps keeps a rate, from the step after its only warm-up step used
    cut = summarize({}, metrics[:2], stamps[:2], 2, 1, 124, "unused.log")
    assert cut["status"] == "timed out after 2 steps" and cut["warmup_used"] == 1 and cut["s_per_step"] == 2.0


def test_opencv_stand_in_reads_back_the_clips_written_without_pyav(tmp_path, monkeypatch):
    """Where PyAV is missing (the GPU machine), the clips are written by OpenCV and read by bench/opencv_av."""
    pytest.importorskip("cv2")
    import importlib.util

    import numpy as np

    import wan

    monkeypatch.setattr(wan, "HAVE_AV", False)
    frames = np.random.default_rng(0).integers(0, 255, (5, 32, 48, 3), dtype=np.uint8)
    wan.write_clip(str(tmp_path / "clip.mp4"), frames)
    spec = importlib.util.spec_from_file_location("opencv_av", REPO_ROOT / "bench" / "opencv_av" / "av.py")
    av = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(av)
    with av.open(str(tmp_path / "clip.mp4")) as container:
        read = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert read.shape == frames.shape
    with pytest.raises(av.FFmpegError):
        av.open(str(tmp_path / "missing.mp4"))
