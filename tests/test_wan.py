"""Wan 2.1 text-to-video in the shared model layer: tiny-wan through the real from_pretrained path, UMT5 prompt encoding
and the Euler sampler against diffusers' WanPipeline, LoRA in the format WanPipeline.load_lora_weights reads, and the
flow-matching code paths on 5-D (B, C, f, h, w) latents.

The sampler is compared with the stock WanPipeline itself, run with the scheduler load_pipeline_parts gives Wan (a
FlowMatchEulerDiscreteScheduler with the shipped UniPC config's flow_shift): the same transformer calls, CFG, Euler
steps and VAE decode as the pipeline's own loop."""
import copy
import json
import os

import pytest
import torch

from conftest import frozen_tiny_parts
from utils import UsageError
from utils.flow import FlowSchedule, flow_noise
from utils.models import (add_lora, build_pipeline, encode_prompts, has_lora, load_lora_into_unet, lora_pipeline_class,
                          named_pipelines, read_family, save_lora, weights_subfolder)
from utils.sampling import cfg_conditioning, decode_latents, sample_latents, sample_trajectory
from utils.toy.tiny import TINY_WAN_FRAMES, TINY_WAN_RESOLUTION

STEPS = 3
GUIDANCE = 5.0  # WanPipeline's default CFG scale
PROMPTS = ["a red cat", "two  blue &amp; dogs "]  # the second needs WanPipeline's cleaning (spaces, HTML entity)
# What finetrainers adapts for Wan 2.1 T2V ("blocks.*(to_q|to_k|to_v|to_out.0)"), written out here
WAN_TARGETS = {f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")}


@pytest.fixture(scope="module")
def parts():
    return frozen_tiny_parts("tiny-wan")


def _x_T(parts, batch=1, seed=0):
    shape = parts.latent_shape(TINY_WAN_RESOLUTION, TINY_WAN_FRAMES)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _cond(parts, prompts):
    return cfg_conditioning(encode_prompts(parts, prompts, "cpu"), encode_prompts(parts, [""], "cpu"), GUIDANCE)


def _stock(pipe, prompt, x_T, output_type="pt"):
    """WanPipeline's output from x_T, and the latents its last step returned (before the decode)."""
    last = {}

    def keep_latents(pipe, i, t, kwargs):
        last["latents"] = kwargs["latents"]
        return {}

    frames = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=x_T, height=TINY_WAN_RESOLUTION,
                  width=TINY_WAN_RESOLUTION, num_frames=TINY_WAN_FRAMES, output_type=output_type,
                  callback_on_step_end=keep_latents).frames
    return frames, last["latents"]


def _transformer(parts):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(parts.path, subfolder="transformer")


def _adapted(model):
    layers = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    return {".".join(layer.split(".")[-3:]) if layer.endswith("to_out.0") else ".".join(layer.split(".")[-2:])
            for layer in layers}


