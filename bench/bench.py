"""Speed and memory of the DRaFT+, DPO and SFT steps on full-size SD1.5 and SDXL with random weights (bf16, SDPA).

Every number of the project's code path stands beside a plain diffusers-style loop measured in the same run.
The project's path is composed from the functions train_draftp.py / train_dpo.py import and call
(utils.sampling.sample_latents, decode_latents, train_draftp.draftp_loss, utils.speed.apply_speed_options,
train_dpo.dpo_loss / sft_loss, utils.denoising.noise_pairs / per_sample_error), with prompts replaced by random embeddings.
Results go to OUT/bench.json and OUT/bench.md, rewritten after every measurement, so a run cut short still
leaves what it measured.

    python3 bench/bench.py --out $OUT --sections sd15 --compile_mode default   # SD1.5: each option in turn (~10 min)
    python3 bench/bench.py --out $OUT --sections sd15_graphs         # SD1.5 with the defaults, batch 1/4/8, K=50 (~9 min)
    python3 bench/bench.py --out $OUT --sections dpo sdxl            # DPO / SFT, SDXL DRaFT+ (~8 min)
    python3 bench/bench.py --out $OUT --sections sd15_tradeoffs      # batch 4 without UNet ckpt; max-autotune (> 10 min)
    python3 bench/bench.py --out $OUT --sections sd15_kernels        # profile by kernel kind; attention / inductor variants
    python3 bench/bench.py --out $OUT --sections vae_layout          # the VAE: channels-last vs NCHW, compiled encoder
    python3 bench/bench.py --out $OUT --sections dpo_reference_graphs  # DPO's reference pass replayed from CUDA graphs
    python3 bench/bench.py --out $OUT --sections sd15_fp8            # --fp8_sampler: FP8 vs bf16 sampler, image difference
    python3 bench/bench.py --smoke --out /tmp/bench                  # tiny configs on the CPU: the script runs

On one H100 each of the first three fits one 10-minute call; BENCHMARKS.md has the results of all four.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_dpo  # noqa: E402
import train_draftp  # noqa: E402
from utils.denoising import noise_pairs, per_sample_error  # noqa: E402
from utils.models import (TextConditioning, adapters_disabled, add_lora, reference_model,  # noqa: E402
                          skip_lora_input_casts)
from utils.sampling import cfg_conditioning, decode_latents, sample_latents  # noqa: E402
from utils.fp8 import float8_sampling_unet  # noqa: E402
from utils.speed import add_speed_args, apply_speed_options, sampling_model  # noqa: E402

STEPS, GUIDANCE, LORA_RANK, KL_COEFF, BETA_DPO = 50, 7.5, 8, 0.1, 5000.0

# --------------------------------------------------------------------------- architectures (configs of the hub models)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=4, sample_size=512)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu")
# PickScore = CLIP ViT-H-14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K fine-tuned)
PICKSCORE = dict(projection_dim=1024,
                 text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  hidden_act="gelu"),
                 vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                                    patch_size=14, image_size=224, hidden_act="gelu"))
DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
            steps_offset=1)
SMOKE = dict(
    unet=dict(sample_size=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
              layers_per_block=1, norm_num_groups=8),
    xl_unet=dict(sample_size=8, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                 attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True, layers_per_block=1,
                 norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8),
    vae=dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    reward=dict(projection_dim=16, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=2),
                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   patch_size=14, image_size=224)),
)


# --------------------------------------------------------------------------- results
class Results:
    """bench.json + bench.md under --out, rewritten after every measurement."""

    def __init__(self, out, meta, merge=None):
        self.out, self.data = out, {"meta": meta, "rows": {}, "checks": {}, "flops": {}}
        os.makedirs(out, exist_ok=True)
        path = merge or os.path.join(out, "bench.json")
        if os.path.exists(path):  # a second call adds to the first's results (same GPU kind: check meta.device)
            with open(path) as f:
                old = json.load(f)
            for key in ("rows", "checks", "flops"):
                self.data[key].update(old.get(key, {}))
            self.data["meta"]["earlier_calls"] = old["meta"].get("earlier_calls", []) + [old["meta"]]

    def add(self, key, **row):
        self.data["rows"][key] = row
        print(f"{key:55s} " + "  ".join(f"{k}={v}" for k, v in row.items() if k != "times_s"), flush=True)
        self.save()

    def save(self):
        with open(os.path.join(self.out, "bench.json"), "w") as f:
            json.dump(self.data, f, indent=1)
        with open(os.path.join(self.out, "bench.md"), "w") as f:
            f.write(markdown(self.data))


def markdown(data):
    lines = ["| measurement | per s | s / step | peak GiB | TFLOP/s | % of bf16 peak |", "|---|---|---|---|---|---|"]
    for key, r in data["rows"].items():
        rate = f"{r['rate']:.3f} {r['unit']}" if "rate" in r else ""
        lines.append(f"| {key} | {rate} | {r.get('seconds', '')} | {r.get('peak_gib', '')} | {r.get('tflops', '')} | "
                     f"{r.get('pct_peak', '')} |")
    lines += ["", "checks: " + json.dumps(data["checks"], indent=1), "", "flops: " + json.dumps(data["flops"], indent=1)]
    return "\n".join(lines) + "\n"


def measure(fn, device, warmup=1, reps=3):
    """Median seconds of `fn()` over `reps` runs after `warmup` runs, and peak memory of the timed runs (GiB)."""
    started = time.time()
    for _ in range(warmup):
        fn()
    first = time.time() - started
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.time()
            fn()
            times.append(time.time() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return statistics.median(times), peak, times, first


def count_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# --------------------------------------------------------------------------- models
class FakeTokenizer:
    """Random token ids in place of the CLIP tokenizer (no vocabulary files on the GPU machine)."""

    def __init__(self, vocab_size, generator_device):
        self.vocab_size, self.device = vocab_size, generator_device

    def __call__(self, prompts, **kwargs):
        ids = torch.randint(0, self.vocab_size, (len(prompts), 77), generator=torch.Generator().manual_seed(len(prompts)))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def build_scorer(cfg, device, dtype):
    """The project's PickScore scorer around a random-weight CLIPModel of PickScore's size."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from utils.rewards import PickScore

    with torch.device(device):
        model = CLIPModel(CLIPConfig(**cfg))
    processor = types.SimpleNamespace(image_processor=CLIPImageProcessor(), tokenizer=FakeTokenizer(49408, device))
    return PickScore("pickscore", model, processor).to(device=device, dtype=dtype).freeze()


