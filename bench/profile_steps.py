"""Where the time of a training script's steps goes, profiled in the run a user makes (not a composed step).

    python3 bench/profile_steps.py --out $OUT --steps 10 13 -- train_dpo.py --pretrained_model_name_or_path ... (its flags)
    python3 bench/profile_steps.py --out /tmp/prof --steps 2 4 -- train_dpo.py ...   # CPU: the harness runs (tests)

The script is imported as a module and run through its own entry point (run_main) with the given flags, in this
process; the run protocol's `log_step` (utils/train/run.py), called once at the end of every optimizer step, is
wrapped so that torch.profiler
(CPU and CUDA activities) records the optimizer steps A+1 .. B. Writes OUT/profile.json: the wall time per step,
the GPU's busy time per step and its share of the wall time, kernel launches per step, GPU seconds by kernel kind
(bench/bench.py's kinds), the top kernels and the top CPU operators by their own time; and OUT/trace.json.gz, the
chrome trace of those steps (open in chrome://tracing or ui.perfetto.dev). The profiler's own overhead makes the
steps slower than unprofiled ones: compare busy shares and kinds, not the wall time against e2e.py's rates.
"""
import argparse
import gzip
import importlib
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def summarize(prof, wall_s: float, steps: int) -> dict:
    """The profiled steps in numbers (bench.kernel_breakdown for the GPU side, the CPU operators beside it)."""
    import torch

    from bench import kernel_breakdown

    events = prof.key_averages()
    gpu = kernel_breakdown(prof, wall_s) if torch.cuda.is_available() else {"wall_s": round(wall_s, 4)}
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                                         "cudaGraphLaunch"))
    cpu_ops = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                     key=lambda e: -e.self_cpu_time_total)[:25]
    return {"steps": steps, "wall_s_per_step": round(wall_s / steps, 4),
            "gpu_busy_s_per_step": round(gpu.get("gpu_busy_s", 0.0) / steps, 4), "busy_pct": gpu.get("busy_pct"),
            "kernel_launches_per_step": round(launches / steps, 1),
            "gpu_s_per_step_by_kind": {k: round(v / steps, 4) for k, v in gpu.get("by_kind_s", {}).items()},
            "top_kernels": gpu.get("top_kernels", []),
            "top_cpu_ops": [dict(name=e.key[:100], self_cpu_s=round(e.self_cpu_time_total / 1e6, 4), calls=e.count)
                            for e in cpu_ops]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: profile_steps.py [--out DIR] [--steps A B] -- SCRIPT.py FLAGS...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out/profile")
    parser.add_argument("--steps", type=int, nargs=2, default=[10, 13], metavar=("A", "B"),
                        help="profile optimizer steps A+1 .. B (after A steps: past start-up and cuDNN autotuning)")
    args = parser.parse_args(argv[:split])
    script, script_flags = argv[split + 1], argv[split + 2:]
    first, last = args.steps
    if not 0 <= first < last:
        parser.error("--steps A B needs 0 <= A < B")
    os.makedirs(args.out, exist_ok=True)

    import torch
    from torch.profiler import ProfilerActivity, profile

    import utils.train.run as run_protocol

    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof, clock = profile(activities=activities), {}
    log_step = run_protocol.log_step

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def profiled_log_step(accelerator, metrics_log, progress, logs, *shown, **kwargs):
        log_step(accelerator, metrics_log, progress, logs, *shown, **kwargs)
        if logs["step"] == first:
            sync()
            prof.start()
            clock["start"] = time.perf_counter()
        elif logs["step"] == last:
            sync()
            wall = time.perf_counter() - clock["start"]
            prof.stop()
            summary = dict(script=script, flags=script_flags, profiled_steps=f"{first + 1}-{last}",
                           **summarize(prof, wall, last - first))
            with open(os.path.join(args.out, "profile.json"), "w") as f:
                json.dump(summary, f, indent=1)
            trace = os.path.join(args.out, "trace.json")
            prof.export_chrome_trace(trace)
            with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(trace)
            print(json.dumps({k: v for k, v in summary.items() if not k.startswith("top_") and k != "flags"}, indent=1),
                  flush=True)

    run_protocol.log_step = profiled_log_step
    sys.argv = [script, *script_flags]
    module.run_main(module.main, module.parse_args)


if __name__ == "__main__":
    main()
