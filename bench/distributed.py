"""Every accelerate config in launchers/accelerate/ with both training scripts, LoRA and full UNet, run end to end
through `accelerate launch` on full-size random-weight SD1.5 (and SDXL for the full-UNet DPO recipe), one process
per config: FSDP and DeepSpeed with one process still wrap, shard (over one rank), save and load as they do on many.

For each (config, script, LoRA/full): a 3-step run with a checkpoint at step 2, then a resumed run from that
checkpoint to step 3. The table gives ok or the error's last line, s/step (median of steps 2-3), peak GiB
(torch.cuda.max_memory_allocated of the process), the first loss beside the one-process (single_gpu.yaml) run's,
and whether the resumed step 3 equals the uninterrupted one. Results go to OUT/distributed.md and .json, rewritten
after every run, so a call cut short keeps what it measured.

    python3 bench/distributed.py --out $OUT --assets .bench_assets --scripts draftp        # SD1.5 DRaFT+ (~8 min)
    python3 bench/distributed.py --out $OUT --assets .bench_assets --scripts dpo           # SD1.5 DPO (~8 min)
    python3 bench/distributed.py --out $OUT --assets .bench_assets --sdxl_memory           # SDXL full-UNet DPO recipe
    python3 bench/distributed.py --out $OUT --assets .bench_assets --sdxl_memory --sdxl_optimizer adamw --configs fsdp
    python3 bench/distributed.py --out $OUT --assets .bench_assets --sdxl --scripts dpo draftp --modes lora --configs ddp
    python3 bench/distributed.py --assets .bench_assets --write_assets                     # here: tokenizer, processor
    python3 bench/distributed.py --assets .bench_assets --out ALL --merge OUT1 OUT2 ...     # several calls' rows, one table

The GPU machine has no hub and no open-clip-torch: `--write_assets` (run where the project is installed) writes the
CLIP tokenizer and the PickScore processor files that the random-weight models are saved with there.
The compiled sampler is off in every run (it costs ~100 s of compilation per process and FSDP cannot use it), so
s/step is the eager step of each strategy.
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIGS = ["single_gpu", "ddp", "fsdp", "deepspeed_zero2"]

SDXL_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu")
SDXL_TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


# --------------------------------------------------------------------------- the models and data (on the GPU machine)
def write_assets(assets):
    """Here, where open-clip-torch is installed: the real CLIP tokenizer and a PickScore-style processor."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from utils.toy.tiny import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    tokenizer.save_pretrained(os.path.join(assets, "tokenizer"))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224),
                              tokenizer=tokenizer)
    processor.save_pretrained(os.path.join(assets, "processor"))


def build_models(assets, models, sdxl):
    """Random-weight SD1.5 (and SDXL) pipelines and a PickScore-size CLIP scorer, saved as the hub would hold them."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import (AutoTokenizer, CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTextModel,
                              CLIPTextModelWithProjection)

    from bench import DDIM, PICKSCORE, SD15_TEXT, SD15_UNET, SD_VAE, SDXL_UNET  # bench/bench.py (this folder is on sys.path)

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(assets, "tokenizer"))
    common = dict(vae=AutoencoderKL(**SD_VAE), tokenizer=tokenizer, scheduler=DDIMScheduler(**DDIM))
    with torch.device("cuda"):  # random init of ~1-3 B parameters is minutes on the CPU
        if not os.path.isdir(os.path.join(models, "sd15")):
            StableDiffusionPipeline(unet=UNet2DConditionModel(**SD15_UNET), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
                                    safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                    **common).save_pretrained(os.path.join(models, "sd15"))
        if not os.path.isdir(os.path.join(models, "pickscore")):
            CLIPModel(CLIPConfig(**PICKSCORE)).save_pretrained(os.path.join(models, "pickscore"))
            CLIPProcessor.from_pretrained(os.path.join(assets, "processor")).save_pretrained(os.path.join(models, "pickscore"))
        if sdxl and not os.path.isdir(os.path.join(models, "sdxl")):
            StableDiffusionXLPipeline(
                unet=UNet2DConditionModel(**SDXL_UNET), text_encoder=CLIPTextModel(CLIPTextConfig(**SDXL_TEXT)),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)), tokenizer_2=tokenizer,
                **common).save_pretrained(os.path.join(models, "sdxl"))


def build_pairs(folder, size, num_pairs=64, layout="datasets"):
    """`num_pairs` synthetic preference pairs of `size` px (no ties) in `folder`, written once: a datasets folder, or
    with layout "parquet" a Pick-a-Pic-layout parquet file (what diffusers' DPO example reads)."""
    from utils.toy.synthetic import synthetic_preference_rows, write_preference_set

    if not os.path.isdir(folder):
        write_preference_set(synthetic_preference_rows(num_pairs, seed=0, sizes=((size, size),)), folder, layout)
    return folder


# --------------------------------------------------------------------------- one run
def script_flags(script, lora, models, data, sdxl=False, sdxl_optimizer="adafactor"):
    model = os.path.join(models, "sdxl" if sdxl else "sd15")
    common = ["--pretrained_model_name_or_path", model, "--mixed_precision", "bf16", "--report_to", "none", "--seed", "0",
              "--validation_prompts", "a photo of a cat", "--num_validation_images", "1", "--validation_steps", "1000",
              "--gradient_checkpointing", *(["--use_lora", "--lora_rank", "8"] if lora else ["--no-use_lora"])]
    if script == "draftp":
        return ["train_draftp.py", *common, "--reward_model", "pickscore", "--reward_model_paths",
                f"pickscore={os.path.join(models, 'pickscore')}", "--prompts", "animals", "--num_inference_steps", "10",
                "--resolution", "1024" if sdxl else "512", "--train_batch_size", "1" if sdxl else "2",
                "--kl_coeff", "0.1", "--compile_sampler", "off", "--learning_rate", "1e-4" if lora else "1e-6"]
    return ["train_dpo.py", *common, "--dataset_name", data, "--resolution", "1024" if sdxl else "512",
            "--train_batch_size", "1" if sdxl else "2", "--num_inference_steps", "5", "--lr_warmup_steps", "0",
            "--learning_rate", "1e-5" if lora else "1e-7",
            *(["--use_adafactor"] if sdxl and sdxl_optimizer == "adafactor" else [])]


def launch(config, flags, output_dir, max_steps, resume, log_path, timeout=240, checkpointing_steps=2):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "launchers", "accelerate", f"{config}.yaml"), "--num_processes", "1",
           "--main_process_port", str(29500 + zlib.crc32(output_dir.encode()) % 1000), *flags,
           "--output_dir", output_dir, "--max_train_steps", str(max_steps), "--checkpointing_steps", str(checkpointing_steps),
           *(["--resume_from_checkpoint", "latest"] if resume else [])]
    return run_logged(cmd, log_path, timeout)