def randomize_lora(unet, seed=0):
    """LoRA B starts at zero (the adapter is the identity); give it small values so the adapter does work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=g))


class Setup:
    """One architecture on the device: UNet (+LoRA), VAE, scheduler, text conditioning, reward, optimizer."""

    def __init__(self, args, sdxl, resolution, with_reward=True):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        self.device, self.dtype, self.sdxl, self.resolution = args.device, args.dtype, sdxl, resolution
        unet_cfg = (SMOKE["xl_unet"] if sdxl else SMOKE["unet"]) if args.smoke else (SDXL_UNET if sdxl else SD15_UNET)
        vae_cfg = dict(SD_VAE, **SMOKE["vae"]) if args.smoke else SD_VAE
        torch.manual_seed(0)
        with torch.device(self.device):
            self.unet = UNet2DConditionModel(**unet_cfg)
            self.vae = AutoencoderKL(**vae_cfg, scaling_factor=0.13025 if sdxl else 0.18215)
        self.unet.to(self.dtype)
        self.vae.requires_grad_(False).eval().to(self.dtype)
        self.base_unet_state = None
        self.scheduler = DDIMScheduler(num_train_timesteps=1000, **DDIM)
        self.latent_hw = resolution // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        self.cross_dim = unet_cfg["cross_attention_dim"]
        if not sdxl:  # the real text encoder on random token ids: realistic embedding statistics
            with torch.device(self.device):
                text = CLIPTextModel(CLIPTextConfig(**(dict(SD15_TEXT, **SMOKE["text"]) if args.smoke else SD15_TEXT)))
            self.text_encoder = text.to(self.dtype).eval().requires_grad_(False)
        self.scorer = build_scorer(SMOKE["reward"] if args.smoke else PICKSCORE, self.device, self.dtype) if with_reward else None
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def add_lora(self):
        add_lora(self.unet, LORA_RANK, seed=0)
        self.unet.to(self.device, dtype=self.dtype)
        for p in self.unet.parameters():  # as train_draftp.py: adapters in fp32 under autocast
            if p.requires_grad:
                p.data = p.data.float()
        randomize_lora(self.unet)
        self.lora_params = [p for p in self.unet.parameters() if p.requires_grad]
        self.lora_start = [p.detach().clone() for p in self.lora_params]
        self.optimizer = torch.optim.AdamW(self.lora_params, lr=1e-5)

    def reset_lora(self):
        """Same adapter weights before each compared step: equal seeds must give equal images."""
        with torch.no_grad():
            for p, p0 in zip(self.lora_params, self.lora_start):
                p.copy_(p0)

    @torch.no_grad()
    def text(self, batch, seed=1) -> TextConditioning:
        g = torch.Generator().manual_seed(seed)
        if not self.sdxl:
            ids = torch.randint(0, self.text_encoder.config.vocab_size, (batch, 77), generator=g).to(self.device)
            return TextConditioning(self.text_encoder(ids)[0])
        embeds = torch.randn(batch, 77, self.cross_dim, generator=g).to(self.device, self.dtype)
        pooled_dim = self.unet.config.projection_class_embeddings_input_dim - 6 * self.unet.config.addition_time_embed_dim
        pooled = torch.randn(batch, pooled_dim, generator=g).to(self.device, self.dtype)
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, device=self.device, dtype=self.dtype)
        return TextConditioning(embeds, pooled, time_ids)

    def noise(self, batch, seed=2):
        return torch.randn(batch, 4, self.latent_hw, self.latent_hw, generator=torch.Generator().manual_seed(seed)).to(self.device)

    def reference(self, *a, **kw):
        with adapters_disabled(self.unet):
            return self.unet(*a, **kw)


# --------------------------------------------------------------------------- DRaFT+: the plain loop
def plain_draftp_step(S, batch, truncation_steps, train=True):
    """A plain diffusers-style loop (pipeline __call__ + DRaFT+ as in the papers' code): device timesteps,
    scale_model_input, DDIMScheduler.step, CFG, the reference by switching the adapters off, VAE decode,
    reward, backward. No checkpointing, no compile, NCHW. train=False: no-grad sampling of images only."""
    sched, unet = S.scheduler, S.unet
    text, uncond = S.text(batch), S.text(1, seed=3)
    embeds = torch.cat([uncond.embeds.expand(batch, -1, -1), text.embeds])
    extra = {}
    if S.sdxl:
        extra["added_cond_kwargs"] = {"text_embeds": torch.cat([uncond.pooled.expand(batch, -1), text.pooled]),
                                      "time_ids": torch.cat([uncond.time_ids.expand(batch, -1), text.time_ids])}
    sched.set_timesteps(STEPS, device=S.device)
    latents = S.noise(batch) * sched.init_noise_sigma
    kls = []
    with S.autocast, torch.set_grad_enabled(train):
        for i, t in enumerate(sched.timesteps):
            grad = train and i >= STEPS - truncation_steps
            with torch.set_grad_enabled(grad):
                model_input = sched.scale_model_input(torch.cat([latents] * 2), t)
                noise_pred = unet(model_input, t, encoder_hidden_states=embeds, **extra).sample
                uncond_pred, text_pred = noise_pred.chunk(2)
                noise_pred = uncond_pred + GUIDANCE * (text_pred - uncond_pred)
                if grad:
                    with torch.no_grad():
                        unet.disable_adapters()
                        ref = unet(model_input, t, encoder_hidden_states=embeds, **extra).sample
                        unet.enable_adapters()
                        ref_u, ref_c = ref.chunk(2)
                        ref = ref_u + GUIDANCE * (ref_c - ref_u)
                    kls.append((noise_pred.float() - ref.float()).pow(2).mean(dim=(1, 2, 3)))
                latents = sched.step(noise_pred, t, latents).prev_sample
        image = S.vae.decode(latents.to(S.dtype) / S.vae.config.scaling_factor).sample
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        if not train:
            return None, image
        reward = S.scorer(image, ["a prompt"] * batch)
        loss = -reward.mean() + KL_COEFF * torch.stack(kls).mean()
    loss.backward()
    S.optimizer.step()
    S.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), image.detach()


# --------------------------------------------------------------------------- DRaFT+: the project's path
def project_draftp_step(S, batch, truncation_steps, sampling_unet=None, train=True):
    """train_draftp.py's loop body for one micro-step (prompt encoding replaced by random embeddings)."""
    cond = cfg_conditioning(S.text(batch), S.text(1, seed=3))
    with S.autocast, torch.set_grad_enabled(train):
        sample = sample_latents(S.unet, S.scheduler, cond, S.noise(batch), STEPS, GUIDANCE,
                                truncation_steps if train else 0, 0.0, S.reference if train else None, None,
                                nograd_unet=sampling_unet)
        images = decode_latents(S.vae, sample.latents)
        if not train:
            return None, images
        reward, _ = S.scorer.parts(images, ["a prompt"] * batch)
        loss, _ = train_draftp.draftp_loss(reward.float(), sample.kl, 1.0, KL_COEFF)
    loss.backward()
    S.optimizer.step()
    S.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), images.detach()


