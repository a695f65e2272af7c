"""Flow-matching models on one GPU (issue 18, item 5): DRaFT+ K = 1 LoRA steps, Diffusion-DPO LoRA pairs and online
RL (Flow-GRPO, DiffusionNFT) images per second and peak memory on SD3.5-Medium-size and FLUX.1-dev-size random-weight
pipelines, run end to end through the real scripts (`accelerate launch train_draftp.py / train_dpo.py /
train_online.py`), as bench/distributed.py runs SD1.5.

The architectures are the hub configs' (transformer, CLIP-L, CLIP-G, T5-XXL encoder, the 16-channel VAE), built with
random weights on the GPU and saved as the hub holds them, so that loading, memory and compute are those of the real
models. FLUX.1-dev (12 B parameters) runs with gradient checkpointing; the question the issue asks is whether it fits
one H200.

    python3 bench/flow.py --out $OUT --assets .bench_assets --family sd35     # SD3.5 Medium: build + 2 runs
    python3 bench/flow.py --out $OUT --assets .bench_assets --family flux     # FLUX.1-dev: build + 2 runs
    python3 bench/flow.py --out $OUT --assets .bench_assets --family sd35 --scripts flow_grpo nft   # online RL only
    python3 bench/flow.py --out /tmp/flow-smoke --smoke --family sd35         # here: tiny sizes on the CPU, 2 steps

--scripts picks the runs (default: draftp dpo); flow_grpo and nft run train_online.py with a weight-free reward
(brightness), one prompt's group of 8 images per step (group_size = train_batch_size = 8, no accumulation), so their
numbers are the model's sampling and training cost without a scorer's. The PickScore-size scorer (and the SD1.5
pipeline bench/distributed.py builds beside it) is built only when a draftp run is asked for.

Writes OUT/flow.md and OUT/flow.json after every run (a call cut short keeps what it measured): exit status, wall
seconds, seconds from the launch to the first step's metrics row (start-up plus the first step), s/step (median of
the steps after the first), images or pairs per second, peak GiB (torch.cuda.max_memory_allocated), first loss, the
first metrics row, and on a failure the log's last lines. OUT/logs/ holds each run's log and metrics.jsonl.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distributed import build_pairs, last_error_line, launch, read_metrics, write_table  # noqa: E402

# --------------------------------------------------------------------------- architectures (the hub configs)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
VAE_16 = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                   qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SCALING = {"sd35": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}  # the VAEs' scaling_factor, shift_factor
# each run's flags beyond the shared ones: the SD3.5 launcher's sampling (launchers/draftp_sd35.sh), FluxPipeline's
# defaults (28 steps, guidance 3.5); DPO at 1024 px (the size both families were trained at), one pair per step.
# Online RL samples as Flow-GRPO's SD3.5-M recipe (10 steps, guidance 4.5; launchers/flow_grpo_sd35.sh) and NFT's
# (10 steps, guidance 1: no CFG; launchers/nft_sd35.sh), both at the family's resolution.
RUNS = {
    "sd35": dict(resolution=512, steps=10, guidance=4.5, dpo_resolution=1024, online_steps=10),
    "flux": dict(resolution=512, steps=28, guidance=3.5, dpo_resolution=1024, online_steps=10),
}
SCRIPTS = ["draftp", "dpo", "flow_grpo", "nft"]
ONLINE = {"flow_grpo": dict(guidance=None), "nft": dict(guidance=1.0)}  # None: the family's RUNS guidance
GROUP_SIZE = 8  # images per prompt; train_batch_size is the same, so one prompt's group per step


def smoke_sizes():
    """Tiny stand-ins of the same classes (CPU): the code path, not the numbers."""
    small_clip = dict(CLIP_L, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      projection_dim=32)
    return dict(
        clip_l=small_clip, clip_g=small_clip,
        t5=dict(T5_XXL, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4),
        vae=dict(VAE_16, block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32),
        sd35=dict(SD35_MEDIUM, sample_size=32, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                  joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32,
                  dual_attention_layers=(0,)),
        flux=dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
    )


def build_pipeline(family, folder, assets, smoke):
    """A random-weight pipeline of the family, saved to `folder` through save_pretrained (skipped if it exists)."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    from utils.toy.tiny import build_clip_tokenizer, build_t5_tokenizer

    sizes = smoke_sizes() if smoke else dict(clip_l=CLIP_L, clip_g=CLIP_G, t5=T5_XXL, vae=VAE_16, sd35=SD35_MEDIUM,
                                             flux=FLUX_DEV)
    # the real CLIP BPE tokenizer where --write_assets saved it; T5's length is the pipelines' max_sequence_length
    # (256 / 512 tokens, padded), so a character-level T5 tokenizer costs the same compute as the real SentencePiece
    clip_tok = AutoTokenizer.from_pretrained(os.path.join(assets, "tokenizer")) if assets else build_clip_tokenizer()
    t5_tok = build_t5_tokenizer()
    scaling, shift = SCALING[family]
    torch.manual_seed(0)
    device = "cpu" if smoke else "cuda"  # random init of 8-17 B parameters is many minutes on the CPU
    with torch.device(device):
        vae = AutoencoderKL(**sizes["vae"], scaling_factor=scaling, shift_factor=shift)
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**sizes["clip_l"]))
        t5 = T5EncoderModel(T5Config(**sizes["t5"])).to(torch.bfloat16)  # T5-XXL is 19 GB in fp32
        if family == "sd35":
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
            pipe = StableDiffusion3Pipeline(
                transformer=SD3Transformer2DModel(**sizes["sd35"]), scheduler=scheduler, vae=vae,
                text_encoder=clip_l, tokenizer=clip_tok,
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**sizes["clip_g"])), tokenizer_2=clip_tok,
                text_encoder_3=t5, tokenizer_3=t5_tok)
        else:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                        base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                        max_image_seq_len=4096)
            transformer = FluxTransformer2DModel(**sizes["flux"]).to(torch.bfloat16)  # 12 B: 48 GB in fp32
            pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                text_encoder=CLIPTextModel(CLIPTextConfig(**sizes["clip_l"])), tokenizer=clip_tok,
                                text_encoder_2=t5, tokenizer_2=t5_tok)
        pipe.save_pretrained(folder)
    return folder


