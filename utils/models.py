"""Loading a pipeline's parts (SD1.5, SDXL, SD3 / SD3.5, FLUX.1, Wan 2.1 text-to-video), prompt encoding, LoRA set-up
and saving.

Everything that differs between SD1.5 and SDXL (two text encoders, pooled embeddings, time ids) sits
behind `encode_prompts` and `TextConditioning`, so the training loops never branch on the architecture.
The flow-matching families (SD3, FLUX, Wan) load, encode and save through the same functions; what is theirs
lives in utils/flow.py.
"""
import functools
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch

from . import UsageError
from .flow import (ATTENTION_LORA_TARGET_MODULES, DEFAULT_NUM_FRAMES, DIFFUSERS_FLOW_LORA_TARGET_MODULES, ENCODER_NAMES,
                   FAMILY_NAMES, MAX_SEQUENCE_LENGTH, VIDEO_FAMILIES, FlowConditioning, build_flow_pipeline,
                   default_sample_size, encode_flow_prompts, flow_family, load_flow_parts, pipeline_class,
                   transformer_family, vae_class)
from .plugins import load_plugins

logger = logging.getLogger(__name__)

# The UNet's attention projections: what diffusers' text-to-image LoRA scripts adapt for SD1.5 and SDXL
# (train_text_to_image_lora.py, train_text_to_image_lora_sdxl.py).
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
# --lora_targets' named sets; anything else is a comma-separated list of module names.
LORA_TARGET_SETS = ("diffusers", "attention")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class PipelineParts:
    """The parts of a text-to-image (or text-to-video) pipeline that training needs. The denoiser (`unet`: the UNet,
    or the SD3 / FLUX / Wan transformer) is the only trainable one."""

    path: str
    is_sdxl: bool
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    text_encoders: list
    tokenizers: list
    # SDXL sets the unconditional (empty prompt) embedding to zeros rather than encoding "" (model_index.json).
    force_zeros_for_empty_prompt: bool = False
    # "sd" (SD1.5 / SDXL: DDIM, eps prediction) or a flow-matching family, "sd3" / "flux" / "wan" (utils/flow.py)
    family: str = "sd"

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along a side (Wan's video VAE says it in its config)."""
        return self.vae.config.get("scale_factor_spatial") or 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_flow(self) -> bool:
        return self.family != "sd"

    @property
    def is_video(self) -> bool:
        """Latents (B, C, f, h, w) that decode to videos (`utils.sampling.decode_latents`)."""
        return self.family in VIDEO_FAMILIES

    @property
    def name(self) -> str:
        """For logs: SD1.5, SD2.x (a v-prediction UNet of that layout), SDXL, SD3, FLUX.1, Wan 2.1."""
        if self.family in FAMILY_NAMES:
            return FAMILY_NAMES[self.family]
        if self.is_sdxl:
            return "SDXL"
        return "SD2.x" if self.scheduler.config.get("prediction_type") == "v_prediction" else "SD1.5"

    @property
    def default_resolution(self) -> int:
        if self.is_flow:
            return default_sample_size(self) * self.vae_scale_factor
        return self.unet.config.sample_size * self.vae_scale_factor

    def latent_shape(self, resolution: int, num_frames: Optional[int] = None) -> tuple:
        """(C, h, w) of the latents of a square `resolution` image (FLUX's packing happens inside its transformer
        call: the sampler's latents are unpacked for every family); for a video family (C, f, h, w) of a video of
        `num_frames` frames (default: the pipeline's, DEFAULT_NUM_FRAMES), f = (num_frames - 1) / 4 + 1 for Wan's VAE,
        which keeps the first frame and compresses each 4 after it into one latent frame."""
        side = resolution // self.vae_scale_factor
        if not self.is_video:
            return (self.vae.config.latent_channels, side, side)
        num_frames = num_frames or DEFAULT_NUM_FRAMES[self.family]
        temporal = self.vae.config.scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise UsageError(f"--num_frames: {num_frames} frames: {self.name}'s VAE takes 1 + {temporal} k frames "
                             f"(e.g. {DEFAULT_NUM_FRAMES[self.family]}, its pipeline's default)")
        return (self.vae.config.z_dim, (num_frames - 1) // temporal + 1, side, side)


# --------------------------------------------------------------------------- loading
# Pipelines known by a short name (plugins register them, utils/plugins.py): name -> a folder, or a function that
# returns one (e.g. builds the pipeline on first use).
_NAMED_PIPELINES: Dict[str, Union[str, os.PathLike, Callable[[], str]]] = {}


def register_pipeline(name: str, folder: Union[str, os.PathLike, Callable[[], str]]):
    """Make `name` usable wherever a pipeline folder or hub id is (--pretrained_model_name_or_path, evaluate.py, the
    notebook): `folder` is a diffusers pipeline folder, or a function returning one."""
    _NAMED_PIPELINES[name] = folder


def named_pipelines() -> List[str]:
    load_plugins()
    return list(_NAMED_PIPELINES)


def resolve_model_path(name_or_path: str) -> str:
    """A registered pipeline name becomes its folder (e.g. `tiny-sd`, built on first use, or `toy-sd`, committed:
    the toy world's plugin); anything else is kept."""
    load_plugins()
    folder = _NAMED_PIPELINES.get(name_or_path)
    if folder is None:
        return name_or_path
    return str(folder() if callable(folder) else folder)


def is_hub_id(name: str) -> bool:
    """`owner/name` as the hub spells repository ids: letters, digits and '-', '_', '.' (dots are common:
    `stabilityai/stable-diffusion-3.5-medium`, `black-forest-labs/FLUX.1-dev`). A name written as a path
    (`./x`, `/x`, `~/x`) or with another number of slashes is not one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def read_model_index(name_or_path: str, revision: Optional[str] = None) -> dict:
    """model_index.json of a local folder or hub id, with errors that name the flag and what was expected."""
    flag = "--pretrained_model_name_or_path"
    if os.path.isdir(name_or_path):
        index = os.path.join(name_or_path, "model_index.json")
        if not os.path.isfile(index):
            raise UsageError(f"{flag} {name_or_path!r} is a folder but not a diffusers pipeline: it has no model_index.json "
                             f"(expected the folder written by DiffusionPipeline.save_pretrained)")
        with open(index) as f:
            return json.load(f)
    if not is_hub_id(name_or_path):
        raise UsageError(f"{flag} {name_or_path!r} does not exist; expected a diffusers pipeline folder, a hub id "
                         f"such as 'stable-diffusion-v1-5/stable-diffusion-v1-5', or one of {', '.join(named_pipelines())}")
    from huggingface_hub import hf_hub_download

    try:
        with open(hf_hub_download(name_or_path, "model_index.json", revision=revision)) as f:
            return json.load(f)
    except Exception as e:  # offline, unknown repo, gated repo: one clear line
        raise UsageError(f"{flag} {name_or_path!r}: no local folder of that name, and model_index.json could not be "
                         f"had from the hub or its cache ({type(e).__name__}); pass a local pipeline folder "
                         f"instead") from None


def is_sdxl_index(model_index: dict) -> bool:
    """SDXL pipelines have a second text encoder; this reads the pipeline's own index, never its name."""
    return "text_encoder_2" in model_index and model_index["text_encoder_2"][0] is not None


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # DDIMScheduler's timestep_spacing values


def load_pipeline_parts(name_or_path: str, revision=None, variant=None, vae_name_or_path=None,
                        timestep_spacing: Optional[str] = None, text_encoders: bool = True) -> PipelineParts:
    """Load UNet (or transformer), VAE, scheduler, text encoder(s) and tokenizer(s) in fp32 (training casts the frozen
    parts). The family comes from model_index.json: SD3 / FLUX / Wan pipelines load through utils.flow.

    `timestep_spacing` (SD1.5 / SDXL): how DDIM spaces its sampling timesteps, in place of the scheduler config's own
    (SD's "leading" ends 50 steps at t = 1; "trailing" ends 40 steps at t = 24, where NeMo-Aligner's SDXL sampler makes
    its last model call). Flow models' Euler schedulers take none. `text_encoders=False` (Wan, training on pre-encoded
    prompts, utils/preencoded.py): no tokenizer or text encoder, which for Wan's UMT5-XXL saves 11 GB."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    path = resolve_model_path(name_or_path)
    index = read_model_index(path, revision)
    kw = dict(revision=revision)
    family = flow_family(index)
    if family:
        if timestep_spacing is not None:
            raise UsageError(f"--timestep_spacing sets DDIM's timesteps; {FAMILY_NAMES[family]} samples with its Euler "
                             f"scheduler's sigmas: drop --timestep_spacing")
        vae = None
        if vae_name_or_path:
            vae = vae_class(family).from_pretrained(resolve_model_path(vae_name_or_path), **kw)
        return PipelineParts(**load_flow_parts(path, family, revision, variant, vae, text_encoders))
    sdxl = is_sdxl_index(index)
    # DDIM is the sampler of DRaFT and the scheduler whose noise schedule DPO trains against.
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    if timestep_spacing is not None:
        scheduler = DDIMScheduler.from_config(scheduler.config, timestep_spacing=timestep_spacing)
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer", use_fast=False, **kw)]
    text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **kw)]
    if sdxl:
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", use_fast=False, **kw))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", variant=variant, **kw))
    if vae_name_or_path:
        vae = AutoencoderKL.from_pretrained(resolve_model_path(vae_name_or_path), **kw)
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **kw)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **kw)
    return PipelineParts(
        path=path, is_sdxl=sdxl, unet=unet, vae=vae, scheduler=scheduler, text_encoders=text_encoders,
        tokenizers=tokenizers, force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
    )


def freeze_frozen_parts(parts: PipelineParts, device, dtype):
    """VAE and text encoders never train: no grad, eval mode, moved to the compute dtype (the VAE stays float32
    where `vae_needs_upcast` says so)."""
    for module in [parts.vae, *parts.text_encoders]:
        module.requires_grad_(False).eval().to(device, dtype=dtype)
    if dtype == torch.float16:
        keep_fp32_modules(parts.text_encoders)
    if vae_needs_upcast(parts, dtype):
        upcast_vae(parts.vae)


def keep_fp32_modules(encoders):
    """T5's feed-forward output projections (`wo`, its `_keep_in_fp32_modules`) overflow to inf in fp16; transformers
    keeps them in float32 when a model loads with torch_dtype=float16, and T5 casts its activations to match, but a
    later `.to(float16)` casts them too: put them back (SD3's and FLUX's T5-XXL in fp16)."""
    for encoder in encoders:
        names = getattr(encoder, "_keep_in_fp32_modules", None) or []
        for name, module in encoder.named_modules():
            if name.split(".")[-1] in names:
                module.float()


def vae_needs_upcast(parts: PipelineParts, dtype) -> bool:
    """SDXL's VAE overflows to NaN in fp16; its config says so with `force_upcast`, which diffusers' SDXL pipelines
    honour by encoding and decoding in float32 (a fp16-fix VAE such as madebyollin/sdxl-vae-fp16-fix sets it False).
    The SD1.5 pipeline ignores the flag, whose default is True even for SD1.5's VAE (fine in fp16), and so do we:
    following the stock pipelines keeps our images theirs. bf16 has float32's range: nothing to upcast."""
    return dtype == torch.float16 and parts.is_sdxl and bool(getattr(parts.vae.config, "force_upcast", False))


def upcast_vae(vae):
    """Keep the VAE in float32 and run its encode / decode outside autocast: under the training loop's fp16
    autocast a float32 VAE's convolutions would still run in fp16. Wrapping the two methods on the instance
    covers every caller, our decode_latents as well as a stock pipeline's validation images."""
    vae.to(torch.float32)
    for name in ("encode", "decode"):
        setattr(vae, name, _float32_outside_autocast(getattr(vae, name)))


def _float32_outside_autocast(method):
    @functools.wraps(method)
    def run(x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return method(x.float(), *args, **kwargs)

    return run


def latent_scaling(vae):
    """(scale, shift) of the VAE's latents as the denoiser sees them: latents = (VAE latents - shift) * scale.
    SD1.5 / SDXL: the config's scaling_factor, no shift; SD3 / FLUX: scaling_factor and shift_factor. Wan's
    AutoencoderKLWan normalises each latent channel by its config's latents_mean and latents_std, as WanPipeline
    decodes: (1, C, 1, 1, 1) tensors on the VAE's device, in its dtype (scale = 1 / std, the pipeline's
    `latents_std`)."""
    from diffusers import AutoencoderKLWan

    config = vae.config
    if isinstance(vae, AutoencoderKLWan):
        param = next(vae.parameters())
        channels = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(channels).to(param.device, param.dtype)
        return 1.0 / torch.tensor(config.latents_std).view(channels).to(param.device, param.dtype), mean
    return config.scaling_factor, config.get("shift_factor") or 0.0


def build_pipeline(parts: PipelineParts, unet=None):
    """A stock diffusers pipeline around our parts (validation images or videos, evaluation)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if parts.is_flow:
        return build_flow_pipeline(parts, unet)
    unet = parts.unet if unet is None else unet  # `is None`: a compiled module has no truth value
    if parts.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=parts.vae, text_encoder=parts.text_encoders[0], text_encoder_2=parts.text_encoders[1],
            tokenizer=parts.tokenizers[0], tokenizer_2=parts.tokenizers[1], unet=unet, scheduler=parts.scheduler,
            force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
        )
    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoders[0], tokenizer=parts.tokenizers[0], unet=unet,
        scheduler=parts.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# --------------------------------------------------------------------------- prompts
@dataclass
class TextConditioning:
    """What the UNet is conditioned on: token embeddings, and for SDXL pooled embeddings and time ids."""

    embeds: torch.Tensor                   # (B, 77, D)
    pooled: Optional[torch.Tensor] = None  # (B, D2), SDXL only
    time_ids: Optional[torch.Tensor] = None  # (B, 6), SDXL only

    def unet_kwargs(self) -> dict:
        kw = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kw

    def _map(self, fn) -> "TextConditioning":
        return TextConditioning(*(None if t is None else fn(t) for t in (self.embeds, self.pooled, self.time_ids)))

    def repeat(self, n: int) -> "TextConditioning":
        """Each row repeated n times in a block ([a, b] -> [a, b, a, b]), e.g. winner and loser of DPO pairs."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))

    def to(self, *args, **kwargs) -> "TextConditioning":
        return self._map(lambda t: t.to(*args, **kwargs))

    def with_time_ids(self, time_ids) -> "TextConditioning":
        return TextConditioning(self.embeds, self.pooled, None if self.pooled is None else time_ids.to(self.embeds.device, self.embeds.dtype))

    @staticmethod
    def cat(items: List["TextConditioning"]) -> "TextConditioning":
        fields = [[getattr(c, name) for c in items] for name in ("embeds", "pooled", "time_ids")]
        return TextConditioning(*(None if f[0] is None else torch.cat(f) for f in fields))


def model_prediction(model, latents, timesteps, cond, guidance_scale: Optional[float] = None) -> torch.Tensor:
    """The denoiser's output on text rows (training on noised data): the UNet's eps (or v), a flow transformer's
    velocity (FLUX.1-dev with its guidance embedding at `guidance_scale`). timesteps (B,): DDPM steps, or sigma * 1000."""
    if isinstance(cond, FlowConditioning):
        return cond.velocity(model, latents, timesteps, guidance_scale)
    return model(latents, timesteps, **cond.unet_kwargs()).sample


def read_family(name_or_path: str, revision=None):
    """(family, is_sdxl) from the pipeline's model_index.json, before any weight loads (argument checks)."""
    index = read_model_index(resolve_model_path(name_or_path), revision)
    family = flow_family(index) or "sd"
    return family, family == "sd" and is_sdxl_index(index)  # FLUX has a text_encoder_2 too (its T5)


def sdxl_time_ids(original_sizes, crops, target_sizes) -> torch.Tensor:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per image -> (B, 6)."""
    rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_sizes, crops, target_sizes)]
    return torch.tensor(rows, dtype=torch.float32)


def tokenize(tokenizer, prompts: List[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def warn_long_prompts(parts: PipelineParts, prompts: List[str]) -> Dict[str, int]:
    """Warn once (one line, on the main process) how many prompts are longer than a text encoder reads: `tokenize`
    and the flow pipelines' `encode_prompt` cut every prompt to the encoder's limit (CLIP: 77 tokens, start and end
    token included; SD3 / FLUX T5: MAX_SEQUENCE_LENGTH), so the words past it never reach the model. Call it once
    after loading the prompts. Returns {encoder name: number of prompts longer than its limit}, the encoders that
    cut any (empty on the other processes)."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return {}
    names = ENCODER_NAMES[parts.family] if parts.is_flow else ("text_encoder", "text_encoder_2")
    cut = {}  # (number of prompts cut, limit, longest in tokens) -> the encoders that cut so many
    for name, tokenizer in zip(names, parts.tokenizers):
        # the flow pipelines read T5 (their last encoder) up to max_sequence_length, their CLIPs up to 77
        t5 = parts.is_flow and name == ENCODER_NAMES[parts.family][-1]
        limit = MAX_SEQUENCE_LENGTH[parts.family] if t5 else tokenizer.model_max_length
        lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False, verbose=False).input_ids]
        n = sum(length > limit for length in lengths)
        if n:
            cut.setdefault((n, limit, max(lengths)), []).append(name)
    if cut:
        each = "; ".join(f"{', '.join(encoders)}: {n} longer than {limit} tokens, the longest {longest}"
                         for (n, limit, longest), encoders in cut.items())
        logger.warning(f"{max(n for n, _, _ in cut)} of {len(prompts)} prompts are longer than the text encoder "
                       f"reads and are cut to its limit ({each}): the words past the limit do not reach the model")
    return {name: n for (n, _, _), encoders in cut.items() for name in encoders}


@torch.no_grad()
def encode_prompts(parts: PipelineParts, prompts: List[str], device, resolution: Optional[int] = None) -> TextConditioning:
    """Encode prompts with the frozen text encoder(s), as the diffusers pipelines do.

    SD1.5: last hidden state of the one encoder. SDXL: penultimate hidden states of both encoders
    concatenated, pooled projection of the second, and time ids for an uncropped square `resolution` image
    (DPO replaces them per image with `with_time_ids`). SD3 / FLUX / Wan: a `utils.flow.FlowConditioning`
    (`encode_flow_prompts`).
    """
    if parts.is_flow:
        return encode_flow_prompts(parts, prompts, device)
    if not parts.is_sdxl:
        embeds = parts.text_encoders[0](tokenize(parts.tokenizers[0], prompts).to(device))[0]
        return TextConditioning(embeds)
    hidden, pooled = [], None
    for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders):
        out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of the projection model (the last encoder)
    embeds = torch.cat(hidden, dim=-1)
    if parts.force_zeros_for_empty_prompt:
        empty = torch.tensor([p == "" for p in prompts], device=device)
        embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
        pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
    size = resolution or parts.default_resolution
    time_ids = sdxl_time_ids([(size, size)] * len(prompts), [(0, 0)] * len(prompts), [(size, size)] * len(prompts))
    return TextConditioning(embeds, pooled, time_ids.to(device, embeds.dtype))


