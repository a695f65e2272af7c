"""Diffusion-DPO and SFT for SD1.5, SDXL, SD3 / SD3.5 and FLUX.1 (full model or LoRA), on preference pairs or
image-caption data.

Diffusion-DPO (Wallace et al. 2023, https://arxiv.org/abs/2311.12908): winner and loser of a pair are noised
with one noise sample at one timestep; the loss rewards the trained UNet for lowering its denoising error on
the winner more than the frozen reference does, relative to the loser. `--sft` is plain noise-prediction
fine-tuning on the preferred image (or on ordinary image-caption data with `--image_column`). Flow-matching models
(SD3, FLUX; read from model_index.json) train the same loss on velocity errors (target noise - x_0), with t drawn as
the model was trained (--weighting_scheme).

Quickstart (offline, the toy world: AI feedback from the `toyclip` scorer on pairs sampled from `toy-sd`, the best
and the worst of 4 base images each; about 14 minutes on a busy 2-core CPU; samples/validation-step-000032.png shows
the base and the trained model's images of the two prompts with toyclip's score under each, README "Diffusion-DPO"):

    python experiments/toyworld_pairs.py --output_dir outputs/toy_pairs --num_pairs 64 --seed 0
    python train_dpo.py --pretrained_model_name_or_path toy-sd --dataset_name outputs/toy_pairs \
        --choice_model toyclip --lora_rank 8 --learning_rate 5e-5 --beta_dpo 500 --lr_scheduler constant \
        --lr_warmup_steps 0 --train_batch_size 4 --max_train_steps 32 --validation_steps 16 --num_inference_steps 10 \
        --validation_prompts "two red circles" "three blue squares" --output_dir outputs/dpo-quickstart --report_to none

SD1.5 on Pick-a-Pic v2, the paper's recipe (full UNet; 16 GPUs x 1 pair x 128 accumulation = 2048 pairs per
step; lr 1e-8 x 2048 with --scale_lr; launchers/sd15.sh of the Diffusion-DPO repository):

    accelerate launch train_dpo.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name yuvalkirstain/pickapic_v2 --mixed_precision bf16 --train_batch_size 1 \
        --gradient_accumulation_steps 128 --learning_rate 1e-8 --scale_lr --beta_dpo 5000 \
        --lr_scheduler constant_with_warmup --lr_warmup_steps 500 --max_train_steps 2000 \
        --checkpointing_steps 500 --dataloader_num_workers 16 --output_dir outputs/dpo-sd15

SDXL (the original always used Adafactor and gradient checkpointing there), LoRA, AI feedback, SFT:

    accelerate launch train_dpo.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix --dataset_name yuvalkirstain/pickapic_v2 \
        --use_adafactor --gradient_checkpointing --mixed_precision bf16 --lr_warmup_steps 200 ...
    ... --use_lora --lora_rank 8 --learning_rate 1e-5     # LoRA as diffusers' DPO example; reference = adapters off
    ... --choice_model pickscore                                            # the scorer picks each winner
    ... --sft                                                               # MSE on the preferred images
    ... --sft --dataset_name my/captioned-images --image_column image      # plain text-to-image fine-tuning
"""
import argparse
import contextlib
import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils import UsageError
from utils.data import (CACHE_STEP, CAPTION_COLUMN, LABEL_COLUMN, PAIR_COLUMNS, GlobalBatchSampler, ImagePairDataset,
                        LatentCacheDataset, PosteriorCache, SkipCachedSampler, check_bad_rows, check_enough_rows,
                        collate_images, next_batch, open_image_dataset, require_columns, scan_rows, select_pairs)
from utils.flow import DEFAULT_WEIGHTING, WEIGHTING_SCHEMES, FlowTrainingTimesteps, flow_noise
from utils.models import (adapters_disabled, add_trainable_lora, build_pipeline, encode_prompts, freeze_frozen_parts,
                          frozen_copy, load_pipeline_parts, model_prediction, read_family, reference_model,
                          sdxl_time_ids)
from utils.rewards import list_rewards, load_reward, parse_reward_spec
from utils.speed import add_speed_args, compile_training_unet
from utils.training import (DEFAULTS_NOTE, HelpFormatter, MetricsLog, NonFiniteGuard, StepClock, StopRequest,
                            add_common_args, build_lr_scheduler, build_optimizer, check_common_args, checkpoint_or_stop,
                            compute_dtype, defers_loss_check, describe_defaults, log_step, log_validation,
                            make_accelerator, optimizer_update, parse_name_paths, prepare_for_training,
                            reduce_step_metrics, register_checkpoint_hooks, resume_from_checkpoint, run_main,
                            save_outputs, scaled_learning_rate, set_help, shards_parameters, step_generator, stop_run,
                            unet_is_wrapped, validation_due, validation_wanted)


logger = logging.getLogger("train_dpo")

# The names the Diffusion-DPO train.py gave its --choice_model scorers, mapped to this project's registry.
CHOICE_MODEL_ALIASES = {"aes": "aesthetic", "hps": "hpsv2"}
# --learning_rate when not given. Full UNet: the Diffusion-DPO train.py's 1e-8, which its recipes multiply by the
# effective batch (--scale_lr: 2048 pairs -> 2.048e-5). LoRA trains at 1e-8 not at all: diffusers' DPO LoRA example
# (examples/research_projects/diffusion_dpo/train_diffusion_dpo.py) defaults to 5e-4.
FULL_UNET_LEARNING_RATE, LORA_LEARNING_RATE = 1e-8, 5e-4


# --latent_cache auto keeps the VAE posteriors of a run that sees its data more than once up to this size (CPU memory;
# SD1.5 at 512 px: 64 KiB per image and flip in bf16, so 4 GiB hold 32k pairs with both flips).
LATENT_CACHE_AUTO_BYTES = 4 * 2**30