def run_logged(cmd, log_path, timeout, cwd=ROOT, env=None):
    """Run `cmd` in a process group of its own with its output in log_path. The group is killed at the end, and at
    `timeout`: accelerate launch's training process or a peer's data-loader workers must not hold the GPU or the CPU
    through the next run. Returns (exit code, 124 on timeout; wall seconds)."""
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            code = 124
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        if code == 124:
            log.write(f"\ntimed out after {timeout} s\n")
    return code, time.time() - started


ERROR_LINE = re.compile(r"^(error:|[\w.]*(Error|Exception)\b)")  # "error: ..." (UsageError) or "x.YError: ..."


# what the launchers raise after the script's own exception (torchelastic's summary ends in "====" lines)
LAUNCHER_ERRORS = ("torch.distributed.elastic", "ChildFailedError", "subprocess.CalledProcessError")


def last_error_line(log_path):
    """The script's own exception (or `error:` line), not the launchers' wrappers printed after it."""
    with open(log_path) as f:
        lines = [line.strip() for line in f if line.strip()]
    for line in reversed(lines):
        if ERROR_LINE.match(line) and not line.startswith(LAUNCHER_ERRORS):
            return line[:200]
    return (lines[-1] if lines else "no output")[:200]


def read_metrics(output_dir):
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def measure(config, script, lora, flags, work, logs, resume_check=True, max_steps=3, checkpointing_steps=2, model="sd15"):
    name = f"{config}-{script}-{model}-{'lora' if lora else 'full'}"  # runs of two calls at once must not share a folder
    out = os.path.join(work, name)
    shutil.rmtree(out, ignore_errors=True)
    code, seconds = launch(config, flags, out, max_steps, False, os.path.join(logs, name + ".log"),
                           checkpointing_steps=checkpointing_steps)
    row = dict(config=config, script=script, mode="LoRA" if lora else "full", wall_s=round(seconds, 1))
    metrics = read_metrics(out)
    if code != 0:
        return {**row, "status": last_error_line(os.path.join(logs, name + ".log"))}
    row.update(status="ok", first_loss=metrics[0]["loss"], peak_gib=max(m.get("peak_mem_gib", 0) for m in metrics),
               s_per_step=round(statistics.median(m["step_seconds"] for m in metrics[1:]), 3))
    weights = "pytorch_lora_weights.safetensors" if lora else "unet/diffusion_pytorch_model.safetensors"
    # a full SDXL UNet in float32 (10 GB) is written in shards beside an index file
    row["weights_saved"] = any(os.path.isfile(os.path.join(out, w)) for w in (weights, weights + ".index.json"))
    if resume_check:
        uninterrupted = metrics[-1]
        code, _ = launch(config, flags, out, max_steps, True, os.path.join(logs, name + "-resume.log"))
        resumed = read_metrics(out)
        if code == 0 and len(resumed) == max_steps:  # 0: bit-exact; GPU bf16 kernels may differ in the last bits
            row["resume_rel_diff"] = max(relative_difference(resumed[-1][k], uninterrupted[k]) for k in ("loss", "grad_norm"))
        if code != 0:
            row["status"] = "resume failed: " + last_error_line(os.path.join(logs, name + "-resume.log"))
    shutil.rmtree(out, ignore_errors=True)  # full-UNet checkpoints are GBs
    return row


