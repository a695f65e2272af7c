"""utils/speed.py: every speed option gives the DRaFT+ step the same images, loss and gradients as without it.

On the tiny pipeline, CPU, float32. torch.compile runs with dynamo's "eager" backend here (the graph capture,
its guards and the routing of the no-grad steps are what can go wrong on our side; inductor's kernels are
checked against eager on the GPU by bench/bench.py).
"""
import argparse

import pytest
import torch

import train_draftp
from utils.models import adapters_disabled, add_lora, encode_prompts, freeze_frozen_parts, load_pipeline_parts
from utils.rewards import load_reward
from utils.sampling import cfg_conditioning, decode_latents, sample_latents
from utils.speed import add_speed_args, apply_speed_options, compile_mode

STEPS, K = 4, 2
PROMPTS = ["a red cat", "a blue dog"]
OFF = dict(channels_last=False, compile_sampler="off", vae_gradient_checkpointing=False)


def speed_args(**overrides):
    parser = argparse.ArgumentParser()
    add_speed_args(parser)
    args = parser.parse_args([])
    for name, value in {**OFF, **overrides}.items():
        setattr(args, name, value)
    return args


def tiny_lora_parts(tiny_sd_path):
    """The tiny pipeline's parts on the CPU in float32, its UNet with seeded LoRA adapters that do change its output."""
    parts = load_pipeline_parts(tiny_sd_path)
    freeze_frozen_parts(parts, "cpu", torch.float32)
    unet = add_lora(parts.unet, rank=4, seed=0)
    with torch.no_grad():  # LoRA starts as the identity (B = 0); make it matter
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return parts, unet


def draftp_step(tiny_sd_path, **options):
    """One DRaFT+ step (as train_draftp.py's loop) with the given speed options: (loss, images, LoRA grads)."""
    parts, unet = tiny_lora_parts(tiny_sd_path)
    unet.enable_gradient_checkpointing()
    sampling_unet = apply_speed_options(speed_args(**options), unet, parts.vae, "cpu", backend="eager")

    def reference(*a, **kw):
        with adapters_disabled(unet):
            return unet(*a, **kw)

    cond = cfg_conditioning(encode_prompts(parts, PROMPTS, "cpu"), encode_prompts(parts, [""], "cpu"))
    x_T = torch.randn(len(PROMPTS), 4, 32, 32, generator=torch.Generator().manual_seed(0))
    sample = sample_latents(unet, parts.scheduler, cond, x_T, STEPS, 7.5, K, reference_unet=reference,
                            nograd_unet=sampling_unet)
    images = decode_latents(parts.vae, sample.latents)
    loss, _ = train_draftp.draftp_loss(load_reward("color_match")(images, PROMPTS), sample.kl, 1.0, 0.1)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    return loss.detach(), images.detach(), grads


@pytest.fixture(scope="module")
def reference_step(tiny_sd_path):
    return draftp_step(tiny_sd_path)


@pytest.mark.parametrize("options", [
    dict(channels_last=True),
    dict(vae_gradient_checkpointing=True),
    dict(compile_sampler="default"),
    dict(channels_last=True, vae_gradient_checkpointing=True, compile_sampler="default"),
], ids=["channels_last", "vae_checkpointing", "compile", "all"])
def test_speed_option_keeps_the_step_equal(tiny_sd_path, reference_step, options):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loss, images, grads = draftp_step(tiny_sd_path, **options)
    ref_loss, ref_images, ref_grads = reference_step
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(images, ref_images, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-6)
    if options.get("compile_sampler", "off") != "off":
        # One graph for all the no-grad steps: timesteps reach the UNet as tensors, so no recompiling per step.
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_defaults_are_on_and_compile_only_on_cuda():
    args = argparse.ArgumentParser()
    add_speed_args(args)
    defaults = args.parse_args([])
    assert defaults.channels_last and defaults.vae_gradient_checkpointing and defaults.compile_sampler == "auto"
    assert compile_mode("auto", "cuda") == "reduce-overhead" and compile_mode("auto", "cpu") is None
    assert compile_mode("off", "cuda") is None and compile_mode("reduce-overhead", "cpu") == "reduce-overhead"
    off = args.parse_args(["--no-channels_last", "--no-vae_gradient_checkpointing", "--compile_sampler", "off"])
    assert not off.channels_last and not off.vae_gradient_checkpointing


def test_train_draftp_takes_the_speed_flags():
    args = train_draftp.parse_args(["--pretrained_model_name_or_path", "tiny-sd", "--reward_model", "color_match",
                                    "--no-channels_last", "--compile_sampler", "off"])
    assert not args.channels_last and args.compile_sampler == "off" and args.vae_gradient_checkpointing


BETA = 5000.0


