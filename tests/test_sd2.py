"""SD 2.x (v-prediction, 768 px: stabilityai/stable-diffusion-2-1) through train_draftp.py and train_dpo.py, on tiny-sd2
(the SD 2.x layout built in code): the sampler's predicted x_0 and the DRaFT+ gradient at the last step, the KL on the
model output, the velocity target of DPO / SFT, the first DPO loss log 2; --rescale_zero_terminal_snr (both scripts)
and train_dpo.py's timestep bias."""
import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch

import train_dpo
import train_draftp
from conftest import run_main_in_process
from utils import UsageError
from utils.denoising import family_noising, rescale_zero_terminal_snr, timestep_bias_weights
from utils.models import add_lora, encode_prompts, freeze_frozen_parts, load_pipeline_parts
from utils.sampling import cfg_conditioning, sample_latents
from utils.toy.synthetic import build_synthetic_preferences
from utils.train.metrics import read_metrics

STEPS = 5  # DDIM steps: leading spacing gives 801 ... 1, trailing 999 ... 199
GUIDANCE = 7.5
LOG2 = math.log(2)


@pytest.fixture(scope="module")
def parts():
    parts = load_pipeline_parts("tiny-sd2")
    freeze_frozen_parts(parts, "cpu", torch.float32)
    return parts


def _cond(parts, prompts):
    return cfg_conditioning(encode_prompts(parts, prompts, "cpu"), encode_prompts(parts, [""], "cpu"))


def _with_spacing(parts, **config):
    """`parts` with its DDIM scheduler rebuilt from its config with `config` changed (the UNet and encoders shared)."""
    return dataclasses.replace(parts, scheduler=type(parts.scheduler).from_config(parts.scheduler.config, **config))


def test_tiny_sd2_has_sd2s_layout(parts):
    """What tells SD 2.x's 768-v models apart, built into tiny-sd2 and read back through from_pretrained: v prediction
    on SD's noise schedule, heads per block and linear projections in the UNet, an OpenCLIP-style text encoder (gelu,
    the tokenizer padding with '!'), the stock StableDiffusionPipeline."""
    from utils.models import read_model_index, resolve_model_path

    assert read_model_index(resolve_model_path("tiny-sd2"))["_class_name"] == "StableDiffusionPipeline"
    assert parts.scheduler.config.prediction_type == "v_prediction" and not parts.is_flow and not parts.is_sdxl
    assert parts.scheduler.config.beta_schedule == "scaled_linear" and parts.scheduler.config.timestep_spacing == "leading"
    assert list(parts.unet.config.attention_head_dim) == [2, 4] and parts.unet.config.use_linear_projection
    assert parts.text_encoders[0].config.hidden_act == "gelu" and parts.tokenizers[0].pad_token == "!"