def speed_options(args, **overrides):
    parser = argparse.ArgumentParser()
    add_speed_args(parser)
    opts = parser.parse_args([])
    opts.compile_sampler = "off" if args.smoke else args.compile_mode
    for k, v in overrides.items():
        setattr(opts, k, v)
    return opts


def set_plain(S):
    """Undo the speed options: NCHW, no checkpointing."""
    S.unet.to(memory_format=torch.contiguous_format)
    S.vae.to(memory_format=torch.contiguous_format)
    S.vae.disable_gradient_checkpointing()
    S.unet.disable_gradient_checkpointing()


def compare(R, key, a, b):
    """Loss and images of two runs from the same seed and weights."""
    (loss_a, img_a), (loss_b, img_b) = a, b
    R.data["checks"][key] = {
        "loss_a": None if loss_a is None else float(loss_a), "loss_b": None if loss_b is None else float(loss_b),
        "image_max_abs_diff": float((img_a - img_b).abs().max()), "image_mean_abs_diff": float((img_a - img_b).abs().mean()),
        "image_psnr_db": float(-10 * torch.log10(F.mse_loss(img_a.float(), img_b.float()).clamp_min(1e-12))),
    }
    print(key, R.data["checks"][key], flush=True)
    R.save()


def rate_row(R, key, seconds, peak, times, first, items, unit, flops=None, peak_tflops=None, **extra):
    """One result row: items per second, seconds per step, peak GiB, TFLOP/s and % of the measured bf16 peak."""
    row = dict(rate=round(items / seconds, 3), unit=unit, seconds=round(seconds, 3), peak_gib=round(peak, 2),
               first_call_s=round(first, 1), times_s=[round(t, 3) for t in times], **extra)
    if flops:
        row["tflops"] = round(flops / seconds / 1e12, 1)
        if peak_tflops:
            row["pct_peak"] = round(100 * flops / seconds / 1e12 / peak_tflops, 1)
    R.add(key, **row)


# --------------------------------------------------------------------------- FLOP counts (eager, one pass each)
def unet_flops(S, batch):
    """(forward, forward+backward into LoRA) FLOPs of one UNet call at `batch` rows, and the VAE decode and reward."""
    cond = S.text(batch).unet_kwargs()
    x = S.noise(batch)
    t = torch.tensor(500, device=S.device)
    with S.autocast:
        with torch.no_grad():
            fwd = count_flops(lambda: S.unet(x, t, **cond))
        fwd_bwd = count_flops(lambda: S.unet(x, t, **cond).sample.float().pow(2).mean().backward())
        S.optimizer.zero_grad(set_to_none=True)
        z = S.noise(batch).requires_grad_(True)
        with torch.no_grad():
            dec = count_flops(lambda: decode_latents(S.vae, z))
        dec_bwd = count_flops(lambda: decode_latents(S.vae, z).mean().backward())
        out = {"unet_fwd": fwd, "unet_fwd_bwd": fwd_bwd, "decode_fwd": dec, "decode_fwd_bwd": dec_bwd}
        if S.scorer is not None:
            img = torch.rand(batch, 3, S.resolution, S.resolution, device=S.device, requires_grad=True)
            out["reward_fwd_bwd"] = count_flops(lambda: S.scorer(img, ["a prompt"] * batch).sum().backward())
    return {k: v / batch for k, v in out.items()}  # per row


def draftp_flops(f, truncation_steps):
    """Per image: 50 guided passes (2 rows each), K of them with backward plus a frozen reference pass,
    the decode and the reward with backward."""
    guided, guided_bwd = 2 * f["unet_fwd"], 2 * f["unet_fwd_bwd"]
    return ((STEPS - truncation_steps) * guided + truncation_steps * (guided_bwd + guided)
            + f["decode_fwd_bwd"] + f["reward_fwd_bwd"])


# --------------------------------------------------------------------------- sections
def matmul_peak(R, args):
    if args.device.type != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seconds, *_ = measure(lambda: a @ b, args.device, warmup=3, reps=20)
    tflops = 2 * n**3 / seconds / 1e12
    R.data["meta"]["matmul_bf16_tflops"] = round(tflops, 1)
    print(f"bf16 8192^3 matmul: {tflops:.1f} TFLOP/s", flush=True)
    return tflops


