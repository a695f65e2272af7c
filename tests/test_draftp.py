"""train_draftp.py: the DRaFT+ loss, the differentiable sampler, and end-to-end runs on the tiny pipeline."""
import contextlib
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_draftp
from conftest import assert_resumed, deterministic_metrics, mark_rows_before_resume, run_main_in_process
from utils import UsageError
from utils.grids import read_cells
from utils.models import adapters_disabled, add_lora, encode_prompts, freeze_frozen_parts, load_pipeline_parts
from utils.rewards import load_reward
from utils.sampling import cfg_conditioning, decode_latents, low_variance_samples, sample_latents
from utils.seeding import step_generator
from utils.train.metrics import read_metrics

STEPS = 5  # DDIM steps of the end-to-end runs: small, so a training step takes about a second on a CPU
VALIDATION_PROMPTS = ["a red cat", "a blue dog"]


# --------------------------------------------------------------------------- the loss
def test_draftp_loss_at_known_points():
    reward, kl = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.5])
    loss, metrics = train_draftp.draftp_loss(reward, kl, reward_scale=2.0, kl_coeff=0.1)
    assert loss.item() == pytest.approx(-2.0 * 1.5 + 0.1 * 1.0)
    assert metrics["reward"].item() == pytest.approx(1.5) and metrics["kl"].item() == pytest.approx(1.0)
    loss, _ = train_draftp.draftp_loss(reward, kl, reward_scale=1.0, kl_coeff=0.0)  # plain DRaFT
    assert loss.item() == pytest.approx(-1.5)


