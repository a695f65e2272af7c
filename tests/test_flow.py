"""Flow-matching models (SD3 / FLUX.1): loading tiny-sd3 / tiny-flux, prompt encoding, the Euler sampler against the
stock pipelines, LoRA in the diffusers format, and train_draftp.py on both families."""
import numpy as np
import pytest
import torch

from conftest import (assert_resumed, deterministic_metrics, frozen_tiny_parts, mark_rows_before_resume,
                      run_main_in_process)
from utils.flow import FlowConditioning, FlowSchedule, flow_family
from utils.models import (add_lora, build_pipeline, encode_prompts, freeze_frozen_parts, load_pipeline_parts,
                          resolve_model_path, save_lora)
from utils.rewards import load_reward
from utils.sampling import cfg_conditioning, decode_latents, sample_latents

FAMILIES = ["tiny-sd3", "tiny-flux"]
STEPS = 3          # Euler steps: the tiny transformers are random, a few steps exercise the whole schedule
RESOLUTION = 64    # pixels; 32x32 latents (the tiny VAE downsamples by 2), 256 image tokens
GUIDANCE = {"tiny-sd3": 7.0, "tiny-flux": 3.5}  # SD3: CFG scale; FLUX.1-dev: the guidance embedding's input


@pytest.fixture(scope="module", params=FAMILIES)
def parts(request):
    return frozen_tiny_parts(request.param)


def _x_T(parts, batch=1, seed=0):
    return torch.randn(batch, *parts.latent_shape(RESOLUTION), generator=torch.Generator().manual_seed(seed))


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
@pytest.mark.parametrize("name", FAMILIES)
def test_loading_flux_switches_cudnn_attention_off(name):
    """cuDNN's fused attention fails in the FLUX.1-dev transformer's backward on the H200 (BENCHMARKS.md, flow
    models): loading a FLUX pipeline leaves PyTorch's other attention kernels; SD3 keeps PyTorch's choice."""
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        load_pipeline_parts(name)
        assert torch.backends.cuda.cudnn_sdp_enabled() == (name != "tiny-flux")
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


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


def test_t5_feed_forward_outputs_stay_float32_in_fp16():
    parts = load_pipeline_parts("tiny-flux")
    freeze_frozen_parts(parts, "cpu", torch.float16)
    t5 = parts.text_encoders[-1]
    dtypes = {n: p.dtype for n, p in t5.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if ".wo." in n)
    assert all(d == torch.float16 for n, d in dtypes.items() if ".wo." not in n)


def test_per_row_sigmas_noise_and_predict_each_row_as_alone(parts):
    """Training on noised data (one sigma per row, `flow_noise`, `velocity` with a (B,) timestep) gives each row what
    it gets alone."""
    from dataclasses import replace

    from utils.flow import flow_noise

    x0, noise = _x_T(parts, 2, seed=1), _x_T(parts, 2, seed=2)
    sigma = torch.tensor([0.3, 0.8])
    x_t = flow_noise(x0, noise, sigma)
    torch.testing.assert_close(x_t[1], 0.2 * x0[1] + 0.8 * noise[1])
    cond = encode_prompts(parts, ["a red cat", "a blue dog"], "cpu")
    with torch.no_grad():
        both = cond.velocity(parts.unet, x_t, sigma * 1000, 3.5)
        second = replace(cond, embeds=cond.embeds[1:], pooled=cond.pooled[1:])
        alone = second.velocity(parts.unet, x_t[1:], sigma[1:] * 1000, 3.5)
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)


