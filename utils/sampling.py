"""The differentiable DDIM sampler of DRaFT / DRaFT+ / DRaFT-LV / AlignProp.

    x_T ~ N(0, I)  --(T-K steps, no grad)-->  x_K  --(K steps, grad, latent never detached)-->  x_0

Classifier-free guidance runs the unconditional and conditional halves in one UNet batch. At every step
that carries gradients the frozen reference model (DRaFT+) predicts eps on the same latent under
no_grad, and the squared difference of the two guided eps is the KL term.

Which latent the last step returns (`scored_latent`):
- "x_prev": x_{t-1} of the last DDIM step, what a stock diffusers pipeline returns (with SD's
  `set_alpha_to_one=False` that is sqrt(a_0) * pred_x0 + sqrt(1 - a_0) * eps, a_0 = alphas_cumprod[0]);
- "pred_x0": the last step's predicted x_0, (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t), which NeMo-Aligner's DRaFT+
  decodes and scores (DDIM with the final alpha set to one).
The two images are nearly the same, but d(latent)/d(eps) at the last step differs: on the SD1.5 schedule (50
steps, t = 1) it is -0.0413 for pred_x0 and -0.0121 for x_prev, so the reward gradient of x_prev is 3.40x weaker
(tests/test_draftp.py checks the ratio against the schedule).

Flow-matching models (SD3 / FLUX / Wan, utils/flow.py) run the same loop with the Euler steps of their
FlowMatchEulerDiscreteScheduler sigmas and the guided velocity in place of the guided eps: the schedule object
(`DDIMSchedule` here, `utils.flow.FlowSchedule`) is chosen once, from the conditioning's type. Their last step
ends at sigma 0, where x_prev and pred_x0 are the same latent (x_t - sigma * v), so `scored_latent` does not matter.
Wan's latents are videos, (B, C, f, h, w): every step is elementwise and every per-sample mean runs over all but the
batch dimension, so the same loop takes them; `decode_latents` returns their frames.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .flow import FlowConditioning, FlowSchedule, gaussian_log_prob, per_sample_mean
from .models import TextConditioning, encode_prompts, latent_scaling


SCORED_LATENTS = ("pred_x0", "x_prev")

# Sampling steps and guidance when --num_inference_steps / --guidance_scale are not given: the defaults of each family's
# stock diffusers pipeline (__call__ of StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline,
# FluxPipeline, WanPipeline in diffusers 0.42), so that a flow model is not sampled with SD1.5's 50 steps and CFG 7.5
# (FLUX.1-dev would take 7.5 as its guidance embedding). SD1.5's are also NeMo-Aligner's DRaFT+ config's
# (draftp_sd.yaml); SDXL's guidance 5.0 also its SDXL config's (draftp_sdxl.yaml: scale 5.0).
SAMPLING_DEFAULTS = {
    "sd": {"num_inference_steps": 50, "guidance_scale": 7.5},
    "sdxl": {"num_inference_steps": 50, "guidance_scale": 5.0},
    "sd3": {"num_inference_steps": 28, "guidance_scale": 7.0},
    "flux": {"num_inference_steps": 28, "guidance_scale": 3.5},
    "wan": {"num_inference_steps": 50, "guidance_scale": 5.0},
}
SAMPLING_DEFAULTS_HELP = {
    flag: "default per family, from its stock diffusers pipeline: " + ", ".join(
        f"{name} {SAMPLING_DEFAULTS[key][flag]}" for key, name in
        (("sd", "SD1.5"), ("sdxl", "SDXL"), ("sd3", "SD3 / SD3.5"), ("flux", "FLUX.1"), ("wan", "Wan 2.1")))
    for flag in ("num_inference_steps", "guidance_scale")}


def resolve_sampling_defaults(args, family: str, is_sdxl: bool = False):
    """Fill --num_inference_steps / --guidance_scale left unset (None) with the family's SAMPLING_DEFAULTS, once the
    family is read from model_index.json (utils.models.read_family) and before args.json is written; a value given on
    the command line stays."""
    for flag, value in SAMPLING_DEFAULTS["sdxl" if is_sdxl else family].items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)


@dataclass
class SampleResult:
    # (B, C, h, w), videos (B, C, f, h, w): the final latent (`scored_latent`); differentiable through the last K steps
    latents: torch.Tensor
    kl: torch.Tensor         # (B,) mean over the grad steps of mean((eps - eps_ref)^2) (flow: velocities); zeros without a reference
    grad_steps: int          # UNet calls with grad per sample


def guided_eps(unet, latents, t, cond: TextConditioning, guidance_scale: float, detach_uncond: bool = False):
    """eps_uncond + s * (eps_text - eps_uncond); `cond` holds the unconditional rows first, then the text rows.
    `detach_uncond`: no gradient through the unconditional rows (online RL's policy)."""
    eps = unet(torch.cat([latents, latents]), t, **cond.unet_kwargs()).sample
    eps_uncond, eps_text = eps.chunk(2)
    if detach_uncond:
        eps_uncond = eps_uncond.detach()
    return eps_uncond + guidance_scale * (eps_text - eps_uncond)


def cfg_conditioning(text, uncond, guidance_scale: float = 1.0, true_cfg_scale: float = 1.0):
    """Stack [uncond; text] once per batch (uncond is one row, broadcast to the batch).

    Flow models: SD3 and Wan guide with `guidance_scale` as SD1.5 does; FLUX feeds `guidance_scale` to its guidance
    embedding instead and runs CFG on [uncond; text] only with a `true_cfg_scale` > 1 (FluxPipeline's true CFG)."""
    if isinstance(text, FlowConditioning):
        scale = true_cfg_scale if text.family == "flux" else guidance_scale
        return text.with_cfg(uncond, scale) if scale > 1 else text
    batch = text.embeds.shape[0]
    if uncond.embeds.shape[0] == 1 and batch > 1:
        uncond = uncond.repeat(batch)
    return TextConditioning.cat([uncond, text])


def ddim_step(scheduler, eps, t: int, latents, eta: float, generator: Optional[torch.Generator], output: str = "x_prev"):
    """One DDIM update x_t -> x_{t-1} (diffusers' DDIMScheduler; differentiable in eps and latents).
    `output` "pred_x0" returns the step's predicted x_0 instead of x_{t-1}."""
    out = scheduler.step(eps, t, latents, eta=eta, generator=generator if eta > 0 else None)
    return out.pred_original_sample if output == "pred_x0" else out.prev_sample


class DDIMSchedule:
    """The DDIM chain of SD1.5 / SDXL: timesteps, the guided eps, the step. `FlowSchedule` (utils/flow.py) is its
    flow-matching twin, with the guided velocity."""

    def __init__(self, scheduler, num_steps: int, device):
        scheduler.set_timesteps(num_steps)
        self.scheduler = scheduler
        self.timesteps = [int(t) for t in scheduler.timesteps]  # python ints for the scheduler: no host sync inside the loop
        # ... and one copy of all of them on the device for the UNet: a python int would be copied to the device
        # (a host sync) inside every UNet call, and would make a compiled UNet recompile for every value.
        self.model_timesteps = scheduler.timesteps.to(device)

    def __len__(self) -> int:
        return len(self.timesteps)

    def init(self, latents):
        return latents * self.scheduler.init_noise_sigma

    def predict(self, model, latents, i: int, cond, guidance_scale: float, detach_uncond: bool = False):
        return guided_eps(model, latents, self.model_timesteps[i], cond, guidance_scale, detach_uncond)

    def step(self, eps, i: int, latents, eta: float = 0.0, generator=None, output: str = "x_prev"):
        return ddim_step(self.scheduler, eps, self.timesteps[i], latents, eta, generator, output)

    def renoise_last(self, x0, noise):
        return self.scheduler.add_noise(x0, noise, torch.tensor([self.timesteps[-1]]))

    def stochastic_step(self, eps, i: int, latents, eta: float, noise=None, prev_sample=None):
        """A DDIM step with eta > 0 as a Gaussian policy step (DDPO, Black et al. 2023), in float32: the mean is
        diffusers' DDIM update without its noise, the std eta * sqrt(DDIM's variance at t). Returns (x_prev,
        log_prob (B,), mean, std), the log-density of x_prev (`prev_sample` where given, else drawn with `noise`)
        averaged over all but the batch dimension."""
        t = self.timesteps[i]
        mean = self.scheduler.step(eps.float(), t, latents.float(), eta=eta,
                                   variance_noise=torch.zeros_like(latents, dtype=torch.float32)).prev_sample
        prev_t = t - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps
        std = eta * float(self.scheduler._get_variance(t, prev_t)) ** 0.5
        if prev_sample is None:
            prev_sample = mean + std * noise.float()
        return prev_sample, gaussian_log_prob(prev_sample.detach().float(), mean, std), mean, std


def make_schedule(scheduler, cond, num_steps: int, latents):
    """DDIM for SD1.5 / SDXL, the flow-matching Euler chain for SD3 / FLUX / Wan (chosen by the conditioning's type)."""
    if isinstance(cond, FlowConditioning):
        return FlowSchedule(scheduler, cond.family, num_steps, latents.shape[-2:], latents.device)
    return DDIMSchedule(scheduler, num_steps, latents.device)


def sample_latents(
    unet: Callable,
    scheduler,
    cond,
    latents: torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float,
    truncation_steps: int = 0,
    eta: float = 0.0,
    reference_unet: Optional[Callable] = None,
    generator: Optional[torch.Generator] = None,
    nograd_unet: Optional[Callable] = None,
    scored_latent: str = "x_prev",
) -> SampleResult:
    """DDIM with CFG (flow models: Euler with their guidance) from x_T = `latents`; the last `truncation_steps`
    steps run with grad (0: none).

    `cond` is the CFG conditioning from `cfg_conditioning`. `reference_unet`, if given, is the frozen model
    (called under no_grad at each grad step) whose guided eps the KL term compares against. `nograd_unet`, if
    given, is the same model (e.g. compiled, `utils.speed`) called instead of `unet` at the steps without grad.
    `scored_latent` is what the last step returns (module docstring); "x_prev" gives the stock pipeline's image.
    """
    schedule = make_schedule(scheduler, cond, num_inference_steps, latents)
    first_grad_step = num_inference_steps - truncation_steps
    kl_terms = []
    latents = schedule.init(latents)
    for i in range(len(schedule)):
        with_grad = i >= first_grad_step
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            model = nograd_unet if nograd_unet is not None and not with_grad else unet
            pred = schedule.predict(model, latents, i, cond, guidance_scale)
            if with_grad and reference_unet is not None:
                kl_terms.append(kl_to_reference(pred, reference_unet, latents, i, schedule, cond, guidance_scale))
            output = scored_latent if i == len(schedule) - 1 else "x_prev"
            latents = schedule.step(pred, i, latents, eta, generator, output)
    kl = torch.stack(kl_terms).mean(0) if kl_terms else torch.zeros(latents.shape[0], device=latents.device)
    return SampleResult(latents, kl, grad_steps=max(0, min(truncation_steps, num_inference_steps)))


def kl_to_reference(pred, reference_unet, latents, i: int, schedule, cond, guidance_scale) -> torch.Tensor:
    """Per-sample mean squared difference of the guided predictions (eps; flow: velocity) of the trained and the
    frozen model at step `i`: (B,).

    For two Gaussians with equal variance this is the KL of one DDIM step up to a constant factor (DRaFT+); for an
    Euler step of a flow model with a small added noise likewise, up to the factor (sigma_next - sigma)^2."""
    with torch.no_grad():
        ref = schedule.predict(reference_unet, latents.detach(), i, cond, guidance_scale)
    return per_sample_mean((pred.float() - ref.float()).pow(2))


def low_variance_samples(unet, scheduler, cond, x0, num_samples: int, guidance_scale: float,
                         noise: torch.Tensor, reference_unet=None, scored_latent: str = "x_prev",
                         num_inference_steps: Optional[int] = None) -> SampleResult:
    """DRaFT-LV (Clark et al. 2023, Algorithm 2): re-noise the finished x_0 of a chain that ran without grad to the
    last timestep with `num_samples` fresh noises (n, B, C, h, w), and denoise each once with grad. `x0` is detached:
    the gradient reaches the UNet only through these n steps. Returns the n results stacked along the batch,
    (n*B, C, h, w), and the KL (B,) as the mean over the n steps; the caller averages the n rewards.
    `num_inference_steps`: the chain's steps, which fix the last timestep (default: those the chain set last)."""
    schedule = make_schedule(scheduler, cond, num_inference_steps or len(scheduler.timesteps), x0)
    last = len(schedule) - 1
    x0 = x0.detach()
    outputs, kl_terms = [], []
    for i in range(num_samples):
        x_t = schedule.renoise_last(x0, noise[i].to(x0.device, x0.dtype))
        pred = schedule.predict(unet, x_t, last, cond, guidance_scale)
        if reference_unet is not None:
            kl_terms.append(kl_to_reference(pred, reference_unet, x_t, last, schedule, cond, guidance_scale))
        outputs.append(schedule.step(pred, last, x_t, eta=0.0, generator=None, output=scored_latent))
    kl = torch.stack(kl_terms).mean(0) if kl_terms else torch.zeros(x0.shape[0], device=x0.device)
    return SampleResult(torch.cat(outputs), kl, grad_steps=num_samples)


def sampling_setup(parts, resolution, device, num_frames=None):
    """What a run that samples needs of its pipeline: the resolution (`resolution`, or the model's own), the latent
    shape (C, h, w; videos (C, f, h, w) of `num_frames` frames, default the pipeline's) and the empty prompt's
    conditioning (classifier-free guidance)."""
    resolution = resolution or parts.default_resolution
    return resolution, parts.latent_shape(resolution, num_frames), encode_prompts(parts, [""], device, resolution)


@dataclass
class Trajectory:
    """A sampled chain kept for online RL: the latent before and after each step, and each step's log-prob."""

    latents: torch.Tensor    # (B, N + 1, C, h, w) float32 (videos: (B, N + 1, C, f, h, w)): x_T, ..., x_0
    log_probs: torch.Tensor  # (B, N) float32: log-prob of each step's output under the sampling policy (0: an ODE step)


@torch.no_grad()
def sample_trajectory(model, scheduler, cond, latents, num_inference_steps: int, guidance_scale: float,
                      stochastic_steps, level: float, generator: torch.Generator, noise_batch: int = None,
                      noise_rows: slice = slice(None)) -> Trajectory:
    """The chain from x_T = `latents` without grad, the steps in `stochastic_steps` taken as Gaussian policy steps
    (flow models: Flow-GRPO's SDE with noise level `level`; SD1.5 / SDXL: DDIM with eta `level`, DDPO) and the
    others deterministically (ODE / DDIM eta 0). `generator` (CPU) draws each step's noise for `noise_batch` rows
    (default: these) of which these are `noise_rows`, so a run's samples depend only on its seeds."""
    noise_batch = noise_batch or latents.shape[0]
    schedule = make_schedule(scheduler, cond, num_inference_steps, latents)
    latents = schedule.init(latents).float()
    chain, log_probs = [latents], []
    for i in range(len(schedule)):
        pred = schedule.predict(model, latents, i, cond, guidance_scale)
        if i in stochastic_steps:
            # the whole global batch's noise, this process's rows of it: samples independent of the process count
            noise = torch.randn(noise_batch, *latents.shape[1:], generator=generator)[noise_rows].to(latents.device)
            latents, log_prob, _, _ = schedule.stochastic_step(pred, i, latents, level, noise=noise)
        else:
            latents = schedule.step(pred.float(), i, latents).float()
            log_prob = torch.zeros(latents.shape[0], device=latents.device)
        chain.append(latents)
        log_probs.append(log_prob)
    return Trajectory(torch.stack(chain, dim=1), torch.stack(log_probs, dim=1))


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Frozen VAE decode to [0, 1]; gradients flow through the decoder to the latents. The latents are scaled back as
    the stock pipelines do (`utils.models.latent_scaling`: SD3's and FLUX's VAEs also shift them, Wan's normalises each
    channel by its own mean and std).

    Images: (B, C, h, w) -> (B, 3, H, W). Videos (Wan): (B, C, f, h, w) -> (B, F, 3, H, W), frame-major, F = 4 (f - 1)
    + 1 frames: WanPipeline's output_type="pt" layout, whose `.flatten(0, 1)` is a batch of images for the image
    rewards."""
    # NCHW, as the VAE's weights (a channels-last UNet returns channels-last latents, and cuDNN would then run the
    # whole decoder channels-last, its GroupNorms copying each activation to NCHW and back)
    scale, shift = latent_scaling(vae)
    pixels = vae.decode(latents.to(vae.dtype).contiguous() / scale + shift).sample
    if pixels.dim() == 5:
        pixels = pixels.transpose(1, 2)  # the VAE's (B, 3, F, H, W) -> (B, F, 3, H, W)
    return (pixels.float() / 2 + 0.5).clamp(0, 1)