# --------------------------------------------------------------------------- the sampler
class CallCounter(torch.nn.Module):
    """Wraps the UNet and counts its calls, with and without grad."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.with_grad, self.without_grad = unet, 0, 0

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            self.with_grad += 1
        else:
            self.without_grad += 1
        return self.unet(*args, **kwargs)


@pytest.fixture(scope="module")
def lora_parts(tiny_sd_path):
    parts = load_pipeline_parts(tiny_sd_path)
    freeze_frozen_parts(parts, "cpu", torch.float32)  # as train_draftp.py does
    add_lora(parts.unet, rank=4, seed=0)
    return parts


def _cond(parts, prompts):
    return cfg_conditioning(encode_prompts(parts, prompts, "cpu"), encode_prompts(parts, [""], "cpu"))


@pytest.mark.parametrize("truncation_steps", [1, 3])
def test_grad_flows_through_exactly_the_last_k_steps_into_lora_only(lora_parts, truncation_steps):
    parts, prompts = lora_parts, ["a red cat", "a blue dog"]
    counter = CallCounter(parts.unet)
    x_T = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    result = sample_latents(counter, parts.scheduler, _cond(parts, prompts), x_T, STEPS, 7.5, truncation_steps)
    assert (counter.with_grad, counter.without_grad) == (truncation_steps, STEPS - truncation_steps)
    assert result.grad_steps == truncation_steps
    parts.unet.zero_grad(set_to_none=True)
    load_reward("color_match")(decode_latents(parts.vae, result.latents), prompts).mean().backward()
    grads = {n: p.grad for n, p in parts.unet.named_parameters()}
    assert all(g is None for n, g in grads.items() if "lora" not in n), "a frozen UNet weight got a gradient"
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora" in n)
    assert all(p.grad is None for p in parts.vae.parameters())


def _directional_gradient(unet, frozen, scheduler, cond, x_T, probe, param, direction, truncation_steps):
    """d/dh of the read-out (latents * probe).sum() of the chain whose last `truncation_steps` steps run `unet` with
    `param` moved by h * direction and whose steps before run `frozen` (the unmoved weights): by autograd through
    sample_latents, and by a central finite difference of the same chain."""
    unet.zero_grad(set_to_none=True)
    out = sample_latents(unet, scheduler, cond, x_T, STEPS, 7.5, truncation_steps, nograd_unet=frozen)
    (grad,) = torch.autograd.grad((out.latents * probe).sum(), [param])
    h, readouts = 1e-5, []
    with torch.no_grad():
        for sign in (1, -1):
            param.add_(sign * h * direction)
            chain = sample_latents(unet, scheduler, cond, x_T, STEPS, 7.5, truncation_steps, nograd_unet=frozen)
            readouts.append((chain.latents * probe).sum().item())
            param.sub_(sign * h * direction)
    return (grad * direction).sum().item(), (readouts[0] - readouts[1]) / (2 * h)


def test_gradient_through_the_last_k_steps_equals_a_finite_difference(tiny_sd_path):
    """The value of the DRaFT-K gradient (K = 3 of 5 steps), on the tiny UNet in float64: the derivative of a fixed
    linear read-out of the final latent w.r.t. a UNet weight, moved only in the K steps with grad (the steps before
    run a frozen copy, sample_latents' nograd_unet), equals the central finite difference of that chain. This holds
    only if the latent carries its gradient from each grad step into the next: detaching it between the K steps
    leaves the last step's term alone, which is the K = 1 gradient, and that differs from the K > 1 one by far more
    than the tolerance (asserted below). Mutation this fails under: in utils/sampling.py sample_latents, `latents = schedule.step(...)`
    followed by `latents = latents.detach()` when `with_grad` and not the last step (or the UNet fed
    `latents.detach()`)."""
    import copy

    from diffusers import DDIMScheduler, UNet2DConditionModel

    from utils.models import TextConditioning

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").double()
    scheduler = DDIMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler")
    frozen = copy.deepcopy(unet).requires_grad_(False)
    # [uncond; text] token embeddings of one prompt: the text encoder plays no part in the gradient's path
    cond = TextConditioning(torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    param = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_v.weight
    direction = torch.randn(param.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours, finite = _directional_gradient(unet, frozen, scheduler, cond, x_T, probe, param, direction, 3)
    # float64, h = 1e-5: the central difference's error is O(h^2) plus rounding of ~1e-16 / h, both far below 1e-6
    assert ours == pytest.approx(finite, rel=1e-6)
    last_step_only, _ = _directional_gradient(unet, frozen, scheduler, cond, x_T, probe, param, direction, 1)
    assert abs(last_step_only - finite) > 1e-3 * abs(finite)  # what a detached latent would give: far outside


def _lora_grads(unet):
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_draft_lv_grads_flow_only_through_the_n_resample_steps(lora_parts):
    """DRaFT-LV (Clark et al., Algorithm 2): the chain runs without grad (truncation_steps 0), each of the n
    re-samples is one UNet call with grad, and a chain x_0 that carries grad contributes none."""
    parts, prompts = lora_parts, ["a red cat"]
    unet = parts.unet
    counter = CallCounter(unet)
    cond = _cond(parts, prompts)
    x_T = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    chain = sample_latents(counter, parts.scheduler, cond, x_T, STEPS, 7.5, truncation_steps=0)
    assert (counter.with_grad, counter.without_grad) == (0, STEPS) and not chain.latents.requires_grad
    lv = low_variance_samples(counter, parts.scheduler, cond, chain.latents, 3, 7.5, noise)
    assert counter.with_grad == 3 and lv.latents.shape == (3, 4, 32, 32) and lv.grad_steps == 3
    assert not torch.allclose(lv.latents[0], lv.latents[1])  # different re-noising draws, different samples

    def lv_grads(x0):
        unet.zero_grad(set_to_none=True)
        out = low_variance_samples(unet, parts.scheduler, cond, x0, 3, 7.5, noise).latents
        load_reward("color_match")(decode_latents(parts.vae, out), prompts * 3).mean().backward()
        return _lora_grads(unet)

    # the same chain x_0, once with a grad path through its last step: the LV gradient must not change
    with_path = sample_latents(unet, parts.scheduler, cond, x_T, STEPS, 7.5, truncation_steps=1).latents
    assert with_path.requires_grad and torch.equal(with_path.detach(), chain.latents)
    detached, attached = lv_grads(chain.latents), lv_grads(with_path)
    assert detached and detached.keys() == attached.keys()
    assert all(torch.equal(detached[n], attached[n]) for n in detached)
    assert any(g.abs().sum() > 0 for g in detached.values())


def _expected_gain(scheduler, num_inference_steps, scored_latent):
    """d(final latent)/d(eps) of the last DDIM step at eta 0, from the schedule: pred_x0 = (x_t - sqrt(1-a_t) eps) /
    sqrt(a_t), x_prev = sqrt(a_prev) pred_x0 + sqrt(1-a_prev) eps, with a_prev the final alpha
    (alphas_cumprod[0], or 1 with set_alpha_to_one) because the last step's t - 1000/steps is below 0."""
    scheduler.set_timesteps(num_inference_steps)
    t = int(scheduler.timesteps[-1])
    prev = t - scheduler.config.num_train_timesteps // num_inference_steps
    a_t = scheduler.alphas_cumprod[t].double()
    a_prev = scheduler.alphas_cumprod[prev].double() if prev >= 0 else torch.as_tensor(scheduler.final_alpha_cumprod).double()
    gain = -(1 - a_t).sqrt() / a_t.sqrt()
    return float(gain if scored_latent == "pred_x0" else (1 - a_prev).sqrt() + a_prev.sqrt() * gain)


def test_pred_x0_gradient_is_stronger_by_the_schedules_ratio(lora_parts):
    """K = 1: both scored latents are linear in the last step's eps, with the gains of `_expected_gain`, and the
    steps before are the same no-grad chain. So for any fixed linear read-out v of the latent (here a random one,
    standing in for the reward's gradient at the image), the LoRA gradients of the two differ exactly by the ratio
    of the gains, up to float32 rounding. The backward pass sums thousands of products per weight, so an element near
    0 can lose its relative precision: the bound is 1e-5 of the largest gradient (float32 keeps 6e-8 per rounding).
    On SD's schedule at 50 steps the ratio is 3.40."""
    parts, prompts = lora_parts, ["a red cat", "a blue dog"]
    unet = parts.unet
    with torch.no_grad():  # LoRA B = 0 at the start would give lora_A no gradient
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    x_T = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    probe = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    grads, latents = {}, {}
    try:
        for scored in ("pred_x0", "x_prev"):
            unet.zero_grad(set_to_none=True)
            out = sample_latents(unet, parts.scheduler, _cond(parts, prompts), x_T, STEPS, 7.5, 1, scored_latent=scored)
            (out.latents * probe).sum().backward()
            grads[scored], latents[scored] = _lora_grads(unet), out.latents.detach()
    finally:
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if "lora_B" in n:
                    p.zero_()
        unet.zero_grad(set_to_none=True)
    ratio = _expected_gain(parts.scheduler, STEPS, "pred_x0") / _expected_gain(parts.scheduler, STEPS, "x_prev")
    assert ratio > 1
    assert grads["pred_x0"].keys() == grads["x_prev"].keys()
    strong = torch.cat([g.flatten() for g in grads["pred_x0"].values()])
    weak = torch.cat([grads["x_prev"][n].flatten() for n in grads["pred_x0"]])
    assert strong.abs().max() > 0
    torch.testing.assert_close(strong, ratio * weak, rtol=0, atol=1e-5 * strong.abs().max().item())
    assert (strong.norm() / weak.norm()).item() == pytest.approx(ratio, rel=1e-5)
    # nearly the same image: x_prev = sqrt(a_0) pred_x0 + sqrt(1 - a_0) eps differs by about 0.03 eps
    assert (latents["pred_x0"] - latents["x_prev"]).abs().mean() < 0.1 * latents["x_prev"].abs().mean()
    # the SD1.5 schedule (the tiny pipelines share it) at 50 steps: -0.0413 / -0.0121
    assert _expected_gain(parts.scheduler, 50, "pred_x0") == pytest.approx(-0.04131, abs=1e-5)
    assert _expected_gain(parts.scheduler, 50, "x_prev") == pytest.approx(-0.01214, abs=1e-5)


class _NudgeLastEps(torch.nn.Module):
    """Wraps a UNet: in the calls with grad (K = 1: the last step) adds `delta` to the eps of both CFG halves, which
    moves the guided eps, eps_u + s (eps_t - eps_u), by exactly `delta`: d(final latent)/d(delta) is the last step's
    d(latent)/d(eps)."""

    def __init__(self, unet, delta):
        super().__init__()
        self.unet, self.delta = unet, delta

    def forward(self, latents, *args, **kwargs):
        out = self.unet(latents, *args, **kwargs).sample
        if torch.is_grad_enabled():
            out = out + torch.cat([self.delta] * (out.shape[0] // self.delta.shape[0]))
        return SimpleNamespace(sample=out)


@pytest.mark.parametrize("spacing, last_t, gain", [(None, 1, -0.04131), ("trailing", 24, -0.15152)])
def test_sdxl_trailing_spacing_ends_at_nemos_last_timestep_with_its_gradient(tiny_sdxl_path, spacing, last_t, gain):
    """launchers/draftp_sdxl.sh (--num_inference_steps 40 --timestep_spacing trailing): DDIM takes NeMo-Aligner's SDXL
    timesteps 999 ... 24 (its LegacyDDPMDiscretization: np.linspace(999, 0, 40, endpoint=False).astype(int)), and the
    scored pred_x0 of the last step has d(latent)/d(eps) = -sqrt((1 - a_24) / a_24) = -0.1515 (NeMo's EDM sigma at
    t = 24), 3.67x the -0.0413 of t = 1 that SDXL's own 'leading' spacing ends at. Measured through the sampler on the
    tiny SDXL pipeline (SDXL's schedule). Mutation: in utils/models.py load_pipeline_parts, the
    `DDIMScheduler.from_config(..., timestep_spacing=timestep_spacing)` line removed (trailing then ends at t = 1)."""
    parts = load_pipeline_parts(tiny_sdxl_path, timestep_spacing=spacing)
    freeze_frozen_parts(parts, "cpu", torch.float32)
    assert parts.scheduler.config.timestep_spacing == (spacing or "leading")  # SDXL's own config: leading
    parts.scheduler.set_timesteps(40)
    timesteps = parts.scheduler.timesteps.tolist()
    assert timesteps[-1] == last_t
    if spacing == "trailing":
        assert timesteps == np.linspace(999, 0, 40, endpoint=False).astype(int).tolist()  # NeMo's, step for step
    shape = parts.latent_shape(parts.default_resolution)
    x_T = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    probe = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    delta = torch.zeros(1, *shape, requires_grad=True)
    out = sample_latents(_NudgeLastEps(parts.unet, delta), parts.scheduler, _cond(parts, ["a red cat"]), x_T, 40, 5.0,
                         truncation_steps=1, scored_latent="pred_x0")
    (out.latents * probe).sum().backward()
    torch.testing.assert_close(delta.grad, gain * probe, rtol=1e-3, atol=1e-6)
    assert _expected_gain(parts.scheduler, 40, "pred_x0") == pytest.approx(gain, abs=1e-5)
    if spacing == "trailing":  # the "about 3.7x": NeMo's kl_coeff against this toolkit's t = 1
        assert gain / -0.04131 == pytest.approx(3.668, abs=1e-3)


def test_the_script_samples_with_the_given_timestep_spacing(tmp_path, monkeypatch, tiny_sd_path):
    """train_draftp.py --timestep_spacing trailing: every chain of the run (training) takes DDIM's trailing timesteps
    (5 steps: 999 ... 199), not the scheduler config's leading ones (751 ... 1). Mutation: train_draftp.main's
    load_pipeline_parts call without `timestep_spacing=args.timestep_spacing`."""
    seen = []
    real = train_draftp.sample_latents

    def recording(unet, scheduler, *args, **kwargs):
        out = real(unet, scheduler, *args, **kwargs)
        seen.append(scheduler.timesteps.tolist())
        return out

    monkeypatch.setattr(train_draftp, "sample_latents", recording)
    monkeypatch.setattr(train_draftp, "validation", lambda *args, **kwargs: None)
    run_draftp(draftp_flags(tmp_path / "out", steps=1, extra=["--timestep_spacing", "trailing"]))
    assert seen == [[999, 799, 599, 399, 199]]
    assert json.loads((tmp_path / "out" / "args.json").read_text())["timestep_spacing"] == "trailing"


def test_truncation_random_draws_once_per_batch_inside_the_range():
    args = train_draftp.parse_args(["--pretrained_model_name_or_path", "tiny-sd", "--reward_model", "brightness",
                                    "--num_inference_steps", "10", "--truncation_steps_random", "2,6",
                                    "--output_dir", "unused"])
    draws = [train_draftp.draw_truncation_steps(args, step_generator(0, step, 0)) for step in range(200)]
    assert set(draws) == {2, 3, 4, 5, 6}  # every value in [MIN, MAX], nothing outside
    again = [train_draftp.draw_truncation_steps(args, step_generator(0, step, 0)) for step in range(200)]
    assert draws == again  # a function of (seed, step): the same on every process and after resume


def test_kl_is_zero_for_the_base_model_and_positive_after_an_update(lora_parts):
    parts, prompts = lora_parts, ["a red cat"]
    unet = parts.unet

    def reference(*a, **kw):
        with adapters_disabled(unet):
            return unet(*a, **kw)

    x_T = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    saved = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_B" in n}
    for p in saved.values():
        assert p.abs().sum() == 0  # LoRA starts as the identity: B = 0
    kl0 = sample_latents(unet, parts.scheduler, _cond(parts, prompts), x_T, STEPS, 7.5, 2, reference_unet=reference).kl
    assert kl0.item() == 0.0
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    kl1 = sample_latents(unet, parts.scheduler, _cond(parts, prompts), x_T, STEPS, 7.5, 2, reference_unet=reference).kl
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    assert kl1.item() > 0


def test_kl_is_the_mean_over_grad_steps_of_the_mean_squared_difference_by_hand(tiny_sd_path):
    """DRaFT+'s KL on known predictions: a stand-in UNet whose guided eps is c_t * D (both CFG halves alike, so the
    guided eps is exactly that) against a reference that predicts 0. On 5 DDIM steps (timesteps 801 ... 201, 1), K = 2
    runs t = 201 with c = 2 and t = 1 with c = 1, so KL = (4 + 1) / 2 * mean(D^2) per sample. Sample 0's D holds 1 and
    -3 (mean(D^2) = 5), sample 1's is 0.5 everywhere (0.25): KL = [12.5, 0.625]. Mutations this fails under: in
    utils/sampling.py kl_to_reference, `.pow(2)` replaced by `.abs()` (gives [3, 0.75]); the mean over the steps
    replaced by their sum or by the last step's term."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    from utils.models import TextConditioning

    D = torch.tensor([1.0, -3.0]).repeat(8).reshape(1, 4, 2, 2)
    D = torch.cat([D, torch.full((1, 4, 2, 2), 0.5)])  # (B=2, C, h, w)

    def trained(x, t, **kwargs):  # x: (2B, C, h, w), the uncond and text halves
        c = 2.0 if int(t) > 100 else 1.0
        return SimpleNamespace(sample=torch.cat([c * D, c * D]) + 0 * x)

    def reference(x, t, **kwargs):
        return SimpleNamespace(sample=torch.zeros_like(x))

    scheduler = DDIMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler")
    cond = TextConditioning(torch.zeros(4, 1, 8))
    x_T = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    kl = sample_latents(trained, scheduler, cond, x_T, 5, 7.5, truncation_steps=2, reference_unet=reference).kl
    assert [int(t) for t in scheduler.timesteps[-2:]] == [201, 1]
    assert kl.tolist() == [12.5, 0.625]


def test_sampler_equals_the_stock_diffusers_pipeline(tiny_sd_path):
    from diffusers import DiffusionPipeline

    parts = load_pipeline_parts(tiny_sd_path)
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_path)
    expected = pipe("a red cat", num_inference_steps=STEPS, guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(3), output_type="pt").images
    x_T = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = decode_latents(parts.vae, sample_latents(parts.unet, parts.scheduler, _cond(parts, ["a red cat"]),
                                                        x_T, STEPS, 7.5).latents)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("force_upcast", [True, False])
def test_sdxl_vae_honours_force_upcast_in_fp16(tiny_sdxl_path, force_upcast):
    """fp16 + an SDXL VAE whose config says force_upcast: the VAE stays float32 and encodes / decodes in float32
    even inside the training loop's fp16 autocast (the stock SDXL pipeline's behaviour); a VAE that says False
    (an fp16-fix VAE) runs in fp16. The text encoders take fp16 either way."""
    parts = load_pipeline_parts(tiny_sdxl_path)
    parts.vae.register_to_config(force_upcast=force_upcast)
    freeze_frozen_parts(parts, "cpu", torch.float16)
    expected = torch.float32 if force_upcast else torch.float16
    assert {p.dtype for p in parts.vae.parameters()} == {expected}
    assert {p.dtype for p in parts.text_encoders[0].parameters()} == {torch.float16}
    if not force_upcast:
        return
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
             for m in (parts.vae.encoder.conv_out, parts.vae.decoder.conv_out)]
    latents = torch.randn(1, 4, 8, 8, dtype=torch.float16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        images = decode_latents(parts.vae, latents)
        parts.vae.encode(images.half() * 2 - 1)
    for hook in hooks:
        hook.remove()
    assert seen == [torch.float32, torch.float32]  # decoder, then encoder
    images.sum().backward()  # the reward's gradient still reaches the fp16 latents
    assert latents.grad.dtype == torch.float16 and torch.isfinite(latents.grad).all()


def test_sd15_vae_follows_the_stock_pipeline_in_fp16(tiny_sd_path):
    """diffusers' SD1.5 pipeline ignores force_upcast (its default is True even for SD1.5's VAE, which runs fine in
    fp16): so do we."""
    parts = load_pipeline_parts(tiny_sd_path)
    assert parts.vae.config.force_upcast
    freeze_frozen_parts(parts, "cpu", torch.float16)
    assert {p.dtype for p in parts.vae.parameters()} == {torch.float16}


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("flags, named", [
    (["--truncation_steps", "9", "--num_inference_steps", "5"], "--truncation_steps"),
    (["--reward_model", "no_such_reward"], "pickscore"),
    (["--kl_coeff", "-1"], "--kl_coeff"),
    (["--prompts", "missing_prompts.txt"], "--prompts"),
    (["--truncation_steps_random", "6,2"], "--truncation_steps_random"),
    (["--reward_model_paths", "pickscore"], "--reward_model_paths"),
    (["--draft_lv_samples", "2", "--truncation_steps", "2"], "--truncation_steps"),  # DRaFT-LV back-propagates one step
    (["--draft_lv_samples", "2", "--truncation_steps_random", "1,3"], "--truncation_steps_random"),
])
def test_bad_input_names_the_flag(flags, named, tmp_path):
    base = ["--pretrained_model_name_or_path", "tiny-sd", "--reward_model", "brightness", "--output_dir", str(tmp_path)]
    with pytest.raises(UsageError, match=named):
        train_draftp.parse_args(base + flags)


def test_bad_input_is_one_line_on_stderr(run_script, tmp_path):
    proc = run_script(["train_draftp.py", "--pretrained_model_name_or_path", "tiny-sd", "--kl_coeff", "-0.5",
                       "--output_dir", str(tmp_path)], expect_ok=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --kl_coeff")
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- end to end
def draftp_flags(output_dir, steps=8, reward="brightness", extra=()):
    """train_draftp.py's command line (script first): run_script(draftp_flags(...)) in a subprocess, or
    run_draftp(draftp_flags(...)) in this process."""
    return ["train_draftp.py", "--pretrained_model_name_or_path", "tiny-sd", "--reward_model", reward,
            "--prompts", "colored_animals", "--num_inference_steps", STEPS, "--truncation_steps", 2,
            "--train_batch_size", 2, "--learning_rate", 3e-3, "--lora_rank", 16, "--max_train_steps", steps,
            "--validation_prompts", *VALIDATION_PROMPTS, "--num_validation_images", 1, "--validation_steps", 1000,
            "--report_to", "none", "--output_dir", output_dir, *extra]


def run_draftp(flags):
    """train_draftp.py's run in this process (conftest.run_main_in_process): the runs below whose subject is what the
    training does (reward, KL, resume, SDXL) skip a subprocess's ~15 s of imports; lora_run, the two-process test
    and test_bad_input_is_one_line_on_stderr keep the subprocess and accelerate launch. Returns the run's log."""
    assert flags[0] == "train_draftp.py"
    return run_main_in_process(train_draftp, flags[1:])


def grid_images(path, rows, cols):
    """The images of a labelled validation grid, cut out with the geometry of its sidecar json: (rows, cols, H, W, 3)."""
    cells = read_cells(path, json.loads(path.with_suffix(".json").read_text())["grid"])
    assert cells.shape[:2] == (rows, cols)
    return cells


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_sd_path):
    from tests.conftest import run_script

    out = tmp_path_factory.mktemp("draftp") / "lora"
    run_script(draftp_flags(out, steps=10, extra=["--learning_rate", 1e-2, "--log_kl"]), launch=True)
    return out