def build_scorer(folder, assets, smoke):
    """A PickScore-size CLIP scorer (bench/distributed.py's on the GPU; the tiny toyclip-free CLIP in smoke mode)."""
    if smoke:
        return None  # the smoke runs score with a weight-free reward
    from distributed import build_models

    build_models(assets, folder, sdxl=False)
    return os.path.join(folder, "pickscore")


def run_flags(family, script, model, scorer, data, smoke):
    run = RUNS[family]
    common = ["--pretrained_model_name_or_path", model, "--report_to", "none", "--seed", "0", "--use_lora",
              "--lora_rank", "32" if not smoke else "4", "--gradient_checkpointing", "--validation_steps", "1000",
              "--mixed_precision", "no" if smoke else "bf16", "--overwrite_output_dir"]
    if script in ONLINE:
        guidance = ONLINE[script]["guidance"] or run["guidance"]
        group = "2" if smoke else str(GROUP_SIZE)
        return ["train_online.py", *common, "--method", script, "--reward_model", "brightness", "--prompts", "animals",
                "--resolution", str(64 if smoke else run["resolution"]), "--num_inference_steps",
                str(2 if smoke else run["online_steps"]), "--guidance_scale", str(guidance), "--group_size", group,
                "--train_batch_size", group, "--gradient_accumulation_steps", "1", "--learning_rate", "3e-4",
                "--num_validation_images", "1"]
    if script == "draftp":
        reward = (["--reward_model", "pickscore", "--reward_model_paths", f"pickscore={scorer}"] if scorer
                  else ["--reward_model", "saturation"])
        return ["train_draftp.py", *common, *reward, "--prompts", "animals", "--train_batch_size", "1" if not smoke else "2",
                "--resolution", str(64 if smoke else run["resolution"]), "--num_inference_steps",
                str(2 if smoke else run["steps"]), "--guidance_scale", str(run["guidance"]), "--kl_coeff", "0.1",
                "--truncation_steps", "1", "--learning_rate", "1e-4", "--compile_sampler", "off"]
    return ["train_dpo.py", *common, "--dataset_name", data, "--resolution", str(64 if smoke else run["dpo_resolution"]),
            "--train_batch_size", "1", "--learning_rate", "1e-5", "--lr_warmup_steps", "0",
            "--num_inference_steps", "2" if smoke else "10"]