# --------------------------------------------------------------------------- LoRA
def lora_target_modules(unet, targets: str = "diffusers") -> List[str]:
    """The module names (peft ``target_modules``: a name matches a module whose path ends with it) that LoRA adapts.

    ``targets``: "diffusers", what diffusers' LoRA training scripts adapt for the denoiser's family (SD1.5 / SDXL / SD3:
    the attention projections; FLUX.1: also the feed-forward layers and the single blocks' proj_mlp; Wan: the self- and
    cross-attention projections, as diffusers' finetrainers; utils.flow.DIFFUSERS_FLOW_LORA_TARGET_MODULES);
    "attention", the attention projections only (SD3 / FLUX: the joint attention's image- and text-stream projections;
    utils.flow.ATTENTION_LORA_TARGET_MODULES); or a comma-separated list of module names, each of which must match a
    linear or convolution layer of the denoiser."""
    family = transformer_family(unet)
    if targets == "diffusers":
        return list(DIFFUSERS_FLOW_LORA_TARGET_MODULES[family] if family else LORA_TARGET_MODULES)
    if targets == "attention":
        return list(ATTENTION_LORA_TARGET_MODULES[family] if family else LORA_TARGET_MODULES)
    names = [name.strip() for name in str(targets).split(",") if name.strip()]
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    unmatched = [t for t in names if not any(n == t or n.endswith("." + t) for n in layers)]
    if not names or unmatched:
        example = ", ".join(sorted({".".join(n.split(".")[-2:]) for n in layers})[:6])
        raise UsageError(f"--lora_targets {targets!r}: {', '.join(map(repr, unmatched)) or 'no name'} matches no linear "
                         f"or convolution layer of the {type(unet).__name__}; give {' or '.join(LORA_TARGET_SETS)}, or "
                         f"module names separated by commas, each the end of a layer's path (e.g. {example})")
    return names