# --------------------------------------------------------------------------- the method
DPO_LOSSES = {
    # inside = beta * h, h = -0.5 * ((err_w - err_l) - (ref_w - ref_l)): the implicit reward margin.
    "sigmoid": lambda inside, beta: -F.logsigmoid(inside),  # Diffusion-DPO
    "hinge": lambda inside, beta: F.relu(1 - inside),  # SLiC (Zhao et al. 2023), as diffusers' DPO example
    "ipo": lambda inside, beta: (inside / beta - 1 / (2 * beta)) ** 2,  # IPO (Azar et al. 2023, eq. 17), tau = beta
}


def dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta: float, loss_type: str = "sigmoid"):
    """Diffusion-DPO on per-pair denoising errors, each (B,) = mean over C,H,W of (eps_pred - eps)^2.

    inside = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l)); sigmoid loss = mean(-logsigmoid(inside)), which
    is log 2 while the model equals the reference. implicit_acc: fraction of pairs with inside > 0, ties
    (inside = 0, e.g. every pair at step 0) counting one half, as diffusers' DPO example.
    """
    inside = -0.5 * beta * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))
    loss = DPO_LOSSES[loss_type](inside, beta).mean()
    acc = (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean()
    return loss, {
        "loss": loss.detach(), "implicit_acc": acc.detach(),
        "model_mse": 0.5 * (model_err_w.mean() + model_err_l.mean()).detach(),
        "ref_mse": 0.5 * (ref_err_w.mean() + ref_err_l.mean()).detach(),
    }


def sft_loss(model_err, weights=None):
    """Noise-prediction MSE on the preferred (or only) images; `weights` (B,) e.g. min-SNR."""
    loss = model_err.mean() if weights is None else (model_err * weights).mean()
    return loss, {"loss": loss.detach()}


def min_snr_weights(scheduler, timesteps, gamma: float):
    """Min-SNR-gamma (Hang et al. 2023, https://arxiv.org/abs/2303.09556): min(SNR, gamma) / SNR for eps
    prediction, / (SNR + 1) for v prediction, as the diffusers text-to-image examples."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, gamma))
    return weights / (snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr)


def per_sample_error(pred, target):
    """(N, C, H, W) -> (N,): mean squared error of each sample, in float32."""
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def noise_pairs(scheduler, latents, noise, timesteps):
    """Noise n images per row with the row's ONE noise sample and timestep.

    latents (n*B, C, h, w), stacked [first images; second images] (winners, then losers); noise (B, C, h, w);
    timesteps (B,). Returns (noisy latents, target, timesteps), each with n*B rows.
    """
    n = latents.shape[0] // noise.shape[0]
    noise, timesteps = noise.repeat(n, 1, 1, 1), timesteps.repeat(n)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, timesteps), timesteps
    return noisy, noise, timesteps


def flow_noise_pairs(latents, noise, timesteps, num_train_timesteps: int = 1000):
    """`noise_pairs` for flow matching (SD3 / FLUX): x_t = (1 - sigma) * x_0 + sigma * noise with sigma = t / 1000,
    and the velocity target noise - x_0; winner and loser share the row's noise and sigma."""
    n = latents.shape[0] // noise.shape[0]
    noise, timesteps = noise.repeat(n, 1, 1, 1), timesteps.repeat(n)
    return flow_noise(latents, noise, timesteps / num_train_timesteps), noise - latents, timesteps


@dataclass
class Noising:
    """What the model's family fixes about training on noised data, chosen once at start (`family_noising`)."""

    draw: Callable         # (n, generator) -> (n,) timesteps: DDPM steps, or sigma * 1000
    pairs: Callable        # (latents, noise, timesteps) -> (noisy, target, timesteps): `noise_pairs`' contract
    sft_weights: Callable  # (timesteps,) -> (n,) per-sample weights of the SFT loss, or None


def family_noising(parts, args) -> Noising:
    """SD1.5 / SDXL: t uniform over the DDPM steps, eps (or v) target, min-SNR for SFT. SD3 / FLUX: t drawn as the
    model was trained (--weighting_scheme), the velocity target, SD3's loss weights for SFT (DPO's errors stay plain
    per-sample MSE: a weight w(t) would only rescale beta at each t)."""
    scheduler = parts.scheduler
    if parts.is_flow:
        t = FlowTrainingTimesteps(scheduler, args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)
        return Noising(t.draw, functools.partial(flow_noise_pairs, num_train_timesteps=t.num_train_timesteps),
                       t.loss_weights)
    return Noising(lambda n, g: torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g),
                   functools.partial(noise_pairs, scheduler),
                   lambda t: min_snr_weights(scheduler, t, args.snr_gamma) if args.snr_gamma else None)


@torch.no_grad()
def choose_winners(scorer, batch):
    """AI feedback: (B,) bool, True where the scoring model prefers the second image of the pair."""
    first, second = [p[0] for p in batch["pil"]], [p[1] for p in batch["pil"]]
    scores = scorer.score(first + second, batch["prompt"] * 2)  # one batched call for all 2B images
    n = len(first)
    return torch.tensor([scores[n + i] > scores[i] for i in range(n)])


PER_IMAGE_FIELDS = ("pixels", "original_size", "crop", "latent_mean", "latent_std")  # (B, 2, ...) in a batch


def swap_pairs(batch, swap):
    """Swap first and second image of the rows where `swap` (B,) is True, in every per-image field."""
    out = dict(batch)
    for key in PER_IMAGE_FIELDS:
        if key in batch:
            value = batch[key]
            out[key] = torch.where(swap.view(-1, *[1] * (value.dim() - 1)), value.flip(1), value)
    if "pil" in batch:
        out["pil"] = [p[::-1] if s else p for p, s in zip(batch["pil"], swap.tolist())]
    return out


