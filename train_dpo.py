"""Diffusion-DPO and SFT for SD1.5, SDXL, SD3 / SD3.5 and FLUX.1 (full model or LoRA), on preference pairs or
image-caption data.

Diffusion-DPO (Wallace et al. 2023, https://arxiv.org/abs/2311.12908): winner and loser of a pair are noised
with one noise sample at one timestep; the loss rewards the trained UNet for lowering its denoising error on
the winner more than the frozen reference does, relative to the loser. `--sft` is plain noise-prediction
fine-tuning on the preferred image (or on ordinary image-caption data with `--image_column`). Flow-matching models
(SD3, FLUX; read from model_index.json) train the same loss on velocity errors (target noise - x_0), with t drawn as
the model was trained (--weighting_scheme). Wan 2.1 (video) trains on a folder written by `python -m utils.preencode`
(VAE posteriors and prompt embeddings; README "Video (Wan 2.1)").

Quickstart (offline, the toy world: AI feedback from the `toyclip` scorer on pairs sampled from `toy-sd`, the best
and the worst of 4 base images each; the full UNet; samples/validation-step-000032.png shows the base and the trained
model's images of the two prompts with toyclip's score under each, README "Diffusion-DPO"):

    python experiments/toyworld_pairs.py --output_dir outputs/toy_pairs --num_pairs 64 --seed 0
    python train_dpo.py --pretrained_model_name_or_path toy-sd --dataset_name outputs/toy_pairs \
        --choice_model toyclip --no-use_lora --learning_rate 5e-5 --beta_dpo 500 --lr_scheduler constant \
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
import contextlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from utils import UsageError
from utils.cli import ArgumentParser
from utils.data import (CAPTION_COLUMN, LABEL_COLUMN, PAIR_COLUMNS, BucketBatchSampler, GlobalBatchSampler,
                        ImagePairDataset, PosteriorCache, SkipCachedSampler, check_bad_rows, check_enough_rows,
                        check_some_row_readable, collate_images, next_batch, open_image_dataset, require_columns,
                        select_pairs)
from utils.denoising import (FLOW_TIMESTEP_DEFAULTS, TIMESTEP_BIAS_STRATEGIES, ZERO_TERMINAL_SNR_HELP,
                             default_train_guidance, encode_batch, family_noising, per_sample_error,
                             rescale_zero_terminal_snr, timestep_bias_weights)
from utils.flow import DEFAULT_WEIGHTING, WEIGHTING_SCHEMES
from utils.models import (adapters_disabled, add_trainable_lora, build_pipeline, freeze_frozen_parts, frozen_copy,
                          load_pipeline_parts, load_unet_init, model_prediction, read_family, reference_model)
from utils.pairs import (LATENT_CACHE_AUTO_BYTES, build_latent_cache, choose_winners, dataset_prompt,
                         default_num_workers, latent_cache_applies, scan_dataset, swap_pairs)
from utils.preencoded import check_encoders, check_preencoded_args, is_preencoded, open_preencoded
from utils.rewards import list_rewards, load_reward, parse_reward_spec, tensor_to_pil
from utils.sampling import SAMPLING_DEFAULTS_HELP, resolve_sampling_defaults
from utils.seeding import step_generator
from utils.speed import SAFE_TO_CHANGE_ON_RESUME as SPEED_FLAGS_SAFE_ON_RESUME
from utils.speed import add_speed_args, check_speed_args, compile_training_unet
from utils.train import Run, run_main
from utils.train.cli import (DEFAULTS_NOTE, HelpFormatter, add_common_args, add_reward_model_paths, check_common_args,
                             describe_defaults, parse_name_paths, set_help)
from utils.train.distributed import shards_parameters
from utils.train.validation import log_validation


logger = logging.getLogger("train_dpo")

# The names the Diffusion-DPO train.py gave its --choice_model scorers, mapped to this project's registry. Its "clip"
# (utils/clip_utils.py) is the LAION ViT-H-14 cosine with HPSv2's preprocessing: clip_h14, not the OpenAI ViT-L/14
# CLIP score that --reward_model clip names.
CHOICE_MODEL_ALIASES = {"aes": "aesthetic", "hps": "hpsv2", "clip": "clip_h14"}
# --learning_rate when not given. Full UNet: the Diffusion-DPO train.py's 1e-8, which its recipes multiply by the
# effective batch (--scale_lr: 2048 pairs -> 2.048e-5). LoRA trains at 1e-8 not at all: diffusers' DPO LoRA example
# (examples/research_projects/diffusion_dpo/train_diffusion_dpo.py) defaults to 5e-4.
FULL_UNET_LEARNING_RATE, LORA_LEARNING_RATE = 1e-8, 5e-4
# --beta_dpo when not given, per family. SD1.5 / SDXL: the Diffusion-DPO train.py's 5000. Flow models (SD3, FLUX):
# Flow-GRPO's Diffusion-DPO on SD3.5-M (scripts/train_sd3_dpo.py with config/dpo.py: train.beta = 100, the same
# -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l)) form), the only published DPO code for a flow model. A velocity
# error (target noise - x_0) moves 1 / (1 - sigma)^2 as much as the eps error for the same change of weights (16x at
# sigma 0.75), so 5000 there saturates the sigmoid within the first steps (bench/results/cpu-2026-12-07-flow-dpo-beta.md).
BETA_DPO = {"sd": 5000.0, "flow": 100.0}
# Flags a resume may change: how the data is read, not what it holds.
SAFE_TO_CHANGE_ON_RESUME = {*SPEED_FLAGS_SAFE_ON_RESUME, "dataloader_num_workers", "cache_dir", "reward_model_paths",
                            "reward_paths", "max_bad_rows", "scan_data", "latent_cache"}


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


# --------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
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
    g.add_argument("--beta_dpo", type=float, default=None,
                   help=f"DPO temperature: the strength of the KL penalty (default per family: SD1.5 / SDXL "
                        f"{BETA_DPO['sd']:g}, from the Diffusion-DPO train.py; SD3 / FLUX {BETA_DPO['flow']:g}, from "
                        f"Flow-GRPO's SD3 DPO config, config/dpo.py; diffusers' DPO example has no 0.5 factor: its beta "
                        f"2500 is 5000 here)")
    g.add_argument("--loss_type", default="sigmoid", choices=list(DPO_LOSSES),
                   help="sigmoid: Diffusion-DPO; hinge: SLiC, relu(1 - inside); ipo: IPO, (inside / beta - 1 / (2 beta))^2")
    g.add_argument("--choice_model", default=None,
                   help=f"AI feedback: this scoring model picks each pair's winner (labels ignored); one of "
                        f"{', '.join(n for n in list_rewards() if n not in CHOICE_MODEL_ALIASES)} (the Diffusion-DPO "
                        f"train.py's names: {', '.join(f'{k}={v}' for k, v in CHOICE_MODEL_ALIASES.items())})")
    add_reward_model_paths(g)
    g.add_argument("--unet_init", default=None,
                   help="start (and reference) UNet: a folder with unet/ or a UNet folder, instead of the pipeline's")
    g.add_argument("--sdxl", action="store_true", help="assert the model is SDXL (it is read from model_index.json)")
    g.add_argument("--snr_gamma", type=float, default=None, help="--sft: min-SNR loss weighting (5.0 is usual)")
    g.add_argument("--noise_offset", type=float, default=0.0, help="offset noise scale (0 = off)")
    g.add_argument("--rescale_zero_terminal_snr", action="store_true", help=ZERO_TERMINAL_SNR_HELP)
    g.add_argument("--timestep_bias_strategy", default="none", choices=TIMESTEP_BIAS_STRATEGIES,
                   help="SD1.5 / SD 2.x / SDXL: draw the training timestep with more weight on the earlier (less noisy) "
                        "or later (noisier) --timestep_bias_portion of the timesteps, or on [--timestep_bias_begin, "
                        "--timestep_bias_end), as diffusers' train_text_to_image_sdxl.py and MaxDiffusion (none = "
                        "uniform)")
    g.add_argument("--timestep_bias_multiplier", type=float, default=1.0,
                   help="weight of the biased timesteps against 1 for the others (> 1 favours them, < 1 avoids them)")
    g.add_argument("--timestep_bias_portion", type=float, default=0.25,
                   help="earlier / later: the fraction of the timesteps biased, in (0, 1]")
    g.add_argument("--timestep_bias_begin", type=int, default=0, help="range: the first biased timestep")
    g.add_argument("--timestep_bias_end", type=int, default=1000, help="range: one past the last biased timestep")
    g = parser.add_argument_group("flow-matching models (SD3 / SD3.5, FLUX.1, Wan 2.1)")
    g.add_argument("--weighting_scheme", default=None, choices=WEIGHTING_SCHEMES,
                   help="how t is drawn (logit_normal, mode) or, with t uniform, how the --sft loss is weighted (cosmap, "
                        "sigma_sqrt), as diffusers' SD3 / FLUX training examples (default: logit_normal for SD3, the "
                        "SD3 paper's; none (uniform) for FLUX, diffusers' FLUX script's; logit_normal for Wan 2.1, "
                        "finetrainers' Wan recipe, crush_smol_lora/train.sh, on sigmas shifted by Wan's flow_shift)")
    g.add_argument("--logit_mean", type=float, default=None, help="logit_normal: mean of the logit of t (default 0.0)")
    g.add_argument("--logit_std", type=float, default=None, help="logit_normal: std of the logit of t (default 1.0)")
    g.add_argument("--mode_scale", type=float, default=None, help="mode: the density's scale (default 1.29)")
    g.add_argument("--train_guidance_scale", type=float, default=None,
                   help="FLUX.1-dev (guidance-distilled): the value of its guidance embedding in the training passes of "
                        "model and reference (default 1.0: the denoising loss on real images is least for the unguided "
                        "velocity, which the distilled model gives at 1, as diffusers' FLUX DreamBooth README trains); "
                        "--guidance_scale stays the validation images'")

    g = parser.add_argument_group("validation images")
    g.add_argument("--num_inference_steps", type=int, default=None,
                   help=f"sampling steps of the validation images (DDIM; SD3 / FLUX: their Euler scheduler; "
                        f"{SAMPLING_DEFAULTS_HELP['num_inference_steps']})")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help=f"classifier-free guidance scale of the validation images (1 = no guidance); FLUX.1-dev: its "
                        f"guidance embedding's value ({SAMPLING_DEFAULTS_HELP['guidance_scale']})")
    add_speed_args(parser, sampling=False)
    describe_defaults(parser, "the Diffusion-DPO train.py", proportion_empty_prompts=0.2,
                      adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-8, max_grad_norm=1.0,
                      checkpointing_steps=500, report_to="tensorboard")
    args = parser.parse_args(argv)
    resolve_learning_rate(args)
    check_args(args)
    return args


def resolve_learning_rate(args):
    """--learning_rate not given: the full-UNet or the LoRA default (written to args.json as resolved).

    --use_lora --scale_lr without --learning_rate is refused: the full-UNet default 1e-8 is a per-pair base that the
    paper's recipes scale, but the LoRA default 5e-4 is diffusers' per-step rate, which no source scales (5e-4 x 2048
    pairs would be 1.0), and no published LoRA DPO recipe gives a per-pair base to scale instead."""
    if args.learning_rate is None and args.use_lora and args.scale_lr:
        raise UsageError(f"--scale_lr with --use_lora needs --learning_rate (a per-pair base): the LoRA default "
                         f"{LORA_LEARNING_RATE:g} is a per-step rate, not scaled by the batch; pass --learning_rate, or "
                         f"drop --scale_lr to train at {LORA_LEARNING_RATE:g}")
    if args.learning_rate is None:
        args.learning_rate = LORA_LEARNING_RATE if args.use_lora else FULL_UNET_LEARNING_RATE


def check_args(args):
    """Everything that can be checked before a model or a dataset is loaded."""
    check_common_args(args)
    if not args.dataset_name and not args.train_data_dir:
        raise UsageError("pass --dataset_name (hub id, datasets folder, parquet or jsonl file) or --train_data_dir")
    if args.beta_dpo is not None and not args.beta_dpo > 0:
        raise UsageError(f"--beta_dpo must be > 0, got {args.beta_dpo}")
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise UsageError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UsageError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.noise_offset < 0 or (args.dataloader_num_workers or 0) < 0:
        raise UsageError("--noise_offset and --dataloader_num_workers must be >= 0")
    if args.timestep_bias_strategy != "none" and not args.timestep_bias_multiplier > 0:
        raise UsageError(f"--timestep_bias_multiplier must be > 0, got {args.timestep_bias_multiplier}; "
                         f"--timestep_bias_strategy none draws t uniformly")
    if args.timestep_bias_strategy in ("earlier", "later") and not 0 < args.timestep_bias_portion <= 1:
        raise UsageError(f"--timestep_bias_portion must be in (0, 1], got {args.timestep_bias_portion}")
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
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
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


def check_family_args(args, family: str, is_sdxl: bool):
    """What the model's family (read from model_index.json before any weight loads) rules out; fills the per-family
    defaults (validation sampling, --beta_dpo, the flow flags), so args.json holds the values the run used."""
    name = {"sd": "SDXL" if is_sdxl else "SD1.5", "sd3": "SD3", "flux": "FLUX.1", "wan": "Wan 2.1"}[family]
    if args.sdxl and not is_sdxl:
        raise UsageError(f"--sdxl given, but {args.pretrained_model_name_or_path} is a {name} pipeline (its "
                         f"model_index.json says so); drop --sdxl")
    if family == "wan" and not is_preencoded(args.dataset_name):
        raise UsageError(f"{name} trains on pre-encoded videos: run python -m utils.preencode on the videos and pass "
                         f"its --output_dir as --dataset_name (README \"Video (Wan 2.1)\")")
    resolve_sampling_defaults(args, family, is_sdxl)
    if args.beta_dpo is None:
        args.beta_dpo = BETA_DPO["sd" if family == "sd" else "flow"]
    if family == "sd":
        given = [f"--{f}" for f in (*FLOW_FLAGS, "train_guidance_scale") if getattr(args, f) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: flow-matching (SD3 / FLUX) flags; {name} trains on DDPM timesteps")
        return
    if args.snr_gamma is not None:
        raise UsageError(f"--snr_gamma (min-SNR) weights DDPM timesteps; for {name} use --weighting_scheme")
    if args.timestep_bias_strategy != "none":
        raise UsageError(f"--timestep_bias_strategy weights DDPM timesteps; {name} draws t by --weighting_scheme")
    if args.train_guidance_scale is not None and family != "flux":
        raise UsageError(f"--train_guidance_scale sets FLUX's guidance embedding; {name} has none")
    args.weighting_scheme = args.weighting_scheme or DEFAULT_WEIGHTING[family]
    # each density's own parameters; the other schemes draw t uniformly and take none
    shapes = {"logit_normal": ("logit_mean", "logit_std"), "mode": ("mode_scale",)}.get(args.weighting_scheme, ())
    given = [f"--{f}" for f in FLOW_TIMESTEP_DEFAULTS if f not in shapes and getattr(args, f) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: not used by --weighting_scheme {args.weighting_scheme} (the {name} "
                         f"default when not given); --logit_mean / --logit_std shape logit_normal, --mode_scale mode")
    if not args.sft and args.weighting_scheme in ("cosmap", "sigma_sqrt"):
        raise UsageError(f"--weighting_scheme {args.weighting_scheme} weights the --sft loss (t uniform); DPO draws t "
                         f"only and keeps plain errors: use logit_normal, mode or none")
    for flag, value in FLOW_TIMESTEP_DEFAULTS.items():
        setattr(args, flag, value if getattr(args, flag) is None else getattr(args, flag))
    if args.train_guidance_scale is None:
        args.train_guidance_scale = default_train_guidance(family)


# --------------------------------------------------------------------------- main
def main(args):
    # ---- before accelerate logs a line, in seconds and one line each: the model's family from its model_index.json
    # (no weights yet) rules out flags and data it cannot train on (Wan: raw videos), then a wrong path or column
    check_family_args(args, *read_family(args.pretrained_model_name_or_path, args.revision))
    data = open_training_data(args)

    # ---- set-up
    run = Run(args, "sft" if args.sft else "dpo", "SFT" if args.sft else "DPO", shown=("loss", "implicit_acc"),
              safe_on_resume=SAFE_TO_CHANGE_ON_RESUME)
    check_speed_args(args, run.strategy, run.wraps_model, run.shards_model, run.device)
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = default_num_workers(run.num_processes,
                                                          decodes_images=not (args.cache_latents or data.preencoded))
    device, dtype = run.device, run.dtype
    if run.is_main_process:
        if data.use_labels:
            logger.info(f"dropped {data.n_ties} of {len(data.ds)} pairs with a tie ({args.label_column} = 0.5)")
        logger.info(f"training on {len(data.rows)} {'pairs' if data.pairs else 'videos' if data.preencoded else 'images'} "
                    f"from {data.where}")

    # ---- load: frozen text encoders + VAE in the compute dtype, trainable UNet (LoRA or full), reference
    parts = load_pipeline_parts(args.pretrained_model_name_or_path, args.revision, args.variant,
                                args.pretrained_vae_model_name_or_path, text_encoders=not data.preencoded)
    if data.preencoded:  # latents and prompt embeddings from this model's VAE and text encoder only
        check_encoders(data.preencoded.manifest, args.dataset_name, parts, args)
    if args.rescale_zero_terminal_snr:
        rescale_zero_terminal_snr(parts)  # the noising and the validation sampler both take the rescaled schedule
    if args.unet_init:
        parts.unet = load_unet_init(args.unet_init, type(parts.unet))
    freeze_frozen_parts(parts, device, dtype)
    unet, frozen_unet = parts.unet, None
    if args.use_lora:
        add_trainable_lora(unet, args.lora_rank, args.lora_alpha, args.seed, device, dtype,  # adapters in fp32
                           targets=args.lora_targets)
    else:
        unet.to(device).requires_grad_(True)
        if not args.sft:  # the reference: a frozen copy in the mixed-precision dtype
            frozen_unet = frozen_copy(unet, dtype)
    if args.channels_last and not run.wraps_model and not parts.is_video:  # NHWC is 4-D; Wan's patch embedding is 3-D
        # cuDNN's bf16 convolutions run in NHWC (BENCHMARKS.md); the full-UNet reference copy runs every step too.
        # FSDP and DeepSpeed need the trained UNet contiguous, and then the reference stays NCHW as well: other bf16
        # convolution kernels would make it differ from the model at step 0 (a first loss other than log 2). The
        # VAE's encoder stays NCHW: its GroupNorms would copy channels-last activations to NCHW and back.
        for model in filter(None, (unet, frozen_unet)):
            model.to(memory_format=torch.channels_last)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    scorer = load_reward(args.choice_model, paths=args.reward_paths, device=device, dtype=dtype) \
        if args.choice_model else None
    resolution = args.resolution or parts.default_resolution
    latent_shape = data.preencoded.latent_shape if data.preencoded else parts.latent_shape(resolution)
    n_images = 1 if args.sft else 2  # images per row that the loss sees (winner, loser)
    size = f"{resolution}px" if not data.preencoded else "the pre-encoded size" if latent_shape else \
        f"the pre-encoded size buckets {', '.join(data.preencoded.bucket_names)} (one per batch)"
    logger.info(f"{parts.name} at {size}, {'SFT' if args.sft else 'DPO'}, "
                f"{'LoRA rank ' + str(args.lora_rank) if args.use_lora else 'full UNet'}, beta {args.beta_dpo}, "
                f"loss {args.loss_type}, choice model {args.choice_model}")
    dataset = build_dataset(args, data, resolution, scorer, n_images, run, parts.vae)

    # ---- optimizer, accelerate, resume, and this process's batches from the step we start at
    unet = run.prepare(unet, frozen_unet, is_sdxl=parts.is_sdxl, defer_loss_check=args.defer_loss_check)
    trained = run.trained
    loader, cache = make_loader(args, run, dataset, parts.vae.dtype, latent_shape, n_images,
                                data.preencoded.buckets if data.preencoded else None)
    train_unet = compile_training_unet(unet, args.compile_unet)  # the loss's forward; `unet` keeps DDP's no_sync
    reference_unet = reference_model(trained, frozen_unet)  # LoRA: adapters off; full: the frozen copy
    noising = family_noising(parts, args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale,
                             args.snr_gamma,  # the family's timesteps, noising and target
                             timestep_bias_weights(parts.scheduler.config.num_train_timesteps,
                                                   args.timestep_bias_strategy, args.timestep_bias_multiplier,
                                                   args.timestep_bias_portion, args.timestep_bias_begin,
                                                   args.timestep_bias_end))
    guidance = args.train_guidance_scale  # FLUX.1-dev: its guidance embedding's value in the training passes
    if parts.is_video:  # the grids are of images, and a pre-encoded run has no text encoder to prompt a sampler
        logger.info(f"no validation samples for {parts.name} video: sample the saved LoRA / transformer with WanPipeline")
    else:
        validation_prompts = args.validation_prompts or [dataset_prompt(dataset, i) for i in range(min(2, len(dataset)))]
        # no grid at step 0: every grid shows the base model (adapters off, or the frozen copy) beside the trained one
        run.on_validation(lambda step: validation(args, run.accelerator, parts, trained, frozen_unet,
                                                  args.use_lora or frozen_unet is not None, validation_prompts, scorer,
                                                  resolution, step, run.stop_requested))
    run.add_step_check(lambda logs: check_bad_rows(run.totals["bad_rows"], args.max_bad_rows))

    for step in run.steps():
        bad_rows = 0
        for micro in run.micro_steps():
            with run.waiting_for_data():
                batch = next_batch(loader)
            # pre-encoded size buckets: the whole global batch is of one bucket (BucketBatchSampler), whose shape
            # this process's latents give
            shape = latent_shape or tuple(batch["latent_mean"].shape[2:])  # (C, f, h, w)

            # ---- noise and timesteps drawn for the whole global batch from (seed, step, micro), then sliced,
            # so resume and any number of processes see the same numbers
            g = step_generator(args.seed, step, micro)
            timesteps = noising.draw(run.global_batch, g)[run.rows]
            noise = torch.randn(run.global_batch, *shape, generator=g)[run.rows]
            offset = torch.randn(run.global_batch, shape[0], *[1] * (len(shape) - 1),
                                 generator=g)[run.rows]  # per channel: (B, C, 1, 1), videos (B, C, 1, 1, 1)
            posterior_eps = torch.randn(run.global_batch, 2, *shape, generator=g)[run.rows]  # VAE posterior
            noise = (noise + args.noise_offset * offset).to(device)  # offset noise: crosslabs.org/blog/diffusion-with-offset-noise
            timesteps = timesteps.to(device)

            # ---- encode: order by the scoring model, images -> latents, captions -> text conditioning
            bad_rows += sum(len(b) for b in batch.get("bad_rows", []))  # replaced by readable rows in the dataset
            if "pil" in batch:
                batch = swap_pairs(batch, choose_winners(scorer, batch))
            latents, cond = encode_batch(parts, batch, posterior_eps, n_images, resolution, cache)

            # ---- noise: one noise sample and one timestep per pair, shared by winner and loser
            noisy, target, timesteps = noising.pairs(latents, noise, timesteps)

            with run.accumulate():
                # ---- loss: the trained model's errors (winners, then losers), the reference's without grad
                err = per_sample_error(model_prediction(train_unet, noisy, timesteps, cond, guidance), target)  # (n*B,)
                if args.sft:
                    loss, logs = sft_loss(err, noising.sft_weights(timesteps))
                else:
                    with torch.no_grad():
                        ref_err = per_sample_error(model_prediction(reference_unet, noisy, timesteps, cond, guidance),
                                                   target)
                    loss, logs = dpo_loss(*err.chunk(2), *ref_err.chunk(2), args.beta_dpo, args.loss_type)

                # ---- update (skipped on every process if any loss or gradient is not finite)
                run.backward(loss, logs)
        run.end_step(counts={"bad_rows": bad_rows})

    # ---- save: LoRA in the diffusers format (or unet/), a last validation grid, upload
    return run.finish(summary=f"{run.totals.get('bad_rows', 0)} unreadable rows skipped in this run")


# --------------------------------------------------------------------------- data
@dataclass
class TrainingData:
    """The rows a run trains on, opened and checked before any model loads."""

    ds: object           # the datasets.Dataset
    base_dir: str        # image paths in the data are relative to this folder
    where: str           # the flag and value, for messages
    image_columns: list  # [first, second] of a pair, or [image] (--image_column)
    rows: object         # (N,) the rows kept (ties dropped, --max_train_samples)
    winner_first: object  # (N,) bool per kept row
    n_ties: int
    pairs: bool          # pairs, or plain image-caption rows
    use_labels: bool     # the label column orders the pairs (no --choice_model)
    preencoded: object = None  # utils.preencoded.PreencodedData: a folder of python -m utils.preencode


def open_training_data(args) -> TrainingData:
    """Open --dataset_name / --train_data_dir, check the columns, drop ties, take --max_train_samples, and read the
    first rows until one is readable (images decoded, caption checked; at most utils.data.PROBE_ROWS): a wrong path,
    column or image fails in seconds, in one line, before the models load, while an unreadable row among readable
    ones is left to training (skipped and counted). With --scan_data the scan reads every row and decides. SFT
    without a scorer never reads the loser. A folder of `python -m utils.preencode` (its manifest.json) holds latents
    and prompt embeddings instead (utils/preencoded.py)."""
    if is_preencoded(args.dataset_name):
        pre = open_preencoded(args.dataset_name, args.max_train_samples, args.seed)
        check_preencoded_args(args, pre)
        return TrainingData(pre, None, f"--dataset_name {args.dataset_name} (pre-encoded)", [],
                            np.arange(len(pre.index)), pre.winner_first, pre.n_ties, pre.manifest["pairs"],
                            pre.manifest["pairs"], pre)
    ds, base_dir, where = open_image_dataset(args.dataset_name, args.train_data_dir, args.split, args.cache_dir)
    pairs = not args.image_column  # plain image-caption data has one image per row (--sft only)
    image_columns = [args.image_0_column, args.image_1_column] if pairs else [args.image_column]
    use_labels = pairs and args.choice_model is None
    columns = {"--caption_column": args.caption_column,
               **dict(zip(["--image_0_column", "--image_1_column"] if pairs else ["--image_column"], image_columns))}
    require_columns(ds, {**columns, **({"--label_column": args.label_column} if use_labels else {})}, where)
    rows, winner_first, n_ties = select_pairs(ds, args.label_column if use_labels else None, args.max_train_samples,
                                              args.seed)
    # accelerate launch sets WORLD_SIZE for more than one process; a set of only ties fails here, not after loading
    check_enough_rows(len(rows), args.train_batch_size, int(os.environ.get("WORLD_SIZE", 1)), n_ties,
                      args.label_column)
    if not args.scan_data:
        check_some_row_readable(ImagePairDataset(ds, image_columns, args.caption_column, rows, winner_first,
                                                 resolution=8, base_dir=base_dir,
                                                 decode=1 if args.sft and args.choice_model is None else 2), where)
    return TrainingData(ds, base_dir, where, image_columns, rows, winner_first, n_ties, pairs, use_labels)


def build_dataset(args, data: TrainingData, resolution: int, scorer, n_images: int, run, vae):
    """The training rows as a dataset of augmented, collatable items; --scan_data drops (or lists) the unreadable
    rows first; --cache_latents encodes every row once. Pre-encoded data: its stored posteriors and embeddings."""
    if data.preencoded:
        return data.preencoded.dataset(n_images, args.proportion_empty_prompts, args.seed)
    dataset = ImagePairDataset(
        data.ds, data.image_columns, args.caption_column, data.rows, data.winner_first, resolution, args.random_crop,
        not args.no_hflip, args.proportion_empty_prompts, args.seed, base_dir=data.base_dir,
        keep_pil=scorer is not None, decode=2 if scorer is not None else n_images,  # SFT without a scorer: winners only
    )
    if args.scan_data:
        dataset = scan_dataset(dataset, args.scan_data, args.dataloader_num_workers, run.accelerator)
    if args.cache_latents:
        dataset = build_latent_cache(dataset, vae, scorer, args.train_batch_size, args.proportion_empty_prompts,
                                     args.seed, run.accelerator.is_local_main_process)
    return dataset


def make_loader(args, run, dataset, vae_dtype, latent_shape, n_images: int, buckets=None):
    """This process's batches (our own sharding, not accelerate's: its slice of each global batch, from the step the
    run starts at) and the VAE posterior cache (--latent_cache; None when off). `buckets` (pre-encoded size buckets,
    each row's): every global batch from one bucket."""
    start = run.start_step * args.gradient_accumulation_steps
    if buckets is None:
        sampler = GlobalBatchSampler(len(dataset), args.train_batch_size, run.num_processes, run.process_index,
                                     args.seed, start)
    else:
        sampler = BucketBatchSampler(buckets, args.train_batch_size, run.num_processes, run.process_index, args.seed,
                                     start)
    # one posterior per image and flip: not with a crop per draw, a scorer reading every image, or latents cached
    cacheable = not (args.cache_latents or args.random_crop or args.choice_model)
    cache = None
    if cacheable and latent_cache_applies(args.latent_cache, len(dataset), n_images, 1 if args.no_hflip else 2,
                                          latent_shape, vae_dtype, args.max_train_steps * args.gradient_accumulation_steps,
                                          run.global_batch):
        cache = PosteriorCache(vae_dtype)
    loader = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=SkipCachedSampler(sampler, dataset, cache) if cache is not None else sampler,
        collate_fn=collate_images, num_workers=args.dataloader_num_workers, pin_memory=run.device.type == "cuda"))
    logger.info(f"{args.dataloader_num_workers} data-loader workers per process; VAE posterior cache "
                f"{'on' if cache is not None else 'off'} (--latent_cache {args.latent_cache})")
    return loader, cache


