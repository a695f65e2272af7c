"""bench/bench.py --smoke, the DPO sections (the others: tests/test_bench.py, which holds the checks every section
must pass): plain loop vs the project's path, the kernel variants, and the reference pass replayed from graphs."""
from tests.test_bench import SECTIONS_B, run_bench_smoke


def test_bench_dpo_sections_run_and_the_compared_paths_agree(tmp_path):
    data = run_bench_smoke(tmp_path, SECTIONS_B)
    rows = data["rows"]
    for prefix in ("sd15 dpo", "sdxl sft"):
        assert any(k.startswith(prefix) for k in rows), prefix
    graphed = {k: c for k, c in data["checks"].items() if "vs reference" in k}
    assert len(graphed) == 2, graphed  # cudagraphs backend and inductor reduce-overhead, each equal to eager
    assert any("dpo loss plain vs project" in k for k in data["checks"]), data["checks"]