def test_last_step_gain_is_minus_the_last_sigma():
    """d(final latent)/d(v) of the last Euler step is -sigma_last; SD3's shift-3 schedule ends at sigma 0.0089 whatever
    the step count (launchers/draftp_sd35.sh scales NeMo's kl_coeff by it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    for steps in (10, 28):
        schedule = FlowSchedule(scheduler, "sd3", steps, (32, 32), "cpu")
        assert schedule.sigma_values[-2] == pytest.approx(0.0089, abs=5e-5)
        v = torch.zeros(1, 4, 2, 2, requires_grad=True)
        schedule.step(v, steps - 1, torch.ones(1, 4, 2, 2)).sum().backward()
        assert torch.allclose(v.grad, torch.full_like(v, -schedule.sigma_values[-2]))


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
# What diffusers' DreamBooth LoRA scripts adapt with --lora_layers unset, written out here from the scripts
# (examples/dreambooth/train_dreambooth_lora_sd3.py, train_dreambooth_lora_flux.py), not read from utils.flow.
ATTENTION = {"attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
             "attn.add_v_proj", "attn.to_add_out"}
DIFFUSERS_TARGETS = {"sd3": ATTENTION, "flux": ATTENTION | {"ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                                             "ff_context.net.2", "proj_mlp"}}


def _adapted(model):
    """The targets (an entry of ATTENTION / DIFFUSERS_TARGETS) of every layer that carries a LoRA."""
    every = ATTENTION | DIFFUSERS_TARGETS["flux"]
    layers = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    targets = {t for t in every for layer in layers if layer.endswith("." + t)}
    assert all(any(layer.endswith("." + t) for t in every) for layer in layers), layers  # nothing else adapted
    return targets


def _transformer(parts):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if parts.family == "sd3" else FluxTransformer2DModel
    return cls.from_pretrained(parts.path, subfolder="transformer")


@pytest.mark.parametrize("targets", ["diffusers", "attention", "attn.to_q,ff.net.2"])
def test_lora_targets_follow_diffusers_per_family(parts, targets):
    """--lora_targets diffusers (the default) adapts what diffusers' DreamBooth LoRA script of the family adapts: SD3
    the joint attention's projections of both streams; FLUX.1 also the double blocks' feed-forward layers of both
    streams and the single blocks' proj_mlp. attention: the attention projections only; a list: those modules.
    Mutation: DIFFUSERS_FLOW_LORA_TARGET_MODULES["flux"] = FLOW_LORA_TARGET_MODULES (attention only) fails it."""
    model = add_lora(_transformer(parts), rank=4, seed=0, targets=targets)
    expected = {"diffusers": DIFFUSERS_TARGETS[parts.family], "attention": ATTENTION,
                "attn.to_q,ff.net.2": {"attn.to_q", "ff.net.2"}}[targets]
    assert _adapted(model) == expected
    assert all(p.requires_grad == ("lora" in n) for n, p in model.named_parameters())
    if parts.family == "flux" and targets == "diffusers":  # every single block's proj_mlp, every double block's ff
        layers = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
        assert {f"single_transformer_blocks.{i}.proj_mlp" for i in range(len(model.single_transformer_blocks))} <= layers
        assert {f"transformer_blocks.{i}.ff_context.net.2" for i in range(len(model.transformer_blocks))} <= layers


def test_unknown_lora_target_is_refused_naming_the_flag(parts):
    from utils import UsageError

    with pytest.raises(UsageError, match=r"--lora_targets 'attn.to_q,ff.nope': 'ff.nope' matches no linear") as err:
        add_lora(_transformer(parts), rank=4, seed=0, targets="attn.to_q,ff.nope")
    assert "\n" not in str(err.value)


def test_unet_lora_targets_are_diffusers_text_to_image_lora_scripts():
    """SD1.5 / SDXL: diffusers' train_text_to_image_lora.py and train_text_to_image_lora_sdxl.py adapt the UNet's
    attention projections to_k, to_q, to_v, to_out.0, which both named sets give."""
    from diffusers import UNet2DConditionModel

    from utils.models import lora_target_modules

    for name in ("tiny-sd", "tiny-sdxl"):
        unet = UNet2DConditionModel.from_pretrained(resolve_model_path(name), subfolder="unet")
        for targets in ("diffusers", "attention"):
            assert lora_target_modules(unet, targets) == ["to_k", "to_q", "to_v", "to_out.0"]


@pytest.mark.parametrize("targets", ["diffusers", "attention"])
def test_saved_lora_loads_in_the_stock_pipeline_with_the_same_images(parts, tmp_path, targets):
    """The saved file loads into StableDiffusion3Pipeline / FluxPipeline (load_lora_weights), with every adapted layer
    (FLUX's feed-forward layers and proj_mlp under diffusers' targets) and its scale: the same images as ours."""
    from diffusers import DiffusionPipeline

    model = _transformer(parts)
    add_lora(model, rank=4, alpha=8, seed=0, targets=targets)  # alpha != rank: the scale must travel in the metadata
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
    assert _adapted(pipe.transformer) == _adapted(model)  # every adapted layer came back
    stock = _stock_images(pipe, parts, "a red cat", x_T, guidance)
    torch.testing.assert_close(stock, ours, atol=1e-5, rtol=0)
    assert (stock - base).abs().max() > 1e-3  # and the LoRA changed the image


# --------------------------------------------------------------------------- the differentiable sampler
class CallCounter(torch.nn.Module):
    """Wraps the transformer and counts its calls, with and without grad."""

    def __init__(self, model):
        super().__init__()
        self.model, self.with_grad, self.without_grad = model, 0, 0

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            self.with_grad += 1
        else:
            self.without_grad += 1
        return self.model(*args, **kwargs)


@pytest.fixture(scope="module")
def lora_parts(parts):
    """The module's parts with a fresh LoRA (rank 4) on a copy of the transformer; the base stays untouched."""
    import copy

    lora = copy.copy(parts)
    lora.unet = add_lora(copy.deepcopy(parts.unet), rank=4, seed=0)
    return lora


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("truncation_steps", [1, STEPS])  # DRaFT-1 and full DRaFT
def test_grad_flows_through_exactly_the_last_k_steps_into_lora_only(lora_parts, truncation_steps):
    parts, prompts = lora_parts, ["a red cat", "a blue dog"]
    guidance = GUIDANCE[parts.tiny_name]
    counter = CallCounter(parts.unet)
    result = sample_latents(counter, parts.scheduler, _cond(parts, prompts, guidance), _x_T(parts, 2), STEPS, guidance,
                            truncation_steps)
    assert (counter.with_grad, counter.without_grad) == (truncation_steps, STEPS - truncation_steps)
    parts.unet.zero_grad(set_to_none=True)
    load_reward("color_match")(decode_latents(parts.vae, result.latents), prompts).mean().backward()
    grads = {n: p.grad for n, p in parts.unet.named_parameters()}
    assert all(g is None for n, g in grads.items() if "lora" not in n), "a frozen transformer weight got a gradient"
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora" in n)
    assert all(p.grad is None for p in parts.vae.parameters())