# --------------------------------------------------------------------------- validation
@torch.no_grad()
def validation(args, accelerator, parts, trained, frozen_unet, with_base, prompts, scorer, resolution, step,
               stop_requested=lambda: False):
    """Fixed prompts and seeds through a stock diffusers pipeline: the base model's images (first row) beside
    the trained model's (second row), with the scoring model's scores when --choice_model is set. A stop request
    interrupts the pipeline at its next denoising step and skips the grid."""
    if accelerator.is_main_process or shards_parameters(accelerator):  # a sharded UNet needs every process
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        prompts = [p for p in prompts for _ in range(args.num_validation_images)]
        seeds = [args.seed + j for _ in range(len(prompts) // args.num_validation_images) for j in range(args.num_validation_images)]
        models = {"trained": (trained, contextlib.nullcontext())}
        if with_base:  # the frozen copy, or the same UNet with its adapters off
            base = (frozen_unet, contextlib.nullcontext()) if frozen_unet is not None else (trained, adapters_disabled(trained))
            models = {"base": base, **models}
        rows, scores = [], {}

        def interrupt_on_stop(pipe, i, t, callback_kwargs):  # after each denoising step
            pipe._interrupt = pipe._interrupt or stop_requested()  # the stock pipelines' own way to end the loop
            return callback_kwargs

        for name, (unet, context) in models.items():
            pipe = build_pipeline(parts, unet=unet)
            # a copy: the training scheduler stays untouched (flow models sample with their own Euler scheduler)
            sampler = FlowMatchEulerDiscreteScheduler if parts.is_flow else DDIMScheduler
            pipe.scheduler = sampler.from_config(parts.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            with context, accelerator.autocast():
                images = pipe(prompts, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                              height=resolution, width=resolution, output_type="pt",
                              generator=[torch.Generator().manual_seed(s) for s in seeds],
                              callback_on_step_end=interrupt_on_stop).images.float()
            if pipe.interrupt:  # the run checkpoints and ends right after: no grid
                rows = []
                break
            if scorer is not None:
                scores[name] = [round(s, 5) for s in scorer.score(tensor_to_pil(images), prompts)]  # any kind
            rows.append(images.cpu())
        if accelerator.is_main_process and rows:
            log_validation(accelerator, args.output_dir, step, torch.cat(rows), list(models), prompts,
                           info={"seeds": seeds, "scores": scores}, scores=scores, score_name=args.choice_model)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    run_main(main, parse_args)
