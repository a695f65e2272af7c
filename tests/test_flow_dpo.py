"""Diffusion-DPO and SFT (train_dpo.py) on the flow-matching families, tiny-sd3 and tiny-flux: the velocity target, t
drawn as the model was trained, winner and loser on one noise and one sigma, first loss log 2, LoRA reload in the stock
pipelines, exact resume, and the family's flags checked before loading."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

import train_dpo as T
from utils.denoising import family_noising, per_sample_error
from utils.models import model_prediction
from conftest import (assert_resumed, deterministic_metrics, frozen_tiny_parts, mark_rows_before_resume,
                      run_main_in_process)
from utils import UsageError
from utils.flow import FlowTrainingTimesteps
from utils.models import adapters_disabled, add_lora, encode_prompts, load_pipeline_parts
from utils.toy.synthetic import build_synthetic_preferences
from utils.train.metrics import read_metrics

FAMILIES = ["tiny-sd3", "tiny-flux"]
LOG2 = math.log(2)
RESOLUTION = 32  # pixels: 16x16 latents (the tiny VAE halves), 64 image tokens
VALIDATION = {"tiny-sd3": 4.5, "tiny-flux": 3.5}  # --guidance_scale of the validation images (SD3: CFG; FLUX: embedding)


def flow_args(**kw):
    """family_noising's arguments as parse_args + check_family_args leave the flow flags."""
    return {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
            "snr_gamma": None, **kw}