class _NudgeLastOutput(torch.nn.Module):
    """Wraps a UNet: in the calls with grad (K = 1: the last step) adds `delta` to the output (here v) of both CFG
    halves, which moves the guided v, v_u + s (v_t - v_u), by exactly `delta`; records that call's latent and its
    guided output."""

    def __init__(self, unet, delta, scale):
        super().__init__()
        self.unet, self.delta, self.scale, self.last = unet, delta, scale, None

    def forward(self, latents, *args, **kwargs):
        out = self.unet(latents, *args, **kwargs).sample
        if torch.is_grad_enabled():
            out = out + torch.cat([self.delta] * (out.shape[0] // self.delta.shape[0]))
            uncond, text = out.detach().chunk(2)
            self.last = (latents[: latents.shape[0] // 2].detach(), uncond + self.scale * (text - uncond))
        return SimpleNamespace(sample=out)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_pred_x0_of_v_prediction_and_the_draftp_gradient_at_the_last_step(parts, spacing):
    """DRaFT+ scores the last step's predicted x_0, which for v prediction is sqrt(a) x_t - sqrt(1 - a) v (diffusers'
    DDIMScheduler.step; Salimans & Ho 2022): checked against that formula on the last call's own x_t and guided v, and
    its gradient d(latent)/d(v) = -sqrt(1 - a_t) through the sampler. At trailing spacing's last t = 199 the eps
    formula's gain -sqrt((1 - a) / a) is 15 % larger, so a sampler that took v for eps fails; at leading spacing's
    t = 1 the two are within 0.1 % (launchers/draftp_sd21.sh: kl_coeff weighs as on SD1.5).
    Mutation: tiny-sd2's scheduler built with prediction_type "epsilon" (utils/toy/tiny.py) fails it."""
    p = _with_spacing(parts, timestep_spacing=spacing)
    shape = p.latent_shape(p.default_resolution)
    x_T = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    probe = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    delta = torch.zeros(1, *shape, requires_grad=True)
    model = _NudgeLastOutput(p.unet, delta, GUIDANCE)
    out = sample_latents(model, p.scheduler, _cond(p, ["a red cat"]), x_T, STEPS, GUIDANCE, truncation_steps=1,
                         scored_latent="pred_x0")
    last_t = p.scheduler.timesteps[-1].item()
    assert last_t == {"leading": 1, "trailing": 199}[spacing]
    a = p.scheduler.alphas_cumprod[last_t]
    x_t, v = model.last
    torch.testing.assert_close(out.latents.detach(), a.sqrt() * x_t - (1 - a).sqrt() * v, rtol=1e-5, atol=1e-5)
    (out.latents * probe).sum().backward()
    gain = -(1 - a).sqrt().item()
    torch.testing.assert_close(delta.grad, gain * probe, rtol=1e-4, atol=1e-7)
    eps_gain = -((1 - a) / a).sqrt().item()
    assert abs(eps_gain / gain - 1) == pytest.approx({"leading": 8.5e-4, "trailing": 0.1507}[spacing], rel=0.01)


def test_the_kl_is_on_the_guided_v_predictions(parts):
    """DRaFT+'s KL at a grad step is the mean squared difference of the trained and frozen models' guided outputs (v
    here): a trained model that is the frozen one plus `delta` on its output gives mean(delta^2)."""
    shape = parts.latent_shape(parts.default_resolution)
    delta = 0.3 * torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    x_T = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3))
    out = sample_latents(_NudgeLastOutput(parts.unet, delta, GUIDANCE), parts.scheduler,
                         _cond(parts, ["a red cat", "a blue dog"]), x_T, STEPS, GUIDANCE, truncation_steps=1,
                         reference_unet=parts.unet)
    torch.testing.assert_close(out.kl, delta.pow(2).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-7)


def test_dpo_and_sft_train_on_the_velocity(parts):
    """v prediction: x_t = sqrt(a) x_0 + sqrt(1 - a) noise and the target is v = sqrt(a) noise - sqrt(1 - a) x_0 (the
    target of the DPO errors and of SFT), winner and loser on one noise and one t. Mutation: noise_pairs returning
    the noise as the target whatever the prediction type (utils/denoising.py) fails it."""
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    noisy, target, timesteps = family_noising(parts).pairs(latents, noise, t)
    a = parts.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    both = noise.repeat(2, 1, 1, 1)
    torch.testing.assert_close(noisy, a.sqrt() * latents + (1 - a).sqrt() * both)
    torch.testing.assert_close(target, a.sqrt() * both - (1 - a).sqrt() * latents)
    assert timesteps.tolist() == [10, 900, 10, 900]


# --------------------------------------------------------------------------- the scripts end to end on tiny-sd2
@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return build_synthetic_preferences(str(tmp_path_factory.mktemp("sd2_prefs") / "data"), num_pairs=8, seed=0)


def dpo_flags(data, output_dir, *extra):
    return ["--pretrained_model_name_or_path", "tiny-sd2", "--dataset_name", data, "--output_dir", output_dir,
            "--resolution", 32, "--num_inference_steps", 2, "--num_validation_images", 1,
            "--validation_prompts", "a red cat", "--report_to", "none", "--lr_warmup_steps", 0, "--train_batch_size", 2,
            "--use_lora", "--lora_rank", 4, "--learning_rate", 1e-2, *extra]


def test_dpo_first_loss_is_log2_and_sft_runs(prefs, tmp_path):
    """train_dpo.py on the v-prediction pipeline: at step 1 the trained model is the reference, so the loss is log 2
    and the model's and reference's velocity errors agree; later steps move it. SFT (the velocity MSE) trains too."""
    run_main_in_process(train_dpo, dpo_flags(prefs, tmp_path / "dpo", "--max_train_steps", 3))
    metrics = read_metrics(str(tmp_path / "dpo"))
    assert metrics[0]["loss"] == pytest.approx(LOG2, abs=1e-6) and metrics[0]["model_mse"] == metrics[0]["ref_mse"]
    assert metrics[-1]["loss"] != pytest.approx(LOG2, abs=1e-4)
    run_main_in_process(train_dpo, dpo_flags(prefs, tmp_path / "sft", "--sft", "--max_train_steps", 2))
    sft = read_metrics(str(tmp_path / "sft"))
    assert [m["step"] for m in sft] == [1, 2] and all(math.isfinite(m["loss"]) for m in sft)


def draftp_flags(output_dir, *extra):
    return ["--pretrained_model_name_or_path", "tiny-sd2", "--reward_model", "brightness", "--prompts",
            "colored_animals", "--num_inference_steps", STEPS, "--truncation_steps", 1, "--kl_coeff", 0.1,
            "--train_batch_size", 2, "--learning_rate", 3e-3, "--lora_rank", 4, "--max_train_steps", 2,
            "--validation_prompts", "a red cat", "--num_validation_images", 1, "--validation_steps", 1000,
            "--report_to", "none", "--output_dir", output_dir, *extra]


def _record_chains(monkeypatch):
    """Make train_draftp.sample_latents note each chain's timesteps and its schedule's last alphas_cumprod."""
    seen, real = [], train_draftp.sample_latents

    def recording(unet, scheduler, *args, **kwargs):
        out = real(unet, scheduler, *args, **kwargs)
        seen.append((scheduler.timesteps.tolist(), scheduler.alphas_cumprod[-1].item()))
        return out

    monkeypatch.setattr(train_draftp, "sample_latents", recording)
    return seen


def test_draftp_trains_on_v_prediction(tmp_path, monkeypatch):
    """DRaFT+ on tiny-sd2: the KL is 0 at step 1 (the adapters start at zero) and the LoRA reloads into the stock
    StableDiffusionPipeline; the chains take the stock schedule's leading timesteps."""
    from diffusers import StableDiffusionPipeline

    from utils.models import resolve_model_path

    seen = _record_chains(monkeypatch)
    run_main_in_process(train_draftp, draftp_flags(tmp_path / "out"))
    metrics = read_metrics(str(tmp_path / "out"))
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["kl"] == 0.0
    assert all(math.isfinite(m["reward"]) for m in metrics) and metrics[1]["kl"] > 0
    assert seen and all(chain == ([801, 601, 401, 201, 1], pytest.approx(0.0047, abs=1e-4)) for chain in seen)
    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_path("tiny-sd2"))
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


# --------------------------------------------------------------------------- --rescale_zero_terminal_snr
def test_rescaled_schedule_has_zero_terminal_snr_and_trailing_timesteps(parts):
    """Lin et al. 2024: the betas rescaled so that alphas_cumprod at the last timestep is 0 (pure noise: DPO noises
    there to x_t = noise exactly, with target v = -x_0) and the first timestep keeps its value; DDIM's trailing spacing
    starts sampling at t = 999, where the predicted x_0 of v is -v (finite)."""
    stock_first = parts.scheduler.alphas_cumprod[0].item()
    p = rescale_zero_terminal_snr(_with_spacing(parts))  # a copy: the module's parts keep the stock schedule
    s = p.scheduler
    assert s.alphas_cumprod[-1].item() == 0.0 and s.alphas_cumprod[0].item() == pytest.approx(stock_first, rel=1e-6)
    assert parts.scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0047, abs=1e-4)  # the stock schedule's
    s.set_timesteps(STEPS)
    assert s.timesteps.tolist() == [999, 799, 599, 399, 199]
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    noisy, target, _ = family_noising(p).pairs(x0, noise, torch.tensor([999]))
    torch.testing.assert_close(noisy, noise.repeat(2, 1, 1, 1))
    torch.testing.assert_close(target, -x0)
    v = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(s.step(v, 999, noise).pred_original_sample, -v)