def relative_difference(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def write_table(rows, out):
    with open(os.path.join(out, "distributed.json"), "w") as f:
        json.dump(rows, f, indent=1)
    reference = {(r["script"], r["mode"]): r.get("first_loss") for r in rows if r["config"] == "single_gpu"}
    lines = ["| config | script | UNet | result | s/step | peak GiB | first loss (single GPU; rel. diff) | "
             "resume: step 3 rel. diff |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = reference.get((r["script"], r["mode"]))
        first = "-"
        if "first_loss" in r and ref is not None:
            first = f"{r['first_loss']:.6g} ({ref:.6g}; {relative_difference(r['first_loss'], ref):.1e})"
        resume = r.get("resume_rel_diff", "-")
        resume = "exact" if resume == 0 else resume if resume == "-" else f"{resume:.1e}"
        lines.append(f"| {r['config']} | {r['script']} | {r['mode']} | {r['status']} | {r.get('s_per_step', '-')} | "
                     f"{r.get('peak_gib', '-')} | {first} | {resume} |")
    write_markdown(out, "distributed.md", lines)


def write_markdown(out: str, name: str, lines):
    """A markdown table into OUT/name (rewritten after every run: a call cut short keeps it) and to stdout."""
    with open(os.path.join(out, name), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--assets", required=True, help="folder of --write_assets (tokenizer, processor)")
    parser.add_argument("--models", default="/tmp/bench-models", help="where the random-weight models are saved")
    parser.add_argument("--write_assets", action="store_true")
    parser.add_argument("--scripts", nargs="*", default=[], choices=["draftp", "dpo"])
    parser.add_argument("--modes", nargs="*", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--configs", nargs="*", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--sdxl_memory", action="store_true", help="full-UNet SDXL DPO (Adafactor, checkpointing), 3 steps, no checkpoint")
    parser.add_argument("--sdxl_optimizer", default="adafactor", choices=["adafactor", "adamw"],
                        help="the --sdxl_memory runs' optimizer (the paper's recipe: Adafactor; FSDP2 refuses it)")
    parser.add_argument("--sdxl", action="store_true",
                        help="the --scripts x --modes x --configs rows on random-weight SDXL at 1024 px, batch 1 "
                             "(DPO with AdamW), instead of SD1.5")
    parser.add_argument("--work", default="/tmp/bench-runs", help="where the runs write (full-UNet checkpoints: ~15 GB each)")
    parser.add_argument("--merge", nargs="*", default=[], help="--out folders of earlier calls: write their rows as one table")
    parser.add_argument("--no_resume", action="store_true", help="skip the resumed run (to fit more rows in one call)")
    args = parser.parse_args()
    if args.write_assets:
        return write_assets(args.assets)
    os.makedirs(args.out, exist_ok=True)
    if args.merge:  # the tables of several calls or lanes (each an --out folder) as one
        rows = []
        for folder in args.merge:
            with open(os.path.join(folder, "distributed.json")) as f:
                rows += json.load(f)
        return write_table(rows, args.out)
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    build_models(args.assets, args.models, args.sdxl_memory or args.sdxl)
    rows = []
    size = 1024 if args.sdxl else 512
    for script in args.scripts:
        data = build_pairs(f"/tmp/bench-data/pairs{size}", size) if script == "dpo" else None
        for mode in args.modes:
            for config in args.configs:
                flags = script_flags(script, mode == "lora", args.models, data, sdxl=args.sdxl, sdxl_optimizer="adamw")
                row = measure(config, script, mode == "lora", flags, args.work, logs, resume_check=not args.no_resume,
                              model="sdxl" if args.sdxl else "sd15")
                rows.append({**row, "script": script + (" SDXL" if args.sdxl else "")})
                write_table(rows, args.out)
    if args.sdxl_memory:
        data = build_pairs("/tmp/bench-data/pairs1024", 1024)
        for config in args.configs:
            flags = script_flags("dpo", False, args.models, data, sdxl=True, sdxl_optimizer=args.sdxl_optimizer)
            # 3 steps, no checkpoint: the peak is the memory of a training step, not of a 20 GB save
            rows.append({**measure(config, "dpo", False, flags, args.work, logs, resume_check=False, checkpointing_steps=1000,
                                  model="sdxl-" + args.sdxl_optimizer),
                         "script": f"dpo SDXL ({args.sdxl_optimizer})"})
            write_table(rows, args.out)


if __name__ == "__main__":
    main()
