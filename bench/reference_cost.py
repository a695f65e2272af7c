"""What the frozen reference costs when its output is not used (issue 16, item 3): full DRaFT (K = 50) with LoRA and
kl_coeff 0, run end to end through `accelerate launch` on full-size random-weight SD1.5 with a PickScore-size scorer,
once as it runs now (the reference is not called) and once with --log_kl (it is called at each of the 50 grad steps,
which is what every kl_coeff 0 LoRA run did before the flag existed). The two runs are the same otherwise.

    python3 bench/reference_cost.py --out $OUT --assets .bench_assets     # ~4 min on one H200

Writes OUT/reference_cost.md and .json: s/step (median of steps 2-4), peak GiB, and the ratio of the two.
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distributed import build_models, last_error_line, launch, read_metrics, script_flags  # noqa: E402

FULL_DRAFT = ["--num_inference_steps", "50", "--truncation_steps", "50", "--kl_coeff", "0", "--train_batch_size", "2"]


def run(name, extra, args, logs):
    flags = script_flags("draftp", True, args.models, None) + FULL_DRAFT + extra
    out = os.path.join("/tmp/bench-runs", name)
    log = os.path.join(logs, name + ".log")
    code, wall = launch("single_gpu", flags, out, args.steps, False, log, timeout=400)
    metrics = read_metrics(out)
    if code != 0:
        return dict(run=name, status=last_error_line(log))
    return dict(run=name, status="ok", wall_s=round(wall, 1), peak_gib=max(m.get("peak_mem_gib", 0) for m in metrics),
                s_per_step=round(statistics.median(m["step_seconds"] for m in metrics[1:]), 3),
                logged_kl=[m.get("kl") for m in metrics])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--assets", required=True, help="folder of `bench/distributed.py --write_assets`")
    parser.add_argument("--models", default="/tmp/bench-models")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    build_models(args.assets, args.models, sdxl=False)
    rows = []
    for name, extra in (("kl0", []), ("kl0-log_kl", ["--log_kl"])):
        rows.append(run(name, extra, args, logs))
        with open(os.path.join(args.out, "reference_cost.json"), "w") as f:
            json.dump(rows, f, indent=1)
    lines = ["| run | result | s/step | peak GiB |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['status']} | {r.get('s_per_step', '-')} | {r.get('peak_gib', '-')} |" for r in rows]
    if all(r["status"] == "ok" for r in rows):
        lines.append(f"\n--log_kl / default: {rows[1]['s_per_step'] / rows[0]['s_per_step']:.2f}x the step time")
    with open(os.path.join(args.out, "reference_cost.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