def test_scored_latents_are_the_same_at_sigma_zero(lora_parts):
    """The last Euler step ends at sigma 0: x_prev = x_t + (0 - sigma) v and pred_x0 = x_t - sigma v are equal."""
    parts = lora_parts
    guidance = GUIDANCE[parts.tiny_name]
    cond = _cond(parts, ["a red cat"], guidance)
    with torch.no_grad():
        a, b = (sample_latents(parts.unet, parts.scheduler, cond, _x_T(parts), STEPS, guidance, scored_latent=s).latents
                for s in ("x_prev", "pred_x0"))
    assert torch.equal(a, b)


def test_draft_lv_renoises_to_the_last_sigma_and_grads_only_through_the_resamples(lora_parts):
    """DRaFT-LV (Clark et al., Algorithm 2): x_t = (1 - sigma) x_0 + sigma noise at the last step's sigma, one
    transformer call with grad per re-sample, and a chain x_0 that carries grad contributes none."""
    from utils.sampling import low_variance_samples

    parts, prompts = lora_parts, ["a red cat"]
    guidance = GUIDANCE[parts.tiny_name]
    model, cond = parts.unet, _cond(parts, prompts, guidance)
    noise = torch.randn(2, 1, *parts.latent_shape(RESOLUTION), generator=torch.Generator().manual_seed(1))
    counter = CallCounter(model)
    chain = sample_latents(counter, parts.scheduler, cond, _x_T(parts), STEPS, guidance, truncation_steps=0)
    lv = low_variance_samples(counter, parts.scheduler, cond, chain.latents, 2, guidance, noise, num_inference_steps=STEPS)
    assert (counter.with_grad, counter.without_grad) == (2, STEPS) and lv.latents.shape[0] == 2
    # the re-sample is one Euler step from the last sigma to 0 on the re-noised x_0
    schedule = FlowSchedule(parts.scheduler, parts.family, STEPS, chain.latents.shape[-2:], "cpu")
    sigma = schedule.sigma_values[-2]
    x_t = (1 - sigma) * chain.latents + sigma * noise[0]
    with torch.no_grad():
        expected = x_t - sigma * cond.velocity(model, x_t, schedule.timesteps[-1], guidance)
    torch.testing.assert_close(lv.latents[:1].detach(), expected, atol=1e-5, rtol=0)

    def lv_grads(x0):
        model.zero_grad(set_to_none=True)
        out = low_variance_samples(model, parts.scheduler, cond, x0, 2, guidance, noise, num_inference_steps=STEPS).latents
        load_reward("color_match")(decode_latents(parts.vae, out), prompts * 2).mean().backward()
        return _lora_grads(model)

    with_path = sample_latents(model, parts.scheduler, cond, _x_T(parts), STEPS, guidance, truncation_steps=1).latents
    detached, attached = lv_grads(chain.latents), lv_grads(with_path)
    assert detached and detached.keys() == attached.keys()
    assert all(torch.equal(detached[n], attached[n]) for n in detached)


