"""DRaFT, DRaFT-K, DRaFT-LV, AlignProp-style random truncation and DRaFT+ for SD1.5, SDXL, SD3 / SD3.5, FLUX.1 and
Wan 2.1 text-to-video.

Sample with DDIM + classifier-free guidance, back-propagate the reward of the decoded image through the
last K denoising steps into the UNet (LoRA or full), optionally held close to the frozen base model by a
KL term on the guided noise predictions (DRaFT+). SD3 and FLUX (flow matching, read from model_index.json)
sample with their Euler scheduler and guidance, the transformer in place of the UNet, the KL on the guided
(FLUX.1-dev: guidance-embedded) velocity; the flags mean the same. Wan 2.1 samples videos the same way (5-D
latents); their reward is an image reward averaged over --reward_frames frames drawn per step, plus an optional
temporal-consistency term (--temporal_weight), back-propagated through the causal video VAE (utils/video_rewards.py).

    DRaFT   (Clark et al. 2023, https://arxiv.org/abs/2309.17400)   --kl_coeff 0 --truncation_steps K
    DRaFT-LV (the chain without grad, N re-samples with grad)        --draft_lv_samples N
    AlignProp (Prabhudesai et al. 2023): K drawn once per batch      --truncation_steps_random 1,50
    DRaFT+  (NeMo-Aligner; Bhattacharya et al. 2024)                 --kl_coeff 0.1 ...

Quickstart (offline, tiny model, weight-free reward, ~2 minutes on a laptop CPU):

    python train_draftp.py --pretrained_model_name_or_path tiny-sd --reward_model color_match \
        --prompts colored_animals --num_inference_steps 20 --train_batch_size 4 --learning_rate 3e-3 \
        --lora_rank 16 --max_train_steps 40 --output_dir outputs/quickstart --report_to none

SD1.5 + PickScore, DRaFT+ (one or many GPUs; `accelerate config` picks DDP / DeepSpeed / FSDP):

    accelerate launch train_draftp.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --reward_model pickscore --prompts animals --kl_coeff 0.1 --mixed_precision bf16 \
        --train_batch_size 4 --learning_rate 1e-4 --max_train_steps 2000 --output_dir outputs/draftp-sd15

SD3.5-medium + PickScore, DRaFT+ (launchers/draftp_sd35.sh holds the recipe and the sources of its values):

    accelerate launch train_draftp.py --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \
        --reward_model pickscore --prompts animals --kl_coeff 0.2 --resolution 512 --num_inference_steps 10 \
        --guidance_scale 4.5 --lora_rank 32 --lora_alpha 64 --gradient_accumulation_steps 4 --mixed_precision bf16 \
        --gradient_checkpointing --output_dir outputs/draftp-sd35

Wan 2.1 T2V 1.3B + PickScore on 4 frames of each 33-frame video (launchers/draftp_wan.sh holds the recipe):

    accelerate launch train_draftp.py --pretrained_model_name_or_path Wan-AI/Wan2.1-T2V-1.3B-Diffusers \
        --reward_model pickscore --prompts animals --kl_coeff 0.2 --resolution 480 --num_frames 33 --reward_frames 4 \
        --num_inference_steps 20 --lora_rank 32 --lora_alpha 64 --gradient_accumulation_steps 4 --mixed_precision bf16 \
        --gradient_checkpointing --output_dir outputs/draftp-wan
"""
import logging
import os

import torch

from utils import UsageError
from utils.cli import ArgumentParser
from utils.data import load_prompts
from utils.denoising import ZERO_TERMINAL_SNR_HELP, rescale_zero_terminal_snr
from utils.flow import resolve_video_flags
from utils.fp8 import float8_sampling_unet, refresh_float8_weights
from utils.models import (TIMESTEP_SPACINGS, add_trainable_lora, encode_prompts, freeze_frozen_parts, frozen_copy,
                          load_pipeline_parts, read_family, reference_model, warn_long_prompts)
