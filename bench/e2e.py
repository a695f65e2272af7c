"""End to end: the training scripts run as a user runs them (one process each, `python train_dpo.py ...`), beside
diffusers' Diffusion-DPO examples on the same data, batch, LoRA rank, resolution, steps and GPU, in one call; and
train_draftp.py beside the plain DRaFT+ loop run as a script (bench/plain_draftp.py: same model, reward, batch, K).

Each (section, script) runs once for N steps. The harness stamps each tqdm step count ("k/N", which both kinds of
script print after each optimizer step) with its own clock as the line appears in the log; throughput = (N - M) x
items per step / (time of step N - time of step M): the steady state, with start-up, the first steps (data-loader
workers starting, cuDNN autotuning) and the end of the run outside the window. A first version took the difference
of two runs' wall times (N and M steps) instead; one slow first step in one of the runs (13 s against 3 s, seen
on the H200) moved that estimate by 2.5x, so the window is now inside one run. Beside it, per script: the wall time,
the time from process start to the first finished step, the fixed cost (wall - N x seconds per step: start-up, the
slower first steps and the end of the run), the peak GPU memory sampled with nvidia-smi (the GPU the run sees, less
what was in use before it), and for this project's scripts the medians of metrics.jsonl's step_seconds /
data_seconds and torch's peak. Where a script compiles, a 1-step run goes first and is reported as the cold start,
so the measured run finds the compile cache warm. Before the first run the harness reads every model file once and
imports the libraries (warm_host), so that the call's first script does not pay the cold caches for the others.
Results go to OUT/e2e.json and OUT/e2e.md, rewritten after every
run, so a call cut short keeps what it measured; the logs go to OUT/logs/.

Models: full-size SD1.5 / SDXL and a PickScore-size scorer with random weights, built and saved by
bench/distributed.py (--models, default /tmp/bench-models; --assets as there). Data: 256 Pick-a-Pic-layout pairs
(jpg_0 / jpg_1 PNG bytes, label_0, caption) written as one parquet file in a folder, which both kinds of script
read through `load_dataset`, each run with a fresh datasets cache. The peers (diffusers' research example
examples/research_projects/diffusion_dpo, third-party code, run unchanged) come from --peers DIR; they import
wandb, so a stub module is put on their PYTHONPATH. --no_peers leaves out the examples, --no_plain the plain DRaFT+
loop.

On the GPU (each line one call of under 10 minutes on an H200; --peers holds the two peer scripts):
    python3 bench/e2e.py --out $OUT --assets .bench_assets --sections dpo4            # DPO LoRA, 4 pairs/step
    python3 bench/e2e.py --out $OUT --assets .bench_assets --sections dpo16           # DPO LoRA, 16 pairs/step
    python3 bench/e2e.py --out $OUT --assets .bench_assets --sections dpo4_full dpo16_full   # full UNet (peer: LoRA)
    python3 bench/e2e.py --out $OUT --assets .bench_assets --sdxl --sections          # builds the SDXL model only
    python3 bench/e2e.py --out $OUT --assets .bench_assets --sections sdxl_dpo        # SDXL DPO LoRA, 1024 px
    python3 bench/e2e.py --out $OUT --assets .bench_assets --sections draftp4         # DRaFT+ K=1, batch 4, + plain loop
    python3 bench/e2e.py --out $OUT --assets .bench_assets --sections draftp8         # batch 8
    python3 bench/e2e.py --out $OUT --assets .bench_assets --sections draftp16        # batch 16
    python3 bench/e2e.py --smoke --out /tmp/e2e                                      # CPU, tiny-sd, 2 steps
Extra flags for this project's DPO runs (a speed lever under test) go after --dpo_flags, e.g.
`--dpo_flags --compile_unet default`, and for the DRaFT+ runs as one quoted string, `--draftp_flags "--compile_unet
default"`; they are recorded in the results.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # bench/distributed.py: the random-weight models and its helpers

import distributed  # noqa: E402

PEER_SCRIPTS = {False: "diffusers_dpo_train_diffusion_dpo.py", True: "diffusers_dpo_train_diffusion_dpo_sdxl.py"}
NUM_PAIRS, LORA_RANK = 256, 8
# name: (script, batch, (N steps, M: the first step of the timed window), full UNet, SDXL); the baseline of the DPO
# sections is diffusers' example, of the DRaFT+ sections the plain loop (bench/plain_draftp.py)
SECTIONS = {
    "dpo4": ("dpo", 4, (40, 10), False, False),
    "dpo16": ("dpo", 16, (30, 10), False, False),
    "dpo4_full": ("dpo", 4, (40, 10), True, False),
    "dpo16_full": ("dpo", 16, (30, 10), True, False),
    "sdxl_dpo": ("dpo", 2, (12, 4), False, True),
    "draftp4": ("draftp", 4, (25, 5), False, False),
    "draftp8": ("draftp", 8, (20, 5), False, False),
    "draftp16": ("draftp", 16, (15, 5), False, False),
}


# --------------------------------------------------------------------------- set-up
def wandb_stub(folder):
    """The peers `import wandb` at the top and use wandb.Image only when reporting to wandb."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "wandb.py"), "w") as f:
        f.write('"""Stub for benchmarks: the peer scripts import wandb; they report to tensorboard here."""\n\n\n'
                "class Image:\n    pass\n")
    return folder