def test_kl_on_the_guided_velocity_is_zero_for_the_base_model_and_positive_after_an_update(lora_parts):
    from utils.models import adapters_disabled

    parts = lora_parts
    guidance = GUIDANCE[parts.tiny_name]
    model, cond = parts.unet, _cond(parts, ["a red cat"], guidance)

    def reference(*a, **kw):
        with adapters_disabled(model):
            return model(*a, **kw)

    kl0 = sample_latents(model, parts.scheduler, cond, _x_T(parts), STEPS, guidance, 2, reference_unet=reference).kl
    assert kl0.item() == 0.0  # LoRA starts as the identity (B = 0)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved:
                p.add_(0.05 * torch.randn_like(p))
    kl1 = sample_latents(model, parts.scheduler, cond, _x_T(parts), STEPS, guidance, 2, reference_unet=reference).kl
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    assert kl1.item() > 0


def test_flux_true_cfg_equals_the_stock_pipeline():
    """FLUX with --true_cfg_scale: the guidance embedding and CFG against the empty prompt, as FluxPipeline's
    true_cfg_scale with negative_prompt ""."""
    parts = load_pipeline_parts("tiny-flux")
    x_T = _x_T(parts, seed=4)
    pipe = build_pipeline(parts)
    expected = pipe("a red cat", negative_prompt="", true_cfg_scale=4.0, num_inference_steps=STEPS, guidance_scale=3.5,
                    latents=type(pipe)._pack_latents(x_T, *x_T.shape), height=RESOLUTION, width=RESOLUTION,
                    output_type="pt").images
    cond = cfg_conditioning(encode_prompts(parts, ["a red cat"], "cpu"), encode_prompts(parts, [""], "cpu"), 3.5,
                            true_cfg_scale=4.0)
    assert cond.cfg_scale == 4.0 and cond.embeds.shape[0] == 2
    with torch.no_grad():
        ours = decode_latents(parts.vae, sample_latents(parts.unet, parts.scheduler, cond, x_T, STEPS, 3.5).latents)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- train_draftp.py on SD3 and FLUX
def draftp_flags(name, output_dir, steps, extra=()):
    return [str(f) for f in [
        "--pretrained_model_name_or_path", name, "--resolution", RESOLUTION, "--reward_model", "brightness",
        "--prompts", "colored_animals", "--num_inference_steps", STEPS, "--truncation_steps", 2,
        "--guidance_scale", GUIDANCE[name], "--train_batch_size", 2, "--learning_rate", 1e-2, "--lora_rank", 4,
        "--max_train_steps", steps, "--validation_prompts", "a red cat", "--num_validation_images", 1,
        "--validation_steps", 1000, "--report_to", "none", "--compile_sampler", "off", "--output_dir", output_dir, *extra]]


def run_draftp(flags):
    """train_draftp.main in this process (conftest.run_main_in_process: a subprocess would spend most of a tiny run
    importing). Returns the run's log."""
    import train_draftp

    return run_main_in_process(train_draftp, flags)


@pytest.fixture(scope="module", params=FAMILIES)
def lora_run(request, tmp_path_factory):
    """DRaFT+ LoRA, 3 steps: SD3 with AlignProp's random K, FLUX with K = 2 and gradient checkpointing."""
    name, out = request.param, tmp_path_factory.mktemp("flow") / request.param
    extra = ["--kl_coeff", 0.1] + (["--truncation_steps_random", "1,3"] if name == "tiny-sd3" else ["--gradient_checkpointing"])
    run_draftp(draftp_flags(name, out, steps=3, extra=extra))
    return name, out


def test_lora_run_writes_the_output_contract_and_kl_starts_at_zero(lora_run):
    from utils.train.metrics import read_metrics

    name, out = lora_run
    assert (out / "pytorch_lora_weights.safetensors").exists() and (out / "samples" / "validation-step-000003.png").exists()
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["kl"] == 0.0 and metrics[-1]["kl"] > 0  # the KL to the base: 0 before the first update
    if name == "tiny-sd3":
        assert all(1 <= m["truncation_steps"] <= 3 for m in metrics)