# --------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                     epilog=DEFAULTS_NOTE)
    add_common_args(parser)
    # The Diffusion-DPO train.py defaults: full UNet, constant lr after a 500-step warmup, 2000 steps; the lr
    # depends on --use_lora and is resolved after parsing (resolve_learning_rate).
    describe_defaults(parser, "the Diffusion-DPO train.py", use_lora=False, lr_scheduler="constant_with_warmup",
                      lr_warmup_steps=500, max_train_steps=2000)
    parser.set_defaults(learning_rate=None)
    set_help(parser, "learning_rate",
             f"peak learning rate (default: {FULL_UNET_LEARNING_RATE:g} for the full UNet, from the Diffusion-DPO "
             f"train.py, whose recipes add --scale_lr; {LORA_LEARNING_RATE:g} with --use_lora, from diffusers' DPO "
             f"LoRA example train_diffusion_dpo.py)")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="hub id, save_to_disk folder, .parquet / .jsonl / .csv file (image columns: bytes or paths "
                        "relative to the file), or a folder load_dataset reads")
    g.add_argument("--train_data_dir", default=None, help="image folder with metadata.jsonl (datasets' imagefolder)")
    g.add_argument("--cache_dir", default=None, help="datasets cache folder")
    g.add_argument("--split", default="train", help="split of --dataset_name to train on")
    g.add_argument("--image_0_column", default=PAIR_COLUMNS[0], help="first image of a pair (bytes, path or Image)")
    g.add_argument("--image_1_column", default=PAIR_COLUMNS[1], help="second image of a pair")
    g.add_argument("--label_column", default=LABEL_COLUMN,
                   help="preference for the first image: 1 first wins, 0 second wins, 0.5 tie (dropped)")
    g.add_argument("--caption_column", default=CAPTION_COLUMN, help="caption (a string, or a list: one drawn)")
    g.add_argument("--image_column", default=None,
                   help="--sft on plain image-caption data: the image column (instead of pairs)")
    g.add_argument("--max_train_samples", type=int, default=None, help="train on a seeded random subset of this many rows")
    g.add_argument("--resolution", type=int, default=None, help="pixels; default: the model's own (512 SD1.5, 1024 SDXL)")
    g.add_argument("--random_crop", action="store_true", help="random instead of center crop after the resize")
    g.add_argument("--no_hflip", action="store_true", help="no random horizontal flips")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.2,
                   help="share of captions replaced by the empty prompt, in [0,1] (CFG dropout)")
    g.add_argument("--dataloader_num_workers", type=int, default=None,
                   help="processes decoding images, per GPU (default: half the CPU cores of each GPU's process, at most "
                        "8, where the platform forks; 0 (the main process decodes) below 4 cores per process, on "
                        "platforms that spawn, and with --cache_latents)")
    g.add_argument("--cache_latents", action="store_true",
                   help="encode every image once before training (small data sets; crop/flip then drawn once per image)")
    g.add_argument("--latent_cache", default="auto", choices=["auto", "on", "off"],
                   help="keep each image's VAE posterior (mean, std; per flip) from its first encoding, so later epochs "
                        "neither decode nor encode it; the posterior sample stays random per step, so results are "
                        "unchanged. auto: on when the run sees its data more than once and the cache fits "
                        f"{LATENT_CACHE_AUTO_BYTES / 2**30:g} GiB of CPU memory. Not with --random_crop, --choice_model "
                        "or --cache_latents")
    g.add_argument("--max_bad_rows", type=int, default=None,
                   help="unreadable rows (image or caption) are skipped, replaced by the next readable row, and counted "
                        "(metrics.jsonl: bad_rows); stop with an error once more than N were skipped in this run "
                        "(default: no limit; 0: stop at the first)")
    g.add_argument("--scan_data", default=None, choices=["exit", "continue"],
                   help="read every row first (with the data-loader workers) and list the unreadable ones; then exit "
                        "(exit code 2 if any is bad, 0 if none), or continue training without them")

    g = parser.add_argument_group("method")
    g.add_argument("--sft", action="store_true", help="supervised fine-tuning on the preferred images instead of DPO")
    g.add_argument("--beta_dpo", type=float, default=5000.0,
                   help="DPO temperature: the strength of the KL penalty (diffusers' DPO example has no 0.5 factor: "
                        "its beta 2500 is 5000 here)")
    g.add_argument("--loss_type", default="sigmoid", choices=list(DPO_LOSSES),
                   help="sigmoid: Diffusion-DPO; hinge: SLiC, relu(1 - inside); ipo: IPO, (inside / beta - 1 / (2 beta))^2")
    g.add_argument("--choice_model", default=None,
                   help=f"AI feedback: this scoring model picks each pair's winner (labels ignored); one of "
                        f"{', '.join(list_rewards())} (aliases: {', '.join(CHOICE_MODEL_ALIASES)})")
    g.add_argument("--reward_model_paths", nargs="*", default=[], metavar="NAME=PATH",
                   help="local folder or file for a scoring model instead of its hub id, e.g. pickscore=/models/pickscore")
    g.add_argument("--unet_init", default=None,
                   help="start (and reference) UNet: a folder with unet/ or a UNet folder, instead of the pipeline's")
    g.add_argument("--sdxl", action="store_true", help="assert the model is SDXL (it is read from model_index.json)")
    g.add_argument("--snr_gamma", type=float, default=None, help="--sft: min-SNR loss weighting (5.0 is usual)")
    g.add_argument("--noise_offset", type=float, default=0.0, help="offset noise scale (0 = off)")
    g = parser.add_argument_group("flow-matching models (SD3 / SD3.5, FLUX.1)")
    g.add_argument("--weighting_scheme", default=None, choices=WEIGHTING_SCHEMES,
                   help="how t is drawn (logit_normal, mode) or, with t uniform, how the --sft loss is weighted (cosmap, "
                        "sigma_sqrt), as diffusers' SD3 / FLUX training examples (default: logit_normal for SD3, the "
                        "SD3 paper's; none (uniform) for FLUX, diffusers' FLUX script's)")
    g.add_argument("--logit_mean", type=float, default=None, help="logit_normal: mean of the logit of t (default 0.0)")
    g.add_argument("--logit_std", type=float, default=None, help="logit_normal: std of the logit of t (default 1.0)")
    g.add_argument("--mode_scale", type=float, default=None, help="mode: the density's scale (default 1.29)")
    g.add_argument("--train_guidance_scale", type=float, default=None,
                   help="FLUX.1-dev (guidance-distilled): the value of its guidance embedding in the training passes of "
                        "model and reference (default 1.0: the denoising loss on real images is least for the unguided "
                        "velocity, which the distilled model gives at 1, as diffusers' FLUX DreamBooth README trains); "
                        "--guidance_scale stays the validation images'")

    g = parser.add_argument_group("validation images")
    g.add_argument("--num_inference_steps", type=int, default=50,
                   help="sampling steps of the validation images (DDIM; SD3 / FLUX: their Euler scheduler)")
    g.add_argument("--guidance_scale", type=float, default=7.5,
                   help="classifier-free guidance scale of the validation images (1 = no guidance); FLUX.1-dev: its "
                        "guidance embedding's value (3.5 is FluxPipeline's default)")
    add_speed_args(parser, sampling=False)
    describe_defaults(parser, "the Diffusion-DPO train.py", beta_dpo=5000.0, proportion_empty_prompts=0.2,
                      adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-8, max_grad_norm=1.0,
                      checkpointing_steps=500, report_to="tensorboard")
    args = parser.parse_args(argv)
    resolve_learning_rate(args)
    check_args(args)
    return args


