"""Flow-matching models (SD3 / FLUX.1): loading tiny-sd3 / tiny-flux, prompt encoding, the Euler sampler against the
stock pipelines, LoRA in the diffusers format, and train_draftp.py on both families."""
import pytest
import torch

from utils.flow import FlowConditioning, FlowSchedule, flow_family
from utils.models import add_lora, build_pipeline, encode_prompts, freeze_frozen_parts, load_pipeline_parts, save_lora
from utils.sampling import cfg_conditioning, decode_latents, sample_latents

FAMILIES = ["tiny-sd3", "tiny-flux"]
STEPS = 3          # Euler steps: the tiny transformers are random, a few steps exercise the whole schedule
RESOLUTION = 64    # pixels; 32x32 latents (the tiny VAE downsamples by 2), 256 image tokens
GUIDANCE = {"tiny-sd3": 7.0, "tiny-flux": 3.5}  # SD3: CFG scale; FLUX.1-dev: the guidance embedding's input


@pytest.fixture(scope="module", params=FAMILIES)
def parts(request):
    parts = load_pipeline_parts(request.param)
    freeze_frozen_parts(parts, "cpu", torch.float32)
    parts.tiny_name = request.param
    return parts


def _cond(parts, prompts, guidance):
    return cfg_conditioning(encode_prompts(parts, prompts, "cpu"), encode_prompts(parts, [""], "cpu"), guidance)


def _stock_images(pipe, parts, prompt, x_T, guidance):
    """The stock pipeline's image from the same x_T (FluxPipeline takes its latents packed)."""
    latents = x_T
    if parts.family == "flux":
        latents = type(pipe)._pack_latents(x_T, *x_T.shape)
    return pipe(prompt, num_inference_steps=STEPS, guidance_scale=guidance, latents=latents, height=RESOLUTION,
                width=RESOLUTION, output_type="pt").images


# --------------------------------------------------------------------------- loading and encoding
def test_family_is_read_from_model_index():
    assert flow_family({"_class_name": "StableDiffusion3Pipeline"}) == "sd3"
    assert flow_family({"_class_name": "FluxPipeline"}) == "flux"
    assert flow_family({"_class_name": "StableDiffusionXLPipeline"}) is None


def test_tiny_flow_pipelines_load_through_from_pretrained(parts):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import T5EncoderModel

    sd3 = parts.tiny_name == "tiny-sd3"
    assert parts.family == ("sd3" if sd3 else "flux") and not parts.is_sdxl
    assert isinstance(parts.unet, SD3Transformer2DModel if sd3 else FluxTransformer2DModel)
    assert isinstance(parts.scheduler, FlowMatchEulerDiscreteScheduler)
    assert len(parts.text_encoders) == len(parts.tokenizers) == (3 if sd3 else 2)
    assert isinstance(parts.text_encoders[-1], T5EncoderModel)
    assert parts.vae.config.shift_factor == pytest.approx(0.1)
    assert parts.latent_shape(RESOLUTION) == (4, 32, 32)


def test_encoding_shapes(parts):
    cond = encode_prompts(parts, ["a red cat", "a blue dog"], "cpu")
    assert isinstance(cond, FlowConditioning)
    if parts.family == "sd3":
        # 77 CLIP tokens (CLIP-L | CLIP-G hidden states side by side, padded to T5's 64) + 256 T5 tokens;
        # pooled: CLIP-L | CLIP-G projections, 32 + 32
        assert cond.embeds.shape == (2, 77 + 256, 64) and cond.pooled.shape == (2, 64) and cond.text_ids is None
        assert torch.equal(cond.embeds[:, :77, 64:], torch.zeros(2, 77, 0))
    else:
        # 512 T5 tokens, CLIP-L's pooled output, text ids (512, 3) of zeros, the guidance embedding on (FLUX.1-dev)
        assert cond.embeds.shape == (2, 512, 64) and cond.pooled.shape == (2, 32)
        assert cond.text_ids.shape == (512, 3) and cond.text_ids.abs().sum() == 0 and cond.guidance_embeds
    assert not torch.allclose(cond.embeds[0], cond.embeds[1])