def test_lora_run_writes_the_output_contract(lora_run):
    assert (lora_run / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((lora_run / "args.json").read_text())["reward_model"] == "brightness"
    metrics = read_metrics(lora_run)
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert all({"loss", "reward", "kl", "lr"} <= set(m) for m in metrics)
    assert metrics[0]["kl"] == 0.0 and metrics[-1]["kl"] > 0  # KL to the base (--log_kl): 0 before the first update
    # asked for by --validation_prompts: a grid at the end only (every grid holds the base row, adapters off)
    assert sorted(p.name for p in (lora_run / "samples").glob("*.png")) == ["validation-step-000010.png"]


FULL_UNET = ["--no-use_lora", "--learning_rate", 1e-3]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_sd_path):
    out = tmp_path_factory.mktemp("draftp") / "full"
    run_draftp(draftp_flags(out, steps=10, extra=FULL_UNET))
    return out


def test_reward_rises(full_run):
    """Same seeds, same prompts: the trained model's validation images score higher than the base model's, and
    the last steps' training reward beats the first steps'. (Full UNet: the tiny UNet has random weights, and
    its few attention layers, where LoRA sits, barely move an image's global colour; see README.)"""
    final = json.loads((full_run / "samples" / "validation-step-000010.json").read_text())
    base, trained = np.mean(final["rewards"]["base"]), np.mean(final["rewards"]["trained"])
    assert trained > base + 0.01, (base, trained)
    rewards = [m["reward"] for m in read_metrics(full_run)]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3])