def resolve_learning_rate(args):
    """--learning_rate not given: the full-UNet or the LoRA default (written to args.json as resolved)."""
    if args.learning_rate is None:
        args.learning_rate = LORA_LEARNING_RATE if args.use_lora else FULL_UNET_LEARNING_RATE


def check_args(args):
    """Everything that can be checked before a model or a dataset is loaded."""
    check_common_args(args)
    if not args.dataset_name and not args.train_data_dir:
        raise UsageError("pass --dataset_name (hub id, datasets folder, parquet or jsonl file) or --train_data_dir")
    if not args.beta_dpo > 0:
        raise UsageError(f"--beta_dpo must be > 0, got {args.beta_dpo}")
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise UsageError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UsageError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.noise_offset < 0 or (args.dataloader_num_workers or 0) < 0:
        raise UsageError("--noise_offset and --dataloader_num_workers must be >= 0")
    if args.max_bad_rows is not None and args.max_bad_rows < 0:
        raise UsageError(f"--max_bad_rows must be >= 0, got {args.max_bad_rows}")
    if args.latent_cache == "on" and (args.random_crop or args.choice_model or args.cache_latents):
        raise UsageError("--latent_cache on keeps one posterior per image and flip: it does not combine with "
                         "--random_crop (a crop per draw), --choice_model (the scorer reads every image each step) or "
                         "--cache_latents (encodes everything up front); drop one")
    if args.scan_data and args.cache_latents:
        raise UsageError("--scan_data and --cache_latents: caching already reads every row; drop --scan_data")
    if args.logit_std is not None and args.logit_std <= 0:
        raise UsageError(f"--logit_std must be > 0, got {args.logit_std}")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise UsageError(f"--max_train_samples must be >= 1, got {args.max_train_samples}")
    if args.num_inference_steps < 1:
        raise UsageError(f"--num_inference_steps must be >= 1, got {args.num_inference_steps}")
    if args.image_column and not args.sft:
        raise UsageError("--image_column (plain image-caption data) needs --sft: DPO trains on pairs")
    if args.snr_gamma is not None and (not args.sft or args.snr_gamma <= 0):
        raise UsageError("--snr_gamma must be > 0 and applies to --sft only (it would change the DPO objective)")
    if args.choice_model is not None:
        if args.image_column:
            raise UsageError("--choice_model picks the winner of a pair; it does not apply to --image_column data")
        spec = CHOICE_MODEL_ALIASES.get(args.choice_model, args.choice_model)
        try:
            parse_reward_spec(spec)
        except UsageError as e:
            raise UsageError(f"--choice_model {args.choice_model!r}: {e}") from None
        args.choice_model = spec
    args.reward_paths = parse_name_paths(args.reward_model_paths)


FLOW_FLAGS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")
# diffusers' SD3 / FLUX training examples' defaults
FLOW_DEFAULTS = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}


