"""Flow-matching pipelines (SD3 / SD3.5, FLUX.1, Wan 2.1 text-to-video): loading, prompt encoding, the transformer call,
the Euler schedule.

    x_t = (1 - sigma) * x_0 + sigma * noise;   the transformer predicts the velocity v = noise - x_0
    Euler step:  x_next = x_t + (sigma_next - sigma) * v;   predicted x_0 = x_t - sigma * v

Every formula is elementwise, so the same code serves images, (B, C, h, w) latents, and Wan's videos, (B, C, f, h, w)
latents (f latent frames).

What differs between the families sits here, behind three small interfaces that the DDIM path of SD1.5 / SDXL
also has, so that the training scripts never branch on the family:
- `load_flow_parts` gives the fields of the same `PipelineParts` as SD1.5 / SDXL (`parts.unet` is then the transformer);
- `encode_flow_prompts` returns a `FlowConditioning`, which knows how to call its transformer (`guided_velocity`):
  SD3 runs classifier-free guidance on [uncond; text] rows as SD1.5 does, FLUX.1-dev feeds the guidance scale to the
  transformer's guidance embedding (one pass) and packs the latents 2x2 into tokens only around the call, so the
  sampler, the VAE and the rewards see (B, C, h, w) latents for every family; Wan runs CFG as SD3 does, on text
  embeddings alone;
- `FlowSchedule` holds the sigmas the stock pipeline would use (SD3, Wan: the scheduler's shift; FLUX: sigmas
  linspace(1, 1/N, N) shifted by the image's token count) and takes the Euler steps.

Prompt encoding (SD3, FLUX), packing, image ids and the shift are diffusers' own code (the pipelines' `encode_prompt`,
`_pack_latents`, `_unpack_latents`, `_prepare_latent_image_ids`, `calculate_shift`), called, not copied. Wan's prompt
encoding is ours (`encode_wan_prompts`: the tokenizer and UMT5 alone, no pipeline object; diffusers' prompt cleaning
called), tested equal to WanPipeline.encode_prompt.
"""
import math
from dataclasses import dataclass, replace
from typing import List, Optional

import numpy as np
import torch

from . import UsageError

# model_index.json's `_class_name` -> family; anything else is SD1.5 / SDXL (utils.models)
FLOW_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "WanPipeline": "wan"}
FAMILY_NAMES = {"sd3": "SD3", "flux": "FLUX.1", "wan": "Wan 2.1"}
# The families whose latents are videos, (B, C, f, h, w), and their pipelines' default frame count (WanPipeline's 81,
# 21 latent frames)
VIDEO_FAMILIES = ("wan",)
DEFAULT_NUM_FRAMES = {"wan": 81}


def refuse_video_flags(family: str, given: List[str]):
    """The scripts' video flags `given` on the command line are for video families; an image family takes none."""
    if family not in VIDEO_FAMILIES and given:
        raise UsageError(f"{given[0]} is for video models (Wan 2.1); this model makes images: drop {given[0]}")


def resolve_video_flags(args, family: str, default_reward_frames: int = None, other_flags: List[str] = ()):
    """`--num_frames` / `--reward_frames` from the family (model_index.json): the pipeline's frame count where not
    given, and `default_reward_frames` frames scored (None: all), capped at the frame count. An image family takes
    neither, nor any of `other_flags` (a script's further video flags given on the command line)."""
    given = [flag for flag in ("--num_frames", "--reward_frames") if getattr(args, flag[2:]) is not None]
    refuse_video_flags(family, given + list(other_flags))
    if family not in VIDEO_FAMILIES:
        return
    args.num_frames = args.num_frames or DEFAULT_NUM_FRAMES[family]
    args.reward_frames = min(args.reward_frames or default_reward_frames or args.num_frames, args.num_frames)

# The joint-attention projections of the image stream (to_*) and of the text stream (add_*, to_add_out), the
# defaults of diffusers' DreamBooth LoRA script for SD3 (train_dreambooth_lora_sd3.py, --lora_layers unset).
# FLUX's single-stream blocks have to_q/k/v but no to_out (their output is proj_out, shared with the MLP).
FLOW_LORA_TARGET_MODULES = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                            "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out"]
# Wan's blocks: the self-attention (attn1) and the cross-attention to the text (attn2) projections. diffusers' examples
# have no Wan LoRA script; its team's finetrainers trains these for Wan 2.1 T2V (examples/training/sft/wan/
# crush_smol_lora/train.sh: --target_modules "blocks.*(to_q|to_k|to_v|to_out.0)").
WAN_LORA_TARGET_MODULES = [f"{attn}.{proj}" for attn in ("attn1", "attn2")
                           for proj in ("to_q", "to_k", "to_v", "to_out.0")]