def dpo_step(tiny_sd_path, channels_last):
    """One LoRA Diffusion-DPO step's loss and LoRA grads, composed as train_dpo.py's loop (reference = adapters off)."""
    import train_dpo
    from utils.denoising import noise_pairs, per_sample_error

    parts, unet = tiny_lora_parts(tiny_sd_path)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 32, 32, generator=g), torch.randn(2, 4, 32, 32, generator=g)
    noisy, target, t = noise_pairs(parts.scheduler, latents, noise, torch.tensor([100, 700]))
    kwargs = encode_prompts(parts, PROMPTS * 2, "cpu").unet_kwargs()
    err = per_sample_error(unet(noisy, t, **kwargs).sample, target)
    with torch.no_grad(), adapters_disabled(unet):
        ref_err = per_sample_error(unet(noisy, t, **kwargs).sample, target)
    loss, _ = train_dpo.dpo_loss(*err.chunk(2), *ref_err.chunk(2), beta=BETA)
    loss.backward()
    errors = torch.cat([err.detach(), ref_err])
    return loss.detach(), errors, {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


def test_channels_last_keeps_the_dpo_step_equal_and_is_train_dpos_default(tiny_sd_path):
    import train_dpo

    (loss, errors, grads), (ref_loss, ref_errors, ref_grads) = dpo_step(tiny_sd_path, True), dpo_step(tiny_sd_path, False)
    assert abs(float(ref_loss) - 0.6931) > 1e-3  # the adapters make a difference to the reference
    # the layouts change only the float32 summation order of the convolutions: the errors (about 1) agree to well
    # within 1e-5 (float32's epsilon is 1.2e-7, accumulated through the UNet's layers)
    torch.testing.assert_close(errors, ref_errors, rtol=1e-5, atol=1e-7)
    # -logsigmoid is 1-Lipschitz and its argument is beta/2 x a sum of four errors: the loss may move by up to
    # beta/2 x 4 x the errors' largest difference (beta 5000 turns a 1e-7 error difference into 1e-3 of loss)
    bound = BETA / 2 * 4 * float((errors - ref_errors).abs().max()) + 1e-6
    assert abs(float(loss) - float(ref_loss)) <= bound, (float(loss), float(ref_loss), bound)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:  # beta 5000 multiplies float32 rounding of the errors: tolerance relative to each grad's scale
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-3 * float(ref_grads[name].abs().max()))
    base = ["--pretrained_model_name_or_path", "tiny-sd", "--dataset_name", "x"]
    assert train_dpo.parse_args(base).channels_last and not train_dpo.parse_args(base + ["--no-channels_last"]).channels_last


# --------------------------------------------------------------------------- start-up and step timing
def test_compile_cache_defaults_to_the_project_cache_unless_the_user_set_one():
    from utils.speed import keep_compile_cache

    environ = {}
    assert keep_compile_cache(environ).endswith("/.cache/diffusion-align/inductor")
    assert environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
    mine = {"TORCHINDUCTOR_CACHE_DIR": "/shared/inductor", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
    assert keep_compile_cache(mine) == "/shared/inductor" and mine["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0"


@pytest.mark.parametrize("flags, due, last", [
    (dict(validation_prompts=None, validation_steps=100), [], False),  # nothing asked for: no grid at all
    (dict(validation_prompts=["a cat"], validation_steps=100), [], True),  # prompts given: the final grid
    (dict(validation_prompts=None, validation_steps=4), [4, 8], True),  # multiples below the end, then the end
    (dict(validation_prompts=[], validation_steps=5), [5], True),  # 10 is the final grid, drawn once
])
def test_validation_grids_only_when_asked_for(flags, due, last):
    from utils.train.validation import validation_due, validation_wanted

    args = argparse.Namespace(max_train_steps=10, **flags)
    assert [step for step in range(1, 11) if validation_due(args, step)] == due
    assert validation_wanted(args) == last


def test_step_clock_counts_data_and_leaves_out_pauses(monkeypatch):
    """step_seconds spans log to log (data included, grids and checkpoints not); a fake clock, no real timing."""
    from utils.train import metrics

    now = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    clock = metrics.StepClock()
    with clock.data():
        now[0] += 2.0  # waiting for the batch
    now[0] += 3.0  # the step's GPU work
    assert clock.lap() == {"step_seconds": 5.0, "data_seconds": 2.0}
    with clock.paused():
        now[0] += 60.0  # a validation grid
    now[0] += 4.0
    assert clock.lap() == {"step_seconds": 4.0, "data_seconds": 0.0}


def test_trainable_lora_makes_no_float32_copies_of_activations_and_changes_no_number(tiny_sd_path):
    """add_trainable_lora: float32 adapters under bf16 autocast. peft would cast each adapted layer's bf16 input to
    float32 and autocast would cast it back; with the casts off the prediction and the adapter gradients are the
    same bit for bit (bf16 -> float32 -> bf16 is exact) and no float32 copy of an activation is made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from utils.models import add_trainable_lora

    class Upcasts(TorchDispatchMode):
        """Counts bf16 -> float32 copies of activations (tensors of 3 or more dims; weights are 2-dim or 4-dim
        convolution kernels, which autocast casts the other way)."""
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].dim() == 3 and args[0].dtype == torch.bfloat16 \
                    and out.dtype == torch.float32:
                Upcasts.count += 1
            return out

    def run(cast_off):
        unet = load_pipeline_parts(tiny_sd_path).unet
        add_trainable_lora(unet, 4, None, 0, "cpu", torch.bfloat16)
        lora = [p for p in unet.parameters() if p.requires_grad]
        assert lora and all(p.dtype == torch.float32 for p in lora)
        with torch.no_grad():
            for p in lora:  # B starts at zero: make the adapters change the output
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        if not cast_off:
            for module in unet.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = True  # peft's default
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900])
        text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
        Upcasts.count = 0
        with Upcasts(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x, t, text).sample
            out.float().square().mean().backward()
        return out, [p.grad for p in lora], Upcasts.count

    out_on, grads_on, upcasts_on = run(cast_off=False)
    out_off, grads_off, upcasts_off = run(cast_off=True)
    assert upcasts_on > 0 and upcasts_off == 0
    assert torch.equal(out_on, out_off) and all(torch.equal(a, b) for a, b in zip(grads_on, grads_off))
