"""DRaFT / DRaFT+ on video (train_draftp.py on tiny-wan, 5 frames at 32 px): the frame-subset reward against the image
reward by hand, the causal decode of the frames it needs with gradient, the LoRA run's outputs loaded by WanPipeline,
exact resume (the frames drawn per step included), and the video flags' usage errors."""
import copy
import json
import os
import shutil

import pytest
import torch

import train_draftp
from conftest import (assert_resumed, deterministic_metrics, frozen_tiny_parts, mark_rows_before_resume,
                      run_main_in_process)
from utils import UsageError
from utils.models import add_lora, encode_prompts, reference_model
from utils.rewards import load_reward
from utils.sampling import cfg_conditioning, decode_latents, sample_latents
from utils.seeding import step_generator
from utils.train.metrics import read_metrics
from utils.video_rewards import draw_reward_frames, temporal_consistency, video_reward
from utils.wan_decode import decode_first_frames

PROMPTS = ["a red cat", "a blue dog"]
REWARD = "brightness:1.0,saturation:0.5"  # two parts: each is averaged over the frames as the sum is


@pytest.fixture(scope="module")
def parts():
    return frozen_tiny_parts("tiny-wan")


def _latents(parts, num_frames, batch=2, seed=0):
    shape = parts.latent_shape(32, num_frames)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def wan_flags(output_dir, steps=2, extra=()):
    return ["--pretrained_model_name_or_path", "tiny-wan", "--reward_model", "brightness", "--prompts", "colored_animals",
            "--num_frames", 5, "--resolution", 32, "--reward_frames", 2, "--temporal_weight", 0.1,
            "--num_inference_steps", 3, "--truncation_steps", 2, "--kl_coeff", 0.1, "--train_batch_size", 2,
            "--learning_rate", 1e-2, "--lora_rank", 4, "--max_train_steps", steps, "--validation_steps", 1000,
            "--report_to", "none", "--output_dir", output_dir, *extra]


# --------------------------------------------------------------------------- the reward and the decode
def test_frame_reward_is_the_mean_of_the_image_reward_over_the_drawn_frames(parts):
    """video_reward = the image reward of frames 1 and 3 of the full decode, averaged by hand (each part too); the
    temporal term = minus the mean squared difference of consecutive frames 0 ... 3 (the ones decoded)."""
    scorer = load_reward(REWARD)
    latents = _latents(parts, 5)
    reward, reward_parts, temporal = video_reward(parts.vae, scorer, latents, PROMPTS, [1, 3], temporal=True)
    with torch.no_grad():
        frames = decode_latents(parts.vae, latents)  # (2, 5, 3, 32, 32)
    by_hand = {name: (r(frames[:, 1], PROMPTS) + r(frames[:, 3], PROMPTS)) / 2
               for name, r in (("brightness", load_reward("brightness")), ("saturation", load_reward("saturation")))}
    torch.testing.assert_close(reward_parts["brightness"], by_hand["brightness"])
    torch.testing.assert_close(reward_parts["saturation"], by_hand["saturation"])
    torch.testing.assert_close(reward, by_hand["brightness"] + 0.5 * by_hand["saturation"])
    diffs = [(frames[:, k + 1] - frames[:, k]).pow(2).flatten(1).mean(1) for k in range(3)]
    torch.testing.assert_close(temporal, -torch.stack(diffs).mean(0))
    assert temporal_consistency(frames[:, :1].repeat(1, 3, 1, 1, 1)).abs().max() == 0  # a still video: 0


@pytest.mark.parametrize("checkpointed", [True, False])
def test_first_frames_decode_as_the_full_decode_and_only_the_needed_latent_frames_get_gradient(parts, checkpointed):
    """9 frames = 3 latent frames; frames 0 ... 4 need latent frames 0 and 1 only (causal decoder): the same numbers as
    decode_latents, the same gradient as through the full decode, none to latent frame 2."""
    latents = _latents(parts, 9).requires_grad_()
    ours = decode_first_frames(parts.vae, latents, 4, checkpointed)
    full = decode_latents(parts.vae, latents)
    assert ours.shape == (2, 5, 3, 32, 32) and full.shape == (2, 9, 3, 32, 32)
    torch.testing.assert_close(ours, full[:, :5], rtol=0, atol=1e-6)
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    grad, = torch.autograd.grad((ours * weights).sum(), latents)
    expected, = torch.autograd.grad((full[:, :5] * weights).sum(), latents)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    assert grad[:, :, 1].abs().sum() > 0 and grad[:, :, 2].abs().max() == 0