@pytest.mark.parametrize("name, needle", [("tiny-sd", "needs a v-prediction model"),
                                          ("tiny-sd3", "is a flow-matching model")])
def test_rescale_refuses_eps_and_flow_models(name, needle):
    with pytest.raises(UsageError, match=needle) as err:
        rescale_zero_terminal_snr(load_pipeline_parts(name))
    assert str(err.value).startswith("--rescale_zero_terminal_snr") and "\n" not in str(err.value)


def test_both_scripts_train_and_sample_on_the_rescaled_schedule(prefs, tmp_path, monkeypatch):
    """--rescale_zero_terminal_snr reaches the chains of train_draftp.py (trailing timesteps from 999, a_T = 0) and
    the noising of train_dpo.py (a_T = 0). Mutation: either script's `if args.rescale_zero_terminal_snr:` line in
    main removed fails it."""
    seen = _record_chains(monkeypatch)
    run_main_in_process(train_draftp, draftp_flags(tmp_path / "draftp", "--max_train_steps", 1,
                                                   "--rescale_zero_terminal_snr"))
    assert seen and all(chain == ([999, 799, 599, 399, 199], 0.0) for chain in seen)  # training and validation
    assert json.loads((tmp_path / "draftp" / "args.json").read_text())["rescale_zero_terminal_snr"] is True

    schedules, real = [], train_dpo.family_noising

    def recording(parts, *args, **kwargs):
        schedules.append(parts.scheduler.alphas_cumprod[-1].item())
        return real(parts, *args, **kwargs)

    monkeypatch.setattr(train_dpo, "family_noising", recording)
    run_main_in_process(train_dpo, dpo_flags(prefs, tmp_path / "dpo", "--max_train_steps", 1,
                                             "--rescale_zero_terminal_snr"))
    assert schedules == [0.0]
    assert read_metrics(str(tmp_path / "dpo"))[0]["loss"] == pytest.approx(LOG2, abs=1e-6)