def add_lora(unet, rank: int, alpha: Optional[float] = None, seed: Optional[int] = None, targets: str = "diffusers"):
    """Add a LoRA adapter (peft) to the denoiser's layers named by `targets` (``lora_target_modules``: by default
    what diffusers' LoRA training scripts adapt for its family); only its weights stay trainable."""
    from peft import LoraConfig

    target_modules = lora_target_modules(unet, targets)
    unet.requires_grad_(False)
    if seed is not None:
        torch.manual_seed(seed)  # LoRA A matrices are drawn at random: make the start reproducible
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=target_modules)
    unet.add_adapter(config)
    return unet


def add_trainable_lora(unet, rank: int, alpha: Optional[float], seed: Optional[int], device, dtype,
                       targets: str = "diffusers"):
    """LoRA for training under mixed precision: the base in `dtype` on `device`, the adapter weights in float32
    (the optimizer's master weights; autocast runs their matmuls in `dtype`), peft's input casts off
    (`skip_lora_input_casts`) where `dtype` is not float32. `targets`: ``lora_target_modules``."""
    add_lora(unet, rank, alpha, seed=seed, targets=targets)
    unet.to(device, dtype=dtype)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if dtype != torch.float32:
        skip_lora_input_casts(unet)
    return unet


def skip_lora_input_casts(unet):
    """peft casts each adapted layer's input to its adapter's dtype (bf16 activations -> a float32 copy), and
    autocast casts it straight back to bf16 for the adapter's matmul: two copies of every adapted activation,
    forward and backward, that change no number (bf16 -> float32 -> bf16 is exact). peft's own switch for them
    (`cast_input_dtype_enabled`) is turned off: on an H200 the composed DPO step ran 1.15x faster at 4 pairs and
    needed 1.5 GiB less at 16 (BENCHMARKS.md). Every forward of the trained UNet must then run under autocast
    (accelerate wraps its forward) or, as under DeepSpeed, with all weights in one dtype."""
    for module in unet.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def weights_subfolder(unet) -> str:
    """Where a full fine-tune is saved: the pipeline's own folder name for its denoiser."""
    return "transformer" if transformer_family(unet) else "unet"