def test_frames_drawn_are_a_function_of_the_steps_generator():
    draws = [draw_reward_frames(81, 4, step_generator(0, step, 0)) for step in range(5)]
    assert draws == [draw_reward_frames(81, 4, step_generator(0, step, 0)) for step in range(5)]  # resume: the same
    assert all(len(set(d)) == 4 and d == sorted(d) and 0 <= d[0] and d[-1] < 81 for d in draws)
    assert len({tuple(d) for d in draws}) > 1  # drawn anew each step
    assert draw_reward_frames(5, 8, step_generator(0, 0, 0)) == [0, 1, 2, 3, 4]


def test_gradient_reaches_only_the_lora_weights(parts):
    """DRaFT-1 on a video: the frame reward's gradient goes through the decode of the frames drawn into the LoRA
    weights, and into nothing else (the VAE and the base transformer stay frozen)."""
    model = add_lora(copy.deepcopy(parts.unet), rank=4, seed=0)
    cond = cfg_conditioning(encode_prompts(parts, PROMPTS, "cpu"), encode_prompts(parts, [""], "cpu"), 5.0)
    sample = sample_latents(model, parts.scheduler, cond, _latents(parts, 5), 2, 5.0, truncation_steps=1,
                            reference_unet=reference_model(model))
    reward, _, temporal = video_reward(parts.vae, load_reward("brightness"), sample.latents, PROMPTS, [2, 4], True)
    (reward + 0.1 * temporal).mean().backward()
    grads = {n: p.grad for n, p in [*model.named_parameters(), *parts.vae.named_parameters()]}
    assert all(g is None for n, g in grads.items() if "lora" not in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


# --------------------------------------------------------------------------- the script
def test_lora_run_writes_metrics_a_frame_grid_and_weights_that_wan_pipeline_loads(parts, tmp_path):
    from diffusers import WanPipeline

    out = tmp_path / "run"
    log = run_main_in_process(train_draftp, wan_flags(out, extra=["--validation_prompts", "a red cat",
                                                                 "--num_validation_images", 1]))
    assert "5 frames (2 scored per video, temporal weight 0.1)" in log
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all({"loss", "reward", "kl", "grad_norm", "temporal", "lr"} <= set(m) for m in metrics)
    assert metrics[0]["kl"] == 0.0 and metrics[1]["kl"] > 0 and metrics[0]["temporal"] < 0
    # the grid: base and trained rows, 4 frames of the video side by side
    sidecar = json.loads((out / "samples" / "validation-step-000002.json").read_text())
    assert sidecar["rows"] == ["base", "trained"]
    assert sidecar["prompts"] == [f"a red cat (frame {k})" for k in (0, 1, 3, 4)]

    pipe = WanPipeline.from_pretrained(parts.path)
    before = {n: p.clone() for n, p in pipe.transformer.named_parameters()}
    pipe.load_lora_weights(str(out))
    lora = {n: p for n, p in pipe.transformer.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().max() > 0 for p in lora.values())  # trained, not the zero init
    assert all(torch.equal(p, before[n]) for n, p in pipe.transformer.named_parameters() if n in before)


def test_resume_continues_metrics_exactly(tmp_path):
    """Cut off after step 4 with checkpoint-2 left: the resumed run's metrics.jsonl equals the straight run's, rewards
    included, which holds only if each step scores the same frames as before (drawn from the step's generator)."""
    out = tmp_path / "run"
    flags = wan_flags(out, steps=4, extra=["--checkpointing_steps", 2])
    run_main_in_process(train_draftp, flags)
    straight = deterministic_metrics(read_metrics(out))
    shutil.rmtree(out / "checkpoint-4")
    os.remove(out / "pytorch_lora_weights.safetensors")
    mark_rows_before_resume(out)
    log = run_main_in_process(train_draftp, [*flags, "--resume_from_checkpoint", "latest"])
    resumed = deterministic_metrics(assert_resumed(out, log, 2))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert resumed == straight


@pytest.mark.parametrize("model, flag, value", [("tiny-wan", "--num_frames", 6), ("tiny-sd", "--num_frames", 5),
                                                ("tiny-sd", "--temporal_weight", 0.1),
                                                ("tiny-wan", "--reward_frames", 0)])
def test_bad_video_flags_are_usage_errors_naming_the_flag(tmp_path, model, flag, value):
    flags = wan_flags(tmp_path / "run")
    flags[flags.index("--pretrained_model_name_or_path") + 1] = model
    flags[flags.index(flag) + 1] = value
    if model != "tiny-wan":  # an image model: only the flag under test is a video flag
        for video_flag in {"--num_frames", "--reward_frames", "--temporal_weight"} - {flag}:
            i = flags.index(video_flag)
            del flags[i:i + 2]
    with pytest.raises(UsageError, match=flag):
        run_main_in_process(train_draftp, flags)
