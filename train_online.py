"""Online reinforcement learning with any reward: Flow-GRPO and DiffusionNFT (SD3 / SD3.5, FLUX.1), DDPO (SD1.5,
SDXL).

Each step samples a group of G images for each of P prompts with the current model, scores them with the reward
(any scoring model: differentiable or not, e.g. a pixel judge, JPEG size or a reward server), turns the rewards into
group-relative advantages, and updates the model on its own samples:

    Flow-GRPO (Liu et al. 2025, https://arxiv.org/abs/2505.05470): the SDE sampler's per-step log-probs, the clipped
        importance ratio against the sampling policy, a KL to the reference on the step means   --method flow_grpo
    DiffusionNFT (Zheng et al. 2025, https://arxiv.org/abs/2509.16117): flow matching on the clean samples, mixing
        the trained and the old policy (an average of the trained weights) into positive and implicit negative
        velocities weighted by the advantage; any sampler (here the ODE)                         --method nft
    DDPO (Black et al. 2023, https://arxiv.org/abs/2305.13301): DDIM with eta 1 as the Gaussian policy, the same
        clipped objective, for SD1.5 / SDXL                                                       --method ddpo

Quickstart (offline, the toy world: toy-sd3 rewarded by the toy world's pixel judge, on the CPU):

    python train_online.py --method flow_grpo --pretrained_model_name_or_path toy-sd3 --reward_model toyworld_judge \
        --prompts toyworld --group_size 4 --train_batch_size 4 --gradient_accumulation_steps 2 --max_train_steps 20 \
        --num_inference_steps 6 --learning_rate 1e-3 --lora_rank 8 --output_dir outputs/online-quickstart

SD3.5-medium + PickScore, Flow-GRPO (launchers/flow_grpo_sd35.sh holds the recipe and the sources of its values):

    accelerate launch train_online.py --method flow_grpo --pretrained_model_name_or_path \
        stabilityai/stable-diffusion-3.5-medium --reward_model pickscore --prompts animals --resolution 512 \
        --group_size 24 --train_batch_size 12 --gradient_accumulation_steps 8 --updates_per_epoch 2 \
        --mixed_precision bf16 --gradient_checkpointing --output_dir outputs/flow-grpo-sd35
"""
import argparse
import contextlib
import logging
from dataclasses import dataclass

import torch

from utils import UsageError
from utils.cli import ArgumentParser
from utils.data import load_prompts
from utils.ema import WeightAverage, nft_decay
from utils.models import (add_trainable_lora, encode_prompts, freeze_frozen_parts, frozen_copy, load_pipeline_parts,
                          read_family, reference_model)
from utils.flow import per_sample_mean, resolve_video_flags
from utils.rewards import load_reward, parse_reward_spec, tensor_to_pil, to_uint8
from utils.sampling import cfg_conditioning, decode_latents, make_schedule, sample_trajectory, sampling_setup
from utils.seeding import step_generator
from utils.train import Run, run_main
from utils.train.cli import (DEFAULTS_NOTE, HelpFormatter, add_common_args, add_prompt_args, add_reward_args,
                             add_video_args, check_common_args, describe_defaults, parse_int_pair, parse_name_paths, set_help)
from utils.train.validation import log_validation
from utils.video_rewards import evenly_spaced_frames, score_videos, validation_frames

logger = logging.getLogger("train_online")

METHODS = {"flow_grpo": "flow", "nft": "flow", "ddpo": "sd"}  # the model families each method trains
# Per-method defaults, resolved after parsing (args.json holds the values the run used). Flow-GRPO: its SD3.5-M
# recipes (config/grpo.py: 10 steps, guidance 4.5, noise level 0.7, G 24, beta 0.04, clip 1e-4, advantages clipped
# at 5, timestep fraction 0.99, global std; config/base.py: lr 3e-4, weight decay 1e-4). DiffusionNFT: config/nft.py
# (guidance 1, no CFG; beta 1; decay schedule 1; KL weight 1e-4; 10 steps). DDPO: the paper (DDIM 50 steps, eta 1,
# guidance 5, clip 1e-4, advantages clipped at 5; no KL).
METHOD_DEFAULTS = {
    "flow_grpo": dict(num_inference_steps=10, guidance_scale=4.5, noise_level=0.7, kl_beta=0.04, clip_range=1e-4,
                      adv_clip_max=5.0, timestep_fraction=0.99, global_std=True),
    "nft": dict(num_inference_steps=10, guidance_scale=1.0, noise_level=0.0, kl_beta=1e-4, clip_range=1e-4,
                adv_clip_max=5.0, timestep_fraction=0.99, global_std=True),
    "ddpo": dict(num_inference_steps=50, guidance_scale=5.0, noise_level=1.0, kl_beta=0.0, clip_range=1e-4,
                 adv_clip_max=5.0, timestep_fraction=1.0, global_std=False),
}