def has_lora(unet) -> bool:
    return getattr(unet, "_hf_peft_config_loaded", False)


def lora_state_dict(unet, state_dict: Optional[dict] = None) -> dict:
    """The adapter weights with the key names diffusers' `load_lora_weights` expects; taken from `state_dict`
    (the gathered weights of a sharded UNet) where given. SD3 / FLUX / Wan keep peft's names, as diffusers' DreamBooth
    LoRA scripts for SD3 and FLUX save them (their loaders, and WanPipeline's, read peft names); the UNet's are
    converted."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, state_dict=state_dict)
    return state if transformer_family(unet) else convert_state_dict_to_diffusers(state)


def lora_pipeline_class(unet, is_sdxl: bool):
    """The stock pipeline whose `save_lora_weights` / `lora_state_dict` fit this denoiser."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family = transformer_family(unet)
    if family:
        return pipeline_class(family)
    return StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline


def save_lora(unet, output_dir: str, is_sdxl: bool, state_dict: Optional[dict] = None):
    """Write pytorch_lora_weights.safetensors so that `pipe.load_lora_weights(output_dir)` works unchanged
    (SD3 / FLUX / Wan: the transformer's layers, which StableDiffusion3Pipeline / FluxPipeline / WanPipeline load)."""
    prefix = weights_subfolder(unet)  # the pipeline's component name: unet_lora_layers / transformer_lora_layers
    # The adapter config (rank, alpha, targets) goes into the file's metadata: without it diffusers' loader
    # assumes lora_alpha == rank, and a run with --lora_alpha != --lora_rank would reload at the wrong scale.
    lora_pipeline_class(unet, is_sdxl).save_lora_weights(
        output_dir, weight_name=LORA_WEIGHT_NAME, safe_serialization=True,
        **{f"{prefix}_lora_layers": lora_state_dict(unet, state_dict),
           f"{prefix}_lora_adapter_metadata": unet.peft_config["default"].to_dict()})


