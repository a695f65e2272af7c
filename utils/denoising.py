"""Training on noised data (Diffusion-DPO, SFT): timesteps (with a timestep bias), noising and targets per model
family, the zero-terminal-SNR schedule, per-sample errors, and a batch's latents and text conditioning."""
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import UsageError
from .flow import DEFAULT_WEIGHTING, FlowConditioning, FlowTrainingTimesteps, flow_noise, per_sample_mean
from .models import encode_prompts, latent_scaling, sdxl_time_ids

# diffusers' SD3 / FLUX training examples' defaults of the logit-normal and mode densities
FLOW_TIMESTEP_DEFAULTS = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}


def default_train_guidance(family: str) -> Optional[float]:
    """The guidance embedding's value in training passes on real images: FLUX.1-dev (guidance-distilled) at 1.0, the
    unguided velocity, for which the denoising loss is least (as diffusers' FLUX DreamBooth README trains); the
    other families have no such input."""
    return 1.0 if family == "flux" else None


def per_sample_error(pred, target):
    """(N, C, H, W) or videos' (N, C, F, H, W) -> (N,): mean squared error of each sample, in float32."""
    return per_sample_mean((pred.float() - target.float()).pow(2))


def min_snr_weights(scheduler, timesteps, gamma: float):
    """Min-SNR-gamma (Hang et al. 2023, https://arxiv.org/abs/2303.09556): min(SNR, gamma) / SNR for eps
    prediction, / (SNR + 1) for v prediction, as the diffusers text-to-image examples."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, gamma))
    return weights / (snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr)


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
    """`noise_pairs` for flow matching (SD3 / FLUX / Wan; images or videos): x_t = (1 - sigma) * x_0 + sigma * noise
    with sigma = t / 1000, and the velocity target noise - x_0; winner and loser share the row's noise and sigma."""
    n = latents.shape[0] // noise.shape[0]
    noise, timesteps = noise.repeat(n, *[1] * (noise.dim() - 1)), timesteps.repeat(n)
    return flow_noise(latents, noise, timesteps / num_train_timesteps), noise - latents, timesteps


ZERO_TERMINAL_SNR_HELP = (
    "SD 1.x / 2.x / SDXL v-prediction models: rescale the noise schedule's betas to zero terminal SNR (the last "
    "timestep is pure noise, as sampling starts from) and sample with DDIM's 'trailing' timesteps, which start at that "
    "last timestep (Lin et al. 2024, https://arxiv.org/abs/2305.08891, sections 3.1 and 3.3; diffusers' "
    "rescale_zero_terminal_snr). Training and validation both use the rescaled schedule")


def rescale_zero_terminal_snr(parts):
    """Give `parts` the DDPM schedule rescaled to zero terminal SNR with DDIM's trailing timesteps (--rescale_zero_
    terminal_snr): alphas_cumprod[-1] = 0, so training noises the last timestep to pure noise and sampling starts there
    (Lin et al. 2024: the stock schedules leave a_T = 0.0047 of signal, which the model learns to expect and sampling
    never provides). diffusers' DDIMScheduler does both (rescale_betas_zero_snr, timestep_spacing); the stock pipeline
    reproduces the validation images with the same two settings.

    The paper's models predict v: with eps prediction the predicted x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a) at a = 0
    is undefined, so eps models and flow-matching models (whose last sigma is 1 already) are refused."""
    flag = "--rescale_zero_terminal_snr"
    if parts.is_flow:
        raise UsageError(f"{flag} rescales a DDPM noise schedule; {parts.name} is a flow-matching model, whose schedule "
                         f"ends at pure noise (sigma 1) already: drop {flag}")
    prediction = parts.scheduler.config.prediction_type
    if prediction != "v_prediction":
        raise UsageError(f"{flag} needs a v-prediction model (e.g. stabilityai/stable-diffusion-2-1); this one predicts "
                         f"{prediction}, whose x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a) is undefined at the rescaled "
                         f"last timestep (a = 0): drop {flag}")
    parts.scheduler = type(parts.scheduler).from_config(parts.scheduler.config, rescale_betas_zero_snr=True,
                                                        timestep_spacing="trailing")
    return parts


TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")