# --------------------------------------------------------------------------- t drawn as the model was trained
@pytest.mark.parametrize("dynamic_shifting", [False, True])  # SD3 (fixed shift 3) / FLUX (shifted only when sampling)
def test_logit_normal_timesteps_have_the_asked_mean_and_std(dynamic_shifting):
    """u ~ sigmoid(N(m, s)) picks sigma = table[floor(1000 u)], the scheduler's training sigmas: 1 - i/1000, shifted by
    3 for SD3 (sigma' = 3 sigma / (1 + 2 sigma)), not for FLUX's dynamic-shifting config. Undoing the shift and the
    index gives u back to within 1/1000, so logit(u) must show mean m and std s. With n = 40000 draws the sample mean's
    standard error is s / sqrt(n) = 0.004 and the sample std's s / sqrt(2n) = 0.0028; the bounds are 6 of those plus
    the index rounding (u within 0.001, i.e. logit within ~0.001 / (u (1 - u)) ~ 0.004 where most of the mass is)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    m, s, n = 0.5, 0.8, 40000
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic_shifting)
    timesteps = FlowTrainingTimesteps(scheduler, "logit_normal", m, s).draw(n, torch.Generator().manual_seed(0))
    sigma = (timesteps / 1000).double()
    if not dynamic_shifting:
        sigma = sigma / (3 - 2 * sigma)  # the inverse of SD3's shift
    u = (1 - sigma + 0.0005).clamp(1e-4, 1 - 1e-4)  # the middle of u's 1/1000 bin
    logit = torch.log(u / (1 - u))
    assert abs(logit.mean().item() - m) < 6 * s / math.sqrt(n) + 0.01
    assert abs(logit.std().item() - s) < 6 * s / math.sqrt(2 * n) + 0.01
    # the same generator state gives the same timesteps (resume and every process draw the global batch alike)
    again = FlowTrainingTimesteps(scheduler, "logit_normal", m, s).draw(n, torch.Generator().manual_seed(0))
    assert torch.equal(timesteps, again)


def test_the_table_is_the_schedulers_training_sigmas_even_after_a_pipeline_set_timesteps():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    table = FlowTrainingTimesteps(scheduler, "none").sigmas.clone()
    scheduler.set_timesteps(4)  # what a validation pipeline does to the scheduler it is given
    assert torch.equal(FlowTrainingTimesteps(scheduler, "none").sigmas, table) and len(table) == 1000
    assert table[0] == 1.0 and table[-1] == pytest.approx(3 * 0.001 / 1.002)


# --------------------------------------------------------------------------- noising and the loss on the tiny models
@pytest.fixture(scope="module", params=FAMILIES)
def parts(request):
    return frozen_tiny_parts(request.param)


def _latents(parts, batch, seed):
    return torch.randn(batch, *parts.latent_shape(RESOLUTION), generator=torch.Generator().manual_seed(seed))


def test_winner_and_loser_share_one_noise_sample_and_one_sigma(parts):
    winners, losers, noise = _latents(parts, 2, 0), _latents(parts, 2, 1), _latents(parts, 2, 2)
    noising = family_noising(parts, **flow_args())
    timesteps = noising.draw(2, torch.Generator().manual_seed(3))
    noisy, target, t = noising.pairs(torch.cat([winners, losers]), noise, timesteps)
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    assert torch.equal(t, timesteps.repeat(2))
    torch.testing.assert_close(noisy, torch.cat([(1 - sigma) * winners + sigma * noise,
                                                 (1 - sigma) * losers + sigma * noise]))
    torch.testing.assert_close(target, torch.cat([noise - winners, noise - losers]))


def test_dpo_loss_is_log2_and_grads_reach_only_the_lora_weights(parts):
    """The script's pieces (family noising, the model call, per-sample velocity errors, dpo_loss against the same
    transformer with its adapters off): log 2 at the start, and the gradient lands on LoRA weights only."""
    import copy

    model = add_lora(copy.deepcopy(parts.unet), rank=4, seed=0)
    cond = encode_prompts(parts, ["a red cat", "a blue dog"], "cpu").repeat(2)
    noising = family_noising(parts, **flow_args())
    noisy, target, t = noising.pairs(torch.cat([_latents(parts, 2, 0), _latents(parts, 2, 1)]), _latents(parts, 2, 2),
                                     noising.draw(2, torch.Generator().manual_seed(3)))
    guidance = 1.0 if parts.family == "flux" else None
    err = per_sample_error(model_prediction(model, noisy, t, cond, guidance), target)
    with torch.no_grad(), adapters_disabled(model):
        ref = per_sample_error(model_prediction(model, noisy, t, cond, guidance), target)
    loss, metrics = T.dpo_loss(*err.chunk(2), *ref.chunk(2), beta=5000.0)
    assert loss.item() == pytest.approx(LOG2, abs=1e-6) and metrics["implicit_acc"] == 0.5
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if "lora" not in n), "a frozen transformer weight got a gradient"
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora" in n)


def test_sft_loss_is_the_flow_matching_mse_at_a_known_point():
    """--sft --weighting_scheme cosmap: mean over the batch of w(sigma) * mean((v - (noise - x_0))^2), the transformer
    called by hand on x_t = (1 - sigma) x_0 + sigma noise at timestep sigma * 1000,
    w = 2 / (pi (1 - 2 sigma + 2 sigma^2))."""
    parts = load_pipeline_parts("tiny-sd3")
    x0, noise = _latents(parts, 2, 0), _latents(parts, 2, 1)
    sigma = torch.tensor([0.25, 0.7])
    cond = encode_prompts(parts, ["a red cat", "a blue dog"], "cpu")
    noising = family_noising(parts, **flow_args(weighting_scheme="cosmap"))
    with torch.no_grad():
        noisy, target, t = noising.pairs(x0, noise, sigma * 1000)
        err = per_sample_error(model_prediction(parts.unet, noisy, t, cond), target)
        loss, _ = T.sft_loss(err, noising.sft_weights(t))
        x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        v = parts.unet(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=cond.embeds,
                       pooled_projections=cond.pooled).sample
    w = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    expected = (w * ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- train_dpo.py end to end
def run_dpo(flags):
    """train_dpo.main in this process (conftest.run_main_in_process: a subprocess would spend most of a tiny run
    importing). Returns the run's log."""
    return run_main_in_process(T, flags)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return build_synthetic_preferences(str(tmp_path_factory.mktemp("flow_prefs") / "data"), num_pairs=8, seed=0)


