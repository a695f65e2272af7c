"""utils/fp8.py, the opt-in FP8 sampler: its products within e4m3's rounding, its weights shared with the trained UNet
(LoRA adapters applied, a full UNet's weights followed after an optimizer step), and train_draftp.py with
--fp8_sampler. On the CPU, where torch._scaled_mm runs the same float8 arithmetic (float32 outputs here)."""
import pytest
import torch
from torch import nn

from conftest import deterministic_metrics
from test_bench import run_bench_smoke
from test_draftp import draftp_flags, read_metrics, run_draftp
from test_speed import PROMPTS, speed_args, tiny_lora_parts
from utils.fp8 import (FLOAT8_MAX, Float8Linear, check_float8_capability, float8_sampling_unet, projection_names,
                       quantize_rows, refresh_float8_weights)
from utils.models import encode_prompts, freeze_frozen_parts, load_pipeline_parts
from utils.sampling import cfg_conditioning, decode_latents, sample_latents
from utils.speed import sampling_model

E4M3_HALF_ULP = 2.0 ** -4  # 3 mantissa bits: rounding to nearest moves a normal value by at most 1/16 of itself
E4M3_SUBNORMAL_HALF_STEP = 2.0 ** -10  # below 2^-6, e4m3 steps by 2^-9 (of the scaled value)


def rounding_bound(x, scale):
    """|float8(x / scale) * scale - x| at most, elementwise."""
    return x.abs() * E4M3_HALF_ULP + scale * E4M3_SUBNORMAL_HALF_STEP


def test_quantize_rows_uses_the_whole_e4m3_range_per_row():
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1e-3], [1], [10], [1e2], [1e3], [1e4]])
    x_fp8, scale = quantize_rows(x)
    assert x_fp8.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    assert torch.equal(x_fp8.float().abs().amax(dim=1), torch.full((6,), FLOAT8_MAX))  # each row's largest -> 448
    assert (x_fp8.float() * scale - x).abs().le(rounding_bound(x, scale)).all()