# Frames an image reward scores per video when --reward_frames is not given: evenly spaced, the same frames of every
# video, as evaluate.py scores them (without a graph, so more cost only scorer forwards)
DEFAULT_REWARD_FRAMES = 4


# --------------------------------------------------------------------------- the methods
def group_advantages(rewards: torch.Tensor, prompt_ids: torch.Tensor, global_std: bool, eps: float = 1e-4):
    """(r - mean of the prompt's group) / (std + eps), the std the group's or (`global_std`) that of all rewards
    (population std, as numpy's): (N,) float64 rewards and prompt ids of every image of the step, all processes."""
    rewards = rewards.double()
    advantages = torch.zeros_like(rewards)
    for prompt in prompt_ids.unique():
        group = prompt_ids == prompt
        std = rewards.std(unbiased=False) if global_std else rewards[group].std(unbiased=False)
        advantages[group] = (rewards[group] - rewards[group].mean()) / (std + eps)
    return advantages


def clipped_policy_loss(log_prob, old_log_prob, advantages, clip_range: float, adv_clip_max: float):
    """PPO's clipped objective on one step's log-probs (B,): mean(max(-A * ratio, -A * clip(ratio, 1 - e, 1 + e))),
    ratio = exp(log_prob - old_log_prob), A clipped to +-adv_clip_max. At ratio 1 it is -mean(A)."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    return loss, {"clipfrac": ((ratio - 1).abs() > clip_range).float().mean().detach(),
                  "approx_kl": (0.5 * (log_prob - old_log_prob) ** 2).mean().detach()}


def step_mean_kl(mean, mean_ref, std) -> torch.Tensor:
    """The KL of two Gaussian steps with one std: mean over the batch of mean((mean - mean_ref)^2) / (2 std^2)."""
    return per_sample_mean((mean - mean_ref) ** 2).mean() / (2 * std ** 2)


def nft_loss(v, v_old, x_t, x0, t, advantages, beta: float, adv_clip_max: float):
    """DiffusionNFT's negative-aware loss at x_t = (1 - t) x_0 + t * noise, from the trained velocity v (grad) and
    the old policy's v_old: v+ = beta v + (1 - beta) v_old, v- = (1 + beta) v_old - beta v, x0+/- = x_t - t v+/-,
    r = clamp((clip(A) / c) / 2 + 0.5, 0, 1), loss = c * mean(r |x0+ - x_0|^2 / w+ + (1 - r) |x0- - x_0|^2 / w-) / beta,
    |.|^2 each sample's mean square, w the no-grad mean |x0 prediction - x_0| of each sample (at least 1e-5).
    v, v_old, x_t, x0: (B, C, h, w), videos (B, C, f, h, w); t, advantages: (B,)."""
    t = t.view(-1, *[1] * (x0.dim() - 1))
    c = adv_clip_max
    r = ((advantages.clamp(-c, c) / c) / 2 + 0.5).clamp(0, 1)
    v, v_old, x_t, x0 = v.float(), v_old.float(), x_t.float(), x0.float()
    dims = tuple(range(1, x0.dim()))

    def weighted_error(x0_pred):
        with torch.no_grad():
            weight = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
        return ((x0_pred - x0) ** 2 / weight).mean(dim=dims)

    positive = weighted_error(x_t - t * (beta * v + (1 - beta) * v_old))
    negative = weighted_error(x_t - t * ((1 + beta) * v_old - beta * v))
    loss = c * (r * positive + (1 - r) * negative).mean() / beta
    return loss, {"old_deviation": ((v - v_old) ** 2).mean().detach()}


# --------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, epilog=DEFAULTS_NOTE)
    add_common_args(parser)
    g = parser.add_argument_group("method")
    g.add_argument("--method", required=True, choices=list(METHODS),
                   help="flow_grpo and nft train SD3 / SD3.5 / FLUX.1 / Wan 2.1; ddpo trains SD1.5 / SDXL")
    g.add_argument("--group_size", type=int, default=24, help="G: images per prompt in each step, one group")
    g.add_argument("--updates_per_epoch", type=int, default=1,
                   help="optimizer updates on each step's samples, each over 1/U of them (Flow-GRPO's recipes: 2; "
                        "from the second on, the ratio to the sampling policy moves and the clip matters)")
    g.add_argument("--inner_epochs", type=int, default=1,
                   help="passes over each step's samples, each of --updates_per_epoch updates, the batches in a new "
                        "order after the first (Flow-GRPO's num_inner_epochs)")
    g.add_argument("--kl_beta", type=float, default=None,
                   help="weight of the KL to the reference model (flow_grpo: on the step means; nft: on the velocity; "
                        "default per method)")
    g.add_argument("--clip_range", type=float, default=None, help="flow_grpo / ddpo: PPO's clip of the ratio")
    g.add_argument("--adv_clip_max", type=float, default=None, help="advantages are clipped to +- this")
    g.add_argument("--global_std", action=argparse.BooleanOptionalAction, default=None,
                   help="normalise advantages by the std of all the step's rewards instead of each group's")
    g.add_argument("--timestep_fraction", type=float, default=None,
                   help="fraction of the stochastic steps trained on (the first ones), in (0, 1]")
    g.add_argument("--nft_beta", type=float, default=1.0, help="nft: the mixing of trained and old policy")
    g.add_argument("--nft_decay", type=int, default=1, choices=[0, 1, 2],
                   help="nft: the old policy's decay schedule (0: none; 1: min(0.001 t, 0.5); 2: 0 for 75 updates, "
                        "then +0.0075 per update up to 0.999)")
    add_reward_args(parser, "; no gradient needed")
    add_prompt_args(parser)
    g = parser.add_argument_group("sampling")
    g.add_argument("--resolution", type=int, default=None, help="pixels; default: the model's own")
    g.add_argument("--num_inference_steps", type=int, default=None, help="sampling steps (default per method)")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help="CFG scale (FLUX.1-dev: its guidance embedding; default per method)")
    g.add_argument("--noise_level", type=float, default=None,
                   help="flow_grpo: a of the SDE's std a * sqrt(sigma / (1 - sigma)); ddpo: DDIM's eta")
    g.add_argument("--sde_window", type=parse_int_pair, default=None, metavar="START,END",
                   help="flow_grpo: stochastic (and trained) steps START..END-1 only, deterministic elsewhere "
                        "(Flow-GRPO-Fast); default: every step")
    add_video_args(parser, f"an image reward is averaged over this many evenly spaced frames of each video, first "
                           f"and last included (default {DEFAULT_REWARD_FRAMES}); a reward that reads whole videos, "
                           f"such as toyvideo_judge, takes every frame")
    describe_defaults(parser, "Flow-GRPO's SD3.5-M recipes (config/base.py, config/grpo.py)", use_lora=True,
                      lora_rank=32, learning_rate=3e-4, adam_weight_decay=1e-4, max_grad_norm=1.0,
                      reward_model="pickscore")
    set_help(parser, "lora_alpha", "LoRA alpha (with --use_lora; default: twice --lora_rank, scale 2, as Flow-GRPO's "
                                   "r 32, alpha 64)")
    args = parser.parse_args(argv)
    if args.lora_alpha is None:  # the scale stays Flow-GRPO's whatever the rank: --lora_rank 8 alone is not scale 8
        args.lora_alpha = 2.0 * args.lora_rank
    for name, value in METHOD_DEFAULTS[args.method].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be checked before a model is loaded."""
    check_common_args(args)
    if args.group_size < 2:
        raise UsageError(f"--group_size must be >= 2 (advantages compare the images of one prompt), got {args.group_size}")
    if args.updates_per_epoch < 1 or args.inner_epochs < 1:
        raise UsageError(f"--updates_per_epoch and --inner_epochs must be >= 1, got {args.updates_per_epoch} and "
                         f"{args.inner_epochs}")
    if args.num_inference_steps < 1 or not 0 < args.timestep_fraction <= 1:
        raise UsageError("--num_inference_steps must be >= 1 and --timestep_fraction in (0, 1]")
    if args.nft_beta <= 0 or args.adv_clip_max <= 0 or args.clip_range <= 0 or args.kl_beta < 0:
        raise UsageError("--nft_beta, --adv_clip_max and --clip_range must be > 0, --kl_beta >= 0")
    if args.method != "nft" and args.noise_level <= 0:
        raise UsageError(f"--noise_level must be > 0 for {args.method} (its steps are Gaussian), got {args.noise_level}")
    if args.sde_window is not None:
        start, end = args.sde_window
        if not 0 <= start < end <= args.num_inference_steps or args.method != "flow_grpo":
            raise UsageError(f"--sde_window START,END needs 0 <= START < END <= --num_inference_steps and "
                             f"--method flow_grpo, got {start},{end}")
    parse_reward_spec(args.reward_model)  # unknown names fail here, listing the valid ones
    args.reward_paths = parse_name_paths(args.reward_model_paths)


