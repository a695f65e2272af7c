"""The toy video world (utils/toy/video_world.py): clips of the image world's shapes moving one way, their captions,
the judge that reads count, colour, shape and direction back from the frames, and the mp4 clip and pair sets."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_command
from utils import UsageError
from utils.data import load_prompts
from utils.rewards import load_judge, load_reward
from utils.toy import video_world as vw

FRAMES = 9  # short clips keep the file under its time budget; the judge reads only first / last / every frame


def scene_of(prompt: str, background: str) -> vw.VideoScene:
    want = vw.parse_video_prompt(prompt)
    return vw.VideoScene(want["count"], want["color"], want["shape"], want["direction"], background)


@pytest.fixture(scope="module")
def sample():
    """(prompt, scene, clip) for every 4th prompt of the set (4 and the 5 directions are coprime: all are there)."""
    rng = np.random.default_rng(0)
    backgrounds = list(vw.BACKGROUNDS)
    out = []
    for i, prompt in enumerate(vw.video_prompt_set()[::4]):
        scene = scene_of(prompt, backgrounds[i % len(backgrounds)])
        out.append((prompt, scene, vw.render_clip(scene, FRAMES, 64, rng)))
    return out


# --------------------------------------------------------------------------- prompts, captions, clips
def test_prompt_set_is_every_count_colour_shape_and_direction():
    prompts = load_prompts("toyvideo")
    assert prompts == vw.video_prompt_set() and len(set(prompts)) == 3 * 6 * 3 * 5
    assert "two red circles moving left" in prompts and "an orange square standing still" in prompts
    assert {vw.parse_video_prompt(p)["direction"] for p in prompts} == set(vw.DIRECTIONS)


def test_captions_parse_back_to_their_scene():
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = vw.random_video_scene(rng)
        want = vw.parse_video_prompt(vw.video_caption(scene, rng))
        assert (want["count"], want["color"], want["shape"], want["direction"]) == \
            (scene.count, scene.color, scene.shape, scene.direction)
        assert want["background"] in (None, scene.background)


def test_clips_move_inside_the_frame(sample):
    for _, scene, clip in sample:
        assert clip.shape == (FRAMES, 64, 64, 3) and clip.dtype == np.uint8
        border = np.concatenate([clip[:, 0], clip[:, -1], clip[:, :, 0], clip[:, :, -1]], axis=1)
        assert (border == vw.BACKGROUNDS[scene.background]).all()  # no shape reaches the edge in any frame
        assert np.array_equal(clip[0], clip[-1]) == (scene.direction == "still")


def test_render_clip_is_deterministic_in_the_rng():
    scene = vw.VideoScene(3, "green", "triangle", "up", "black")
    a, b, c = (vw.render_clip(scene, FRAMES, 64, np.random.default_rng(s)) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# --------------------------------------------------------------------------- the judge
def test_judge_reads_every_attribute_of_clean_clips(sample):
    for prompt, scene, clip in sample:
        assert vw.read_clip(clip) == {"count": scene.count, "color": scene.color, "background": scene.background,
                                      "shape": scene.shape, "direction": scene.direction}, prompt
        assert vw.clip_accuracy(clip, prompt) == {"count": 1.0, "color": 1.0, "shape": 1.0, "direction": 1.0,
                                                  "all": 1.0}


def test_judge_fails_the_wrong_direction_or_colour(sample):
    for prompt, scene, clip in sample:
        for direction in vw.DIRECTIONS:
            if direction != scene.direction:
                scores = vw.clip_accuracy(clip, vw.video_prompt(scene.count, scene.color, scene.shape, direction))
                assert scores["direction"] == scores["all"] == 0.0 and scores["color"] == 1.0
        other = next(c for c in vw.COLORS if c != scene.color)
        scores = vw.clip_accuracy(clip, vw.video_prompt(scene.count, other, scene.shape, scene.direction))
        assert scores["color"] == scores["all"] == 0.0 and scores["direction"] == 1.0


def test_a_blank_clip_reads_nothing():
    clip = np.full((FRAMES, 64, 64, 3), vw.BACKGROUNDS["gray"], np.uint8)
    assert vw.read_clip(clip) == {"count": 0, "color": None, "background": "gray", "shape": None, "direction": None}


def test_the_judge_and_reward_take_arrays_tensors_and_pil_frames(sample):
    prompts = [p for p, _, _ in sample[:6]]
    clips = [clip for _, _, clip in sample[:6]]
    tensors = torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() / 255  # (B, F, 3, H, W)
    pils = [[Image.fromarray(frame) for frame in clip] for clip in clips]
    for video in (clips[0], tensors[0], pils[0]):
        assert load_judge("toyvideo_acc").judge(video, prompts[0]) == 1.0
    reward = load_reward("toyvideo_judge")
    assert not reward.differentiable
    wrong = [vw.video_prompt(s.count, s.color, s.shape, "still" if s.direction != "still" else "left")
             for _, s, _ in sample[:6]]
    assert reward.score(tensors, prompts) == reward.score(pils, prompts) == [1.0] * 6
    assert reward.score(tensors, wrong) == [0.0] * 6
    with pytest.raises(UsageError, match="toyvideo_judge reward reads toy-video prompts .* name no shape or no "
                                         "direction, e.g. 'two red circles'"):
        reward.score(tensors[:1], ["two red circles"])


# --------------------------------------------------------------------------- the written sets
def test_mp4_clip_set_keeps_the_judges_verdicts(tmp_path):
    """Through H.264 and back (PyAV): the codec's noise changes no verdict on the captions, nor on a wrong one."""
    out = str(tmp_path / "clips")
    vw.main(["--output_dir", out, "--num_clips", "24", "--num_frames", str(FRAMES), "--size", "64", "--seed", "0"])
    rows = [json.loads(line) for line in open(os.path.join(out, "captions.jsonl"))]
    assert len(rows) == 24 and all(set(r) == {"file", "caption"} for r in rows)
    for row in rows:
        clip = vw.read_mp4(os.path.join(out, row["file"]))
        assert clip.shape == (FRAMES, 64, 64, 3)
        assert vw.clip_accuracy(clip, row["caption"])["all"] == 1.0, row
        want = vw.parse_video_prompt(row["caption"])
        moved = vw.video_prompt(want["count"], want["color"], want["shape"],
                                "still" if want["direction"] != "still" else "down")
        assert vw.clip_accuracy(clip, moved)["all"] == 0.0, row


def test_pairs_labels_agree_with_the_judge(tmp_path):
    out = str(tmp_path / "pairs")
    proc = run_command([sys.executable, "-m", "utils.toy.video_world", "--output_dir", out, "--num_clips", "10",
                        "--num_frames", str(FRAMES), "--seed", "1", "--pairs"], 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "pairs.jsonl"))]
    assert len(rows) == 10 and all(set(r) == {"video_0", "video_1", "label_0", "caption"} for r in rows)
    assert {r["label_0"] for r in rows} == {0.0, 1.0}  # the right clip sits on either side
    for row in rows:
        verdicts = [vw.clip_accuracy(vw.read_mp4(os.path.join(out, row[f"video_{k}"])), row["caption"])["all"]
                    for k in (0, 1)]
        assert verdicts == [row["label_0"], 1.0 - row["label_0"]], row