def check_family_args(args, family: str, is_sdxl: bool):
    """What the model's family (read from model_index.json before any weight loads) rules out; fills the flow flags'
    per-family defaults, so args.json holds the values the run used."""
    name = {"sd": "SDXL" if is_sdxl else "SD1.5", "sd3": "SD3", "flux": "FLUX.1"}[family]
    if args.sdxl and not is_sdxl:
        raise UsageError(f"--sdxl given, but {args.pretrained_model_name_or_path} is a {name} pipeline (its "
                         f"model_index.json says so); drop --sdxl")
    if family == "sd":
        given = [f"--{f}" for f in (*FLOW_FLAGS, "train_guidance_scale") if getattr(args, f) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: flow-matching (SD3 / FLUX) flags; {name} trains on DDPM timesteps")
        return
    if args.snr_gamma is not None:
        raise UsageError(f"--snr_gamma (min-SNR) weights DDPM timesteps; for {name} use --weighting_scheme")
    if args.train_guidance_scale is not None and family != "flux":
        raise UsageError(f"--train_guidance_scale sets FLUX's guidance embedding; {name} has none")
    args.weighting_scheme = args.weighting_scheme or DEFAULT_WEIGHTING[family]
    # each density's own parameters; the other schemes draw t uniformly and take none
    shapes = {"logit_normal": ("logit_mean", "logit_std"), "mode": ("mode_scale",)}.get(args.weighting_scheme, ())
    given = [f"--{f}" for f in FLOW_DEFAULTS if f not in shapes and getattr(args, f) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: not used by --weighting_scheme {args.weighting_scheme} (the {name} "
                         f"default when not given); --logit_mean / --logit_std shape logit_normal, --mode_scale mode")
    if not args.sft and args.weighting_scheme in ("cosmap", "sigma_sqrt"):
        raise UsageError(f"--weighting_scheme {args.weighting_scheme} weights the --sft loss (t uniform); DPO draws t "
                         f"only and keeps plain errors: use logit_normal, mode or none")
    for flag, value in FLOW_DEFAULTS.items():
        setattr(args, flag, value if getattr(args, flag) is None else getattr(args, flag))
    if family == "flux" and args.train_guidance_scale is None:
        args.train_guidance_scale = 1.0


# --------------------------------------------------------------------------- main
def main(args):
    # ---- data first, before accelerate logs a line: a wrong path or column fails in seconds, in one line
    ds, base_dir, where = open_image_dataset(args.dataset_name, args.train_data_dir, args.split, args.cache_dir)
    pairs = not args.image_column  # plain image-caption data has one image per row (--sft only)
    image_columns = [args.image_0_column, args.image_1_column] if pairs else [args.image_column]
    use_labels = pairs and args.choice_model is None
    columns = {"--caption_column": args.caption_column,
               **dict(zip(["--image_0_column", "--image_1_column"] if pairs else ["--image_column"], image_columns))}
    require_columns(ds, {**columns, **({"--label_column": args.label_column} if use_labels else {})}, where)
    data_rows, winner_first, n_ties = select_pairs(ds, args.label_column if use_labels else None,
                                                   args.max_train_samples, args.seed)
    # accelerate launch sets WORLD_SIZE for more than one process; a set of only ties fails here, not after loading
    check_enough_rows(len(data_rows), args.train_batch_size, int(os.environ.get("WORLD_SIZE", 1)), n_ties,
                      args.label_column)
    # the first row read once now (images decoded at any size, caption checked): a wrong image path or a caption
    # that is not text fails in seconds, not after the models load. SFT without a scorer never reads the loser.
    ImagePairDataset(ds, image_columns, args.caption_column, data_rows[:1], winner_first[:1], resolution=8,
                     decode=1 if args.sft and args.choice_model is None else 2, base_dir=base_dir)[(0, 0, 0)]
    # the model's family from its model_index.json (no weights yet): flags that cannot work with it fail here
    check_family_args(args, *read_family(args.pretrained_model_name_or_path, args.revision))

    # ---- set-up
    accelerator = make_accelerator(args, project_name="dpo" if not args.sft else "sft")
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = default_num_workers(args, accelerator.num_processes)
    device, dtype = accelerator.device, compute_dtype(accelerator)
    stop = StopRequest()
    global_batch = accelerator.num_processes * args.train_batch_size
    rows = slice(accelerator.process_index * args.train_batch_size, (accelerator.process_index + 1) * args.train_batch_size)
    if accelerator.is_main_process:
        if use_labels:
            logger.info(f"dropped {n_ties} of {len(ds)} pairs with a tie ({args.label_column} = 0.5)")
        logger.info(f"training on {len(data_rows)} {'pairs' if pairs else 'images'} from {where}")

    # ---- load: frozen text encoders + VAE in the compute dtype, trainable UNet (LoRA or full), reference
    parts = load_pipeline_parts(args.pretrained_model_name_or_path, args.revision, args.variant,
                                args.pretrained_vae_model_name_or_path)
    if args.unet_init:
        parts.unet = load_unet_init(args.unet_init, type(parts.unet))
    freeze_frozen_parts(parts, device, dtype)
    unet = parts.unet
    frozen_unet = None
    if args.use_lora:
        add_trainable_lora(unet, args.lora_rank, args.lora_alpha, args.seed, device, dtype)  # adapters in fp32
    else:
        unet.to(device).requires_grad_(True)
        if not args.sft:  # the reference: a frozen copy in the mixed-precision dtype
            frozen_unet = frozen_copy(unet, dtype)
    if args.channels_last and not unet_is_wrapped(accelerator):
        # cuDNN's bf16 convolutions run in NHWC: +8-16 % per DPO step on an H100 (BENCHMARKS.md); the full-UNet
        # reference copy runs every step too. FSDP and DeepSpeed need the trained UNet contiguous, and then the
        # reference stays NCHW as well: other bf16 convolution kernels would make it differ from the model at step 0
        # (first loss 0.72 instead of log 2 under ZeRO-2 on an H200, BENCHMARKS.md "Distributed"). The VAE's encoder
        # stays NCHW: its GroupNorms would copy channels-last activations to NCHW and back (1.36x, BENCHMARKS.md)
        for model in filter(None, (unet, frozen_unet)):
            model.to(memory_format=torch.channels_last)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    scorer = None
    if args.choice_model:
        scorer = load_reward(args.choice_model, paths=args.reward_paths, device=device, dtype=dtype)
    resolution = args.resolution or parts.default_resolution
    latent_shape = parts.latent_shape(resolution)
    n_images = 1 if args.sft else 2  # images per row that the loss sees (winner, loser)
    logger.info(f"{parts.name} at {resolution}px, {'SFT' if args.sft else 'DPO'}, "
                f"{'LoRA rank ' + str(args.lora_rank) if args.use_lora else 'full UNet'}, beta {args.beta_dpo}, "
                f"loss {args.loss_type}, choice model {args.choice_model}")

    dataset = ImagePairDataset(
        ds, image_columns, args.caption_column, data_rows, winner_first, resolution, args.random_crop,
        not args.no_hflip, args.proportion_empty_prompts, args.seed, base_dir=base_dir, keep_pil=scorer is not None,
        decode=2 if scorer is not None else n_images,  # SFT without a scorer never reads the loser
    )
    if args.scan_data:
        dataset = scan_dataset(dataset, args, accelerator)

    if args.cache_latents:
        dataset = build_latent_cache(dataset, parts.vae, scorer, args, accelerator.is_local_main_process)

    # ---- optimizer, scheduler, accelerate
    learning_rate = scaled_learning_rate(args, accelerator.num_processes)
    optimizer = build_optimizer(args, unet.parameters(), learning_rate)
    lr_scheduler = build_lr_scheduler(args, optimizer, accelerator.num_processes)
    register_checkpoint_hooks(accelerator, parts.is_sdxl)
    unet, optimizer, lr_scheduler = prepare_for_training(accelerator, args, unet, optimizer, lr_scheduler, frozen_unet)
    trained = accelerator.unwrap_model(unet)
    start_step = resume_from_checkpoint(accelerator, args)
    metrics_log = MetricsLog(args.output_dir, start_step, enabled=accelerator.is_main_process)
    guard, bad_rows_total = NonFiniteGuard(start_step=start_step, defer=defers_loss_check(args, accelerator)), 0
    # Our own sharding (not accelerate's): this process's slice of each global batch, from the step we start at.
    sampler = GlobalBatchSampler(len(dataset), args.train_batch_size, accelerator.num_processes,
                                 accelerator.process_index, args.seed, start_step * args.gradient_accumulation_steps)
    cache = PosteriorCache(parts.vae.dtype) if latent_cache_applies(args, dataset, global_batch, parts, latent_shape,
                                                                    n_images) else None
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=SkipCachedSampler(sampler, dataset, cache)
                                              if cache is not None else sampler, collate_fn=collate_images,
                                              num_workers=args.dataloader_num_workers,
                                              pin_memory=accelerator.device.type == "cuda"))
    logger.info(f"{args.dataloader_num_workers} data-loader workers per process; VAE posterior cache "
                f"{'on' if cache is not None else 'off'} (--latent_cache {args.latent_cache})")
    train_unet = compile_training_unet(unet, args.compile_unet)  # the loss's forward; `unet` keeps DDP's no_sync

    reference_unet = reference_model(trained, frozen_unet)  # LoRA: adapters off; full: the frozen copy

    # The objective, chosen once: both take the trained model's per-image errors and the noised inputs.
    def dpo_objective(err, noisy, timesteps, cond, target):
        with torch.no_grad():
            ref_err = per_sample_error(predict(reference_unet, noisy, timesteps, cond), target)
        return dpo_loss(*err.chunk(2), *ref_err.chunk(2), args.beta_dpo, args.loss_type)

    def sft_objective(err, noisy, timesteps, cond, target):
        return sft_loss(err, noising.sft_weights(timesteps))

    objective = sft_objective if args.sft else dpo_objective
    # the family's timesteps, noising and target, and its model call (FLUX: the guidance embedding at a fixed value)
    noising = family_noising(parts, args)
    predict = functools.partial(model_prediction, guidance_scale=args.train_guidance_scale)
    validation_prompts = args.validation_prompts or [dataset_prompt(dataset, i) for i in range(min(2, len(dataset)))]
    has_reference = args.use_lora or frozen_unet is not None

    def validate(step):
        validation(args, accelerator, parts, trained, frozen_unet, has_reference, validation_prompts, scorer,
                   resolution, step)

    # no grid at step 0: every grid shows the base model (adapters off, or the frozen copy) beside the trained one
    progress = tqdm(range(start_step, args.max_train_steps), initial=start_step, total=args.max_train_steps,
                    disable=not accelerator.is_local_main_process, desc="SFT" if args.sft else "DPO")
    stopping, clock = False, StepClock()

    for step in progress:
        unet.train()
        micro_metrics, skipped, stopping, bad_rows = [], False, False, 0
        for micro in range(args.gradient_accumulation_steps):
            # ---- noise and timesteps drawn for the whole global batch from (seed, step, micro), then sliced,
            # so resume and any number of processes see the same numbers
            g = step_generator(args.seed, step, micro)
            timesteps = noising.draw(global_batch, g)[rows]
            noise = torch.randn(global_batch, *latent_shape, generator=g)[rows]
            offset = torch.randn(global_batch, latent_shape[0], 1, 1, generator=g)[rows]
            posterior_eps = torch.randn(global_batch, 2, *latent_shape, generator=g)[rows]  # VAE posterior sample
            noise = (noise + args.noise_offset * offset).to(device)  # offset noise: crosslabs.org/blog/diffusion-with-offset-noise
            timesteps = timesteps.to(device)

            # ---- encode: order by the scoring model, images -> latents, captions -> text conditioning
            with clock.data():
                batch = next_batch(loader)
            bad_rows += sum(len(b) for b in batch.get("bad_rows", []))  # replaced by readable rows in the dataset
            if "pil" in batch:
                batch = swap_pairs(batch, choose_winners(scorer, batch))
            latents, cond = encode_batch(parts, batch, posterior_eps, n_images, resolution, cache)

            # ---- noise: one noise sample and one timestep per pair, shared by winner and loser
            noisy, target, timesteps = noising.pairs(latents, noise, timesteps)

            with accelerator.accumulate(unet), accelerator.autocast():
                # ---- loss
                err = per_sample_error(predict(train_unet, noisy, timesteps, cond), target)  # (n*B,)
                loss, metrics = objective(err, noisy, timesteps, cond, target)

                # ---- update (skipped on every process if any loss or gradient is not finite); a stop request
                # drops the partial accumulation at once: a long step need not finish before the launcher kills it
                finite, stopping = guard.check(accelerator, loss, stop, step + 1, micro)
                if stopping:
                    optimizer.zero_grad(set_to_none=True)
                    break
                if finite:
                    accelerator.backward(loss)
                else:
                    skipped = True
                if accelerator.sync_gradients:
                    grad_norm, skipped = optimizer_update(accelerator, args, unet, optimizer, lr_scheduler, skipped,
                                                          guard.take_pending())
            micro_metrics.append(metrics)
        if stopping:
            stop_run(accelerator, args, step, metrics_log)  # checkpoint of the last completed step, exit code 3

        # ---- log: one metrics dict per optimizer step, averaged over micro-steps and processes
        global_step = step + 1
        logs = reduce_step_metrics(accelerator, micro_metrics, grad_norm, counts={"bad_rows": bad_rows})
        logs.update(step=global_step, lr=lr_scheduler.get_last_lr()[0], skipped=int(skipped), **clock.lap())
        log_step(accelerator, metrics_log, progress, logs, shown=("loss", "implicit_acc"))
        bad_rows_total += logs["bad_rows"]
        check_bad_rows(bad_rows_total, args.max_bad_rows)
        guard.end_step(accelerator, args, global_step, skipped, metrics_log)  # Diverged (exit code 4) if it must

        with clock.paused():  # checkpoints and grids are not steps
            stopping = checkpoint_or_stop(accelerator, args, global_step, stop, metrics_log)  # Stopped (exit code 3)
            if validation_due(args, global_step):
                validate(global_step)

    # ---- save: LoRA in the diffusers format (or unet/), a last validation grid (not when told to stop), upload
    save_outputs(accelerator, args, trained, parts.is_sdxl)
    if not stopping and validation_wanted(args):
        validate(args.max_train_steps)
    logger.info(f"finished {args.max_train_steps} steps; {guard.total} updates skipped (non-finite), "
                f"{bad_rows_total} unreadable rows skipped in this run")
    metrics_log.close()
    accelerator.end_training()