def section_sd15(R, args, peak_tflops):
    S = Setup(args, sdxl=False, resolution=64 if args.smoke else 512)
    S.add_lora()
    f = unet_flops(S, 1)
    R.data["flops"]["sd15_per_row"] = {k: round(v / 1e12, 4) for k, v in f.items()}
    sample_flops = STEPS * 2 * f["unet_fwd"] + f["decode_fwd"]
    k1, k50 = draftp_flops(f, 1), draftp_flops(f, STEPS)
    R.data["flops"]["sd15_draftp_k1_tflop_per_image"] = round(k1 / 1e12, 2)
    R.data["flops"]["sd15_draftp_k50_tflop_per_image"] = round(k50 / 1e12, 2)
    R.data["flops"]["sd15_sampling_tflop_per_image"] = round(sample_flops / 1e12, 2)
    if peak_tflops:
        R.data["flops"]["sd15_draftp_k1_floor_img_per_s"] = round(peak_tflops * 1e12 / k1, 2)
    R.save()
    run = lambda key, fn, batch, flops, unit="img/s", **kw: rate_row(
        R, key, *measure(fn, args.device, reps=args.reps), batch, unit, flops * batch, peak_tflops, **kw)

    # ---- plain loop
    set_plain(S)
    for b in args.sample_batches:
        run(f"sd15 sampling b{b} plain", lambda: plain_draftp_step(S, b, 0, train=False), b, sample_flops)
    for b in (1, 4):
        run(f"sd15 draftp K1 b{b} plain", lambda: plain_draftp_step(S, b, 1), b, k1)

    # ---- the project, one option at a time (batch 4)
    run("sd15 draftp K1 b4 project, options off", lambda: project_draftp_step(S, 4, 1), 4, k1)
    S.reset_lora()
    plain_out = plain_draftp_step(S, 4, 1)
    S.reset_lora()
    off_out = project_draftp_step(S, 4, 1)
    compare(R, "sd15 b4: plain vs project (options off)", plain_out, off_out)

    apply_speed_options(speed_options(args, compile_sampler="off", vae_gradient_checkpointing=False), S.unet, S.vae, S.device)
    run("sd15 draftp K1 b4 project, channels_last", lambda: project_draftp_step(S, 4, 1), 4, k1)
    S.vae.enable_gradient_checkpointing()
    run("sd15 draftp K1 b4 project, channels_last+vae_ckpt", lambda: project_draftp_step(S, 4, 1), 4, k1)
    compiled = apply_speed_options(speed_options(args), S.unet, S.vae, S.device)
    run(f"sd15 draftp K1 b4 project, channels_last+compile {args.compile_mode}+vae_ckpt",
        lambda: project_draftp_step(S, 4, 1, compiled), 4, k1)
    S.unet.enable_gradient_checkpointing()
    run(f"sd15 draftp K1 b4 project, channels_last+compile {args.compile_mode}+vae_ckpt+unet_ckpt",
        lambda: project_draftp_step(S, 4, 1, compiled), 4, k1)
    S.reset_lora()
    fast_out = project_draftp_step(S, 4, 1, compiled)
    compare(R, f"sd15 b4: project options off vs compile {args.compile_mode}", off_out, fast_out)
    compare(R, f"sd15 b4: plain vs project compile {args.compile_mode}", plain_out, fast_out)

    for b in args.sample_batches:
        run(f"sd15 sampling b{b} project, compile {args.compile_mode}", lambda: project_draftp_step(S, b, 0, compiled, train=False), b,
            sample_flops)
    for b in (1, 8):
        run(f"sd15 draftp K1 b{b} project, channels_last+compile {args.compile_mode}+vae_ckpt+unet_ckpt", lambda: project_draftp_step(S, b, 1, compiled), b, k1)
    run("sd15 draft K50 b1 project, channels_last+vae_ckpt+unet_ckpt", lambda: project_draftp_step(S, 1, STEPS, compiled), 1, k50,
        )
    del S, compiled
    torch._dynamo.reset()


def section_sd15_graphs(R, args, peak_tflops):
    """The project with the UNet compiled in "reduce-overhead" mode (CUDA graphs) for the no-grad steps, beside
    the plain loop re-measured in this run. On the H100 the default-mode compiled loop was bound by the host
    launching kernels (batch 4 sampled as fast as batch 8)."""
    S = Setup(args, sdxl=False, resolution=64 if args.smoke else 512)
    S.add_lora()
    f = unet_flops(S, 1)
    sample_flops = STEPS * 2 * f["unet_fwd"] + f["decode_fwd"]
    k1, k50 = draftp_flops(f, 1), draftp_flops(f, STEPS)
    run = lambda key, fn, batch, flops, unit="img/s": rate_row(
        R, key, *measure(fn, args.device, reps=args.reps), batch, unit, flops * batch, peak_tflops)
    set_plain(S)
    run("sd15 sampling b4 plain (call 2)", lambda: plain_draftp_step(S, 4, 0, train=False), 4, sample_flops)
    run("sd15 draftp K1 b4 plain (call 2)", lambda: plain_draftp_step(S, 4, 1), 4, k1)
    S.reset_lora()
    off_out = project_draftp_step(S, 4, 1)
    mode = "off" if args.smoke else "reduce-overhead"
    graphed = apply_speed_options(speed_options(args, compile_sampler=mode), S.unet, S.vae, S.device)
    S.unet.enable_gradient_checkpointing()
    tag = "channels_last+compile reduce-overhead+vae_ckpt+unet_ckpt"
    run(f"sd15 draftp K1 b4 project, {tag}", lambda: project_draftp_step(S, 4, 1, graphed), 4, k1)
    S.reset_lora()
    compare(R, "sd15 b4: project options off vs reduce-overhead defaults", off_out, project_draftp_step(S, 4, 1, graphed))
    run("sd15 sampling b4 project, reduce-overhead", lambda: project_draftp_step(S, 4, 0, graphed, train=False), 4,
        sample_flops)
    run("sd15 draft K50 b1 project, channels_last+vae_ckpt+unet_ckpt", lambda: project_draftp_step(S, 1, STEPS, graphed),
        1, k50)
    run(f"sd15 draftp K1 b8 project, {tag}", lambda: project_draftp_step(S, 8, 1, graphed), 8, k1)
    run("sd15 sampling b8 project, reduce-overhead", lambda: project_draftp_step(S, 8, 0, graphed, train=False), 8,
        sample_flops)
    run(f"sd15 draftp K1 b1 project, {tag}", lambda: project_draftp_step(S, 1, 1, graphed), 1, k1)
    del S, graphed
    torch._dynamo.reset()


def section_sd15_tradeoffs(R, args, peak_tflops):
    """Batch 4: the defaults without UNet checkpointing (speed for memory), and compile mode "max-autotune"
    (autotuned convolutions and matmuls, with CUDA graphs), beside the plain loop of this run."""
    S = Setup(args, sdxl=False, resolution=64 if args.smoke else 512)
    S.add_lora()
    f = unet_flops(S, 1)
    k1 = draftp_flops(f, 1)
    run = lambda key, fn: rate_row(R, key, *measure(fn, args.device, reps=args.reps), 4, "img/s", k1 * 4, peak_tflops)
    set_plain(S)
    run("sd15 draftp K1 b4 plain (call 4)", lambda: plain_draftp_step(S, 4, 1))
    S.reset_lora()
    off_out = project_draftp_step(S, 4, 1)
    for mode in ("reduce-overhead", "max-autotune"):
        graphed = apply_speed_options(speed_options(args, compile_sampler="off" if args.smoke else mode),
                                      S.unet, S.vae, S.device)
        run(f"sd15 draftp K1 b4 project, channels_last+compile {mode}+vae_ckpt (no unet_ckpt)",
            lambda: project_draftp_step(S, 4, 1, graphed))
        S.reset_lora()
        compare(R, f"sd15 b4: project options off vs compile {mode}, no unet_ckpt", off_out,
                project_draftp_step(S, 4, 1, graphed))
        del graphed
        torch._dynamo.reset()


