"""Rewards of videos from the image rewards of utils/rewards.py: the image reward averaged over a subset of a video's
frames, and a temporal-consistency term. Training (train_draftp.py) and evaluation share them."""
from typing import Dict, List, Sequence, Tuple

import torch

from .wan_decode import decode_first_frames


def draw_reward_frames(num_frames: int, count: int, generator: torch.Generator) -> List[int]:
    """`count` distinct frame indices out of `num_frames`, sorted, drawn with `generator` (a step's seeded generator,
    so that a resumed run draws the same frames); all frames where `count` >= `num_frames`."""
    if count >= num_frames:
        return list(range(num_frames))
    return sorted(torch.randperm(num_frames, generator=generator)[:count].tolist())


def frame_reward(scorer, frames: torch.Tensor, prompts: Sequence[str],
                 frame_ids: Sequence[int]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The image reward `scorer` of frames `frame_ids` of each video, averaged over those frames: frames (B, F, 3, H, W)
    in [0, 1] -> (B,), and each weighted part's (B,) (`scorer.parts`). Differentiable w.r.t. the frames."""
    chosen = frames[:, list(frame_ids)]  # (B, n, 3, H, W)
    batch, n = chosen.shape[:2]
    reward, parts = scorer.parts(chosen.flatten(0, 1), [p for p in prompts for _ in range(n)])  # (B * n,)

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