def test_float8_linear_is_a_linear_within_e4m3_rounding():
    """Against F.linear in float32: each operand is rounded to e4m3 (`rounding_bound`), so the error of an output is at
    most the sum over k of |dx_k| |w_k| + |x_k| |dw_k| + |dx_k| |dw_k| (float32 accumulation adds ~1e-7 of that)."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g))
        linear.bias.copy_(torch.randn(48, generator=g))
    x = torch.randn(2, 5, 64, generator=g)
    with torch.no_grad():
        ours, exact = Float8Linear(linear)(x), linear(x)
    assert ours.shape == exact.shape == (2, 5, 48) and ours.dtype == torch.float32
    rows, weight = x.reshape(-1, 64), linear.weight
    dx = rounding_bound(rows, quantize_rows(rows)[1])
    dw = rounding_bound(weight, quantize_rows(weight)[1])
    bound = dx @ weight.abs().T + rows.abs() @ dw.T + dx @ dw.T
    error = (ours - exact).reshape(-1, 48).abs()
    assert (error <= bound * (1 + 1e-5) + 1e-5).all()
    assert error.max() > 1e-3  # it did round: this is not the float32 product


def test_only_the_transformer_projections_are_replaced(tiny_sd_path):
    parts, unet = tiny_lora_parts(tiny_sd_path)
    names = projection_names(unet)
    assert names and all("transformer_blocks" in n and ".attn" in n or ".ff." in n for n in names)
    assert not any("lora_" in n for n in names)
    assert any(n.endswith("attn1.to_q.base_layer") for n in names)  # under a LoRA layer: its base product
    assert any(".ff.net." in n for n in names)
    fp8_unet = float8_sampling_unet(unet)
    replaced = [n for n, m in fp8_unet.named_modules() if isinstance(m, Float8Linear)]
    assert replaced == names
    assert not any(isinstance(m, Float8Linear) for m in unet.modules())  # the trained UNet itself is unchanged


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_flow_models_get_their_attention_and_feed_forward_in_fp8(name):
    """SD3 / FLUX: the joint attention's projections and the feed-forward layers, not the adaptive norms' modulation."""
    names = projection_names(load_pipeline_parts(name).unet)
    assert any(n.endswith("attn.to_q") for n in names) and any(".ff." in n for n in names)
    assert not any(".norm" in n for n in names)


def test_fp8_sampler_shares_the_trained_weights_and_applies_the_adapters(tiny_sd_path):
    """The copy holds the UNet's own Parameter objects (no second set of weights), and its eps is that of the LoRA
    model, changed by FP8 rounding far less than the adapters change it; with the adapters zeroed in the UNet, the
    copy follows at once."""
    parts, unet = tiny_lora_parts(tiny_sd_path)
    with torch.no_grad():  # adapters whose effect stands well above FP8's rounding
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.mul_(3)
    fp8_unet = float8_sampling_unet(unet)
    assert {id(p) for p in fp8_unet.parameters()} == {id(p) for p in unet.parameters()}
    assert {id(b) for n, b in fp8_unet.named_buffers() if "weight_fp8" not in n and "weight_scale" not in n} <= \
        {id(b) for b in unet.buffers()}

    kwargs = encode_prompts(parts, PROMPTS, "cpu").unet_kwargs()
    x_t = torch.randn(len(PROMPTS), 4, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    with torch.no_grad():
        exact, fp8 = unet(x_t, t, **kwargs).sample, fp8_unet(x_t, t, **kwargs).sample
        for name, p in unet.named_parameters():  # the adapters off, in place, in the trained UNet only
            if "lora_B" in name:
                p.zero_()
        base, fp8_base = unet(x_t, t, **kwargs).sample, fp8_unet(x_t, t, **kwargs).sample
    fp8_error, lora_effect = (fp8 - exact).abs().mean(), (exact - base).abs().mean()
    assert 0 < fp8_error < 0.2 * lora_effect
    assert (fp8_base - base).abs().mean() < 0.2 * lora_effect


def test_compiled_fp8_sampler_gives_the_same_eps(tiny_sd_path):
    """train_draftp.py's path on a GPU: `sampling_model` compiles the FP8 copy (--compile_sampler; dynamo's eager
    backend here) into one graph, the quantize-and-multiply included, with the uncompiled copy's output. (Choosing between the
    compiled and the plain copy with `compiled or fp8_unet` would ask a compiled module for its truth value.)"""
    parts, unet = tiny_lora_parts(tiny_sd_path)
    fp8_unet = float8_sampling_unet(unet)
    assert sampling_model(speed_args(compile_sampler="off"), fp8_unet, "cpu") is fp8_unet
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = sampling_model(speed_args(compile_sampler="default"), fp8_unet, "cpu", backend="eager")
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    kwargs = encode_prompts(parts, PROMPTS, "cpu").unet_kwargs()
    x_t = torch.randn(len(PROMPTS), 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x_t, torch.tensor(500), **kwargs).sample,
                                   fp8_unet(x_t, torch.tensor(500), **kwargs).sample, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_fp8_sampler_images_differ_from_exact_ones_by_a_little(tiny_sd_path):
    """Eight DDIM steps with CFG 7.5 (the tiny model's seeded adapters): the images differ, by a mean of about 0.004
    of the [0, 1] range (PSNR ~ 40 dB); BENCHMARKS.md has the full-size SD1.5 numbers."""
    parts, unet = tiny_lora_parts(tiny_sd_path)
    cond = cfg_conditioning(encode_prompts(parts, PROMPTS, "cpu"), encode_prompts(parts, [""], "cpu"))
    x_T = torch.randn(len(PROMPTS), 4, 32, 32, generator=torch.Generator().manual_seed(0))
    images = []
    with torch.no_grad():
        for nograd_unet in (None, float8_sampling_unet(unet)):
            latents = sample_latents(unet, parts.scheduler, cond, x_T, 8, 7.5, 0, nograd_unet=nograd_unet).latents
            images.append(decode_latents(parts.vae, latents))
    difference = (images[1] - images[0]).abs()
    assert 0 < difference.mean() < 0.02


def test_refresh_follows_a_trained_full_unet_and_leaves_frozen_weights(tiny_sd_path):
    """A full UNet: after the optimizer changes its weights, refresh_float8_weights re-quantizes them (in place: a
    CUDA graph of the sampler keeps its buffers); a LoRA model's frozen base weights are not touched."""
    parts = load_pipeline_parts(tiny_sd_path)
    freeze_frozen_parts(parts, "cpu", torch.float32)
    unet = parts.unet.requires_grad_(True)
    fp8_unet = float8_sampling_unet(unet)
    layer = next(m for m in fp8_unet.modules() if isinstance(m, Float8Linear))
    buffer, before = layer.weight_fp8, layer.weight_fp8.clone()
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # an optimizer step, in place on the shared Parameter
    assert torch.equal(layer.weight_fp8, before)  # stale until refreshed
    refresh_float8_weights(fp8_unet)
    expected_fp8, expected_scale = quantize_rows(layer.weight.detach())
    assert layer.weight_fp8 is buffer and torch.equal(layer.weight_fp8.float(), expected_fp8.float())
    assert torch.equal(layer.weight_scale, expected_scale.T)

    parts, lora_unet = tiny_lora_parts(tiny_sd_path)
    lora_fp8 = float8_sampling_unet(lora_unet)
    frozen = next(m for m in lora_fp8.modules() if isinstance(m, Float8Linear))
    with torch.no_grad():
        frozen.weight.mul_(-2.0)  # not something training does to a frozen base; shows refresh skips it
    snapshot = frozen.weight_fp8.clone()
    refresh_float8_weights(lora_fp8)
    assert torch.equal(frozen.weight_fp8.float(), snapshot.float())


def test_capability_check_names_the_flag():
    check_float8_capability((9, 0), "H100")
    check_float8_capability((8, 9), "L4")
    with pytest.raises(ValueError, match=r"--fp8_sampler needs .* compute capability 8.9 .* A100 has 8.0"):
        check_float8_capability((8, 0), "A100")


@pytest.mark.parametrize("lora", [True, False])
def test_train_draftp_with_the_fp8_sampler(tmp_path, monkeypatch, tiny_sd_path, lora):
    """Two DRaFT+ steps with --fp8_sampler (LoRA and full UNet): the same prompts and noise as without, so the first
    step's reward differs only by the FP8 rounding of the no-grad steps; the KL of the first step is still 0 (the
    steps with grad and the reference run in float32 here, from the same x_K). The FP8 weights are refreshed before
    each step's sampling: a full UNet's follow its first update, LoRA's frozen base stays as it was."""
    import train_draftp

    fp8_weights, refresh = [], train_draftp.refresh_float8_weights

    def refresh_and_keep(fp8_unet):
        refresh(fp8_unet)
        layer = next(m for m in fp8_unet.modules() if isinstance(m, Float8Linear))
        fp8_weights.append(layer.weight_fp8.float().clone())

    monkeypatch.setattr(train_draftp, "refresh_float8_weights", refresh_and_keep)
    extra = ["--kl_coeff", 0.1, "--log_kl", *([] if lora else ["--no-use_lora", "--learning_rate", 1e-4])]
    run_draftp(draftp_flags(tmp_path / "exact", steps=2, extra=extra))
    run_draftp(draftp_flags(tmp_path / "fp8", steps=2, extra=[*extra, "--fp8_sampler"]))
    assert len(fp8_weights) == 2 and torch.equal(fp8_weights[0], fp8_weights[1]) == lora
    exact, fp8 = deterministic_metrics(read_metrics(tmp_path / "exact")), deterministic_metrics(read_metrics(tmp_path / "fp8"))
    assert [m["step"] for m in fp8] == [1, 2] and not any(m["skipped"] for m in fp8)
    assert fp8[0]["kl"] == 0.0
    assert fp8[0]["reward"] != exact[0]["reward"]
    assert fp8[0]["reward"] == pytest.approx(exact[0]["reward"], rel=0.05)


def test_bench_section_compares_the_two_samplers(tmp_path):
    """bench/bench.py --sections sd15_fp8 on the tiny configs: both samplers timed at batch 4 and 8 (and 4 with
    cudnn.benchmark), alone and in the DRaFT+ step; their images from the same noise and weights differ by FP8 rounding
    only, and cudnn.benchmark changes nothing on the CPU (on the GPU: other convolution algorithms, bf16 rounding)."""
    data = run_bench_smoke(tmp_path, ["sd15_fp8"])
    expected = {f"sd15 {what} b{batch} {sampler} sampler{variant}" for what in ("sampling", "draftp K1")
                for sampler in ("bf16", "fp8") for batch, variant in ((4, ""), (4, ", cudnn.benchmark"), (8, ""))}
    assert set(data["rows"]) == expected
    check = data["checks"]["sd15 b4 sampling: bf16 vs fp8 sampler (changes results)"]
    assert 0 < check["image_mean_abs_diff"] < 0.02
    assert data["checks"]["sd15 b4 sampling: bf16 sampler vs the same with cudnn.benchmark"]["image_max_abs_diff"] < 1e-4