from utils.rewards import load_reward, parse_reward_spec, require_differentiable
from utils.sampling import (SAMPLING_DEFAULTS_HELP, SCORED_LATENTS, cfg_conditioning, decode_latents,
                            low_variance_samples, resolve_sampling_defaults, sample_latents, sampling_setup)
from utils.seeding import step_generator
from utils.speed import SAFE_TO_CHANGE_ON_RESUME as SPEED_FLAGS_SAFE_ON_RESUME
from utils.speed import add_speed_args, apply_speed_options, check_speed_args, compile_training_unet, sampling_model
from utils.train import Run, run_main
from utils.train.cli import (DEFAULTS_NOTE, HelpFormatter, add_common_args, add_prompt_args, add_reward_args,
                             add_video_args, check_common_args, describe_defaults, parse_int_pair, parse_name_paths)
from utils.train.distributed import shards_parameters
from utils.train.validation import log_validation
from utils.video_rewards import draw_reward_frames, validation_frames, video_reward


logger = logging.getLogger("train_draftp")


# --------------------------------------------------------------------------- the method
def draftp_loss(reward: torch.Tensor, kl: torch.Tensor, reward_scale: float, kl_coeff: float,
                temporal: torch.Tensor = None, temporal_weight: float = 0.0):
    """DRaFT+: maximise the reward, stay close to the base model.

    reward: (B,) reward of each final image (DRaFT-LV: the mean of its n re-samples' rewards; videos: the mean over
    the frames scored); kl: (B,) mean over the backpropagated steps (DRaFT-LV: the n re-sample steps) of
    mean((eps - eps_ref)^2) of the guided predictions; temporal: (B,) videos' temporal-consistency term, or None.
    loss = -reward_scale * mean(reward + temporal_weight * temporal) + kl_coeff * mean(kl); kl_coeff = 0 is plain DRaFT.
    """
    total = reward if temporal is None else reward + temporal_weight * temporal
    loss = -reward_scale * total.mean() + kl_coeff * kl.mean()
    logs = {"loss": loss.detach(), "reward": reward.detach().mean(), "kl": kl.detach().mean()}
    if temporal is not None:
        logs["temporal"] = temporal.detach().mean()
    return loss, logs


# Frames scored per video per step when --reward_frames is not given: a few frames spread over the video, at the cost
# of 4 image-reward calls (the decode, up to the last frame drawn, dominates anyway).
DEFAULT_REWARD_FRAMES = 4


def wants_kl(args) -> bool:
    """The frozen model is needed in training steps: for the KL term (DRaFT+), or to log the KL when asked."""
    return args.kl_coeff > 0 or args.log_kl


def draw_truncation_steps(args, generator: torch.Generator) -> int:
    """K for this batch: fixed, or (AlignProp) drawn once per batch from [MIN, MAX]. Drawing it per denoising
    step instead, as AlignProp's and TRL's code did, biases K towards small values."""
    if args.truncation_steps_random is None:
        return args.truncation_steps
    low, high = args.truncation_steps_random
    return int(torch.randint(low, high + 1, (1,), generator=generator))