def test_schedule_shift(parts):
    """FLUX: 256 image tokens (32x32 latents packed 2x2) is base_image_seq_len, so mu = base_shift = 0.5 and
    sigma' = e^mu / (e^mu + 1/sigma - 1); SD3: the fixed shift 3: sigma' = 3 sigma / (1 + 2 sigma)."""
    import math

    schedule = FlowSchedule(parts.scheduler, parts.family, 4, (32, 32), "cpu")
    if parts.family == "flux":
        raw = [1.0, 0.75, 0.5, 0.25]  # linspace(1, 1/N, N)
        expected = [math.exp(0.5) / (math.exp(0.5) + 1 / s - 1) for s in raw]
    else:
        # linspace(sigma_max, sigma_min, N) where the scheduler's sigma_min is its training sigmas' smallest, 1/1000,
        # already shifted once: 3 * 0.001 / 1.002
        low = 3 * 0.001 / 1.002
        raw = [1.0 - k * (1.0 - low) / 3 for k in range(4)]
        expected = [3 * s / (1 + 2 * s) for s in raw]
    assert schedule.sigma_values == pytest.approx(expected + [0.0], abs=1e-6)


# --------------------------------------------------------------------------- the sampler
def test_sampler_equals_the_stock_pipeline(parts):
    guidance = GUIDANCE[parts.tiny_name]
    x_T = torch.randn(1, *parts.latent_shape(RESOLUTION), generator=torch.Generator().manual_seed(3))
    expected = _stock_images(build_pipeline(parts), parts, "a red cat", x_T, guidance)
    with torch.no_grad():
        latents = sample_latents(parts.unet, parts.scheduler, _cond(parts, ["a red cat"], guidance), x_T, STEPS,
                                 guidance).latents
        ours = decode_latents(parts.vae, latents)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- LoRA
def test_lora_targets_the_joint_attention_projections(parts, tmp_path):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if parts.family == "sd3" else FluxTransformer2DModel
    model = cls.from_pretrained(parts.path, subfolder="transformer")
    add_lora(model, rank=4, seed=0)
    wrapped = {n.rsplit(".", 2)[0] for n, p in model.named_parameters() if "lora_A" in n}
    names = {n.split(".attn.")[-1] for n in wrapped}
    assert {"to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} <= {
        n.split(".")[0] for n in names}
    assert all(p.requires_grad == ("lora" in n) for n, p in model.named_parameters())


def test_saved_lora_loads_in_the_stock_pipeline_with_the_same_images(parts, tmp_path):
    from diffusers import DiffusionPipeline, FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if parts.family == "sd3" else FluxTransformer2DModel
    model = cls.from_pretrained(parts.path, subfolder="transformer")
    add_lora(model, rank=4, alpha=8, seed=0)  # alpha != rank: the scale must travel in the file's metadata
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
    save_lora(model, str(tmp_path), is_sdxl=False)
    guidance = GUIDANCE[parts.tiny_name]
    x_T = torch.randn(1, *parts.latent_shape(RESOLUTION), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = decode_latents(parts.vae, sample_latents(model, parts.scheduler, _cond(parts, ["a red cat"], guidance),
                                                        x_T, STEPS, guidance).latents)
    pipe = DiffusionPipeline.from_pretrained(parts.path)
    base = _stock_images(pipe, parts, "a red cat", x_T, guidance)
    pipe.load_lora_weights(str(tmp_path))
    stock = _stock_images(pipe, parts, "a red cat", x_T, guidance)
    torch.testing.assert_close(stock, ours, atol=1e-5, rtol=0)
    assert (stock - base).abs().max() > 1e-3  # and the LoRA changed the image
