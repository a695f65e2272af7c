"""Flow-matching models on one GPU (issue 18, item 5): DRaFT+ K = 1 LoRA steps and Diffusion-DPO LoRA pairs per second
and peak memory on SD3.5-Medium-size and FLUX.1-dev-size random-weight pipelines, run end to end through the real
scripts (`accelerate launch train_draftp.py / train_dpo.py`), as bench/distributed.py runs SD1.5.

The architectures are the hub configs' (transformer, CLIP-L, CLIP-G, T5-XXL encoder, the 16-channel VAE), built with
random weights on the GPU and saved as the hub holds them, so that loading, memory and compute are those of the real
models. FLUX.1-dev (12 B parameters) runs with gradient checkpointing; the question the issue asks is whether it fits
one H200.

    python3 bench/flow.py --out $OUT --assets .bench_assets --family sd35     # SD3.5 Medium: build + 2 runs
    python3 bench/flow.py --out $OUT --assets .bench_assets --family flux     # FLUX.1-dev: build + 2 runs
    python3 bench/flow.py --out /tmp/flow-smoke --smoke --family sd35         # here: tiny sizes on the CPU, 2 steps

Writes OUT/flow.md and OUT/flow.json after every run (a call cut short keeps what it measured): s/step (median of
the steps after the first), images or pairs per second, peak GiB (torch.cuda.max_memory_allocated), first loss.
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distributed import build_pairs, last_error_line, launch, read_metrics  # noqa: E402

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
# defaults (28 steps, guidance 3.5); DPO at 1024 px (the size both families were trained at), one pair per step
RUNS = {
    "sd35": dict(resolution=512, steps=10, guidance=4.5, dpo_resolution=1024),
    "flux": dict(resolution=512, steps=28, guidance=3.5, dpo_resolution=1024),
}


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


def measure(family, script, flags, work, logs, steps):
    name = f"{family}-{script}"
    out = os.path.join(work, name)
    log = os.path.join(logs, name + ".log")
    code, wall = launch("single_gpu", flags, out, steps, False, log, timeout=540, checkpointing_steps=1000)
    metrics = read_metrics(out)
    row = dict(family=family, script=script, wall_s=round(wall, 1))
    if code != 0 or not metrics:
        return {**row, "status": last_error_line(log)}
    seconds = statistics.median(m["step_seconds"] for m in metrics[1:] or metrics)
    per_step = 1 if script == "dpo" else int(flags[flags.index("--train_batch_size") + 1])
    return {**row, "status": "ok", "s_per_step": round(seconds, 3), "per_s": round(per_step / seconds, 3),
            "unit": "pairs/s" if script == "dpo" else "images/s", "first_loss": metrics[0]["loss"],
            "peak_gib": max(m.get("peak_mem_gib", 0) for m in metrics)}


def write_table(rows, out):
    with open(os.path.join(out, "flow.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["| model | script | result | s/step | throughput | peak GiB | first loss |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['script']} | {r['status']} | {r.get('s_per_step', '-')} | "
              f"{r.get('per_s', '-')} {r.get('unit', '')} | {r.get('peak_gib', '-')} | {r.get('first_loss', '-')} |"
              for r in rows]
    with open(os.path.join(out, "flow.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--assets", default=None, help="folder of `bench/distributed.py --write_assets` (GPU runs)")
    parser.add_argument("--models", default="/tmp/bench-models")
    parser.add_argument("--family", nargs="*", default=["sd35", "flux"], choices=list(RUNS))
    parser.add_argument("--scripts", nargs="*", default=["draftp", "dpo"], choices=["draftp", "dpo"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, 2 steps: the code path runs")
    args = parser.parse_args()
    if not args.smoke and not args.assets:
        parser.error("--assets is required on the GPU (run `bench/distributed.py --write_assets` here first)")
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    work = os.path.join(args.out, "runs") if args.smoke else "/tmp/bench-runs"
    scorer = None if args.smoke else build_scorer(args.models, args.assets, args.smoke)
    rows = []
    for family in args.family:
        model = build_pipeline(family, os.path.join(args.models, family + ("-smoke" if args.smoke else "")),
                               args.assets, args.smoke)
        for script in args.scripts:
            size = 64 if args.smoke else RUNS[family]["dpo_resolution"]
            data = build_pairs(f"/tmp/bench-data/pairs{size}", size) if script == "dpo" else None
            flags = run_flags(family, script, model, scorer, data, args.smoke)
            rows.append(measure(family, script, flags, work, logs, 2 if args.smoke else args.steps))
            write_table(rows, args.out)


if __name__ == "__main__":
    main()