def dpo_flags(name, data, output_dir, *extra):
    return ["--pretrained_model_name_or_path", name, "--dataset_name", data, "--output_dir", output_dir,
            "--resolution", RESOLUTION, "--num_inference_steps", 2, "--num_validation_images", 1,
            "--guidance_scale", VALIDATION.get(name, 7.5), "--validation_prompts", "a red cat", "--report_to", "none",
            "--lr_warmup_steps", 0, "--train_batch_size", 2, *extra]


LORA = ["--use_lora", "--lora_rank", 4, "--learning_rate", 1e-2, "--max_train_steps", 3, "--checkpointing_steps", 2]


@pytest.fixture(scope="module", params=FAMILIES)
def lora_run(request, prefs, tmp_path_factory):
    """LoRA DPO, 3 steps of 2 pairs, a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("flow_dpo") / request.param
    run_dpo(dpo_flags(request.param, prefs, out, *LORA))
    return request.param, out


def test_lora_first_loss_is_log2_and_the_run_trains(lora_run):
    name, out = lora_run
    metrics = read_metrics(str(out))
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["loss"] == pytest.approx(LOG2, abs=1e-6) and metrics[0]["model_mse"] == metrics[0]["ref_mse"]
    assert metrics[-1]["loss"] < LOG2 - 0.01 and metrics[-1]["implicit_acc"] > 0.5
    args = json.loads((out / "args.json").read_text())
    assert args["weighting_scheme"] == {"tiny-sd3": "logit_normal", "tiny-flux": "none"}[name]
    assert args["train_guidance_scale"] == (1.0 if name == "tiny-flux" else None)


def test_lora_output_reloads_in_the_stock_pipeline_with_the_same_images(lora_run):
    """StableDiffusion3Pipeline / FluxPipeline.load_lora_weights(output_dir) reproduces the trained row of the last
    validation grid (same seed, steps and guidance) up to PNG rounding, and differs from the base row."""
    from diffusers import DiffusionPipeline

    from utils.grids import read_cells
    from utils.models import resolve_model_path

    name, out = lora_run
    grid = out / "samples" / "validation-step-000003.png"
    info = json.loads(grid.with_suffix(".json").read_text())
    cells = read_cells(grid, info["grid"])  # rows: base, trained
    pipe = DiffusionPipeline.from_pretrained(resolve_model_path(name))

    def image():
        return pipe("a red cat", num_inference_steps=2, guidance_scale=VALIDATION[name], height=RESOLUTION,
                    width=RESOLUTION, generator=torch.Generator().manual_seed(info["seeds"][0]),
                    output_type="np").images[0]

    base = image()
    pipe.load_lora_weights(str(out))
    tuned = image()
    # what was trained and reloaded: --lora_targets diffusers (the default), diffusers' DreamBooth LoRA targets of the
    # family (FLUX.1: the feed-forward layers and the single blocks' proj_mlp too). Mutation:
    # DIFFUSERS_FLOW_LORA_TARGET_MODULES["flux"] = FLOW_LORA_TARGET_MODULES fails it.
    from safetensors import safe_open

    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        saved = {k.split(".lora_A")[0] for k in f.keys() if ".lora_A." in k}
    loaded = {n.split(".lora_A")[0] for n, _ in pipe.transformer.named_parameters() if ".lora_A." in n}
    assert {"transformer." + n for n in loaded} == saved
    ff = {n for n in saved if ".ff." in n or ".ff_context." in n or n.endswith(".proj_mlp")}
    assert (len(ff) == 4 * len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
            if name == "tiny-flux" else not ff), ff
    assert np.abs(tuned - cells[1, 0].astype(np.float32) / 255).max() <= 2 / 255  # PNG rounding only
    assert np.abs(base - cells[0, 0].astype(np.float32) / 255).max() <= 2 / 255
    assert np.abs(tuned - base).max() > 1e-4  # and the LoRA changed the image (float32 rounding is ~1e-6)


def test_resume_continues_metrics_exactly(lora_run, prefs, tmp_path):
    """The 3-step run resumed from its checkpoint-2: it continues from there (conftest.assert_resumed, which says the
    mutation this fails under) and step 3 comes out equal (==) to the uninterrupted run's."""
    name, out = lora_run
    resumed = tmp_path / "run"
    shutil.copytree(out, resumed)  # holds checkpoint-2: step 3 runs again from it
    mark_rows_before_resume(resumed)
    log = run_dpo(dpo_flags(name, prefs, resumed, *LORA, "--resume_from_checkpoint", "latest"))
    a, b = deterministic_metrics(read_metrics(str(out))), deterministic_metrics(assert_resumed(resumed, log, 2))
    assert [m["step"] for m in b] == [1, 2, 3]
    assert a == b