# --------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                            epilog=DEFAULTS_NOTE)
    add_common_args(parser)
    g = add_reward_args(parser, " with a gradient")
    g.add_argument("--reward_scale", type=float, default=1.0, help="multiplies the reward in the loss")
    add_prompt_args(parser)
    g = parser.add_argument_group("sampling and DRaFT")
    g.add_argument("--resolution", type=int, default=None, help="pixels; default: the model's own (512 SD1.5, 1024 SDXL)")
    g.add_argument("--num_inference_steps", type=int, default=None,
                   help=f"DDIM steps (SD3 / FLUX: Euler steps; {SAMPLING_DEFAULTS_HELP['num_inference_steps']})")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help=f"classifier-free guidance scale (1 = no guidance); FLUX.1-dev: the value of its guidance "
                        f"embedding, one pass, no CFG ({SAMPLING_DEFAULTS_HELP['guidance_scale']})")
    g.add_argument("--timestep_spacing", default=None, choices=TIMESTEP_SPACINGS,
                   help="SD1.5 / SDXL: how DDIM spaces its timesteps (diffusers' DDIMScheduler timestep_spacing; "
                        "default: the scheduler config's own, 'leading' for SD1.5 and SDXL, whose last step is at t = 1). "
                        "'trailing' ends at t = 1000 / steps - 1 (40 steps: 999 ... 24, the timesteps of NeMo-Aligner's "
                        "SDXL DRaFT+ sampler, launchers/draftp_sdxl.sh); a stock pipeline reproduces the validation "
                        "images with DDIMScheduler.from_config(config, timestep_spacing=...)")
    g.add_argument("--true_cfg_scale", type=float, default=1.0,
                   help="FLUX only: classifier-free guidance against the empty prompt on top of the guidance "
                        "embedding (FluxPipeline's true_cfg_scale; 1 = off, two transformer passes per step when > 1)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic; SD3 / FLUX sample "
                                                           "deterministically and take 0 only)")
    g.add_argument("--rescale_zero_terminal_snr", action="store_true", help=ZERO_TERMINAL_SNR_HELP)
    g.add_argument("--truncation_steps", type=int, default=1,
                   help="K: back-propagate through the last K steps (K = --num_inference_steps is full DRaFT)")
    g.add_argument("--truncation_steps_random", type=parse_int_pair, default=None, metavar="MIN,MAX",
                   help="AlignProp: draw K uniformly from [MIN, MAX] once per batch (overrides --truncation_steps)")
    g.add_argument("--draft_lv_samples", type=int, default=0,
                   help="DRaFT-LV: sample the whole chain without grad, re-noise its x_0 N times to the last timestep, "
                        "denoise each once with grad and average the N rewards (0 = off)")
    g.add_argument("--scored_latent", choices=SCORED_LATENTS, default="pred_x0",
                   help="the latent decoded and scored: the last DDIM step's predicted x_0 (NeMo-Aligner's DRaFT+), "
                        "or its x_{t-1} (what a diffusers pipeline returns; about 3.4x weaker reward gradient on SD's "
                        "schedule at 50 steps). Validation images are always the pipeline's x_{t-1}. SD3 / FLUX: the "
                        "same latent either way (their last Euler step ends at sigma 0)")
    g.add_argument("--kl_coeff", type=float, default=0.0,
                   help="DRaFT+ KL weight (0 = plain DRaFT; NeMo-Aligner's DRaFT+ config uses 1.0, "
                        "launchers/draftp_sd15.sh)")
    g.add_argument("--log_kl", action="store_true",
                   help="compute and log the KL to the base model also when --kl_coeff is 0 (costs one frozen-model "
                        "forward per grad step; a full-UNet run keeps a frozen copy for it)")
    g = add_video_args(parser, f"the image reward is averaged over this many frames of each video, drawn anew each "
                               f"step (seeded by the step: a resume draws the same); default {DEFAULT_REWARD_FRAMES}, "
                               f"all frames where the video has fewer. The decode with grad runs up to the last frame "
                               f"drawn (causal VAE)")
    g.add_argument("--temporal_weight", type=float, default=0.0,
                   help="weight of the temporal-consistency term added to the reward: minus the mean squared "
                        "difference of consecutive decoded frames (pixels in [0,1]; free, as those frames are decoded "
                        "anyway). It penalises motion as well as flicker: keep it small (0 = off)")
    add_speed_args(parser)
    # NeMo-Aligner's DRaFT+ config (examples/mm/stable_diffusion/conf/draftp_sd.yaml; launchers/draftp_sd15.sh
    # passes the same values and cites each), in place of add_common_args' general-purpose defaults.
    # Steps and guidance: per family, resolved once the family is read (resolve_family_defaults).
    describe_defaults(parser, "NeMo-Aligner's DRaFT+ config", use_lora=True, lora_rank=32, learning_rate=1e-4,
                      adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, max_grad_norm=10.0, reward_model="pickscore",
                      eta=0.0, truncation_steps=1)
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be checked before a model is loaded."""
    check_common_args(args)
    check_steps(args)  # against --num_inference_steps once known (resolve_family_defaults)
    if args.kl_coeff < 0:
        raise UsageError(f"--kl_coeff must be >= 0 (0 = DRaFT, > 0 = DRaFT+), got {args.kl_coeff}")
    if args.draft_lv_samples < 0:
        raise UsageError(f"--draft_lv_samples must be >= 0, got {args.draft_lv_samples}")
    if args.draft_lv_samples and (args.truncation_steps > 1 or args.truncation_steps_random is not None):
        flag = "--truncation_steps_random" if args.truncation_steps_random is not None else "--truncation_steps"
        raise UsageError(f"{flag} does not combine with --draft_lv_samples: DRaFT-LV runs the whole chain without "
                         f"grad and back-propagates through one re-sample step only; drop {flag}")
    if not 0 <= args.eta <= 1:
        raise UsageError(f"--eta must be in [0, 1], got {args.eta}")
    if args.rescale_zero_terminal_snr and getattr(args, "timestep_spacing", None) not in (None, "trailing"):
        raise UsageError(f"--rescale_zero_terminal_snr samples from the last timestep (pure noise) with DDIM's trailing "
                         f"timesteps; --timestep_spacing {args.timestep_spacing} would skip it: drop --timestep_spacing")
    if args.true_cfg_scale < 1:
        raise UsageError(f"--true_cfg_scale must be >= 1 (1 = off), got {args.true_cfg_scale}")
    for flag, value in (("--num_frames", args.num_frames), ("--reward_frames", args.reward_frames)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.temporal_weight < 0:
        raise UsageError(f"--temporal_weight must be >= 0 (0 = off), got {args.temporal_weight}")
    parse_reward_spec(args.reward_model)  # unknown names fail here, listing the valid ones
    require_differentiable(args.reward_model, "--reward_model")  # DRaFT back-propagates the reward through the images
    args.reward_paths = parse_name_paths(args.reward_model_paths)
    if args.prompts.endswith((".txt", ".jsonl")):
        load_prompts(args.prompts, args.prompt_column)  # a missing or empty file fails here


def check_steps(args):
    """--num_inference_steps, and the truncation flags that must fit in it (while it is None, the family's default
    not yet read: all but the upper bound)."""
    steps = args.num_inference_steps
    shown = "its family's default" if steps is None else steps
    if steps is not None and steps < 1:
        raise UsageError(f"--num_inference_steps must be >= 1, got {steps}")
    if not 1 <= args.truncation_steps <= (steps or args.truncation_steps):
        raise UsageError(f"--truncation_steps must be in [1, --num_inference_steps={shown}], "
                         f"got {args.truncation_steps}")
    if args.truncation_steps_random is not None:
        low, high = args.truncation_steps_random
        if not 1 <= low <= high <= (steps or high):
            raise UsageError(f"--truncation_steps_random MIN,MAX needs 1 <= MIN <= MAX <= --num_inference_steps="
                             f"{shown}, got {low},{high}")


def resolve_family_defaults(args):
    """From the model's model_index.json (no weights yet): the family's sampling steps and guidance where not given
    (utils.sampling.SAMPLING_DEFAULTS), then checked as given ones are. main runs it before args.json is written, so
    that args.json holds the values the run uses."""
    family, is_sdxl = read_family(args.pretrained_model_name_or_path, args.revision)
    if args.timestep_spacing is not None and family != "sd":
        raise UsageError("--timestep_spacing sets DDIM's timesteps (SD1.5 / SDXL); this model samples with its "
                         "flow-matching Euler scheduler's sigmas: drop --timestep_spacing")
    resolve_sampling_defaults(args, family, is_sdxl)
    check_steps(args)
    resolve_video_flags(args, family, DEFAULT_REWARD_FRAMES,
                        ["--temporal_weight"] if args.temporal_weight != 0 else [])


def check_family_args(args, parts):
    """What only the loaded model's family can tell: flow models sample deterministically, true CFG is FLUX's."""
    if parts.is_flow and args.eta > 0:
        raise UsageError(f"--eta {args.eta}: {parts.name} samples with a deterministic Euler scheduler; pass --eta 0")
    if parts.is_video:  # a frame count its VAE cannot take fails here, before the reward model loads
        parts.latent_shape(parts.default_resolution, args.num_frames)
    if args.true_cfg_scale > 1 and parts.family != "flux":
        raise UsageError(f"--true_cfg_scale is FLUX's (its guidance is an embedding); {parts.name} guides with "
                         f"--guidance_scale")


# --------------------------------------------------------------------------- main
def main(args):
    resolve_family_defaults(args)  # the family's steps and guidance, before args.json is written
    run = Run(args, "draftp", "DRaFT+" if args.kl_coeff > 0 else "DRaFT", shown=("loss", "reward", "kl"),
              safe_on_resume={*SPEED_FLAGS_SAFE_ON_RESUME, "reward_model_paths", "reward_paths"})
    check_speed_args(args, run.strategy, run.wraps_model, run.shards_model, run.device)
    device, dtype = run.device, run.dtype

    # ---- load: frozen text encoders + VAE in the compute dtype, trainable UNet (LoRA or full)
    parts = load_pipeline_parts(args.pretrained_model_name_or_path, args.revision, args.variant,
                                args.pretrained_vae_model_name_or_path, timestep_spacing=args.timestep_spacing)
    check_family_args(args, parts)
    if args.rescale_zero_terminal_snr:
        rescale_zero_terminal_snr(parts)  # the sampler (training and validation) takes the rescaled schedule
    freeze_frozen_parts(parts, device, dtype)
    unet, scheduler = parts.unet, parts.scheduler
    # before the frozen copy is made, so that it shares the memory format; None: no-grad steps use `unet`
    sampling_unet = apply_speed_options(args, unet, parts.vae, device, plain_unet=not run.wraps_model)
    if args.use_lora:
        add_trainable_lora(unet, args.lora_rank, args.lora_alpha, args.seed, device, dtype,  # adapters in fp32
                           targets=args.lora_targets)
        frozen_unet = None  # the reference is the same UNet with its adapters switched off
    else:
        unet.to(device)
        frozen_unet = frozen_copy(unet, dtype) if wants_kl(args) else None
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    scorer = load_reward(args.reward_model, paths=args.reward_paths, device=device, dtype=dtype)
    prompts = load_prompts(args.prompts, args.prompt_column, args.prompt_split)
    warn_long_prompts(parts, prompts)  # the text encoders cut them: say so once, not on every step
    resolution, latent_shape, uncond = sampling_setup(parts, args.resolution, device, args.num_frames)
    frames = (f", {args.num_frames} frames ({args.reward_frames} scored per video, temporal weight "
              f"{args.temporal_weight})" if parts.is_video else "")
    logger.info(f"{parts.name} at {resolution}px{frames}, {len(prompts)} prompts, reward "
                f"{args.reward_model}, K={args.truncation_steps_random or args.truncation_steps}, "
                f"LV samples {args.draft_lv_samples}, kl_coeff {args.kl_coeff}, scored latent {args.scored_latent}")

    # ---- optimizer, accelerate, resume
    unet = run.prepare(unet, frozen_unet, is_sdxl=parts.is_sdxl, defer_loss_check=args.defer_loss_check)
    trained = run.trained
    reference_unet = reference_model(trained, frozen_unet)  # LoRA: adapters off; full: the frozen copy
    grad_unet = compile_training_unet(unet, args.compile_unet)  # the steps with grad; `unet` keeps DDP's no_sync
    # --fp8_sampler: the no-grad steps run a copy of the trained UNet that shares its weights and adapters (so it is
    # made once both exist) with FP8 transformer projections; a full UNet's FP8 weights follow each optimizer step
    fp8_unet = float8_sampling_unet(trained) if args.fp8_sampler else None
    if fp8_unet is not None:
        sampling_unet = sampling_model(args, fp8_unet, device)
    # the training steps call the frozen model only where its output is used: with kl_coeff 0 and K = 50 it would
    # add 50 UNet forwards per sample just to log a number
    training_reference = reference_unet if wants_kl(args) else None
    base_unet = reference_unet if args.use_lora or frozen_unet is not None else None  # the validation grid's base row
    run.on_validation(lambda step: validation(args, run.accelerator, parts, trained, scorer, uncond, latent_shape,
                                              resolution, step, base_unet, run.stop_requested))
    # a grid at step 0 only where later grids need it: without a base model in memory its images are the base row
    if run.start_step == 0 and base_unet is None and run.validation_wanted:
        run.validate(0)

    for step in run.steps():
        for micro in run.micro_steps():
            # ---- the batch: prompts, x_T and K drawn for the whole global batch from (seed, step, micro),
            # then sliced, so resume and any number of processes give the same samples
            with run.waiting_for_data():
                g = step_generator(args.seed, step, micro)
                truncation_steps = draw_truncation_steps(args, g)
                prompt_ids = torch.randint(len(prompts), (run.global_batch,), generator=g)[run.rows]
                batch_prompts = [prompts[i] for i in prompt_ids]
                x_T = torch.randn(run.global_batch, *latent_shape, generator=g)[run.rows].to(device)
                lv_noise = torch.randn(args.draft_lv_samples, run.global_batch, *latent_shape, generator=g)[:, run.rows]
                # the frames scored, one draw for the whole batch, after the draws above: an image run's are unchanged
                frame_ids = draw_reward_frames(args.num_frames, args.reward_frames, g) if parts.is_video else None
            eta_generator = step_generator(args.seed, step, micro, run.process_index)

            if fp8_unet is not None:
                refresh_float8_weights(fp8_unet)  # LoRA: nothing (the base is frozen); full UNet: the new weights
            with run.accumulate():
                # ---- sample: no grad for the first T-K steps, grad (and KL) through the last K; DRaFT-LV: the
                # whole chain without grad, then N re-noised copies of its x_0 denoised once each with grad
                cond = cfg_conditioning(encode_prompts(parts, batch_prompts, device, resolution), uncond,
                                        args.guidance_scale, args.true_cfg_scale)
                sample = sample_latents(grad_unet, scheduler, cond, x_T, args.num_inference_steps, args.guidance_scale,
                                        0 if args.draft_lv_samples else truncation_steps, args.eta,
                                        None if args.draft_lv_samples else training_reference, eta_generator,
                                        nograd_unet=sampling_unet, scored_latent=args.scored_latent)
                if args.draft_lv_samples:
                    sample = low_variance_samples(grad_unet, scheduler, cond, sample.latents, args.draft_lv_samples,
                                                  args.guidance_scale, lv_noise, training_reference, args.scored_latent,
                                                  args.num_inference_steps)
                images_per_prompt = max(1, args.draft_lv_samples)  # (N*B, 4, h, w) for DRaFT-LV, N blocks of B

                # ---- reward: decode through the frozen VAE (with grad) and score
                reward, reward_parts, temporal = score_latents(args, parts, scorer, sample.latents,
                                                               batch_prompts * images_per_prompt, frame_ids)
                reward = reward.float().view(images_per_prompt, -1).mean(0)  # DRaFT-LV: the mean of the N rewards
                if temporal is not None:
                    temporal = temporal.view(images_per_prompt, -1).mean(0)
                loss, logs = draftp_loss(reward, sample.kl, args.reward_scale, args.kl_coeff, temporal,
                                         args.temporal_weight)
                logs.update({f"reward_{name}": r.detach().float().mean() for name, r in reward_parts.items()
                             if len(reward_parts) > 1})
                if training_reference is None:
                    logs.pop("kl")

                # ---- update (skipped on every process if any loss, reward or gradient is not finite)
                run.backward(loss, logs)
        run.end_step(truncation_steps=truncation_steps)

    # ---- save: LoRA in the diffusers format (or unet/), a last validation grid, upload
    return run.finish()


def score_latents(args, parts, scorer, latents, prompts, frame_ids=None):
    """(reward (B,), parts {name: (B,)}, temporal (B,) or None) of the final latents, with gradient to them. Images:
    decode and score. Videos: the image reward averaged over the frames `frame_ids`, decoded up to the last of them,
    and the temporal term when --temporal_weight is on (utils.video_rewards.video_reward)."""
    if frame_ids is None:
        return (*scorer.parts(decode_latents(parts.vae, latents), prompts), None)
    return video_reward(parts.vae, scorer, latents, prompts, frame_ids, args.temporal_weight > 0,
                        args.vae_gradient_checkpointing)


@torch.no_grad()
def validation(args, accelerator, parts, trained, scorer, uncond, latent_shape, resolution, step, base_model=None,
               stop_requested=lambda: False):
    """Fixed prompts and seeds: the base model's images (first row) beside the trained model's (second row),
    each with its reward. Seeds are those a diffusers pipeline uses with generator=manual_seed(seed), so the
    saved LoRA reproduces these images in stock diffusers. A stop request between the two rows skips the grid.

    Without a base model in memory (full UNet, kl_coeff 0), the base row is the trained model's images of
    step 0, kept in samples/validation-base.pt for later steps and resumed runs.

    Videos: the same two rows, each video shown as 4 of its frames side by side (validation_frames), each frame with
    its image reward; a grid of frames is what the trackers and samples/ already take, and enough to see the change."""
    if accelerator.is_main_process or shards_parameters(accelerator):  # a sharded UNet needs every process
        prompts = args.validation_prompts or load_prompts(args.prompts, args.prompt_column, args.prompt_split)[:2]
        prompts = [p for p in prompts for _ in range(args.num_validation_images)]
        seeds = [args.seed + j for _ in range(len(prompts) // args.num_validation_images) for j in range(args.num_validation_images)]
        x_T = torch.cat([torch.randn(1, *latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        cond = cfg_conditioning(encode_prompts(parts, prompts, accelerator.device, resolution), uncond,
                                args.guidance_scale, args.true_cfg_scale)

        def generate(model):
            with accelerator.autocast():
                sample = sample_latents(model, parts.scheduler, cond, x_T.to(accelerator.device),
                                        args.num_inference_steps, args.guidance_scale, eta=args.eta,
                                        generator=torch.Generator().manual_seed(args.seed))
                return decode_latents(parts.vae, sample.latents)

        images = {"trained": generate(trained)}
        base_file = os.path.join(args.output_dir, "samples", "validation-base.pt")
        if stop_requested():  # the run checkpoints and ends right after: no grid
            images = {}
        elif base_model is not None:
            images["base"] = generate(base_model)
        elif step == 0:
            images["base"] = images["trained"]
            if accelerator.is_main_process:
                os.makedirs(os.path.dirname(base_file), exist_ok=True)
                torch.save(images["base"].cpu(), base_file)
        elif os.path.exists(base_file):
            images["base"] = torch.load(base_file).to(accelerator.device)
        if accelerator.is_main_process and images:
            if parts.is_video:
                images, prompts, seeds = validation_frames(images, prompts, seeds)
            rows = [name for name in ("base", "trained") if name in images]
            rewards = {name: [round(r, 5) for r in scorer(images[name], prompts).float().tolist()] for name in rows}
            log_validation(accelerator, args.output_dir, step, torch.cat([images[name] for name in rows]), rows,
                           prompts, info={"seeds": seeds, "rewards": rewards}, scores=rewards)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    run_main(main, parse_args)