# --lora_targets attention: the attention projections of each family
ATTENTION_LORA_TARGET_MODULES = {"sd3": FLOW_LORA_TARGET_MODULES, "flux": FLOW_LORA_TARGET_MODULES,
                                 "wan": WAN_LORA_TARGET_MODULES}
# What diffusers' DreamBooth LoRA scripts adapt per family with --lora_layers unset: SD3 (train_dreambooth_lora_sd3.py)
# the attention projections above; FLUX (train_dreambooth_lora_flux.py) also the double blocks' feed-forward layers of
# both streams (ff.net.0.proj, ff.net.2, ff_context.*) and the single blocks' MLP input projection (proj_mlp); Wan:
# finetrainers' attention projections (above).
DIFFUSERS_FLOW_LORA_TARGET_MODULES = {
    "sd3": FLOW_LORA_TARGET_MODULES,
    "flux": FLOW_LORA_TARGET_MODULES + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                                        "proj_mlp"],
    "wan": WAN_LORA_TARGET_MODULES,
}
# The stock pipelines' defaults for the T5 prompt length (their `max_sequence_length`; WanPipeline's __call__ 512, its
# UMT5): following them keeps our images the stock pipeline's.
MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512, "wan": 512}


def flow_family(model_index: dict) -> Optional[str]:
    """"sd3", "flux" or "wan" from the pipeline's own model_index.json (never from its name); None for SD1.5 / SDXL."""
    return FLOW_PIPELINES.get(model_index.get("_class_name"))


def pipeline_class(family: str):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, WanPipeline

    return {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline, "wan": WanPipeline}[family]


def vae_class(family: str):
    """The VAE class of the family's pipelines (--pretrained_vae_model_name_or_path loads one of it)."""
    from diffusers import AutoencoderKL, AutoencoderKLWan

    return AutoencoderKLWan if family == "wan" else AutoencoderKL


def transformer_family(model) -> Optional[str]:
    """"sd3" / "flux" / "wan" for a flow transformer, None for a UNet: saving and reloading dispatch on the model
    itself."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel

    families = ((SD3Transformer2DModel, "sd3"), (FluxTransformer2DModel, "flux"), (WanTransformer3DModel, "wan"))
    for cls, family in families:
        if isinstance(model, cls):
            return family
    return None


# --------------------------------------------------------------------------- loading
# the pipelines' names of their text encoders, in the order of `PipelineParts.text_encoders` (tokenizers alike)
ENCODER_NAMES = {"sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
                 "flux": ("text_encoder", "text_encoder_2"), "wan": ("text_encoder",)}


def _tokenizer_name(encoder_name: str) -> str:
    return encoder_name.replace("text_encoder", "tokenizer")


def load_flow_parts(path: str, family: str, revision=None, variant=None, vae=None, text_encoders: bool = True) -> dict:
    """All parts through the stock pipeline's `from_pretrained` (the path users' hub ids take), in fp32, as the
    fields of a `utils.models.PipelineParts`. `vae`: a VAE of the family's `vae_class` to use instead of the pipeline's
    own (--pretrained_vae_model_name_or_path). Wan's multistep scheduler is replaced by the Euler scheduler of its shift
    (`euler_scheduler`). `text_encoders=False`: none loaded (empty lists)."""
    names = ENCODER_NAMES[family] if text_encoders else ()
    kwargs = {"vae": vae} if vae is not None else {}
    if not text_encoders:  # from_pretrained skips a component passed as None
        kwargs.update({n: None for name in ENCODER_NAMES[family] for n in (name, _tokenizer_name(name))})
    if family == "flux":
        avoid_cudnn_attention()
    pipe = pipeline_class(family).from_pretrained(path, revision=revision, variant=variant, **kwargs)
    scheduler = euler_scheduler(pipe.scheduler) if family == "wan" else pipe.scheduler
    return dict(path=path, is_sdxl=False, unet=pipe.transformer, vae=pipe.vae, scheduler=scheduler,
                text_encoders=[getattr(pipe, n) for n in names],
                tokenizers=[getattr(pipe, _tokenizer_name(n)) for n in names], family=family)


def euler_scheduler(scheduler):
    """The FlowMatchEulerDiscreteScheduler that our samplers step with, for a pipeline that ships another flow
    scheduler. Wan 2.1 ships UniPCMultistepScheduler (prediction_type flow_prediction, use_flow_sigmas) whose config
    holds the shift as `flow_shift` (3.0 at 480p as in the Wan reference, 5.0 at 720p, as WanPipeline's docstring sets
    it). UniPC's multistep predictor-corrector is not the single Euler / SDE step that DRaFT's gradients and Flow-GRPO's
    log-probs are written for. The Euler scheduler built from the same `flow_shift` and training timesteps shifts its
    sigmas by the same sigma' = shift * sigma / (1 + (shift - 1) * sigma) (UniPC spaces the unshifted sigmas as
    linspace(1, 1/1000, N + 1)[:N], Euler as linspace(1, its smallest training sigma, N): nearly the same points);
    WanPipeline samples with it unchanged (`build_flow_pipeline`), so validation videos are our sampler's. A
    FlowMatchEulerDiscreteScheduler is kept as it is."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return scheduler
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=scheduler.config.num_train_timesteps,
                                           shift=scheduler.config.flow_shift)


