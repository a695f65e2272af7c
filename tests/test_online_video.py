"""train_online.py on video (Wan 2.1): rewards of whole videos and of frames, the NFT loss and the step KL on 5-D
latents, and tiny-wan runs of Flow-GRPO and DiffusionNFT on the toy video judge whose LoRA loads into WanPipeline."""
import numpy as np
import pytest
import torch

import train_online as T
from tests.conftest import run_main_in_process
from utils import UsageError
from utils.rewards import load_reward, pil_to_tensor
from utils.toy.video_world import VideoScene, clip_accuracy, render_clip, video_prompt
from utils.train.metrics import read_metrics
from utils.video_rewards import score_videos

FRAMES = 5


def test_a_video_judge_scores_whole_videos_and_an_image_reward_their_frames():
    """'toyvideo_judge:2,brightness:0.5' on two clips: 2 x the judge's verdict on the whole clip (right prompt 1,
    wrong direction 0) + 0.5 x brightness averaged over frames 0, 2, 4. Mutations: handing the judge single frames
    (it then reads no motion), or averaging brightness over every frame, fail here."""
    from PIL import Image

    scene = VideoScene(2, "red", "circle", "left", "white")
    clip = render_clip(scene, num_frames=FRAMES, size=64, rng=np.random.default_rng(0))
    right, wrong = video_prompt(2, "red", "circle", "left"), video_prompt(2, "red", "circle", "right")
    assert clip_accuracy(clip, right)["all"] == 1.0 and clip_accuracy(clip, wrong)["all"] == 0.0
    brightness = load_reward("brightness")
    frame_ids = [0, 2, 4]
    mean_brightness = np.mean([float(brightness(pil_to_tensor(Image.fromarray(clip[f]))[None], [right])[0])
                               for f in frame_ids])
    assert abs(mean_brightness - np.mean([float(brightness(pil_to_tensor(Image.fromarray(f))[None], [right])[0])
                                          for f in clip])) > 1e-5  # the chosen frames matter
    scores = score_videos(load_reward("toyvideo_judge:2,brightness:0.5"), np.stack([clip, clip]), [right, wrong],
                          frame_ids)
    assert scores == pytest.approx([2 + 0.5 * mean_brightness, 0.5 * mean_brightness], abs=1e-7)


def test_nft_loss_and_step_kl_on_videos_equal_the_same_numbers_laid_out_as_images():
    """Both are per-sample means: a video's (B, C, f, h, w) gives what its frames stacked as channels (B, C f, h, w)
    give. Mutation: t.view(-1, 1, 1, 1) in nft_loss breaks the broadcast on 5-D latents."""
    g = torch.Generator().manual_seed(0)
    v, v_old, x_t, x0 = (torch.randn(3, 4, 2, 5, 6, generator=g) for _ in range(4))
    t, advantages = torch.rand(3, generator=g), torch.randn(3, generator=g)
    video, _ = T.nft_loss(v, v_old, x_t, x0, t, advantages, beta=0.7, adv_clip_max=5.0)
    image, _ = T.nft_loss(*(x.flatten(1, 2) for x in (v, v_old, x_t, x0)), t, advantages, beta=0.7, adv_clip_max=5.0)
    torch.testing.assert_close(video, image)
    torch.testing.assert_close(T.step_mean_kl(v, v_old, 0.3), T.step_mean_kl(v.flatten(1, 2), v_old.flatten(1, 2), 0.3))


def video_flags(method, out, *extra):
    return ["--method", method, "--pretrained_model_name_or_path", "tiny-wan", "--reward_model",
            "toyvideo_judge,brightness", "--prompts", "toyvideo", "--group_size", 2, "--train_batch_size", 4,
            "--num_inference_steps", 3, "--num_frames", FRAMES, "--reward_frames", 2, "--resolution", 32,
            "--learning_rate", 1e-2, "--lora_rank", 4, "--report_to", "none", "--output_dir", out, *extra]


@pytest.mark.parametrize("method", ["flow_grpo", "nft"])
def test_online_rl_trains_wan_on_the_video_judge_and_the_lora_loads_into_wan_pipeline(method, tmp_path):
    """Two steps of 2 prompts x 2 videos rewarded by the video judge plus frame brightness: finite steps, a
    validation grid of frames, and a LoRA that WanPipeline.load_lora_weights takes and that changes its videos."""
    from diffusers import WanPipeline

    from utils.toy.tiny import tiny_pipeline_path

    out = tmp_path / method
    run_main_in_process(T, video_flags(method, out, "--max_train_steps", 2, "--validation_steps", 2))
    rows = read_metrics(str(out))
    assert [r["step"] for r in rows] == [1, 2] and all(r["skipped"] == 0 for r in rows)
    assert all(np.isfinite(r["loss"]) and 0 <= r["reward"] <= 2 for r in rows)  # judge in {0, 1}, brightness in [0, 1]
    assert (out / "samples" / "validation-step-000002.png").is_file()

    pipe = WanPipeline.from_pretrained(tiny_pipeline_path("tiny-wan"))
    x_T = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))

    def sample():
        return pipe("two red circles moving left", height=32, width=32, num_frames=FRAMES, num_inference_steps=2,
                    latents=x_T, output_type="latent").frames

    base = sample()
    pipe.load_lora_weights(str(out))
    assert (sample() - base).abs().max() > 0


def test_video_flags_are_refused_for_an_image_model(tmp_path):
    flags = ["--method", "flow_grpo", "--pretrained_model_name_or_path", "tiny-sd3", "--reward_model", "brightness",
             "--prompts", "colored_animals", "--group_size", 2, "--train_batch_size", 2, "--num_frames", FRAMES,
             "--report_to", "none", "--output_dir", tmp_path / "run"]
    with pytest.raises(UsageError, match="--num_frames is for video models"):
        run_main_in_process(T, flags)