# --------------------------------------------------------------------------- helpers of main
def default_num_workers(args, num_processes: int) -> int:
    """--dataloader_num_workers not given: decode images off the training process where that pays (see its help)."""
    import multiprocessing

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", num_processes)))
    if args.cache_latents or per_process < 4 or multiprocessing.get_start_method() == "spawn":
        return 0  # nothing to decode; workers would take cores from the step; spawned workers re-import everything
    return min(8, per_process // 2)


@torch.no_grad()
def vae_moments(vae, pixels):
    """(B, n, 3, R, R) in [-1,1] -> mean and std of the VAE posterior, each (B, n, C, h, w) float32."""
    param = next(vae.parameters())
    dist = vae.encode(pixels.flatten(0, 1).to(param.device, param.dtype)).latent_dist
    return dist.mean.float().unflatten(0, pixels.shape[:2]), dist.std.float().unflatten(0, pixels.shape[:2])


@torch.no_grad()
def encode_batch(parts, batch, posterior_eps, n_images: int, resolution: int, cache=None):
    """A collated batch -> (latents (n*B, C, h, w) stacked [winners; losers], TextConditioning of n*B rows).

    The first `n_images` images of each row are used (SFT: the winner). `posterior_eps` (B, >=n, C, h, w) draws
    the VAE posterior sample. SDXL time ids come from each image's own original size and crop. `cache`
    (--latent_cache): the posteriors of images seen before come from there, the others are encoded into it.
    """
    device = parts.text_encoders[0].device
    if cache is not None:
        mean, std, batch = cache.moments(lambda pixels: vae_moments(parts.vae, pixels), batch, n_images, device)
    elif "pixels" in batch:
        mean, std = vae_moments(parts.vae, batch["pixels"][:, :n_images])
    else:  # --cache_latents
        mean, std = batch["latent_mean"][:, :n_images].float(), batch["latent_std"][:, :n_images].float()
    latents = mean.to(device) + std.to(device) * posterior_eps[:, :n_images].to(device)  # (B, n, C, h, w)
    shift = getattr(parts.vae.config, "shift_factor", None) or 0.0
    latents = (latents.transpose(0, 1).flatten(0, 1) - shift) * parts.vae.config.scaling_factor  # (n*B, C, h, w)

    def per_image(key):  # (B, n, 2) -> n*B rows, in the order of the latents
        return batch[key][:, :n_images].transpose(0, 1).flatten(0, 1).tolist()

    time_ids = sdxl_time_ids(per_image("original_size"), per_image("crop"), [(resolution, resolution)] * len(latents))
    cond = encode_prompts(parts, batch["caption"], device, resolution).repeat(n_images).with_time_ids(time_ids)
    return latents, cond


def latent_cache_applies(args, dataset, global_batch: int, parts, latent_shape, n_images: int) -> bool:
    """--latent_cache: on, off, or (auto) on where it pays: the run draws more batches than one epoch holds (each
    epoch is a permutation cut into whole global batches), and the posteriors of every image and flip fit
    LATENT_CACHE_AUTO_BYTES."""
    if args.latent_cache == "off" or args.cache_latents or args.random_crop or args.choice_model:
        return False
    if args.latent_cache == "on":
        return True
    one_image = 2 * math.prod(latent_shape) * parts.vae.dtype.itemsize  # mean and std
    size = len(dataset) * n_images * (1 if args.no_hflip else 2) * one_image
    more_than_one_epoch = args.max_train_steps * args.gradient_accumulation_steps > len(dataset) // global_batch
    return more_than_one_epoch and size <= LATENT_CACHE_AUTO_BYTES


def scan_dataset(dataset, args, accelerator):
    """--scan_data: every process reads its share of the rows (with the data-loader workers); the main process
    lists the unreadable ones. `exit`: stop here (exit code 0 if none, 2 if some); `continue`: train without them."""
    from accelerate.utils import gather_object

    share = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    found = scan_rows(dataset, share, args.dataloader_num_workers, accelerator.is_local_main_process)
    found = sorted(gather_object(found))
    for _, reason in found:
        logger.warning(f"--scan_data: {reason}")
    logger.info(f"--scan_data: {len(found)} of {len(dataset)} rows are unreadable")
    if args.scan_data == "exit":
        accelerator.end_training()
        if found:
            raise UsageError(f"--scan_data: {len(found)} of {len(dataset)} rows are unreadable (listed above)")
        raise SystemExit(0)
    keep = sorted(set(range(len(dataset))) - {position for position, _ in found})
    dataset.rows, dataset.winner_first = dataset.rows[keep], dataset.winner_first[keep]
    return dataset


def load_unet_init(path, model_class):
    """--unet_init: a folder holding unet/ or transformer/ (e.g. an earlier full fine-tune's output), or the model's
    own folder / hub id; `model_class`: the pipeline's denoiser class (UNet, SD3 or FLUX transformer)."""
    import os

    subfolder = next((s for s in ("unet", "transformer") if os.path.isdir(os.path.join(path, s))), None)
    try:
        return model_class.from_pretrained(path, subfolder=subfolder)
    except (OSError, ValueError) as e:
        raise UsageError(f"--unet_init {path}: not a {model_class.__name__} folder or a folder with unet/ or "
                         f"transformer/ ({type(e).__name__})") from None


def dataset_prompt(dataset, position):
    """The caption of a row, for the default validation prompts."""
    if isinstance(dataset, LatentCacheDataset):
        return dataset.prompts[position]
    value = dataset.ds[int(dataset.rows[position])][dataset.caption_column]
    return value if isinstance(value, str) else str(value[0])


@torch.no_grad()
def build_latent_cache(dataset, vae, scorer, args, show_progress):
    """--cache_latents: every row through the VAE once (after the scoring model has ordered the pair)."""
    means, stds, originals, crops, prompts = [], [], [], [], []
    for start in tqdm(range(0, len(dataset), args.train_batch_size), disable=not show_progress, desc="caching latents"):
        items = [dataset[(i, CACHE_STEP, i)] for i in range(start, min(start + args.train_batch_size, len(dataset)))]
        batch = collate_images(items)
        if "pil" in batch:
            batch = swap_pairs(batch, choose_winners(scorer, batch))
        mean, std = vae_moments(vae, batch["pixels"])
        means.append(mean.cpu())
        stds.append(std.cpu())
        originals.append(batch["original_size"])
        crops.append(batch["crop"])
        prompts += batch["prompt"]
    return LatentCacheDataset(torch.cat(means), torch.cat(stds), torch.cat(originals), torch.cat(crops), prompts,
                              dataset.rows, args.proportion_empty_prompts, args.seed)


@torch.no_grad()
def validation(args, accelerator, parts, trained, frozen_unet, with_base, prompts, scorer, resolution, step):
    """Fixed prompts and seeds through a stock diffusers pipeline: the base model's images (first row) beside
    the trained model's (second row), with the scoring model's scores when --choice_model is set."""
    if accelerator.is_main_process or shards_parameters(accelerator):  # a sharded UNet needs every process
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        prompts = [p for p in prompts for _ in range(args.num_validation_images)]
        seeds = [args.seed + j for _ in range(len(prompts) // args.num_validation_images) for j in range(args.num_validation_images)]
        models = {"trained": (trained, contextlib.nullcontext())}
        if with_base:  # the frozen copy, or the same UNet with its adapters off
            base = (frozen_unet, contextlib.nullcontext()) if frozen_unet is not None else (trained, adapters_disabled(trained))
            models = {"base": base, **models}
        rows, scores = [], {}
        for name, (unet, context) in models.items():
            pipe = build_pipeline(parts, unet=unet)
            # a copy: the training scheduler stays untouched (flow models sample with their own Euler scheduler)
            sampler = FlowMatchEulerDiscreteScheduler if parts.is_flow else DDIMScheduler
            pipe.scheduler = sampler.from_config(parts.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            with context, accelerator.autocast():
                images = pipe(prompts, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                              height=resolution, width=resolution, output_type="pt",
                              generator=[torch.Generator().manual_seed(s) for s in seeds]).images.float()
            if scorer is not None:
                scores[name] = [round(s, 5) for s in scorer(images, prompts).tolist()]
            rows.append(images.cpu())
        if accelerator.is_main_process:
            log_validation(accelerator, args.output_dir, step, torch.cat(rows), list(models), prompts,
                           info={"seeds": seeds, "scores": scores}, scores=scores, score_name=args.choice_model)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    run_main(main, parse_args)