def avoid_cudnn_attention():
    """PyTorch picks cuDNN's fused attention first on Hopper GPUs. For the FLUX.1-dev transformer its backward fails
    (H200, torch 2.11: `mha_graph.execute(...).is_good()` without gradient checkpointing, an illegal memory access
    with it; bench/flow.py), while flash attention trains it. Switched off for the process: the recomputation of a
    checkpointed block must pick the same kernel as its forward, so a context around the forward would not do."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def build_flow_pipeline(parts, transformer=None):
    """A stock StableDiffusion3Pipeline / FluxPipeline / WanPipeline around our parts (validation images, evaluation,
    tests)."""
    names = ENCODER_NAMES[parts.family]
    encoders = dict(zip(names, parts.text_encoders))
    tokenizers = {_tokenizer_name(n): t for n, t in zip(names, parts.tokenizers)}
    transformer = parts.unet if transformer is None else transformer
    return pipeline_class(parts.family)(transformer=transformer, vae=parts.vae, scheduler=parts.scheduler,
                                        **encoders, **tokenizers)


# WanPipeline's default video is 480 x 832 px; the scripts sample squares, whose side is its height
WAN_DEFAULT_HEIGHT = 480


def default_sample_size(parts) -> int:
    """Latent side of the default image: SD3's transformer config says it; FluxPipeline fixes 128 (1024 px); Wan:
    WAN_DEFAULT_HEIGHT."""
    if parts.family == "wan":
        return WAN_DEFAULT_HEIGHT // parts.vae_scale_factor
    return getattr(parts.unet.config, "sample_size", None) or 128


# --------------------------------------------------------------------------- prompts
@dataclass
class FlowConditioning:
    """What a flow transformer is conditioned on. With classifier-free guidance (SD3, Wan; FLUX with true CFG) the
    unconditional rows come first, then the text rows, as `TextConditioning` of SD1.5."""

    family: str
    # (B, L, D): SD3: 77 tokens of CLIP-L | CLIP-G hidden states padded to T5's width, then the T5 tokens; FLUX: T5's;
    # Wan: UMT5's, zeros past each prompt's last token
    embeds: torch.Tensor
    # (B, P): SD3: CLIP-L | CLIP-G pooled projections (2048); FLUX: CLIP-L's (768); Wan: None (text tokens only)
    pooled: Optional[torch.Tensor]
    text_ids: Optional[torch.Tensor] = None  # (L, 3) FLUX's text position ids (zeros), shared by the batch
    guidance_embeds: bool = False        # FLUX.1-dev: the guidance scale is an input of the transformer
    cfg_scale: Optional[float] = None    # the CFG scale when the rows are [uncond; text]; None: text rows only

    def _map(self, fn) -> "FlowConditioning":
        return replace(self, embeds=fn(self.embeds), pooled=None if self.pooled is None else fn(self.pooled))

    def repeat(self, n: int) -> "FlowConditioning":
        """Each row repeated n times in a block ([a, b] -> [a, b, a, b]), e.g. winner and loser of DPO pairs."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))

    def to(self, *args, **kwargs) -> "FlowConditioning":
        moved = self._map(lambda t: t.to(*args, **kwargs))
        return moved if self.text_ids is None else replace(moved, text_ids=self.text_ids.to(*args, **kwargs))

    @staticmethod
    def cat(items: List["FlowConditioning"]) -> "FlowConditioning":
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])
        return replace(items[0], embeds=torch.cat([c.embeds for c in items]), pooled=pooled)

    def with_time_ids(self, time_ids) -> "FlowConditioning":
        """SDXL's size / crop micro-conditioning: SD3 and FLUX have none (train_dpo.py's batches carry it for SDXL)."""
        return self

    def with_cfg(self, uncond: "FlowConditioning", scale: float) -> "FlowConditioning":
        """Rows [uncond; text] (uncond is one row, broadcast to the batch), guided with `scale`."""
        batch = self.embeds.shape[0]
        if uncond.embeds.shape[0] == 1 and batch > 1:
            uncond = uncond.repeat(batch)
        return replace(FlowConditioning.cat([uncond, self]), cfg_scale=scale)

    def velocity(self, model, latents: torch.Tensor, timestep: torch.Tensor, guidance_scale: float,
                 detach_uncond: bool = False) -> torch.Tensor:
        """The transformer's velocity for `latents` (B, C, h, w), Wan's (B, C, f, h, w), at `timestep` (sigma * 1000: a
        0-dim tensor, or (B,) one per row, e.g. for training on noised data with `flow_noise`; text rows only then),
        guided: CFG over [uncond; text] rows when `cfg_scale` is set (SD3, Wan: `guidance_scale` itself), and for
        FLUX.1-dev the guidance embedding set to `guidance_scale`. `detach_uncond`: no gradient through the
        unconditional rows (online RL's policy, as Flow-GRPO trains it). Returns the latents' shape."""
        rows = 2 if self.cfg_scale is not None else 1
        x = torch.cat([latents] * rows)
        if self.family == "sd3":
            v = model(hidden_states=x, timestep=timestep.expand(x.shape[0]), encoder_hidden_states=self.embeds,
                      pooled_projections=self.pooled, return_dict=False)[0]
        elif self.family == "wan":
            v = model(hidden_states=x, timestep=timestep.expand(x.shape[0]), encoder_hidden_states=self.embeds,
                      return_dict=False)[0]
        else:
            v = self._flux_velocity(model, x, timestep, guidance_scale)
        if rows == 1:
            return v
        v_uncond, v_text = v.chunk(2)
        if detach_uncond:
            v_uncond = v_uncond.detach()
        return v_uncond + self.cfg_scale * (v_text - v_uncond)

    def _flux_velocity(self, model, x, timestep, guidance_scale):
        from diffusers import FluxPipeline

        batch, channels, h, w = x.shape
        packed = FluxPipeline._pack_latents(x, batch, channels, h, w)  # (B, h/2 * w/2, 4C): 2x2 patches as tokens
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, x.device, x.dtype)  # (h/2 * w/2, 3)
        guidance = torch.full((batch,), guidance_scale, device=x.device, dtype=torch.float32) if self.guidance_embeds else None
        # FluxPipeline passes timestep / 1000 (sigma) where SD3's takes sigma * 1000
        t = timestep.expand(batch).to(x.dtype) / 1000
        v = model(hidden_states=packed, timestep=t, guidance=guidance, pooled_projections=self.pooled,
                  encoder_hidden_states=self.embeds, txt_ids=self.text_ids, img_ids=image_ids, return_dict=False)[0]
        # _unpack_latents takes the image's pixel size and the VAE factor; latent sizes with factor 1 say the same
        return FluxPipeline._unpack_latents(v, h, w, vae_scale_factor=1)


