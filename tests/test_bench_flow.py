"""bench/flow.py --smoke: online RL through train_online.py on a tiny SD3 pipeline, and beside it Flow-GRPO's and
DiffusionNFT's own scripts where their copies and ml_collections / absl-py are here, end to end on the CPU; what the
GPU call brings back (flow.md, flow.json and one archive of the logs) is what the harness writes."""
import importlib.util
import json
import math
import sys
import tarfile

from tests.conftest import REPO_ROOT, run_command

PEERS = (REPO_ROOT / ".peers_online").is_dir() and all(importlib.util.find_spec(m) for m in ("ml_collections", "absl"))


def test_online_runs_and_their_logs_come_back_in_three_files(tmp_path):
    scripts = ["flow_grpo", "nft"] + (["flow_grpo_peer", "nft_peer"] if PEERS else [])
    out = tmp_path / "out"
    done = run_command([sys.executable, "bench/flow.py", "--out", out, "--smoke", "--family", "sd35", "--scripts",
                        *scripts, "--models", tmp_path / "models"], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((out / "flow.json").read_text())
    assert [r["script"] for r in rows] == scripts
    for row in rows:
        assert row["status"] == "ok" and row["exit_code"] == 0, row
        assert math.isfinite(row["s_per_step"]) and row["s_per_step"] > 0 and row["per_s"] > 0, row
    if PEERS:
        assert all(r["ours_over_peer"] > 0 for r in rows if r["script"].endswith("_peer"))
    assert {p.name for p in out.iterdir()} == {"flow.json", "flow.md", "flow_logs.tar.gz", "runs"}  # runs: --smoke's
    with tarfile.open(out / "flow_logs.tar.gz") as archive:
        names = {name.lstrip("./") for name in archive.getnames()}
    for script in scripts:
        assert f"sd35-{script}.log" in names, names
    for line in (f"| sd35 | {s} | ok |" for s in scripts):
        assert line in (out / "flow.md").read_text()