class MemorySampler:
    """Peak memory of the GPU (nvidia-smi every 0.2 s), less what was in use when it started; None without
    nvidia-smi (CPU smoke runs)."""

    def __init__(self):
        self.baseline = self._used()
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _used():
        try:
            # the GPU this process sees first (a call may run other benches on the other GPUs of the machine)
            gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return sum(float(x) for x in out.split()) / 1024  # GiB
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None

    def _run(self):
        while not self._stop.is_set():
            used = self._used()
            if used is not None:
                self.peak = max(self.peak or 0.0, used - self.baseline)
            self._stop.wait(0.2)

    def __enter__(self):
        if self.baseline is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def run(cmd, log_path, steps, env, timeout):
    """Run one training process. Returns (exit code, wall s, {step count: s from start when tqdm first showed
    it}, peak GiB)."""
    count = re.compile(rf"\|\s*(\d+)/{steps}\s*\[")  # tqdm's "| k/N [" (after step k, in both kinds of script)
    started, seen_at = time.perf_counter(), {}
    with open(log_path, "w") as log, MemorySampler() as memory:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        with open(log_path, errors="replace") as reader:
            tail = ""
            while True:
                finished = proc.poll() is not None
                now = time.perf_counter() - started
                text = tail + reader.read()
                for match in count.finditer(text):
                    seen_at.setdefault(int(match.group(1)), now)
                tail = text[-200:]  # a count split across two reads is matched on the next
                if finished:
                    break
                if now > timeout:
                    proc.kill()
                    proc.wait()
                    break
                time.sleep(0.05)
    return proc.returncode, time.perf_counter() - started, seen_at, memory.peak


def steady_rate(seen_at, first_counted, items):
    """Items per second between the first step count seen at or after `first_counted` and the last one seen."""
    counts = sorted(k for k in seen_at if k >= first_counted)
    if len(counts) < 2 or seen_at[counts[-1]] <= seen_at[counts[0]]:
        return None, None
    per_step = (seen_at[counts[-1]] - seen_at[counts[0]]) / (counts[-1] - counts[0])
    return items / per_step, per_step


# --------------------------------------------------------------------------- the command lines
def dpo_command(peer, args, model, data, batch, steps, full, sdxl, resolution, out):
    """The same run for both kinds of script: data, batch, LoRA rank, resolution, steps, bf16, no validation, no
    checkpoint, constant lr; everything else each script's default (data-loader workers, VAE encoding, ...)."""
    common = ["--pretrained_model_name_or_path", model, "--dataset_name", data, "--resolution", str(resolution),
              "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--learning_rate", "1e-5",
              "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0", "--checkpointing_steps", "100000",
              "--output_dir", out, "--cache_dir", os.path.join(out, "datasets-cache")]
    if args.mixed_precision != "no":
        common += ["--mixed_precision", args.mixed_precision]
    if peer:  # diffusers' beta has no 0.5 factor: its 2500 is the project's 5000
        script = os.path.join(args.peers, PEER_SCRIPTS[sdxl])
        return [sys.executable, script, *common, "--dataset_split_name", "train", "--rank", str(LORA_RANK),
                "--beta_dpo", "2500", "--report_to", "tensorboard"]
    lora = ["--no-use_lora"] if full else ["--use_lora", "--lora_rank", str(LORA_RANK)]
    return [sys.executable, "train_dpo.py", *common, *lora, "--beta_dpo", "5000", "--report_to", "none",
            *(["--sdxl"] if sdxl else []), *args.dpo_flags]