@torch.no_grad()
def encode_flow_prompts(parts, prompts: List[str], device) -> FlowConditioning:
    """Encode prompts with the stock pipeline's own `encode_prompt` (SD3: CLIP-L and CLIP-G penultimate hidden states
    side by side, zero-padded to T5's width, then the T5 tokens; pooled = both CLIPs' projections. FLUX: the T5 tokens
    and CLIP-L's pooled output, text ids zeros), Wan's as WanPipeline does (`encode_wan_prompts`). The text rows only;
    `FlowConditioning.with_cfg` adds the uncond rows."""
    length = MAX_SEQUENCE_LENGTH[parts.family]
    if parts.family == "wan":
        embeds = encode_wan_prompts(parts.tokenizers[0], parts.text_encoders[0], prompts, length, device)
        return FlowConditioning("wan", embeds, None)
    pipe = build_flow_pipeline(parts)
    if parts.family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False,
                                                  max_sequence_length=length)
        return FlowConditioning("sd3", embeds, pooled)
    embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, device=device, max_sequence_length=length)
    return FlowConditioning("flux", embeds, pooled, text_ids, guidance_embeds=bool(parts.unet.config.guidance_embeds))


def encode_wan_prompts(tokenizer, encoder, prompts: List[str], max_length: int, device) -> torch.Tensor:
    """(B, max_length, D): WanPipeline's prompt embeddings (its `_get_t5_prompt_embeds`). Each prompt is cleaned as it
    cleans them (diffusers' `prompt_clean`: ftfy where installed, HTML entities, runs of whitespace), padded to
    `max_length` tokens and encoded by UMT5 under the padding mask; the rows past the prompt's last token are then set
    to zero, as the pipeline cuts each prompt to its length and pads it with zeros (the reference Wan code's text
    encoder returns the prompt's tokens only)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    tokens = tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_length,
                       truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device)  # (B, L): ones over the prompt (padding is on the right), zeros after
    hidden = encoder(tokens.input_ids.to(device), mask).last_hidden_state
    return torch.where(mask.bool()[..., None], hidden, torch.zeros_like(hidden))


# --------------------------------------------------------------------------- the schedule
class FlowSchedule:
    """The sigmas of the stock pipeline's FlowMatchEulerDiscreteScheduler for `num_steps` steps on latents of side
    (h, w) (a video's frames: the same), and the Euler step. The scheduler itself is only asked for its sigmas: its
    `step` keeps a step index (one chain at a time) and rounds the latent to the velocity's dtype, where ours stays
    float32 under autocast."""

    def __init__(self, scheduler, family: str, num_steps: int, latent_size, device, patch_size: int = 2):
        h, w = latent_size
        image_seq_len = (h // patch_size) * (w // patch_size)  # tokens of the image: FLUX packs 2x2, SD3 patches 2x2
        config = scheduler.config
        if family == "flux":
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            # FluxPipeline: sigmas linspace(1, 1/N, N), shifted by the token count (use_dynamic_shifting)
            sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
            mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        else:
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            # StableDiffusion3Pipeline: the scheduler's own timesteps with its fixed shift (3.0), unless the config
            # asks for dynamic shifting; WanPipeline: the same, with Wan's flow_shift (`euler_scheduler`)
            sigmas, mu = None, None
            if config.get("use_dynamic_shifting"):
                mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                     config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        scheduler.set_timesteps(num_steps, device=device, sigmas=sigmas, mu=mu)
        self.timesteps = scheduler.timesteps  # (N,) sigma * 1000, on `device`
        self.sigmas = scheduler.sigmas        # (N + 1,) ending in 0
        self.sigma_values = self.sigmas.tolist()  # python floats: no host sync inside the loop

    def __len__(self) -> int:
        return len(self.timesteps)

    def init(self, latents):
        return latents  # x_T at sigma 1 is the noise itself

    def predict(self, model, latents, i: int, cond: FlowConditioning, guidance_scale: float, detach_uncond=False):
        return cond.velocity(model, latents, self.timesteps[i], guidance_scale, detach_uncond)

    def step(self, velocity, i: int, latents, eta: float = 0.0, generator=None, output: str = "x_prev"):
        """x_t -> x_{t_next} (Euler), or the predicted x_0 when `output` is "pred_x0". At the last step sigma_next is
        0, so the two are the same latent: x_t + (0 - sigma) * v = x_t - sigma * v. The chain is deterministic: `eta`
        and `generator` are DDIM's (train_draftp.py refuses --eta > 0 for flow models)."""
        if output == "pred_x0":
            return latents - self.sigmas[i] * velocity
        return latents + (self.sigmas[i + 1] - self.sigmas[i]) * velocity

    def renoise_last(self, x0, noise):
        """x_0 noised to the last step's sigma (DRaFT-LV)."""
        return flow_noise(x0, noise, self.sigmas[-2])

    def stochastic_step(self, velocity, i: int, latents, noise_level: float, noise=None, prev_sample=None):
        """Flow-GRPO's SDE step from sigma to sigma_next, whose marginals are the ODE's (Liu et al. 2025), in
        float32: with dt = sigma_next - sigma < 0 and std_t = a * sqrt(sigma / (1 - sigma')) (a = `noise_level`;
        sigma' = sigma, except the schedule's second sigma where sigma = 1),

            mean = x * (1 + std_t^2 / (2 sigma) * dt) + v * (1 + std_t^2 (1 - sigma) / (2 sigma)) * dt
            x_next = mean + std_t * sqrt(-dt) * noise

        Returns (x_next, log_prob, mean, std_t): the log-density of x_next (`prev_sample` where given, e.g. a stored
        trajectory's, else drawn with `noise`) under that Gaussian, averaged over all but the batch dimension, (B,)."""
        sigma, sigma_next = self.sigma_values[i], self.sigma_values[i + 1]
        dt = sigma_next - sigma
        std = noise_level * math.sqrt(sigma / (1 - (self.sigma_values[1] if sigma == 1 else sigma)))
        x, v = latents.float(), velocity.float()
        mean = x * (1 + std ** 2 / (2 * sigma) * dt) + v * (1 + std ** 2 * (1 - sigma) / (2 * sigma)) * dt
        step_std = std * math.sqrt(-dt)
        if prev_sample is None:
            prev_sample = mean + step_std * noise.float()
        return prev_sample, gaussian_log_prob(prev_sample.detach().float(), mean, step_std), mean, std


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """log N(x; mean, std^2) per element, averaged over all but the batch dimension: (B,). `std` a float or a
    tensor that broadcasts."""
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    log_prob = -((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return per_sample_mean(log_prob)


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,): the mean over all but the batch dimension (images' C, h, w; videos' C, f, h, w)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def flow_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x_t = (1 - sigma) * x_0 + sigma * noise, for (B, C, h, w) or video (B, C, f, h, w) latents and a float, 0-dim or
    (B,) sigma; the velocity the transformer is trained to predict there is noise - x_0."""
    if torch.is_tensor(sigma) and sigma.dim() == 1:
        sigma = sigma.view(-1, *[1] * (x0.dim() - 1))  # (B,) -> (B, 1, 1, 1), videos (B, 1, 1, 1, 1)
    return (1 - sigma) * x0 + sigma * noise


# --------------------------------------------------------------------------- training on noised data (train_dpo.py)
# diffusers' SD3 / FLUX training examples' names: how t is drawn (logit_normal, mode) or how the loss is weighted
# (cosmap, sigma_sqrt; t uniform then); none: uniform t, unweighted loss.
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")
# --weighting_scheme when not given: SD3's own (the SD3 paper's logit-normal(0, 1), the default of diffusers'
# train_dreambooth_lora_sd3.py); FLUX: uniform, the default of diffusers' train_dreambooth_lora_flux.py (Black Forest
# Labs did not publish FLUX's training density); Wan: logit-normal, as finetrainers trains Wan 2.1 T2V
# (examples/training/sft/wan/crush_smol_lora/train.sh: --flow_weighting_scheme logit_normal).
DEFAULT_WEIGHTING = {"sd3": "logit_normal", "flux": "none", "wan": "logit_normal"}


class FlowTrainingTimesteps:
    """Timesteps for training on noised data, drawn as diffusers' SD3 / FLUX DreamBooth scripts draw them: u from
    `compute_density_for_timestep_sampling` in [0, 1], then index (u * N) into the N = 1000 training sigmas of a freshly
    configured FlowMatchEulerDiscreteScheduler. Those carry the scheduler's fixed shift (SD3 / SD3.5: 3.0,
    sigma' = 3 sigma / (1 + 2 sigma); Wan: its flow_shift, `euler_scheduler`); a scheduler with `use_dynamic_shifting`
    (FLUX) shifts only at sampling time, by the image's token count, so its training sigmas are unshifted, as in
    diffusers' FLUX script.

    The table is taken once from the config, not from the pipeline's scheduler: a validation pipeline's
    `set_timesteps` replaces that scheduler's sigmas with its sampling schedule."""

    def __init__(self, scheduler, weighting_scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29):
        from diffusers import FlowMatchEulerDiscreteScheduler

        fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.sigmas = fresh.sigmas.float()        # (N,) descending from 1 to 1/N (shifted where the config says)
        self.num_train_timesteps = fresh.config.num_train_timesteps
        self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale = (
            weighting_scheme, logit_mean, logit_std, mode_scale)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) timesteps, sigma * 1000 (what the transformer is called with; `sigma_of` gives sigma back)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, n, self.logit_mean, self.logit_std,
                                                  self.mode_scale, generator=generator)
        # u = 1 exactly (the mode density at a uniform draw of 0, probability 2^-24) would index one past the end
        indices = (u * len(self.sigmas)).long().clamp(max=len(self.sigmas) - 1)
        return self.sigmas[indices] * self.num_train_timesteps

    def sigma_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps / self.num_train_timesteps

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) SD3's loss weights (`compute_loss_weighting_for_sd3`: cosmap, sigma_sqrt; ones for the others)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting_scheme, self.sigma_of(timesteps).float())
