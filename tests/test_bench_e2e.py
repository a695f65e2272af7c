"""bench/e2e.py --smoke: the end-to-end harness runs the real scripts (and diffusers' DPO example where its copy
exists) as subprocesses and reads their results (about a minute)."""
import json
import math
import shutil
import sys

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))  # bench/e2e.py and the bench modules it imports


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
    # bench/e2e.py's main() in this process (its runs are the subprocesses that it starts either way; what is tested is
    # what it reads from them and writes), without a subprocess's imports
    from e2e import main

    main([str(a) for a in ["--smoke", "--out", root / "out", "--sections", "dpo4", "draftp4", *flags]])
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
    from e2e import steady_rate

    seen_at = {1: 13.0, 2: 13.4, 4: 14.0, 5: 14.3, 10: 15.8}  # a slow first step, counts 3 and 6-9 not shown
    rate, per_step = steady_rate(seen_at, 3, items=4)
    assert per_step == pytest.approx((15.8 - 14.0) / 6) and rate == pytest.approx(4 / per_step)
    assert steady_rate({1: 2.0, 2: 2.0}, 1, 4) == (None, None)  # both counts read in one poll: no rate
    assert steady_rate({10: 5.0}, 1, 4) == (None, None)