def test_saved_lora_reproduces_the_validation_images_in_the_stock_pipeline(lora_run):
    import json

    import numpy as np
    from diffusers import DiffusionPipeline

    from utils.grids import read_cells
    from utils.models import resolve_model_path

    name, out = lora_run
    grid = out / "samples" / "validation-step-000003.png"
    cells = read_cells(grid, json.loads(grid.with_suffix(".json").read_text())["grid"])  # rows: base, trained
    pipe = DiffusionPipeline.from_pretrained(resolve_model_path(name))
    pipe.load_lora_weights(str(out))
    image = pipe("a red cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE[name], height=RESOLUTION,
                 width=RESOLUTION, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    ours = cells[1, 0].astype(np.float32) / 255
    assert np.abs(image - ours).max() <= 2 / 255  # PNG rounding only
    assert np.abs(cells[0, 0].astype(np.float32) / 255 - ours).max() > 2 / 255  # and training changed it


def test_evaluate_scores_base_and_trained_flow_models(lora_run, tmp_path):
    """evaluate.py in this process (conftest.run_main_in_process; its command line is tested in test_evaluate.py)."""
    import csv

    import evaluate

    name, out = lora_run
    run_main_in_process(evaluate, [
        "--pretrained_model_name_or_path", name, "--models", f"trained={out}", "--resolution", RESOLUTION,
        "--prompts", "colored_animals", "--max_prompts", 2, "--num_seeds", 2, "--num_inference_steps", STEPS,
        "--guidance_scale", GUIDANCE[name], "--reward_models", "brightness", "--diversity", "pixel",
        "--output_dir", tmp_path / "eval"])
    rows = list(csv.DictReader(open(tmp_path / "eval" / "results.csv")))
    assert [r["model"] for r in rows] == ["base", "trained"]
    base, trained = (float(r["brightness_mean"]) for r in rows)
    assert base != trained  # the LoRA was applied


def test_full_transformer_draft_lv_saves_transformer(tmp_path):
    """Full fine-tuning (a frozen copy is the KL's reference) with DRaFT-LV: transformer/ loads with from_pretrained."""
    from diffusers import FluxTransformer2DModel

    from utils.train.metrics import read_metrics

    run_draftp(draftp_flags("tiny-flux", tmp_path, steps=2, extra=["--no-use_lora", "--learning_rate", 1e-3,
                                                                    "--truncation_steps", 1, "--draft_lv_samples", 2,
                                                                    "--kl_coeff", 0.1]))
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 2 and metrics[0]["kl"] == 0.0 and all(np.isfinite(m["loss"]) for m in metrics)
    trained = FluxTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    base = FluxTransformer2DModel.from_pretrained(resolve_model_path("tiny-flux"), subfolder="transformer")
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters()))


def test_resume_continues_metrics_exactly(tmp_path):
    """A run checkpointed at step 2, cut off after step 4 before its last checkpoint, resumed: it continues from
    checkpoint-2 (conftest.assert_resumed, which says the mutation this fails under) and metrics.jsonl goes on equal
    (==: the same float32 operations on the CPU) to what the uninterrupted run wrote."""
    import shutil

    from utils.train.metrics import read_metrics

    out = tmp_path / "run"
    flags = draftp_flags("tiny-sd3", out, steps=4, extra=["--checkpointing_steps", 2, "--kl_coeff", 0.1])
    run_draftp(flags)
    straight = deterministic_metrics(read_metrics(out))
    shutil.rmtree(out / "checkpoint-4")
    (out / "pytorch_lora_weights.safetensors").unlink()
    mark_rows_before_resume(out)
    log = run_draftp([*flags, "--resume_from_checkpoint", "latest"])
    resumed = deterministic_metrics(assert_resumed(out, log, 2))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert resumed == straight


@pytest.mark.parametrize("name, flags, named", [
    ("tiny-sd3", ["--eta", "0.5"], "--eta"),
    ("tiny-sd3", ["--true_cfg_scale", "2"], "--true_cfg_scale"),
])
def test_family_specific_flags_are_checked(name, flags, named, tmp_path):
    from utils import UsageError

    with pytest.raises(UsageError, match=named):
        run_draftp(draftp_flags(name, tmp_path, steps=1, extra=flags))