# --------------------------------------------------------------------------- loading and encoding
def test_tiny_wan_loads_through_from_pretrained(parts):
    """The family comes from model_index.json; the parts are WanPipeline's; the shipped UniPC scheduler becomes the
    Euler scheduler of its flow_shift. Mutation: load_flow_parts without euler_scheduler (UniPC stays)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    assert "tiny-wan" in named_pipelines()
    assert read_family("tiny-wan") == ("wan", False)
    with open(os.path.join(parts.path, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "WanPipeline"
    with open(os.path.join(parts.path, "scheduler", "scheduler_config.json")) as f:
        shipped = json.load(f)
    assert shipped["_class_name"] == "UniPCMultistepScheduler" and shipped["prediction_type"] == "flow_prediction"
    assert parts.family == "wan" and parts.is_flow and parts.is_video and parts.name == "Wan 2.1"
    assert isinstance(parts.unet, WanTransformer3DModel) and isinstance(parts.vae, AutoencoderKLWan)
    assert len(parts.text_encoders) == len(parts.tokenizers) == 1
    assert isinstance(parts.text_encoders[0], UMT5EncoderModel)
    assert isinstance(parts.scheduler, FlowMatchEulerDiscreteScheduler)
    assert parts.scheduler.config.shift == shipped["flow_shift"] == 3.0
    assert parts.scheduler.config.num_train_timesteps == shipped["num_train_timesteps"]
    # 5 frames -> the first + 4 in one = 2 latent frames; 32 px / 8 = 4; WanPipeline's defaults: 81 frames, 480 px
    assert parts.latent_shape(TINY_WAN_RESOLUTION, TINY_WAN_FRAMES) == (16, 2, 4, 4)
    assert parts.latent_shape(TINY_WAN_RESOLUTION) == (16, 21, 4, 4) and parts.default_resolution == 480
    with pytest.raises(UsageError, match="6 frames: Wan 2.1's VAE takes 1 \\+ 4 k frames"):
        parts.latent_shape(TINY_WAN_RESOLUTION, 6)


def test_defaults_are_wan_pipelines():
    import inspect

    from diffusers import WanPipeline

    from utils.flow import MAX_SEQUENCE_LENGTH
    from utils.sampling import SAMPLING_DEFAULTS

    params = inspect.signature(WanPipeline.__call__).parameters
    assert SAMPLING_DEFAULTS["wan"] == {k: params[k].default for k in ("num_inference_steps", "guidance_scale")}
    assert MAX_SEQUENCE_LENGTH["wan"] == params["max_sequence_length"].default == 512


def test_prompt_embeddings_equal_wan_pipelines(parts):
    """Cleaned, 512 tokens, UMT5 under the padding mask, zeros past each prompt's end: WanPipeline.encode_prompt's
    numbers exactly. Mutation: the torch.where dropped (UMT5's outputs at the padding kept)."""
    cond = encode_prompts(parts, PROMPTS, "cpu")
    expected, _ = build_pipeline(parts).encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                                      max_sequence_length=512, device="cpu")
    assert cond.family == "wan" and cond.pooled is None and cond.embeds.shape == (2, 512, 64)
    torch.testing.assert_close(cond.embeds, expected, rtol=0, atol=0)
    length = len(parts.tokenizers[0]("a red cat").input_ids)  # the characters and </s>
    assert cond.embeds[0, :length].abs().sum(-1).gt(0).all() and not cond.embeds[0, length:].any()


# --------------------------------------------------------------------------- the sampler
def test_schedule_is_the_euler_schedule_shifted_by_flow_shift(parts):
    """sigma' = 3 sigma / (1 + 2 sigma) over the Euler scheduler's linspace, as SD3's (tests/test_flow.py)."""
    schedule = FlowSchedule(parts.scheduler, "wan", 4, (4, 4), "cpu")
    low = 3 * 0.001 / 1.002
    raw = [1.0 - k * (1.0 - low) / 3 for k in range(4)]
    assert schedule.sigma_values == pytest.approx([3 * s / (1 + 2 * s) for s in raw] + [0.0], abs=1e-6)


def test_sampler_and_decode_equal_wan_pipeline(parts):
    """Our Euler chain with CFG on 5-D latents, and decode_latents (latents_mean / latents_std, frames (B, F, 3, H, W)
    in [0, 1]), against WanPipeline from the same x_T. Mutation: decode_latents without the per-channel mean."""
    x_T = _x_T(parts, seed=3)
    frames, stock_latents = _stock(build_pipeline(parts), PROMPTS[0], x_T)
    with torch.no_grad():
        latents = sample_latents(parts.unet, parts.scheduler, _cond(parts, PROMPTS[:1]), x_T, STEPS, GUIDANCE).latents
        ours = decode_latents(parts.vae, latents)
    assert latents.shape == x_T.shape == (1, 16, 2, 4, 4)
    torch.testing.assert_close(latents, stock_latents, atol=1e-5, rtol=0)
    assert ours.shape == frames.shape == (1, TINY_WAN_FRAMES, 3, TINY_WAN_RESOLUTION, TINY_WAN_RESOLUTION)
    torch.testing.assert_close(ours, frames, atol=1e-5, rtol=0)


def test_grad_reaches_lora_through_the_last_step_and_the_video_decoder(parts):
    """DRaFT-1 on video latents: one step with grad, the KL to the adapters-off model, the reward's gradient through
    Wan's VAE into the LoRA weights only."""
    from utils.models import reference_model

    model = add_lora(copy.deepcopy(parts.unet), rank=4, seed=0)
    result = sample_latents(model, parts.scheduler, _cond(parts, PROMPTS), _x_T(parts, 2), STEPS, GUIDANCE,
                            truncation_steps=1, reference_unet=reference_model(model))
    assert result.kl.shape == (2,) and result.kl.abs().max() == 0  # LoRA B starts at zero: the base model
    decode_latents(parts.vae, result.latents).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if "lora" not in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_sde_trajectory_on_video_latents(parts):
    """Flow-GRPO's SDE step and its per-sample log-prob on (B, C, f, h, w) latents; the ODE steps log-prob 0."""
    generator = torch.Generator().manual_seed(0)
    trajectory = sample_trajectory(parts.unet, parts.scheduler, _cond(parts, PROMPTS), _x_T(parts, 2), STEPS,
                                   GUIDANCE, stochastic_steps={1}, level=0.7, generator=generator)
    assert trajectory.latents.shape == (2, STEPS + 1, 16, 2, 4, 4) and trajectory.log_probs.shape == (2, STEPS)
    assert (trajectory.log_probs[:, [0, 2]] == 0).all() and trajectory.log_probs[:, 1].isfinite().all()
    assert (trajectory.log_probs[:, 1] != 0).all()