def kernel_breakdown(prof, wall_s):
    """GPU kernel seconds of a profiled region by kind, the busy share of its wall time, and the top kernels."""
    import re

    kinds = [("attention", r"flash|fmha|sdpa|attention"), ("convolution", r"conv|fprop|dgrad|wgrad|implicit|nhwc"),
             ("matmul", r"gemm|nvjet|cutlass|matmul"), ("inductor fused (norms, elementwise)", r"^triton")]
    by_kind, kernels = {}, []
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.self_device_time_total <= 0:
            continue
        seconds = e.self_device_time_total / 1e6
        kind = next((k for k, pattern in kinds if re.search(pattern, e.key, re.I)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
        kernels.append((seconds, e.count, kind, e.key[:120]))
    busy = sum(by_kind.values())
    return {"wall_s": round(wall_s, 4), "gpu_busy_s": round(busy, 4), "busy_pct": round(100 * busy / wall_s, 1),
            "by_kind_s": {k: round(v, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [dict(s=round(t, 4), calls=n, kind=k, name=name) for t, n, k, name in sorted(kernels, reverse=True)[:25]]}


def profile_step(fn):
    """One call of `fn` under the profiler (after the caller's warm-up): its kernel_breakdown."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.time()
        fn()
        torch.cuda.synchronize()
        wall = time.time() - started
    return kernel_breakdown(prof, wall)


def section_sd15_kernels(R, args, peak_tflops):
    """Where the DRaFT+ step's time goes (profiler, by kernel kind: sampling alone and the whole step, batch 4,
    the defaults + UNet ckpt), and the sampling UNet under other attention kernels and inductor settings."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    S = Setup(args, sdxl=False, resolution=64 if args.smoke else 512)
    S.add_lora()
    f = unet_flops(S, 1)
    sample_flops, k1 = STEPS * 2 * f["unet_fwd"] + f["decode_fwd"], draftp_flops(f, 1)
    run = lambda key, fn, flops: rate_row(R, key, *measure(fn, args.device, reps=args.reps), 4, "img/s", flops * 4,
                                          peak_tflops)
    mode = "off" if args.smoke else "reduce-overhead"
    variants = [("flash attention (default)", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], {}),
                ("cuDNN attention", [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], {}),
                ("inductor conv_1x1_as_mm + coordinate descent", [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
                 {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False})]
    reference_out = None
    for i, (name, backends, inductor_flags) in enumerate(variants):
        torch._dynamo.reset()
        with torch._inductor.config.patch(**inductor_flags), sdpa_kernel(backends, set_priority=True):
            graphed = apply_speed_options(speed_options(args, compile_sampler=mode), S.unet, S.vae, S.device)
            S.unet.enable_gradient_checkpointing()
            run(f"sd15 draftp K1 b4 project defaults+unet_ckpt, {name}", lambda: project_draftp_step(S, 4, 1, graphed), k1)
            run(f"sd15 sampling b4 project, {name}", lambda: project_draftp_step(S, 4, 0, graphed, train=False),
                sample_flops)
            S.reset_lora()
            out = project_draftp_step(S, 4, 1, graphed)
            if reference_out is None:
                reference_out = out
            else:
                compare(R, f"sd15 b4: {variants[0][0]} vs {name}", reference_out, out)
            if i == 0 and args.device.type == "cuda":
                R.data["checks"]["profile sd15 sampling b4"] = profile_step(
                    lambda: project_draftp_step(S, 4, 0, graphed, train=False))
                R.data["checks"]["profile sd15 draftp K1 b4"] = profile_step(lambda: project_draftp_step(S, 4, 1, graphed))
                R.save()
        del graphed
    del S
    torch._dynamo.reset()


def section_sd15_fp8(R, args, peak_tflops):
    """--fp8_sampler (utils/fp8.py): the no-grad sampling and the whole DRaFT+ K=1 step at batch 4 and 8 with the bf16
    sampler and with the FP8 one (both graphed as --compile_sampler auto does; the defaults + UNet ckpt), the image
    difference of the two samplers from the same noise and weights, both samplings' profiles by kernel kind, and
    batch 4 again with torch.backends.cudnn.benchmark on."""
    S = Setup(args, sdxl=False, resolution=64 if args.smoke else 512)
    S.add_lora()
    f = unet_flops(S, 1)
    sample_flops, k1 = STEPS * 2 * f["unet_fwd"] + f["decode_fwd"], draftp_flops(f, 1)
    opts = speed_options(args, compile_sampler="off" if args.smoke else "reduce-overhead")
    apply_speed_options(opts, S.unet, S.vae, S.device)
    S.unet.enable_gradient_checkpointing()
    fp8_unet = float8_sampling_unet(S.unet)

    def compile_samplers():  # as train_draftp.py does for each sampler (after a dynamo reset: compiled anew)
        return {name: sampling_model(opts, unet, S.device)
                for name, unet in (("bf16 sampler", S.unet), ("fp8 sampler", fp8_unet))}

    samplers = compile_samplers()

    def rows(batch, variant=""):
        for name, sampler in samplers.items():
            rate_row(R, f"sd15 sampling b{batch} {name}{variant}",
                     *measure(lambda: project_draftp_step(S, batch, 0, sampler, train=False), args.device, reps=args.reps),
                     batch, "img/s", sample_flops * batch, peak_tflops)
            rate_row(R, f"sd15 draftp K1 b{batch} {name}{variant}",
                     *measure(lambda: project_draftp_step(S, batch, 1, sampler), args.device, reps=args.reps),
                     batch, "img/s", k1 * batch, peak_tflops)

    # the image difference first (what a call cut short must still bring back: each sampler's cold compile takes
    # minutes), then batch 4's rows and the profiles; batch 8 compiles two more graphs
    exact = project_draftp_step(S, 4, 0, samplers["bf16 sampler"], train=False)
    compare(R, "sd15 b4 sampling: bf16 vs fp8 sampler (changes results)", exact,
            project_draftp_step(S, 4, 0, samplers["fp8 sampler"], train=False))
    rows(4)
    S.reset_lora()
    if args.device.type == "cuda":
        for name, sampler in samplers.items():
            R.data["checks"][f"profile sd15 sampling b4 {name}"] = profile_step(
                lambda: project_draftp_step(S, 4, 0, sampler, train=False))
        R.save()
    # the convolutions: cuDNN's own heuristic picks their algorithms unless cudnn.benchmark times them (once per shape)
    torch.backends.cudnn.benchmark = True
    try:
        torch._dynamo.reset()
        samplers = compile_samplers()
        rows(4, ", cudnn.benchmark")
        S.reset_lora()
        compare(R, "sd15 b4 sampling: bf16 sampler vs the same with cudnn.benchmark", exact,
                project_draftp_step(S, 4, 0, samplers["bf16 sampler"], train=False))
    finally:
        torch.backends.cudnn.benchmark = False
        torch._dynamo.reset()
    samplers = compile_samplers()
    rows(8)
    del S, samplers, fp8_unet
    torch._dynamo.reset()


def section_sdxl(R, args, peak_tflops):
    S = Setup(args, sdxl=True, resolution=64 if args.smoke else 1024)
    S.add_lora()
    f = unet_flops(S, 1)
    R.data["flops"]["sdxl_per_row"] = {k: round(v / 1e12, 4) for k, v in f.items()}
    k1 = draftp_flops(f, 1)
    R.data["flops"]["sdxl_draftp_k1_tflop_per_image"] = round(k1 / 1e12, 2)
    R.save()
    run = lambda key, fn, flops: rate_row(R, key, *measure(fn, args.device, reps=args.reps), 1, "img/s", flops,
                                          peak_tflops)
    set_plain(S)
    S.unet.enable_gradient_checkpointing()  # the plain loop at 1024 px needs it too
    run("sdxl draftp K1 b1 plain + unet_ckpt", lambda: plain_draftp_step(S, 1, 1), k1)
    S.reset_lora()
    plain_out = plain_draftp_step(S, 1, 1)
    opts = speed_options(args, compile_sampler="off" if args.sdxl_no_compile else speed_options(args).compile_sampler)
    compiled = apply_speed_options(opts, S.unet, S.vae, S.device)
    run(f"sdxl draftp K1 b1 project, defaults{' (no compile)' if compiled is None else ''} + unet_ckpt",
        lambda: project_draftp_step(S, 1, 1, compiled), k1)
    S.reset_lora()
    compare(R, "sdxl b1: plain+unet_ckpt vs project defaults", plain_out, project_draftp_step(S, 1, 1, compiled))
    del S, compiled
    torch._dynamo.reset()


# --------------------------------------------------------------------------- DPO / SFT
def dpo_batch(S, pairs, n_images):
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(n_images * pairs, 4, S.latent_hw, S.latent_hw, generator=g).to(S.device)  # [winners; losers]
    noise = torch.randn(pairs, 4, S.latent_hw, S.latent_hw, generator=g).to(S.device)
    timesteps = torch.randint(0, 1000, (pairs,), generator=g).to(S.device)
    return latents, noise, timesteps, S.text(pairs)


def project_dpo_step(S, pairs, sft, train_unet=None, reference=None):
    """train_dpo.py's loop body: winners and losers in one UNet batch, the reference = adapters off.
    train_unet: what computes the trained model's prediction (--compile_unet: a compiled view of S.unet);
    reference: what computes the reference's (default S.reference: S.unet with its adapters off, eager)."""
    n = 1 if sft else 2
    latents, noise, timesteps, cond = dpo_batch(S, pairs, n)
    noisy, target, timesteps = noise_pairs(S.scheduler, latents, noise, timesteps)
    cond = cond.repeat(n)
    with S.autocast:
        prediction = (S.unet if train_unet is None else train_unet)(noisy, timesteps, **cond.unet_kwargs()).sample
        err = per_sample_error(prediction, target)
        if sft:
            loss, _ = train_dpo.sft_loss(err)
        else:
            with torch.no_grad():
                ref_out = (reference or S.reference)(noisy, timesteps, **cond.unet_kwargs()).sample
                ref_err = per_sample_error(ref_out, target)
            loss, _ = train_dpo.dpo_loss(*err.chunk(2), *ref_err.chunk(2), BETA_DPO)
    loss.backward()
    S.optimizer.step()
    S.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def plain_dpo_step(S, ref_unet, pairs, sft):
    """diffusers-style Diffusion-DPO: separate forwards for winner and loser, a frozen reference copy."""
    n = 1 if sft else 2
    latents, noise, timesteps, cond = dpo_batch(S, pairs, n)
    kw = cond.unet_kwargs()
    with S.autocast:
        errs, ref_errs = [], []
        for half in latents.chunk(n):
            noisy = S.scheduler.add_noise(half, noise, timesteps)
            pred = S.unet(noisy, timesteps, **kw).sample
            errs.append(F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)))
            if not sft:
                with torch.no_grad():
                    ref = ref_unet(noisy, timesteps, **kw).sample
                    ref_errs.append(F.mse_loss(ref.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)))
        if sft:
            loss = errs[0].mean()
        else:
            inside = -0.5 * BETA_DPO * ((errs[0] - errs[1]) - (ref_errs[0] - ref_errs[1]))
            loss = -F.logsigmoid(inside).mean()
    loss.backward()
    S.optimizer.step()
    S.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def section_dpo(R, args, peak_tflops):
    for sdxl, res, pairs in ((False, 512, args.dpo_batch), (True, 1024, 1)):
        name = "sdxl" if sdxl else "sd15"
        S = Setup(args, sdxl=sdxl, resolution=64 if args.smoke else res, with_reward=False)
        ref_unet = copy.deepcopy(S.unet).requires_grad_(False).eval()  # the plain loop's reference copy
        S.add_lora()
        if sdxl:
            S.unet.enable_gradient_checkpointing()
            ref_unet.enable_gradient_checkpointing()
        f = unet_flops(S, 1)
        dpo_flops = 2 * f["unet_fwd_bwd"] + 2 * f["unet_fwd"]  # per pair
        sft_flops = f["unet_fwd_bwd"]
        R.data["flops"][f"{name}_dpo_tflop_per_pair"] = round(dpo_flops / 1e12, 3)
        run = lambda key, fn, flops, unit: rate_row(R, key, *measure(fn, args.device, warmup=2, reps=args.reps + 2),
                                                    pairs, unit, flops * pairs, peak_tflops, batch=pairs)
        for sft, flops, unit in ((False, dpo_flops, "pairs/s"), (True, sft_flops, "img/s")):
            method = "sft" if sft else "dpo"
            run(f"{name} {method} b{pairs} plain", lambda: plain_dpo_step(S, ref_unet, pairs, sft), flops, unit)
            if not sft:
                S.reset_lora()
                a = plain_dpo_step(S, ref_unet, pairs, sft)
                S.reset_lora()
                b = project_dpo_step(S, pairs, sft)
                R.data["checks"][f"{name} dpo loss plain vs project"] = [float(a), float(b)]
        del ref_unet
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        for sft, flops, unit in ((False, dpo_flops, "pairs/s"), (True, sft_flops, "img/s")):
            method = "sft" if sft else "dpo"
            run(f"{name} {method} b{pairs} project", lambda: project_dpo_step(S, pairs, sft), flops, unit)
        S.unet.to(memory_format=torch.channels_last)
        for sft, flops, unit in ((False, dpo_flops, "pairs/s"), (True, sft_flops, "img/s")):
            method = "sft" if sft else "dpo"
            run(f"{name} {method} b{pairs} project + channels_last", lambda: project_dpo_step(S, pairs, sft), flops, unit)
        del S