def test_full_unet_output_loads_with_from_pretrained(full_run):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(full_run, subfolder="unet")
    assert unet.config.cross_attention_dim == 32
    assert "kl" not in read_metrics(full_run)[0]  # full UNet with kl_coeff 0 keeps no frozen copy: no KL to log


def test_saved_lora_reproduces_the_validation_images_in_stock_diffusers(lora_run, tiny_sd_path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.load_lora_weights(str(lora_run))
    grid = grid_images(lora_run / "samples" / "validation-step-000010.png", rows=2, cols=len(VALIDATION_PROMPTS))
    for col, prompt in enumerate(VALIDATION_PROMPTS):
        image = pipe(prompt, num_inference_steps=STEPS, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                     output_type="np").images[0]
        ours = grid[1, col].astype(np.float32) / 255  # row 0: base model, row 1: trained
        assert np.abs(image - ours).max() <= 2 / 255  # PNG rounding only
        assert np.abs(grid[0, col].astype(np.float32) / 255 - ours).max() > 2 / 255  # and training changed it


def test_large_kl_coeff_stays_closer_to_the_base_model(full_run, tmp_path):
    """After the same run, fixed-seed samples with a huge kl_coeff are closer to the base model's than kl 0."""
    run_draftp(draftp_flags(tmp_path / "kl", steps=10, extra=[*FULL_UNET, "--kl_coeff", "1000"]))

    def distance_to_base(out):
        grid = grid_images(out / "samples" / "validation-step-000010.png", rows=2, cols=len(VALIDATION_PROMPTS))
        return np.abs(grid[0].astype(np.float32) - grid[1].astype(np.float32)).mean()

    assert distance_to_base(tmp_path / "kl") < 0.5 * distance_to_base(full_run)
    metrics = read_metrics(tmp_path / "kl")
    assert metrics[0]["kl"] == 0.0 and metrics[-1]["kl"] > 0  # the frozen copy starts equal to the UNet


class _UNetCalls:
    """What train_draftp.main does with the UNet, counted in-process: guided-eps calls with and without grad
    (trained model and reference alike), and calls of the LoRA reference (the UNet with its adapters off)."""

    def __init__(self, monkeypatch):
        import utils.models
        import utils.sampling

        self.with_grad = self.without_grad = self.reference = 0
        real_eps, real_disabled = utils.sampling.guided_eps, utils.models.adapters_disabled

        def guided_eps(*args, **kwargs):
            if torch.is_grad_enabled():
                self.with_grad += 1
            else:
                self.without_grad += 1
            return real_eps(*args, **kwargs)

        @contextlib.contextmanager
        def adapters_disabled(unet):
            self.reference += 1
            with real_disabled(unet):
                yield unet

        monkeypatch.setattr(utils.sampling, "guided_eps", guided_eps)
        monkeypatch.setattr(utils.models, "adapters_disabled", adapters_disabled)  # the LoRA reference (reference_model)
        # validation images call the base model by design; only the training steps are counted here
        monkeypatch.setattr(train_draftp, "validation", lambda *args, **kwargs: None)


def run_in_process(output_dir, monkeypatch, steps, extra):
    calls = _UNetCalls(monkeypatch)
    run_draftp(draftp_flags(output_dir, steps=steps, extra=[*extra, "--compile_sampler", "off"]))
    return calls, read_metrics(output_dir)


@pytest.mark.parametrize("log_kl", [False, True])
def test_reference_is_called_only_when_its_output_is_used(tmp_path, monkeypatch, tiny_sd_path, log_kl):
    """LoRA, kl_coeff 0 (DRaFT), K = 2 (draftp_flags): without --log_kl the frozen model never runs in a training
    step and no kl is logged; with it, once per grad step, and the kl is logged."""
    steps = 2
    calls, metrics = run_in_process(tmp_path, monkeypatch, steps, ["--log_kl"] if log_kl else [])
    assert calls.with_grad == steps * 2
    assert calls.reference == (steps * 2 if log_kl else 0)
    assert all(("kl" in m) == log_kl for m in metrics)


def test_draft_lv_training_steps_carry_grad_only_through_the_resamples(tmp_path, monkeypatch, tiny_sd_path):
    """The script with --draft_lv_samples 3: per step, STEPS no-grad chain calls, 3 re-sample calls with grad, and
    the KL (logged with --log_kl) over the 3 re-sample steps only."""
    steps, n = 2, 3
    calls, metrics = run_in_process(tmp_path, monkeypatch, steps, ["--draft_lv_samples", n, "--truncation_steps", 1,
                                                                   "--log_kl"])
    assert calls.with_grad == steps * n
    assert calls.reference == steps * n
    assert calls.without_grad == steps * (STEPS + n)  # the chain, and the reference's eps at each re-sample
    assert len(metrics) == steps and all(np.isfinite(m["reward"]) and "kl" in m for m in metrics)


def test_compiled_grad_unet_gives_the_same_numbers(tmp_path, monkeypatch, tiny_sd_path):
    """--compile_unet: dynamo captures the trained UNet's forward at the steps with grad, through gradient
    checkpointing, with backward through AOTAutograd (backend "eager" here: the capture, guards and graph breaks are
    what is tested; inductor's kernels are measured on the GPU, bench/e2e.py). The run must equal eager's."""
    from utils.speed import compile_training_unet

    compiled = []

    def eager_backend(unet, mode):
        view = compile_training_unet(unet, mode, "eager")
        compiled.extend([view] if view is not unet else [])
        return view

    monkeypatch.setattr(train_draftp, "compile_training_unet", eager_backend)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    flags = ["--log_kl", "--gradient_checkpointing"]
    _, eager = run_in_process(tmp_path / "eager", monkeypatch, 3, flags)
    _, ours = run_in_process(tmp_path / "compiled", monkeypatch, 3, flags + ["--compile_unet", "default"])
    assert len(compiled) == 1 and torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    ours, eager = deterministic_metrics(ours), deterministic_metrics(eager)
    assert [m["step"] for m in ours] == [1, 2, 3]
    for a, b in zip(ours, eager):  # float32, the same kernels: equal but for the reduction order
        for key in ("loss", "reward", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_resume_continues_metrics_exactly(tmp_path):
    """A run checkpointed at step 2 and cut off after step 4 before its last checkpoint (checkpoint-4 and the final
    weights gone), resumed with --resume_from_checkpoint latest: it continues from checkpoint-2 (conftest.assert_resumed,
    which says the mutation this fails under) and metrics.jsonl ends equal (==: the same float32 operations on the
    CPU) to what the run wrote uninterrupted."""
    out = tmp_path / "run"
    flags = draftp_flags(out, steps=4, extra=["--checkpointing_steps", "2"])
    run_draftp(flags)
    straight = deterministic_metrics(read_metrics(out))
    shutil.rmtree(out / "checkpoint-4")
    os.remove(out / "pytorch_lora_weights.safetensors")
    mark_rows_before_resume(out)
    log = run_draftp([*flags, "--resume_from_checkpoint", "latest"])
    resumed = deterministic_metrics(assert_resumed(out, log, 2))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert resumed == straight


def test_two_processes_give_the_losses_of_one_at_the_first_and_a_later_step(tmp_path, run_script):
    """DRaFT+ (kl_coeff 0.1), 2 processes x batch 1 against 1 process x batch 2, the same global batch. Step 1's
    gradient norm is that of the all-reduced gradient, and step 2 runs on the weights of one update: both match only
    if the two processes' gradients were averaged into the one process's update (loss, reward, KL and gradient norm
    within float32 rounding of a different batch split). Mutation this fails under: no gradient all-reduce, e.g. in
    train_draftp.py `with run.accumulate():` made `with run.accumulate(), run.accelerator.no_sync(run.model):` (DDP's
    no_sync around the micro-step's forward and backward): each process steps on its own half of the batch, and step
    1's grad_norm becomes the mean of the two halves' norms."""
    from conftest import free_port

    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--kl_coeff", 0.1]
    run_draftp(draftp_flags(one, steps=2, extra=[*extra, "--train_batch_size", 2]))  # the reference: 1 process x 2
    # 2 processes x batch 1 = the same global batch of 2. On a machine without GPUs, `--multi_gpu` with
    # ACCELERATE_USE_CPU starts torchrun-style processes that accelerate joins with gloo (plain `--cpu` with
    # several processes expects MPI).
    run_script(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", 2, "--num_machines", 1,
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
                *draftp_flags(two, steps=2, extra=[*extra, "--train_batch_size", 1])],
               env={"ACCELERATE_USE_CPU": "true"})
    metrics_one, metrics_two = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in metrics_two] == [1, 2]  # only the main process writes metrics
    assert metrics_two[0]["kl"] == metrics_one[0]["kl"] == 0.0
    for a, b in zip(metrics_two, metrics_one):
        for key in ("loss", "reward", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (key, a["step"], a[key], b[key])
    assert metrics_two[1]["kl"] > 0  # step 2 does see the updated weights


def test_tiny_sdxl_trains(tmp_path):
    """Two DRaFT steps on tiny-sdxl (two text encoders, time ids) update the LoRA weights: LoRA starts as the identity,
    its up (B) matrices at 0, so a saved up matrix that is not all zeros was trained. Mutation this fails under: in
    utils/train/optim.py optimizer_update, `optimizer.step()` removed."""
    from safetensors.torch import load_file

    out = tmp_path / "sdxl"
    flags = draftp_flags(out, steps=2)
    flags[flags.index("tiny-sd")] = "tiny-sdxl"
    run_draftp(flags)
    metrics = read_metrics(out)
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    up = [w for name, w in saved.items() if "lora_B" in name or "lora.up" in name]
    assert up and any(w.abs().max() > 0 for w in up)


def test_prompts_from_a_datasets_folder_and_a_parquet_file(tmp_path):
    import datasets

    from utils.data import load_prompts

    ds = datasets.Dataset.from_dict({"text": ["a red cat", "a blue dog"], "id": [1, 2]})
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "prompts.parquet"))
    for source in (tmp_path / "saved", tmp_path / "prompts.parquet"):
        assert load_prompts(str(source), column="text") == ["a red cat", "a blue dog"]
    with pytest.raises(UsageError, match=r"no column 'prompt'.*set --prompt_column"):
        load_prompts(str(tmp_path / "saved"))
    with pytest.raises(UsageError, match=r"--prompts .*missing_folder: no such file or folder"):
        load_prompts(str(tmp_path / "missing_folder"))
