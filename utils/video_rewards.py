"""Rewards of videos from the image rewards of utils/rewards.py: the image reward averaged over a subset of a video's
frames, and a temporal-consistency term. Training (train_draftp.py, with gradient) and evaluation (evaluate.py, each
frame's score) share them."""
import math
from typing import Dict, List, Sequence, Tuple

import torch

from .rewards import WeightedSum
from .wan_decode import decode_first_frames


def draw_reward_frames(num_frames: int, count: int, generator: torch.Generator) -> List[int]:
    """`count` distinct frame indices out of `num_frames`, sorted, drawn with `generator` (a step's seeded generator,
    so that a resumed run draws the same frames); all frames where `count` >= `num_frames`."""
    if count >= num_frames:
        return list(range(num_frames))
    return sorted(torch.randperm(num_frames, generator=generator)[:count].tolist())


def evenly_spaced_frames(num_frames: int, count: int) -> List[int]:
    """`count` frame indices spread evenly over `num_frames`, first and last included (one: the first); all frames
    where `count` >= `num_frames`. Evaluation scores the same frames of every video."""
    if count >= num_frames:
        return list(range(num_frames))
    return torch.linspace(0, num_frames - 1, count).round().long().tolist()


def frame_prompts(prompts: Sequence[str], n: int) -> List[str]:
    """Each prompt n times: the prompts of the flattened (B * n) frames of B videos."""
    return [p for p in prompts for _ in range(n)]


def score_frames(scorer, videos, prompts: Sequence[str], frame_ids: Sequence[int]) -> List[List[float]]:
    """The image score of frames `frame_ids` of each video, without gradient, through `scorer.score` on the 8-bit
    frames as evaluate.py scores images: uint8 videos (B, F, H, W, 3) -> B lists of n scores."""
    from PIL import Image

    n = len(frame_ids)
    scores = scorer.score([Image.fromarray(video[f]) for video in videos for f in frame_ids], frame_prompts(prompts, n))
    return [scores[k * n : (k + 1) * n] for k in range(len(videos))]


def score_videos(scorer, videos, prompts: Sequence[str], frame_ids: Sequence[int]) -> List[float]:
    """One score per video, without gradient: a reward that reads whole videos (`takes_videos`, e.g. the toy video
    judge) takes each uint8 video (F, H, W, 3) as it is, an image reward is averaged over frames `frame_ids`
    (`score_frames`), and a weighted sum scores each of its parts its own way."""
    if isinstance(scorer, WeightedSum):
        per_part = [[scorer.weights[part.name] * v for v in score_videos(part, videos, prompts, frame_ids)]
                    for part in scorer.scorers]
        return [math.fsum(values) for values in zip(*per_part)]
    if scorer.takes_videos:
        return scorer.score(list(videos), prompts)
    return [math.fsum(scores) / len(scores) for scores in score_frames(scorer, videos, prompts, frame_ids)]


def reads_videos(scorer) -> bool:
    """Whether `scorer`, or a part of its weighted sum, scores whole videos rather than frames."""
    return any(part.takes_videos for part in (scorer.scorers if isinstance(scorer, WeightedSum) else [scorer]))


def validation_frames(images: dict, prompts, seeds, count: int = 4):
    """Videos as a grid of images: `count` frames spread evenly over each video (first and last included) side by
    side, one column each, labelled with the prompt and the frame. images {row: (P, F, 3, H, W)} -> {row: (P * n, 3,
    H, W)}, and the columns' prompts and seeds."""
    shown = evenly_spaced_frames(next(iter(images.values())).shape[1], count)
    flat = {name: v[:, shown].flatten(0, 1) for name, v in images.items()}
    return (flat, [f"{p} (frame {k})" for p in prompts for k in shown], [s for s in seeds for _ in shown])


def frame_reward(scorer, frames: torch.Tensor, prompts: Sequence[str],
                 frame_ids: Sequence[int]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The image reward `scorer` of frames `frame_ids` of each video, averaged over those frames: frames (B, F, 3, H, W)
    in [0, 1] -> (B,), and each weighted part's (B,) (`scorer.parts`). Differentiable w.r.t. the frames."""
    chosen = frames[:, list(frame_ids)]  # (B, n, 3, H, W)
    batch, n = chosen.shape[:2]
    reward, parts = scorer.parts(chosen.flatten(0, 1), frame_prompts(prompts, n))  # (B * n,)

    def per_video(r):
        return r.float().view(batch, n).mean(1)

    return per_video(reward), {name: per_video(r) for name, r in parts.items()}


def temporal_consistency(frames: torch.Tensor) -> torch.Tensor:
    """Minus the mean squared difference of consecutive frames, per video: (B, F, 3, H, W) -> (B,), 0 for a still video.

    In pixels rather than in the reward model's image features: the frames are decoded anyway (a causal decode gives
    every frame up to the last one scored) and the scorer interface gives scores, not features. It penalises motion
    as well as flicker, so its weight should stay small next to the reward's."""
    return -(frames[:, 1:] - frames[:, :-1]).pow(2).flatten(1).mean(1)


def video_reward(vae, scorer, latents: torch.Tensor, prompts: Sequence[str], frame_ids: Sequence[int],
                 temporal: bool = False, checkpointed: bool = True):
    """The reward of the videos `latents` (B, C, f, h, w) with gradient to the latents: decode the frames up to the
    last of `frame_ids` (Wan's decoder is causal: `utils.wan_decode.decode_first_frames`, each latent frame under
    activation checkpointing when `checkpointed`), average the image reward over `frame_ids` (`frame_reward`) and,
    when `temporal`, the temporal-consistency term of the decoded frames (`temporal_consistency`; over frames 0 ... last
    of `frame_ids`, the ones decoded). Returns (reward (B,), parts {name: (B,)}, temporal (B,) or None)."""
    frames = decode_first_frames(vae, latents, max(frame_ids), checkpointed)
    reward, parts = frame_reward(scorer, frames, prompts, frame_ids)
    return reward, parts, temporal_consistency(frames) if temporal else None