def first_row_watcher(metrics_path, started):
    """A thread that notes the seconds from `started` until metrics.jsonl holds its first row (polled every 0.2 s);
    returns (stop event, result dict with "first_step_s" once seen)."""
    stop, result = threading.Event(), {}

    def watch():
        while not stop.is_set():
            if os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0:
                result["first_step_s"] = round(time.time() - started, 1)
                return
            stop.wait(0.2)

    threading.Thread(target=watch, daemon=True).start()
    return stop, result


def log_tail(log_path, lines=40):
    with open(log_path) as f:
        return f.read().splitlines()[-lines:]


def measure(family, script, flags, work, logs, steps, timeout=540):
    name = f"{family}-{script}"
    out = os.path.join(work, name)
    log = os.path.join(logs, name + ".log")
    shutil.rmtree(out, ignore_errors=True)  # a first row left by an earlier call would end the watcher at once
    stop, seen = first_row_watcher(os.path.join(out, "metrics.jsonl"), time.time())
    code, wall = launch("single_gpu", flags, out, steps, False, log, timeout=timeout, checkpointing_steps=1000)
    stop.set()
    metrics = read_metrics(out)
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        shutil.copy(os.path.join(out, "metrics.jsonl"), os.path.join(logs, name + ".metrics.jsonl"))
    row = dict(family=family, script=script, exit_code=code, wall_s=round(wall, 1), steps_logged=len(metrics),
               first_step_s=seen.get("first_step_s"))
    if code != 0 or not metrics:
        return {**row, "status": last_error_line(log), "log_tail": log_tail(log)}
    seconds = statistics.median(m["step_seconds"] for m in metrics[1:] or metrics)
    per_step = 1 if script == "dpo" else int(flags[flags.index("--train_batch_size") + 1])
    return {**row, "status": "ok", "s_per_step": round(seconds, 3), "per_s": round(per_step / seconds, 3),
            "unit": "pairs/s" if script == "dpo" else "images/s", "first_loss": metrics[0]["loss"],
            "peak_gib": max(m.get("peak_mem_gib", 0) for m in metrics), "first_metrics": metrics[0]}


def write_table(rows, out):
    with open(os.path.join(out, "flow.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["| model | script | result | exit | s/step | throughput | peak GiB | first step s | wall s | first loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['script']} | {r['status']} | {r.get('exit_code', '-')} | {r.get('s_per_step', '-')} | "
              f"{r.get('per_s', '-')} {r.get('unit', '')} | {r.get('peak_gib', '-')} | {r.get('first_step_s', '-')} | "
              f"{r.get('wall_s', '-')} | {r.get('first_loss', '-')} |"
              for r in rows]
    write_table(out, "flow.md", lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--assets", default=None, help="folder of `bench/distributed.py --write_assets` (GPU runs)")
    parser.add_argument("--models", default="/tmp/bench-models")
    parser.add_argument("--family", nargs="*", default=["sd35", "flux"], choices=list(RUNS))
    parser.add_argument("--scripts", nargs="*", default=["draftp", "dpo"], choices=SCRIPTS,
                        help="the runs, in this order: draftp (train_draftp.py), dpo (train_dpo.py), flow_grpo and "
                             "nft (train_online.py --method flow_grpo / nft)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=540, help="seconds each run may take before it is stopped")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, 2 steps: the code path runs")
    args = parser.parse_args()
    if not args.smoke and not args.assets:
        parser.error("--assets is required on the GPU (run `bench/distributed.py --write_assets` here first)")
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    work = os.path.join(args.out, "runs") if args.smoke else "/tmp/bench-runs"
    scorer = None
    rows = []
    for family in args.family:
        started = time.time()
        model = build_pipeline(family, os.path.join(args.models, family + ("-smoke" if args.smoke else "")),
                               args.assets, args.smoke)
        print(f"{family} pipeline ready in {time.time() - started:.1f} s", flush=True)
        for script in args.scripts:
            if script == "draftp" and scorer is None and not args.smoke:  # only DRaFT+ scores with a model
                started = time.time()
                scorer = build_scorer(args.models, args.assets, args.smoke)
                print(f"scorer ready in {time.time() - started:.1f} s", flush=True)
            size = 64 if args.smoke else RUNS[family]["dpo_resolution"]
            data = build_pairs(f"/tmp/bench-data/pairs{size}", size) if script == "dpo" else None
            flags = run_flags(family, script, model, scorer, data, args.smoke)
            rows.append(measure(family, script, flags, work, logs, 2 if args.smoke else args.steps, args.timeout))
            write_table(rows, args.out)


if __name__ == "__main__":
    main()