# --------------------------------------------------------------------------- noising on video latents
def test_flow_noising_and_target_on_video_latents():
    """x_t = (1 - sigma) x0 + sigma noise per row of (B, C, f, h, w) latents, the target noise - x0; DPO's pairs share
    the row's noise and sigma; per-sample errors average over C, f, h, w."""
    from utils.denoising import flow_noise_pairs, per_sample_error

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 16, 2, 4, 4, generator=g)
    x_t = flow_noise(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], noise[1])
    x_t = flow_noise(x0, noise, torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(x_t[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(x_t[1], 0.5 * (x0[1] + noise[1]))
    winners_losers = torch.cat([x0, x0.flip(0)])  # (2B, C, f, h, w): the loser of row i is the other row's x0
    noisy, target, t = flow_noise_pairs(winners_losers, noise, torch.tensor([250.0, 500.0]))
    assert noisy.shape == target.shape == (4, 16, 2, 4, 4) and t.tolist() == [250.0, 500.0, 250.0, 500.0]
    torch.testing.assert_close(noisy[2], 0.75 * x0[1] + 0.25 * noise[0])
    torch.testing.assert_close(target, torch.cat([noise, noise]) - winners_losers)
    error = per_sample_error(target, torch.zeros_like(target))
    assert error.shape == (4,)
    torch.testing.assert_close(error[0], (noise[0] - x0[0]).pow(2).mean())


# --------------------------------------------------------------------------- LoRA and full fine-tuning
@pytest.mark.parametrize("targets", ["diffusers", "attention"])
def test_lora_targets_are_the_attention_projections(parts, targets):
    model = add_lora(_transformer(parts), rank=4, seed=0, targets=targets)
    assert _adapted(model) == WAN_TARGETS
    assert all(p.requires_grad == ("lora" in n) for n, p in model.named_parameters())


def test_saved_lora_loads_in_wan_pipeline_and_resumes(parts, tmp_path):
    """save_lora's file loads into WanPipeline.from_pretrained(...).load_lora_weights with its alpha / rank scale and
    changes the pipeline's output exactly as our adapter changes ours; load_lora_into_unet puts the same weights back
    (resume). A full fine-tune saves the transformer into transformer/, as SD3's and FLUX's."""
    from diffusers import WanPipeline

    model = add_lora(_transformer(parts), rank=4, alpha=8, seed=0)  # alpha != rank: the scale travels in the metadata
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
    save_lora(model, str(tmp_path), is_sdxl=False)
    x_T = _x_T(parts, seed=5)
    with torch.no_grad():
        ours = sample_latents(model, parts.scheduler, _cond(parts, PROMPTS[:1]), x_T, STEPS, GUIDANCE).latents

    pipe = WanPipeline.from_pretrained(parts.path)
    pipe.scheduler = parts.scheduler
    base, _ = _stock(pipe, PROMPTS[0], x_T, output_type="latent")
    pipe.load_lora_weights(str(tmp_path))
    assert _adapted(pipe.transformer) == WAN_TARGETS
    stock, _ = _stock(pipe, PROMPTS[0], x_T, output_type="latent")
    torch.testing.assert_close(stock, ours, atol=1e-5, rtol=0)
    assert (stock - base).abs().max() > 1e-3  # and the LoRA changed the video

    resumed = add_lora(_transformer(parts), rank=4, alpha=8, seed=1)
    load_lora_into_unet(resumed, str(tmp_path))
    saved = {n: p for n, p in model.named_parameters() if "lora" in n}
    assert all(torch.equal(p, saved[n]) for n, p in resumed.named_parameters() if "lora" in n)
    assert has_lora(resumed) and lora_pipeline_class(resumed, False) is WanPipeline
    assert weights_subfolder(parts.unet) == "transformer"