def check_family(args, family: str):
    wanted = METHODS[args.method]
    if (family == "sd") != (wanted == "sd"):
        trains = "SD1.5 / SDXL" if wanted == "sd" else "SD3 / SD3.5 / FLUX.1 / Wan 2.1"
        other = "ddpo" if wanted == "flow" else "flow_grpo or nft"
        raise UsageError(f"--method {args.method} trains {trains}; {args.pretrained_model_name_or_path} is another "
                         f"family (its model_index.json): use --method {other}")


# --------------------------------------------------------------------------- main
@dataclass
class Batch:
    """One sampling batch of this process, kept for the updates."""

    prompt_ids: torch.Tensor   # (b,) indices into the prompt list
    cond: object               # the CFG conditioning of its prompts
    latents: torch.Tensor      # (b, N + 1, C, h, w) the chain (flow_grpo / ddpo) or (b, 1, C, h, w) its x_0 (nft)
    log_probs: torch.Tensor    # (b, N)
    advantages: torch.Tensor = None  # (b,)


def main(args):
    family = read_family(args.pretrained_model_name_or_path, args.revision)[0]
    check_family(args, family)
    resolve_video_flags(args, family, DEFAULT_REWARD_FRAMES)
    schedule_steps = stochastic_steps(args)
    trained_steps = schedule_steps[: max(1, int(len(schedule_steps) * args.timestep_fraction))]
    run = Run(args, "online", {"flow_grpo": "Flow-GRPO", "nft": "NFT", "ddpo": "DDPO"}[args.method],
              shown=("loss", "reward"), safe_on_resume={"reward_model_paths", "reward_paths"},
              passes_per_batch=len(trained_steps), updates_per_step=args.updates_per_epoch * args.inner_epochs)
    images_per_step = run.global_batch * args.gradient_accumulation_steps * args.updates_per_epoch
    if images_per_step % args.group_size:
        raise UsageError(f"{images_per_step} images per step (processes x --train_batch_size x "
                         f"--gradient_accumulation_steps x --updates_per_epoch) is not a multiple of --group_size "
                         f"{args.group_size}: every prompt's group must be whole")
    device, dtype = run.device, run.dtype

    # ---- load: frozen text encoders + VAE, trainable denoiser (LoRA or full), reference, reward, prompts
    parts = load_pipeline_parts(args.pretrained_model_name_or_path, args.revision, args.variant,
                                args.pretrained_vae_model_name_or_path)
    freeze_frozen_parts(parts, device, dtype)
    model = parts.unet
    frozen = None
    if args.use_lora:
        add_trainable_lora(model, args.lora_rank, args.lora_alpha, args.seed, device, dtype, args.lora_targets)
    else:
        model.to(device).requires_grad_(True)
        frozen = frozen_copy(model, dtype) if args.kl_beta > 0 else None
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    scorer = load_reward(args.reward_model, paths=args.reward_paths, device=device, dtype=dtype)
    prompts = load_prompts(args.prompts, args.prompt_column, args.prompt_split)
    resolution, latent_shape, uncond = sampling_setup(parts, args.resolution, device, args.num_frames)
    frame_ids = evenly_spaced_frames(args.num_frames, args.reward_frames) if parts.is_video else None
    logger.info(f"{parts.name} at {resolution}px, {args.method}, {images_per_step // args.group_size} prompts x "
                f"{args.group_size} images per step, reward {args.reward_model}, stochastic steps {schedule_steps}, "
                f"trained {trained_steps}")

    # ---- optimizer, accelerate, resume; NFT's old policy, an average of the trained weights, in every checkpoint
    old_policy = None
    if args.method == "nft":
        # moved towards the trained weights once per step, after its updates, with the decay of the optimizer steps
        # made so far (DiffusionNFT's reference code: once per epoch, return_decay(global_step))
        old_policy = WeightAverage([p for p in model.parameters() if p.requires_grad],
                                   lambda steps_before: nft_decay((steps_before + 1) * run.updates_per_step,
                                                                  args.nft_decay))
    model = run.prepare(model, frozen, is_sdxl=parts.is_sdxl, checkpointed=[old_policy] if old_policy else [])
    trained = run.trained
    reference = reference_model(trained, frozen) if args.kl_beta > 0 else None
    run.on_validation(lambda step: validation(args, run, parts, trained, scorer, uncond, latent_shape, resolution,
                                              step, prompts, frame_ids))

    def condition(ids):
        text = encode_prompts(parts, [prompts[i] for i in ids], device, resolution)
        return cfg_conditioning(text, uncond, args.guidance_scale)

    batches_per_update = args.gradient_accumulation_steps
    for step in run.steps():
        # ---- sample: P prompts x G images over all processes, drawn from (seed, step); this process's batches
        g = step_generator(args.seed, step)
        prompt_ids = torch.randint(len(prompts), (images_per_step // args.group_size,), generator=g)
        prompt_ids = prompt_ids.repeat_interleave(args.group_size)  # (S * n * b,) global order: batch, process, row
        x_T = torch.randn(len(prompt_ids), *latent_shape, generator=g)
        batches, local_rewards = [], []
        model.eval()
        for m in range(batches_per_update * args.updates_per_epoch):
            rows = slice(m * run.global_batch, (m + 1) * run.global_batch)
            ids = prompt_ids[rows][run.rows]
            cond = condition(ids)
            with run.accelerator.autocast():
                # NFT samples with the old policy, as its reference code does
                with old_policy.swapped_in() if old_policy is not None else contextlib.nullcontext():
                    chain = sample_trajectory(trained, parts.scheduler, cond, x_T[rows][run.rows].to(device),
                                              args.num_inference_steps, args.guidance_scale,
                                              schedule_steps if args.method != "nft" else (), args.noise_level,
                                              step_generator(args.seed, step, m), run.global_batch, run.rows)
                images = decode_latents(parts.vae, chain.latents[:, -1])
            # ---- reward: one number per image, without a graph; a reward that fails (a server that stays down
            # after its retries) ends the run on every process with the last step checkpointed, never a zero reward
            failure = None
            try:
                scores = score_samples(scorer, images, [prompts[i] for i in ids], frame_ids)
            except UsageError as e:
                failure, scores = e, [float("nan")] * len(ids)
            if run.any_process(failure is not None):
                run.abort(failure)
            local_rewards.append(torch.tensor(scores, dtype=torch.float64))
            kept = chain.latents[:, -1:] if args.method == "nft" else chain.latents
            batches.append(Batch(ids, cond, kept, chain.log_probs))
        # ---- advantages: every process's rewards gathered in the global order, then each group's statistics
        rewards = gather_rewards(run, torch.stack(local_rewards))  # (S, n * b)
        advantages = group_advantages(rewards.flatten(), prompt_ids, args.global_std).view_as(rewards)
        for m, batch in enumerate(batches):
            batch.advantages = advantages[m][run.rows].to(device).float()

        # ---- update: U optimizer updates, each over its batches x the trained steps
        model.train()
        schedule = make_schedule(parts.scheduler, batches[0].cond, args.num_inference_steps, batches[0].latents[:, 0])
        plan = [(m, j) for epoch in range(args.inner_epochs) for m in batch_order(args, len(batches), step, epoch)
                for j in trained_steps_of(args, trained_steps, step, m, epoch)]
        for micro in run.micro_steps():
            m, j = plan[micro]
            batch = batches[m]
            with run.accumulate():
                if args.method == "nft":
                    loss, logs = nft_step(args, run, model, old_policy, reference, schedule, batch, j, step, m)
                else:
                    loss, logs = policy_step(args, model, reference, schedule, batch, j)
                run.backward(loss, logs)
        if old_policy is not None:
            old_policy.update()
        run.end_step(reward=float(rewards.mean()), reward_std=float(rewards.std()))

    # ---- save: LoRA in the diffusers format (or the full model), a last validation grid, upload
    return run.finish()


def stochastic_steps(args) -> list:
    """The sampling steps that are Gaussian policy steps (and may be trained): all, or Flow-GRPO-Fast's window."""
    start, end = args.sde_window or (0, args.num_inference_steps)
    return list(range(start, end))


def batch_order(args, num_batches: int, step: int, epoch: int) -> list:
    """The order of the step's batches in inner epoch `epoch`: as sampled in the first, shuffled (seeded by (seed,
    step, epoch)) in the others, so that each update of a later pass mixes other batches."""
    if epoch == 0:
        return list(range(num_batches))
    return torch.randperm(num_batches, generator=step_generator(args.seed, step, num_batches, epoch)).tolist()


def trained_steps_of(args, trained_steps: list, step: int, m: int, epoch: int = 0) -> list:
    """The steps a batch is trained on. Flow-GRPO / DDPO: the first --timestep_fraction of the stochastic steps.
    NFT: as many, drawn at random from all the sampling steps for each batch and inner epoch (its reference code
    draws them per sample), seeded by (seed, step, batch[, epoch])."""
    if args.method != "nft":
        return trained_steps
    seed_of = (m, 1) if epoch == 0 else (m, 1, epoch)
    order = torch.randperm(args.num_inference_steps, generator=step_generator(args.seed, step, *seed_of))
    return order[: len(trained_steps)].tolist()


def policy_step(args, model, reference, schedule, batch: Batch, j: int):
    """Flow-GRPO / DDPO at step j: the log-prob of the stored x_{j+1} under the trained model's step, against the
    sampling policy's, and the KL of the step means to the reference."""
    latents, target = batch.latents[:, j], batch.latents[:, j + 1]
    pred = schedule.predict(model, latents, j, batch.cond, args.guidance_scale, detach_uncond=True)
    _, log_prob, mean, std = schedule.stochastic_step(pred, j, latents, args.noise_level, prev_sample=target)
    loss, logs = clipped_policy_loss(log_prob, batch.log_probs[:, j], batch.advantages, args.clip_range,
                                     args.adv_clip_max)
    if reference is not None:
        with torch.no_grad():
            ref_pred = schedule.predict(reference, latents, j, batch.cond, args.guidance_scale)
            _, _, ref_mean, _ = schedule.stochastic_step(ref_pred, j, latents, args.noise_level, prev_sample=target)
        kl = step_mean_kl(mean, ref_mean, std)
        loss = loss + args.kl_beta * kl
        logs["kl"] = kl.detach()
    logs["loss"] = loss.detach()
    return loss, logs


def nft_step(args, run, model, old_policy, reference, schedule, batch: Batch, j: int, step: int, m: int):
    """DiffusionNFT at the sampling schedule's step j: x_t = (1 - t) x_0 + t * noise with fresh noise, the trained,
    old-policy and (for the KL) reference velocities there."""
    x0 = batch.latents[:, 0]
    g = step_generator(args.seed, step, m, j)
    noise = torch.randn(run.global_batch, *x0.shape[1:], generator=g)[run.rows].to(x0.device)
    t = schedule.sigmas[j].to(x0.device).float()
    x_t = (1 - t) * x0 + t * noise
    with torch.no_grad(), old_policy.swapped_in():
        v_old = schedule.predict(run.trained, x_t, j, batch.cond, args.guidance_scale)
    v = schedule.predict(model, x_t, j, batch.cond, args.guidance_scale)
    loss, logs = nft_loss(v, v_old, x_t, x0, t.expand(len(x0)), batch.advantages, args.nft_beta, args.adv_clip_max)
    if reference is not None:
        with torch.no_grad():
            v_ref = schedule.predict(reference, x_t, j, batch.cond, args.guidance_scale)
        kl = ((v.float() - v_ref.float()) ** 2).mean()
        loss = loss + args.kl_beta * kl
        logs["kl"] = kl.detach()
    logs["loss"] = loss.detach()
    return loss, logs


def score_samples(scorer, images: torch.Tensor, prompts, frame_ids) -> list:
    """One reward per sample, without a graph: images (B, 3, H, W) in [0, 1] as PIL images; videos (B, F, 3, H, W)
    as uint8 arrays, an image reward averaged over frames `frame_ids` (utils.video_rewards.score_videos)."""
    if images.dim() == 5:
        return score_videos(scorer, to_uint8(images), prompts, frame_ids)
    return scorer.score(tensor_to_pil(images), prompts)


def gather_rewards(run, local: torch.Tensor) -> torch.Tensor:
    """(S, b) rewards of this process -> (S, n * b) of all processes, in the global order (batch, process, row)."""
    gathered = run.accelerator.gather(local.to(run.device).unsqueeze(0))  # (n, S, b)
    return gathered.view(run.num_processes, *local.shape).permute(1, 0, 2).reshape(local.shape[0], -1).cpu()


@torch.no_grad()
def validation(args, run, parts, trained, scorer, uncond, latent_shape, resolution, step, prompts, frame_ids):
    """Fixed prompts and seeds, sampled deterministically: the base model's images (first row) beside the trained
    model's (second row), each with its reward. Videos: each shown as 4 of its frames side by side, each frame under
    its video's reward."""
    accelerator = run.accelerator
    if accelerator.is_main_process:
        shown = args.validation_prompts or prompts[:2]
        shown = [p for p in shown for _ in range(args.num_validation_images)]
        seeds = [args.seed + j for _ in range(len(shown) // args.num_validation_images)
                 for j in range(args.num_validation_images)]
        x_T = torch.cat([torch.randn(1, *latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        cond = cfg_conditioning(encode_prompts(parts, shown, accelerator.device, resolution), uncond,
                                args.guidance_scale)
        # the base row where it is in memory: a LoRA run's model with its adapters off
        models = {"base": reference_model(trained, None), "trained": trained} if args.use_lora else {"trained": trained}
        images = {}
        for name, model in models.items():
            if run.stop_requested():  # the run checkpoints and ends right after: no grid
                break
            with accelerator.autocast():
                chain = sample_trajectory(model, parts.scheduler, cond, x_T.to(accelerator.device),
                                          args.num_inference_steps, args.guidance_scale, (), args.noise_level,
                                          torch.Generator())
                images[name] = decode_latents(parts.vae, chain.latents[:, -1])
        if len(images) == len(models):
            rows = list(images)
            scores = {name: [round(s, 5) for s in score_samples(scorer, images[name], shown, frame_ids)] for name in rows}
            if parts.is_video:
                images, shown, seeds = validation_frames(images, shown, seeds)
                frames_per_video = len(shown) // len(scores[rows[0]])
                scores = {name: [s for s in values for _ in range(frames_per_video)] for name, values in scores.items()}
            log_validation(accelerator, args.output_dir, step, torch.cat([images[n] for n in rows]), rows, shown,
                           info={"seeds": seeds, "rewards": scores}, scores=scores)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    run_main(main, parse_args)