def sd15_dpo_setup(args):
    """SD1.5 at 512 px with LoRA as train_dpo.py trains it by default (channels-last UNet, peft's input casts off; the
    DPO step takes latents, so the VAE is not used): (Setup, FLOPs per pair)."""
    S = Setup(args, sdxl=False, resolution=64 if args.smoke else 512, with_reward=False)
    S.add_lora()
    skip_lora_input_casts(S.unet)
    S.unet.to(memory_format=torch.channels_last)
    f = unet_flops(S, 1)
    return S, 2 * f["unet_fwd_bwd"] + 2 * f["unet_fwd"]


def section_dpo_kernels(R, args, peak_tflops):
    """Where the SD1.5 DPO step's time goes at 4 and 16 pairs (sd15_dpo_setup: train_dpo.py's defaults): the profile
    by kernel kind; cuDNN attention; the trained UNet's forward compiled by inductor (--compile_unet default) with the
    reference eager, and the loss's difference to eager at the same weights. The VAE's share: section vae_layout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    S, dpo_flops = sd15_dpo_setup(args)
    compiled = torch.compile(S.unet, dynamic=False, backend="inductor" if args.device.type == "cuda" else "eager")
    for pairs in (2,) if args.smoke else (4, 16):  # the smoke run: one size
        run = lambda key, fn, flops=dpo_flops: rate_row(R, key, *measure(fn, args.device, warmup=2, reps=args.reps + 2),
                                                        pairs, "pairs/s", None if flops is None else flops * pairs,
                                                        peak_tflops, batch=pairs)
        run(f"sd15 dpo b{pairs} project (channels_last)", lambda: project_dpo_step(S, pairs, False))
        if args.device.type == "cuda":
            R.data["checks"][f"profile sd15 dpo b{pairs}"] = profile_step(lambda: project_dpo_step(S, pairs, False))
            R.save()
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], set_priority=True):
            run(f"sd15 dpo b{pairs} project, cuDNN attention", lambda: project_dpo_step(S, pairs, False))
        run(f"sd15 dpo b{pairs} project, trained UNet compiled", lambda: project_dpo_step(S, pairs, False, compiled))
        S.reset_lora()
        eager = project_dpo_step(S, pairs, False)
        S.reset_lora()
        compiled_loss = project_dpo_step(S, pairs, False, compiled)
        S.reset_lora()
        R.data["checks"][f"sd15 dpo b{pairs} loss: eager vs trained UNet compiled"] = [float(eager), float(compiled_loss)]
        R.save()
    del S, compiled
    torch._dynamo.reset()


def section_dpo_reference_graphs(R, args, peak_tflops):
    """The SD1.5 DPO step (sd15_dpo_setup: LoRA as train_dpo.py trains it) with its reference forward (no grad,
    adapters off) replayed from CUDA graphs, at 4 and 16 pairs: torch.compile's "cudagraphs" backend (the eager
    kernels, captured: the same numbers expected) and inductor's "reduce-overhead" (fused kernels in graphs: other
    rounding). End to end the 4-pair step is host-bound (BENCHMARKS.md "End to end"); the reference pass is the part
    of it that needs no autograd. Checks: each variant's loss against eager from the same weights. On the CPU both
    variants compile with the "eager" backend (the capture and the guards run, no graphs)."""
    S, dpo_flops = sd15_dpo_setup(args)
    cuda = args.device.type == "cuda"

    def graphed_reference(backend, mode=None):
        # the compiled view under reference_model's adapters_disabled (switched on the UNet it wraps): dynamo guards on
        # peft's switches, so this graph is the adapters-off UNet, as train_dpo.py's --compile_reference built it
        # (removed: slower end to end, BENCHMARKS.md)
        return reference_model(torch.compile(S.unet, backend=backend if cuda else "eager", mode=mode if cuda else None,
                                             dynamic=False))

    for pairs in (2,) if args.smoke else (4, 16):  # the smoke run: one size (each compiles twice)
        S.reset_lora()
        eager_loss = float(project_dpo_step(S, pairs, False))
        run = lambda key, fn: rate_row(R, key, *measure(fn, args.device, warmup=3, reps=args.reps + 2), pairs, "pairs/s",
                                       dpo_flops * pairs, peak_tflops, batch=pairs)
        run(f"sd15 dpo b{pairs} project, reference eager", lambda: project_dpo_step(S, pairs, False))
        for name, backend, mode in (("cudagraphs backend", "cudagraphs", None),
                                    ("inductor reduce-overhead", "inductor", "reduce-overhead")):
            torch._dynamo.reset()
            reference = graphed_reference(backend, mode)
            run(f"sd15 dpo b{pairs} project, reference {name}", lambda: project_dpo_step(S, pairs, False, reference=reference))
            S.reset_lora()
            R.data["checks"][f"sd15 dpo b{pairs} loss: eager vs reference {name}"] = [
                eager_loss, float(project_dpo_step(S, pairs, False, reference=reference))]
            R.save()
    del S
    torch._dynamo.reset()


def section_vae_layout(R, args, peak_tflops):
    """The SD VAE at 512 px in bf16, channels-last against NCHW (and the encoder compiled): the encoding train_dpo.py
    does before each DPO step (8 images at 4 pairs, 32 at 16) and DRaFT+'s decoding with grad (4 images, forward and
    backward). Eager GroupNorm makes a channels-last input contiguous and the next convolution converts it back: the
    largest copies in train_dpo.py's profile (BENCHMARKS.md). Checks: the largest difference between the layouts of the
    posterior mean and of the decoder's gradient to its latents (bf16 kernels differ, so not zero on a GPU), and of the
    compiled encoder's output from eager."""
    S = Setup(args, sdxl=False, resolution=64 if args.smoke else 512, with_reward=False)
    vae, size = S.vae, S.resolution

    def encode(pixels):
        with torch.no_grad():
            return vae.encode(pixels).latent_dist.mean

    def decode_with_grad(latents):
        latents = latents.detach().requires_grad_(True)
        vae.decode(latents).sample.float().square().mean().backward()
        return latents.grad

    layouts = (("channels_last", torch.channels_last), ("NCHW", torch.contiguous_format))
    for images in (8, 32):
        pixels = torch.randn(images, 3, size, size, device=S.device, dtype=S.dtype)
        means = {}
        for name, layout in layouts:
            vae.to(memory_format=layout)
            x = pixels.contiguous(memory_format=layout)
            rate_row(R, f"sd15 vae encode of {images} images, {name}", *measure(lambda: encode(x), S.device, 2, args.reps + 2),
                     images, "img/s")
            means[name] = encode(x).float()
        R.data["checks"][f"vae encode of {images}: max |mean| difference, channels_last vs NCHW"] = float(
            (means["channels_last"] - means["NCHW"]).abs().max())
        R.save()
    latents = torch.randn(4, 4, size // 8, size // 8, device=S.device, dtype=S.dtype)
    grads = {}
    for name, layout in layouts:
        vae.to(memory_format=layout)
        x = latents.contiguous(memory_format=layout)
        rate_row(R, f"sd15 vae decode of 4 images with grad, {name}", *measure(lambda: decode_with_grad(x), S.device, 2,
                                                                              args.reps + 2), 4, "img/s")
        grads[name] = decode_with_grad(x).float()
    R.data["checks"]["vae decode of 4 with grad: max |grad| difference, channels_last vs NCHW"] = float(
        (grads["channels_last"] - grads["NCHW"]).abs().max())
    vae.to(memory_format=torch.channels_last)
    compiled = torch.compile(vae.encoder, dynamic=False, backend="inductor" if args.device.type == "cuda" else "eager")
    pixels = torch.randn(32, 3, size, size, device=S.device, dtype=S.dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        rate_row(R, "sd15 vae encode of 32 images, channels_last, encoder compiled",
                 *measure(lambda: compiled(pixels), S.device, 2, args.reps + 2), 32, "img/s")
        R.data["checks"]["vae encode of 32: max |encoder output| difference, compiled vs eager"] = float(
            (compiled(pixels).float() - vae.encoder(pixels).float()).abs().max())
    R.save()
    del S, compiled
    torch._dynamo.reset()


def section_dpo_lora_casts(R, args, peak_tflops):
    """The SD1.5 DPO step (LoRA, channels-last) with peft's input casts of the adapted layers on (peft's default)
    and off (utils.models.add_trainable_lora, as the scripts train): speed at 4 and 16 pairs, and the loss from the
    same weights, which must be equal."""
    S, dpo_flops = sd15_dpo_setup(args)
    layers = [m for m in S.unet.modules() if hasattr(m, "cast_input_dtype_enabled")]
    for pairs in (2,) if args.smoke else (4, 16):  # the smoke run: one size
        losses = {}
        for casts in (True, False):
            for m in layers:
                m.cast_input_dtype_enabled = casts
            name = "peft's input casts on" if casts else "input casts off (add_trainable_lora)"
            rate_row(R, f"sd15 dpo b{pairs} project, {name}",
                     *measure(lambda: project_dpo_step(S, pairs, False), args.device, warmup=2, reps=args.reps + 2),
                     pairs, "pairs/s", dpo_flops * pairs, peak_tflops, batch=pairs)
            S.reset_lora()
            losses[casts] = float(project_dpo_step(S, pairs, False))
            S.reset_lora()
        R.data["checks"][f"sd15 dpo b{pairs} loss: casts on vs off"] = [losses[True], losses[False]]
        R.save()
    del S


SECTIONS = {"dpo_reference_graphs": section_dpo_reference_graphs, "vae_layout": section_vae_layout, "dpo_lora_casts": section_dpo_lora_casts, "dpo_kernels": section_dpo_kernels, "sd15": section_sd15, "sd15_graphs": section_sd15_graphs, "sd15_tradeoffs": section_sd15_tradeoffs, "sd15_kernels": section_sd15_kernels, "sd15_fp8": section_sd15_fp8, "sdxl": section_sdxl, "dpo": section_dpo}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out", help="folder for bench.json and bench.md")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median reported)")
    parser.add_argument("--sample_batches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--dpo_batch", type=int, default=4, help="pairs per DPO step at SD1.5 512 px")
    parser.add_argument("--compile_mode", default="reduce-overhead", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="torch.compile mode of the no-grad UNet in sections sd15 and sdxl (--compile_sampler auto = reduce-overhead)")
    parser.add_argument("--sdxl_no_compile", action="store_true", help="SDXL DRaFT+ without torch.compile (saves its compile time)")
    parser.add_argument("--merge", default=None, help="bench.json of an earlier call whose results to keep beside these")
    parser.add_argument("--smoke", action="store_true", help="tiny configs, 3 steps, on the CPU: checks the script runs")
    args = parser.parse_args()
    global STEPS
    if args.smoke:
        STEPS = 3
        args.reps, args.sample_batches, args.dpo_batch = 1, [2], 2
    args.device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    args.dtype = torch.float32 if args.device.type == "cpu" else torch.bfloat16
    import diffusers
    import peft
    import transformers

    meta = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "device": torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu",
            "argv": sys.argv, "steps": STEPS, "guidance": GUIDANCE, "lora_rank": LORA_RANK, "sdpa": True}
    R = Results(args.out, meta, args.merge)
    peak = matmul_peak(R, args)
    for name in args.sections:
        started = time.time()
        try:
            SECTIONS[name](R, args, peak)
        except Exception as e:  # keep what was measured, record why the rest is missing, go on
            import traceback

            traceback.print_exc()
            R.data["checks"][f"section {name} failed"] = f"{type(e).__name__}: {e}"[:500]
            R.save()
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"section {name}: {time.time() - started:.0f} s", flush=True)
    R.save()
    print(markdown(R.data))


if __name__ == "__main__":
    main()