def load_lora_into_unet(unet, folder: str):
    """Load weights written by `save_lora` back into a UNet (or transformer) that already has the adapter (resume)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    if transformer_family(unet):  # our own file, in peft's names already (save_lora)
        from safetensors.torch import load_file

        state = load_file(os.path.join(folder, LORA_WEIGHT_NAME))
    else:
        state, _ = StableDiffusionPipeline.lora_state_dict(folder, weight_name=LORA_WEIGHT_NAME)
    prefix = weights_subfolder(unet) + "."
    state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    if result is not None and getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"LoRA weights in {folder} do not fit this UNet: unexpected keys {result.unexpected_keys[:3]}")


def frozen_copy(model, dtype):
    """The frozen reference of a full fine-tune: a copy with its parameters in the mixed-precision `dtype` and its
    buffers as they are. Under autocast the trained float32 model's matmuls and convolutions run on the same rounded
    weights, so the two compute the same at step 0 (DPO's first loss log 2, DRaFT+'s KL 0). A float32 buffer cast too
    would differ: SD3's `pos_embed` is added in float32 by the trained model, in bf16 by a `.to(dtype)` copy (first
    DPO loss 0.37 instead of log 2 on tiny-sd3 in bf16)."""
    import copy

    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    for p in frozen.parameters():
        p.data = p.data.to(dtype)
    return frozen


@contextmanager
def adapters_disabled(unet):
    """The frozen base model for free: the same UNet with its LoRA adapters switched off.

    peft's switch also sets the adapters' requires_grad to False; it is put back at once (the forward ignores it), so
    that nothing that reads requires_grad meanwhile sees a model without trainable weights: FSDP2 picks its gradient
    dtypes at its first forward, which is the reference's in train_dpo.py, and without trainable weights it picked
    none and reduced the adapters' bf16 gradients into their fp32 weights unconverted (an error)."""
    trainable = [p for p in unet.parameters() if p.requires_grad]
    unet.disable_adapters()
    for p in trainable:
        p.requires_grad_(True)
    try:
        yield unet
    finally:
        unet.enable_adapters()


def reference_model(trained, frozen=None):
    """The frozen reference (DRaFT+'s KL, DPO's reference errors, the base row of validation grids) as one callable:
    the frozen copy of a full fine-tune, or the trained model with its LoRA adapters switched off for the call."""
    if frozen is not None:
        return frozen

    def base(*args, **kwargs):
        with adapters_disabled(trained):
            return trained(*args, **kwargs)

    return base


def load_unet_init(path, model_class):
    """--unet_init: a folder holding unet/ or transformer/ (e.g. an earlier full fine-tune's output), or the model's
    own folder / hub id; `model_class`: the pipeline's denoiser class (UNet, SD3, FLUX or Wan transformer)."""
    subfolder = next((s for s in ("unet", "transformer") if os.path.isdir(os.path.join(path, s))), None)
    try:
        return model_class.from_pretrained(path, subfolder=subfolder)
    except (OSError, ValueError) as e:
        raise UsageError(f"--unet_init {path}: not a {model_class.__name__} folder or a folder with unet/ or "
                         f"transformer/ ({type(e).__name__})") from None
