"""The first frames of a Wan video decoded with gradient, one latent frame at a time under activation checkpointing.

It drives the decoder of diffusers' `AutoencoderKLWan` frame by frame, as its own `_decode` does
(models/autoencoders/autoencoder_kl_wan.py), with these differences, each for training:
- only the latent frames that the wanted output frames need are decoded. The decoder is causal in time: latent frame 0
  gives output frame 0, latent frame i >= 1 gives frames 4 (i - 1) + 1 ... 4 i, each from its own latent frame and the
  cached features of the frames before it; so frames 0 ... k come out as in a full decode, and no frame after the
  last one scored is computed;
- each latent frame's decoder call runs under `torch.utils.checkpoint` (non-reentrant) as a pure function of that
  latent frame and the causal cache it is handed (a fresh list, returned as a tuple) instead of mutating the VAE's
  `_feat_map`, so that a recomputation in backward sees the cache of its own frame. Between forward and backward only
  each latent frame's output and its small cache (the last 2 frames' features at each causal convolution) stay in
  memory, not the decoder's activations of every frame; backward recomputes one latent frame's activations at a time.
  AutoencoderKLWan has no gradient checkpointing of its own (`_supports_gradient_checkpointing = False`);
- no tiling and no slicing: training decodes the whole frame of the whole batch.
"""
import functools

import torch
from torch.utils.checkpoint import checkpoint

from .models import latent_scaling


def latent_frames_needed(last_frame: int, temporal: int) -> int:
    """How many latent frames the causal decoder needs for output frames 0 ... `last_frame` (`temporal`: the VAE's
    scale_factor_temporal, 4 for Wan): the first, then one per `temporal` output frames."""
    return 1 + (last_frame + temporal - 1) // temporal


def _decode_latent_frame(decoder, x, cache: tuple, first_chunk: bool):
    """One latent frame (B, C, 1, h, w) through the decoder with the cache of the frames before it; returns its output
    frames and the cache for the next latent frame. The cache holds tensors, None (not yet filled) or "Rep" (Wan's
    temporal upsampler before its first frame)."""
    cache = list(cache)
    out = decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first_chunk)
    return out, tuple(cache)


def decode_first_frames(vae, latents: torch.Tensor, last_frame: int, checkpointed: bool = True) -> torch.Tensor:
    """Frames 0 ... `last_frame` of the videos `latents` (B, C, f, h, w): (B, last_frame + 1, 3, H, W) in [0, 1], the
    same numbers as `utils.sampling.decode_latents(vae, latents)[:, :last_frame + 1]`, with gradients to the latents.
    `checkpointed`: each latent frame's decode under activation checkpointing (module docstring)."""
    needed = latent_frames_needed(last_frame, vae.config.scale_factor_temporal)
    scale, shift = latent_scaling(vae)
    z = latents[:, :, :needed].to(vae.dtype).contiguous() / scale + shift
    x = vae.post_quant_conv(z)  # a 1x1x1 convolution: no cache, frames independent
    cache = (None,) * vae._cached_conv_counts["decoder"]
    chunks = []
    for i in range(needed):
        step = functools.partial(_decode_latent_frame, vae.decoder, first_chunk=i == 0)
        if checkpointed and torch.is_grad_enabled():
            out, cache = checkpoint(step, x[:, :, i:i + 1], cache, use_reentrant=False)
        else:
            out, cache = step(x[:, :, i:i + 1], cache)
        chunks.append(out)
    pixels = torch.cat(chunks, 2)[:, :, :last_frame + 1]  # (B, 3, F', H, W)
    if vae.config.patch_size is not None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        pixels = unpatchify(pixels, patch_size=vae.config.patch_size)
    pixels = pixels.clamp(-1, 1).transpose(1, 2)  # (B, F', 3, H, W), as decode_latents
    return (pixels.float() / 2 + 0.5).clamp(0, 1)