def draftp_common(args, model, scorer, batch, steps, resolution):
    """What a DRaFT+ section's two runs share: model, reward, batch, resolution, DDIM steps, K = 1, seed."""
    reward = ["--reward_model", "brightness"] if args.smoke else \
        ["--reward_model", "pickscore", "--reward_model_paths", f"pickscore={scorer}"]
    return ["--pretrained_model_name_or_path", model, *reward, "--train_batch_size", str(batch), "--max_train_steps",
            str(steps), "--resolution", str(resolution), "--num_inference_steps", str(args.inference_steps),
            "--truncation_steps", "1", "--seed", "0"]


def draftp_command(args, model, scorer, batch, steps, resolution, out):
    """DRaFT+ as BENCHMARKS.md measures it: K=1, 50 DDIM steps, CFG 7.5, kl 0.1, LoRA rank 8, UNet checkpointing."""
    return [sys.executable, "train_draftp.py", *draftp_common(args, model, scorer, batch, steps, resolution),
            "--prompts", "animals", "--guidance_scale", "7.5", "--kl_coeff", "0.1", "--lora_rank", str(LORA_RANK),
            "--gradient_checkpointing", "--checkpointing_steps", "100000", "--report_to", "none", "--output_dir", out,
            *(["--mixed_precision", args.mixed_precision] if args.mixed_precision != "no" else []), *args.draftp_flags]


def plain_draftp_command(args, model, scorer, batch, steps, resolution):
    """The baseline of a DRaFT+ section: bench/plain_draftp.py (the plain loop) with draftp_command's shared flags
    (its CFG 7.5, kl 0.1 and LoRA rank 8 are bench.py's constants, the same)."""
    return [sys.executable, os.path.join("bench", "plain_draftp.py"),
            *draftp_common(args, model, scorer, batch, steps, resolution), "--mixed_precision", args.mixed_precision]


# --------------------------------------------------------------------------- measuring
def first_step_seen(seen_at):
    """Seconds from the start to the first step count shown (tqdm skips counts within 0.1 s of the last one shown:
    on fast CPU steps this may be step 2)."""
    shown = [k for k in seen_at if k >= 1]
    return round(seen_at[min(shown)], 2) if shown else None


def measure_run(name, runner, commands, steps, items, work, logs, env, timeout, warmup=False):
    """One script's row: the steady rate over steps M..N of an N-step run, the start-up, memory and logged medians.

    warmup: a 1-step run first (its wall time and first step are the cold start, reported as such), so that the
    measured run finds inductor's compile cache warm."""
    total, window_start = steps
    row = dict(section=name, script=runner, items_per_step=items, steps=total, window=f"{window_start}-{total}")
    if warmup:
        out = os.path.join(work, f"{name}-{runner}-warmup")
        code, wall, seen_at, _ = run(commands(1, out), os.path.join(logs, f"{name}-{runner}-warmup.log"), 1, env, timeout)
        row.update(cold_wall_s=round(wall, 2), cold_first_step_s=first_step_seen(seen_at), cold_rc=code)
        shutil.rmtree(out, ignore_errors=True)
    out = os.path.join(work, f"{name}-{runner}-{total}")
    shutil.rmtree(out, ignore_errors=True)
    log = os.path.join(logs, f"{name}-{runner}-{total}.log")
    command = commands(total, out)
    code, wall, seen_at, peak = run(command, log, total, env, timeout)
    rate, per_step = steady_rate(seen_at, window_start, items)
    row.update(command="python " + " ".join(command[1:]), rc=code, wall_s=round(wall, 2),
               first_step_s=first_step_seen(seen_at),
               peak_gib_smi=None if peak is None else round(peak, 2))
    if code != 0:
        row["error"] = distributed.last_error_line(log)
    if rate is not None and code == 0:
        row.update(rate=round(rate, 3), s_per_step=round(per_step, 4), fixed_s=round(wall - total * per_step, 1))
    metrics = distributed.read_metrics(out)
    if metrics:
        later = metrics[window_start:] or metrics
        row.update(first_loss=metrics[0]["loss"],
                   step_seconds_median=round(statistics.median(m["step_seconds"] for m in later), 4),
                   data_seconds_median=round(statistics.median(m.get("data_seconds", 0.0) for m in later), 4),
                   peak_gib_torch=max((m.get("peak_mem_gib", 0.0) for m in metrics), default=None))
        row["rate_from_step_seconds"] = round(items / row["step_seconds_median"], 3)
    shutil.rmtree(out, ignore_errors=True)  # full-UNet weights are GBs
    return row