def timestep_bias_weights(num_timesteps: int, strategy: str = "none", multiplier: float = 1.0, portion: float = 0.25,
                          begin: int = 0, end: Optional[int] = None) -> Optional[torch.Tensor]:
    """The probability (float64, (num_timesteps,)) of each DDPM timestep under a timestep bias, as diffusers'
    train_text_to_image_sdxl.py (generate_timestep_weights) and MaxDiffusion (its timestep_bias config) draw them:
    `multiplier` on the biased timesteps, 1 on the others, normalised. "earlier": the first `portion` of the timesteps
    (t < portion * T, the least noisy), "later": the last `portion` (the noisiest), "range": t in [begin, end). None
    for "none" (t uniform)."""
    if strategy == "none":
        return None
    end = num_timesteps if end is None else end
    count = int(portion * num_timesteps)
    if strategy in ("earlier", "later") and count < 1:
        raise UsageError(f"--timestep_bias_portion {portion:g} biases int({portion:g} x {num_timesteps}) = 0 timesteps; "
                         f"give a portion in [{1 / num_timesteps:g}, 1]")
    if strategy == "range" and not 0 <= begin < end <= num_timesteps:
        raise UsageError(f"--timestep_bias_begin {begin} / --timestep_bias_end {end}: need 0 <= begin < end <= "
                         f"{num_timesteps} (the model's training timesteps)")
    biased = {"earlier": slice(0, count), "later": slice(num_timesteps - count, num_timesteps),
              "range": slice(begin, end)}[strategy]
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    weights[biased] *= multiplier
    return weights / weights.sum()


@dataclass
class Noising:
    """What the model's family fixes about training on noised data, chosen once at start (`family_noising`)."""

    draw: Callable         # (n, generator) -> (n,) timesteps: DDPM steps, or sigma * 1000
    pairs: Callable        # (latents, noise, timesteps) -> (noisy, target, timesteps): `noise_pairs`' contract
    sft_weights: Callable  # (timesteps,) -> (n,) per-sample weights of the SFT loss, or None


def family_noising(parts, weighting_scheme: Optional[str] = None, logit_mean: float = 0.0, logit_std: float = 1.0,
                   mode_scale: float = 1.29, snr_gamma: Optional[float] = None,
                   timestep_weights: Optional[torch.Tensor] = None) -> Noising:
    """SD1.5 / SD 2.x / SDXL: t uniform over the DDPM steps (or drawn with the probabilities `timestep_weights`,
    `timestep_bias_weights`), eps (or v) target, min-SNR-`snr_gamma` weights for SFT. SD3 / FLUX: t drawn as the model
    was trained (`weighting_scheme`, default the family's: DEFAULT_WEIGHTING), the velocity target, SD3's loss weights
    for SFT (DPO's errors stay plain per-sample MSE: a weight w(t) would only rescale beta at each t)."""
    scheduler = parts.scheduler
    if parts.is_flow:
        if timestep_weights is not None:
            raise UsageError(f"--timestep_bias_strategy weights DDPM timesteps; {parts.name} draws t by "
                             f"--weighting_scheme: use that")
        scheme = weighting_scheme or DEFAULT_WEIGHTING[parts.family]
        t = FlowTrainingTimesteps(scheduler, scheme, logit_mean, logit_std, mode_scale)
        return Noising(t.draw, functools.partial(flow_noise_pairs, num_train_timesteps=t.num_train_timesteps),
                       t.loss_weights)
    if timestep_weights is None:
        def draw(n, g):
            return torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g)
    else:
        def draw(n, g):
            return torch.multinomial(timestep_weights, n, replacement=True, generator=g)
    return Noising(draw, functools.partial(noise_pairs, scheduler),
                   lambda t: min_snr_weights(scheduler, t, snr_gamma) if snr_gamma else None)


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
    Pre-encoded videos (utils/preencoded.py) carry their posteriors and prompt embeddings.
    """
    device = parts.vae.device
    if cache is not None:
        mean, std, batch = cache.moments(lambda pixels: vae_moments(parts.vae, pixels), batch, n_images, device)
    elif "pixels" in batch:
        mean, std = vae_moments(parts.vae, batch["pixels"][:, :n_images])
    else:  # --cache_latents
        mean, std = batch["latent_mean"][:, :n_images].float(), batch["latent_std"][:, :n_images].float()
    latents = mean.to(device) + std.to(device) * posterior_eps[:, :n_images].to(device)  # (B, n, C, h, w)
    scale, shift = latent_scaling(parts.vae)
    latents = (latents.transpose(0, 1).flatten(0, 1) - shift) * scale  # (n*B, C, h, w)

    def per_image(key):  # (B, n, 2) -> n*B rows, in the order of the latents
        return batch[key][:, :n_images].transpose(0, 1).flatten(0, 1).tolist()

    if "prompt_embeds" in batch:  # in the VAE's dtype, as a text encoder's output would be
        embeds = batch["prompt_embeds"].to(device, parts.vae.dtype)
        return latents, FlowConditioning(parts.family, embeds, None).repeat(n_images)
    time_ids = sdxl_time_ids(per_image("original_size"), per_image("crop"), [(resolution, resolution)] * len(latents))
    cond = encode_prompts(parts, batch["caption"], device, resolution).repeat(n_images).with_time_ids(time_ids)
    return latents, cond