# --------------------------------------------------------------------------- timestep bias (train_dpo.py)
def test_timestep_bias_weights_by_hand():
    """diffusers' generate_timestep_weights (train_text_to_image_sdxl.py): `multiplier` on the biased timesteps, 1 on
    the others, normalised; earlier = the first int(portion * T), later = the last int(portion * T), range =
    [begin, end)."""
    def expected(biased, multiplier, n=10):
        w = torch.tensor([multiplier if i in biased else 1.0 for i in range(n)], dtype=torch.float64)
        return w / w.sum()

    assert timestep_bias_weights(10, "none") is None
    torch.testing.assert_close(timestep_bias_weights(10, "earlier", 3.0, 0.3), expected({0, 1, 2}, 3.0))
    torch.testing.assert_close(timestep_bias_weights(10, "later", 3.0, 0.3), expected({7, 8, 9}, 3.0))
    torch.testing.assert_close(timestep_bias_weights(10, "later", 0.5, 0.25), expected({8, 9}, 0.5))
    torch.testing.assert_close(timestep_bias_weights(10, "range", 2.0, begin=2, end=5), expected({2, 3, 4}, 2.0))
    with pytest.raises(UsageError, match="--timestep_bias_portion"):
        timestep_bias_weights(10, "later", 2.0, 0.05)  # int(0.5) = 0 timesteps
    with pytest.raises(UsageError, match="--timestep_bias_begin 5 / --timestep_bias_end 20"):
        timestep_bias_weights(10, "range", 2.0, begin=5, end=20)


def test_training_timesteps_are_drawn_with_the_bias(parts):
    """family_noising draws t from the weights: with the last quarter weighted 1e9 times the rest, every draw is a
    noisy timestep (>= 750); without weights the draws are uniform over 0..999. Mutation: family_noising's draw
    ignoring `timestep_weights` fails it."""
    weights = timestep_bias_weights(1000, "later", 1e9, 0.25)
    draws = family_noising(parts, timestep_weights=weights).draw(2000, torch.Generator().manual_seed(0))
    assert draws.min() >= 750 and draws.max() <= 999 and len(set(draws.tolist())) > 200
    uniform = family_noising(parts).draw(2000, torch.Generator().manual_seed(0))
    assert uniform.min() < 50 and uniform.max() > 950


def test_the_script_draws_its_timesteps_with_the_bias(prefs, tmp_path, monkeypatch):
    """train_dpo.py --timestep_bias_strategy range: every training timestep falls in [begin, end). Mutation: main's
    family_noising call without the timestep_bias_weights argument fails it."""
    drawn, real = [], train_dpo.family_noising

    def recording(*args, **kwargs):
        noising = real(*args, **kwargs)
        draw = noising.draw

        def noting(n, g):
            t = draw(n, g)
            drawn.extend(t.tolist())
            return t

        noising.draw = noting
        return noising

    monkeypatch.setattr(train_dpo, "family_noising", recording)
    run_main_in_process(train_dpo, dpo_flags(prefs, tmp_path / "out", "--max_train_steps", 2,
                                             "--timestep_bias_strategy", "range", "--timestep_bias_begin", 400,
                                             "--timestep_bias_end", 410, "--timestep_bias_multiplier", 1e9))
    assert len(drawn) >= 2 and all(400 <= t < 410 for t in drawn), drawn


@pytest.mark.parametrize("flags, needle", [
    (["--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "0"], "--timestep_bias_multiplier must be > 0"),
    (["--timestep_bias_strategy", "earlier", "--timestep_bias_portion", "1.5"], "--timestep_bias_portion must be in"),
])
def test_bad_timestep_bias_flags_are_refused(flags, needle):
    base = ["--pretrained_model_name_or_path", "tiny-sd2", "--dataset_name", "x", "--output_dir", "unused"]
    with pytest.raises(UsageError, match=needle):
        train_dpo.parse_args(base + flags)


def test_timestep_bias_is_refused_for_flow_models():
    args = train_dpo.parse_args(["--pretrained_model_name_or_path", "tiny-sd3", "--dataset_name", "x",
                                 "--output_dir", "unused", "--timestep_bias_strategy", "later"])
    with pytest.raises(UsageError, match="--timestep_bias_strategy weights DDPM timesteps; SD3 draws t by "
                                         "--weighting_scheme"):
        train_dpo.check_family_args(args, "sd3", False)