def markdown(results):
    unit = {"dpo": "pairs/s", "draftp": "images/s"}
    lines = [f"Device: {results['device']}; {results['note']}", "",
             "| section | script | rate (steps M-N) | s/step | fixed s (start + end) | to 1st step s | peak GiB (smi) | "
             "step_seconds median | data_seconds median | peak GiB (torch) | first loss | cold: to 1st step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        rate = f"{r['rate']} {unit[r['kind']]}" if "rate" in r else \
            f"failed: {r.get('error', 'rc ' + str(r['rc']))}" if r["rc"] != 0 else "- (too few steps seen)"
        lines.append("| " + " | ".join([r["section"], r["script"], rate] + [
            str(r[k]) if r.get(k) is not None else "-"
            for k in ("s_per_step", "fixed_s", "first_step_s", "peak_gib_smi", "step_seconds_median",
                      "data_seconds_median", "peak_gib_torch", "first_loss", "cold_first_step_s")]) + " |")
    if results["ratios"]:
        lines += ["", "| section | this project / baseline (throughput; DPO: diffusers' example, DRaFT+: the plain "
                      "loop) | fixed s: project vs baseline | peak GiB (smi): project vs baseline |", "|---|---|---|---|"]
        for section, q in results["ratios"].items():
            lines.append(f"| {section} | {q['speedup']}x | {q['fixed_s']} | {q['peak_gib']} |")
    return "\n".join(lines) + "\n"


def write_results(results, out):
    with open(os.path.join(out, "e2e.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "e2e.md"), "w") as f:
        f.write(markdown(results))


def ratio(ours, peer):
    if "rate" not in ours or "rate" not in peer:
        return None
    return dict(speedup=round(ours["rate"] / peer["rate"], 3), fixed_s=f"{ours.get('fixed_s')} vs {peer.get('fixed_s')}",
                peak_gib=f"{ours.get('peak_gib_smi')} vs {peer.get('peak_gib_smi')}")


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--sections", nargs="*", default=["dpo4"], choices=list(SECTIONS))
    parser.add_argument("--peers", default=".peers", help="folder holding diffusers' DPO example scripts")
    parser.add_argument("--assets", default=".bench_assets", help="bench/distributed.py --write_assets (written if absent)")
    parser.add_argument("--models", default="/tmp/bench-models", help="where the random-weight models are saved")
    parser.add_argument("--sdxl", action="store_true", help="also build the SDXL model (section sdxl_dpo)")
    parser.add_argument("--steps", type=int, nargs=2, default=None, metavar=("N", "M"),
                        help="run length and first timed step of every section (default: the section's own)")
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--inference_steps", type=int, default=50, help="DDIM steps of the DRaFT+ runs")
    parser.add_argument("--no_peers", action="store_true", help="DPO sections: without diffusers' examples")
    parser.add_argument("--no_plain", action="store_true", help="DRaFT+ sections: without the plain loop")
    parser.add_argument("--warm_cache", action="store_true",
                        help="where a script compiles (DRaFT+, --compile_unet), a 1-step run first: its first step is "
                             "the cold start, the measured run's the warm one (without: the measured run's first step "
                             "is the cold start; the timed window starts after it either way)")
    parser.add_argument("--timeout", type=int, default=540, help="seconds per run")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny-sd, 32 px, batch 2, 3-step runs, float32: the harness runs")
    parser.add_argument("--dpo_flags", nargs=argparse.REMAINDER, default=[],
                        help="extra flags of this project's DPO runs (the rest of the command line)")
    parser.add_argument("--draftp_flags", type=shlex.split, default=[],
                        help='extra flags of the DRaFT+ runs, one quoted string: --draftp_flags "--compile_unet '
                             'default"; a single flag with "=" (--draftp_flags=--fp8_sampler), else argparse takes it '
                             'for its own')
    args = parser.parse_args(argv)
    if args.smoke:
        args.mixed_precision, args.inference_steps, args.steps = "no", 2, args.steps or [3, 1]
    return args


def prepare_models(args, sdxl_needed):
    """(SD1.5 folder, SDXL folder or None, scorer folder or None, resolution of SD1.5, of SDXL)."""
    if args.smoke:
        from utils.toy.tiny import tiny_pipeline_path

        return tiny_pipeline_path("tiny-sd"), tiny_pipeline_path("tiny-sdxl") if sdxl_needed else None, None, 32, 64
    if not os.path.isdir(args.assets):
        distributed.write_assets(args.assets)
    distributed.build_models(args.assets, args.models, sdxl_needed)
    return (os.path.join(args.models, "sd15"), os.path.join(args.models, "sdxl"),
            os.path.join(args.models, "pickscore"), 512, 1024)


def warm_host(folders, env):
    """Read every model file once and import the libraries both kinds of script import, before the first timed run:
    otherwise the first script of the call pays the cold page cache and the first compilation of the libraries'
    .pyc files, and the next one starts warm (measured: 35 s to the first step of train_dpo.py, the call's first
    process, against 19 s for the example right after it on the same files; 21-25 s for each when both were warm)."""
    for folder in filter(None, folders):
        for root, _, files in os.walk(folder):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    while f.read(1 << 24):
                        pass
    subprocess.run([sys.executable, "-c", "import torch, diffusers, transformers, accelerate, peft, datasets"],
                   cwd=ROOT, env=env, check=True)


def main(argv=None):
    args = parse_args(argv)
    wanted = {PEER_SCRIPTS[SECTIONS[s][4]] for s in args.sections if SECTIONS[s][0] == "dpo"} if not args.no_peers else ()
    missing = [name for name in sorted(wanted) if not os.path.isfile(os.path.join(args.peers, name))]
    if missing:
        raise SystemExit(f"error: --peers {args.peers} lacks {', '.join(missing)} (diffusers' DPO examples: copy them "
                         f"there, e.g. from ../shared/peers/), or pass --no_peers")
    os.makedirs(args.out, exist_ok=True)
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    work = tempfile.mkdtemp(prefix="e2e-runs-")
    sdxl_needed = args.sdxl or any(SECTIONS[s][4] for s in args.sections)
    sd15, sdxl, scorer, res15, res_xl = prepare_models(args, sdxl_needed)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [wandb_stub(os.path.join(work, "stub")),
                                                        os.environ.get("PYTHONPATH")])))
    warm_host([sd15, sdxl if sdxl_needed else None, scorer], env)
    data_root = "/tmp/bench-data" if not args.smoke else os.path.join(work, "data")
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    results = dict(device=device, note=f"mixed precision {args.mixed_precision}, LoRA rank {LORA_RANK}, "
                                       f"{'CPU smoke run (tiny-sd)' if args.smoke else 'random-weight full-size models'}"
                                       f"; extra DPO flags: {' '.join(args.dpo_flags) or 'none'}",
                   dpo_flags=args.dpo_flags, draftp_flags=args.draftp_flags, rows=[], ratios={})
    for name in args.sections:
        kind, batch, steps, full, is_xl = SECTIONS[name]
        steps = args.steps or steps
        if args.smoke:
            batch = 2
        model, resolution = (sdxl, res_xl) if is_xl else (sd15, res15)
        # (label, is the baseline, command for n steps into out, compiles: a warm-up run first with --warm_cache)
        if kind == "draftp":
            runners = [("train_draftp.py", False, lambda n, out: draftp_command(args, model, scorer, batch, n,
                                                                                 resolution, out), True)]
            if not args.no_plain:
                runners.append(("plain loop (bench/plain_draftp.py)", True,
                                lambda n, out: plain_draftp_command(args, model, scorer, batch, n, resolution), False))
        else:
            # not bench/distributed.py's pairs folders (64 pairs, save_to_disk): a folder with one parquet file
            data = distributed.build_pairs(os.path.join(data_root, f"e2e-pairs{resolution}"), resolution,
                                           8 if args.smoke else NUM_PAIRS, "parquet")
            runners = [("train_dpo.py" + (" (full UNet)" if full else ""), False,
                        lambda n, out: dpo_command(False, args, model, data, batch, n, full, is_xl, resolution, out),
                        "--compile_unet" in args.dpo_flags)]  # the DPO example compiles nothing
            if not args.no_peers:
                runners.append((PEER_SCRIPTS[is_xl].replace("diffusers_dpo_", "diffusers ") + " (LoRA)", True,
                                lambda n, out: dpo_command(True, args, model, data, batch, n, full, is_xl, resolution,
                                                           out), False))
        rows = {}
        for label, peer, commands, compiles in runners:
            rows[peer] = {**measure_run(name, label.split()[0] + ("-peer" if peer else ""), commands, steps, batch,
                                         work, logs, env, args.timeout, warmup=args.warm_cache and compiles),
                          "script": label, "kind": kind}
            results["rows"].append(rows[peer])
            write_results(results, args.out)
        if True in rows and ratio(rows[False], rows[True]):
            results["ratios"][name] = ratio(rows[False], rows[True])
            write_results(results, args.out)
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(results), flush=True)
    return results


if __name__ == "__main__":
    main()