@pytest.fixture(scope="module", params=FAMILIES)
def full_run(request, prefs, tmp_path_factory):
    """Full fine-tune, 1 step in bf16: the reference is a frozen bf16 copy of the transformer (utils.models.frozen_copy)."""
    out = tmp_path_factory.mktemp("flow_full") / request.param
    run_dpo(dpo_flags(request.param, prefs, out, "--no-use_lora", "--learning_rate", 1e-4, "--max_train_steps", 1,
                      "--mixed_precision", "bf16"))
    return request.param, out


def test_full_fine_tune_first_loss_is_log2_and_saves_transformer(full_run):
    """The trained float32 transformer runs under bf16 autocast, the reference is its bf16 copy: they compute the same
    at step 0 (SD3's float32 pos_embed buffer stays float32 in the copy). transformer/ loads with from_pretrained."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    name, out = full_run
    assert read_metrics(str(out))[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    cls = SD3Transformer2DModel if name == "tiny-sd3" else FluxTransformer2DModel
    assert isinstance(cls.from_pretrained(out, subfolder="transformer"), cls)
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_evaluate_scores_the_base_and_the_dpo_transformer(full_run, tmp_path):
    """evaluate.py in this process (conftest.run_main_in_process; its command line is tested in test_evaluate.py)."""
    import csv

    import evaluate

    name, out = full_run
    run_main_in_process(evaluate, [
        "--pretrained_model_name_or_path", name, "--models", f"dpo={out}", "--resolution", RESOLUTION,
        "--prompts", "colored_animals", "--max_prompts", 1, "--num_seeds", 2, "--num_inference_steps", 2,
        "--guidance_scale", VALIDATION[name], "--reward_models", "brightness", "--diversity", "pixel",
        "--output_dir", tmp_path / "eval"])
    rows = list(csv.DictReader(open(tmp_path / "eval" / "results.csv")))
    assert [r["model"] for r in rows] == ["base", "dpo"]
    assert rows[0]["brightness_mean"] != rows[1]["brightness_mean"]  # the trained transformer was used


@pytest.mark.parametrize("name, flags, named", [
    ("tiny-flux", ["--sdxl"], "--sdxl"),
    ("tiny-sd3", ["--sft", "--snr_gamma", "5"], "--snr_gamma"),
    ("tiny-sd3", ["--train_guidance_scale", "3.5"], "--train_guidance_scale"),
    ("tiny-sd3", ["--weighting_scheme", "cosmap"], "--weighting_scheme cosmap"),
    ("tiny-flux", ["--logit_std", "0.5"], "--logit_std: not used by --weighting_scheme none"),  # FLUX's default
    ("tiny-sd3", ["--mode_scale", "1.0"], "--mode_scale: not used by --weighting_scheme logit_normal"),
    ("tiny-sd", ["--weighting_scheme", "logit_normal"], "--weighting_scheme"),
    ("tiny-sd", ["--logit_std", "0.5"], "--logit_std"),
])
def test_flags_that_cannot_work_with_the_family_are_refused_before_loading(name, flags, named, prefs, tmp_path,
                                                                           monkeypatch):
    def no_loading(*a, **kw):
        raise AssertionError("the weights were loaded before the flags were checked")

    monkeypatch.setattr(T, "load_pipeline_parts", no_loading)
    with pytest.raises(UsageError, match=named):
        run_dpo(dpo_flags(name, prefs, tmp_path, "--max_train_steps", 1, *flags))
