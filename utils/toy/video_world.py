"""The toy video world: the image world's shapes (utils/toy/world.py) moving across short clips, and a judge that
reads count, colour, shape and the direction of motion back from the frames.

A scene is 1-3 copies of one shape in one colour on a plain background, all moving one way (left, right, up, down)
or standing still. Each shape keeps its own constant velocity (its speed drawn at random) and stays inside the
frame and apart from the others in every frame. Captions name count, colour, shape and motion always, the
background a third of the time:

    "two red circles moving left", "a video of a blue square standing still on a black background"

    python -m utils.toy.video_world --output_dir outputs/toyvideo-data --num_clips 2000 --seed 0 [--pairs]

writes clips/*.mp4 (H.264) and captions.jsonl ({"file", "caption"}, files relative to it); with --pairs, pairs for
video DPO instead: pairs.jsonl ({"video_0", "video_1", "label_0", "caption"}) where one clip of each pair shows the
caption and the other the same kind of scene moving another way, label_0 1.0 when video_0 is the right one.

The judge's video: a uint8 (F, H, W, 3) array, one (F, 3, H, W) float tensor in [0, 1] of a decoded batch
(`utils.sampling.decode_latents`'s (B, F, 3, H, W)), or a sequence of PIL frames. The `toyvideo_judge` reward
(`score(videos, prompts)`) takes one such video per prompt in place of score's PIL images.
"""
import argparse
import json
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import numpy as np

from .world import (BACKGROUNDS, COLORS, COUNT_WORDS, RESOLUTION, SHAPES, SUPERSAMPLE, _apart, background_words,
                    describe, draw_shapes, fill, find_objects, parse_prompt, place, score_reading, shape_of,
                    shape_radius, subject, supersample_grid)

DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0), "still": (0, 0)}  # (dy, dx)
MOTION_WORDS = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
                "still": "standing still"}
PREFIXES = ("", "", "a video of ", "a clip of ", "an animation of ")
NUM_FRAMES = 17  # 1 + 4k frames, the lengths Wan's VAE takes
FPS = 8
TRAVEL = (0.25, 0.45)  # how far a moving shape goes over the clip, as a fraction of the frame's side
STILL_BELOW = 0.1  # shapes whose mean centre moves less than this fraction of the side are read as still
# Smallest radius (px): a smaller triangle's outline reads as a circle's in many frames (the image judge misses
# mostly those), and a judge that fails clean clips would be a noisy reward
SMALLEST = 6.5
MIN_SIZE = 56  # the CLI's smallest frame: room for three moving shapes (measured: 300 clips at 56 px, failures at 48)
CRF = 10  # H.264 quality (0: lossless): 18 already changed 1 verdict in 300 clips


@dataclass(frozen=True)
class VideoScene:
    count: int
    color: str
    shape: str
    direction: str
    background: str


def video_prompt(count: int, color: str, shape: str, direction: str) -> str:
    """"two red circles moving left"."""
    return f"{subject(count, color, shape)} {MOTION_WORDS[direction]}"


def video_prompt_set() -> List[str]:
    """The 270 prompts of the `toyvideo` set: every count x colour x shape x direction (still included)."""
    return [video_prompt(n, c, s, d) for n in COUNT_WORDS for c in COLORS for s in SHAPES for d in DIRECTIONS]


def random_video_scene(rng: np.random.Generator) -> VideoScene:
    return VideoScene(int(rng.integers(1, 4)), str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)),
                      str(rng.choice(list(DIRECTIONS))), str(rng.choice(list(BACKGROUNDS))))


def video_caption(scene: VideoScene, rng: np.random.Generator) -> str:
    text = str(rng.choice(PREFIXES)) + video_prompt(scene.count, scene.color, scene.shape, scene.direction)
    return text + background_words(scene.background, rng)


def _paths(scene: VideoScene, num_frames: int, size: int, rng: np.random.Generator) -> list:
    """Each shape's (cy, cx, r, ty, tx) in supersampled pixels: its start, radius and travel over the clip, such
    that every shape stays inside the frame and apart from the others in every frame."""
    big = size * SUPERSAMPLE
    dy, dx = DIRECTIONS[scene.direction]
    fractions = np.linspace(0, 1, num_frames)

    def draw():
        r = shape_radius(scene.count, rng, SMALLEST)
        travel = rng.uniform(*TRAVEL) * big
        ty, tx = dy * travel, dx * travel
        margin = r + SUPERSAMPLE
        lo_y, hi_y = margin - min(ty, 0), big - margin - max(ty, 0)  # the start's range keeps the end inside too
        lo_x, hi_x = margin - min(tx, 0), big - margin - max(tx, 0)
        if hi_y <= lo_y or hi_x <= lo_x:
            return None
        return rng.uniform(lo_y, hi_y), rng.uniform(lo_x, hi_x), r, ty, tx

    def apart(a, b):
        return all(_apart(scene.shape, a[0] - b[0] + (a[3] - b[3]) * f, a[1] - b[1] + (a[4] - b[4]) * f, a[2] + b[2])
                   for f in fractions)

    return place(scene.count, draw, apart, scene)


def render_clip(scene: VideoScene, num_frames: int = NUM_FRAMES, size: int = RESOLUTION,
                rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """(num_frames, size, size, 3) uint8: the scene's shapes moving at constant velocities."""
    rng = rng if rng is not None else np.random.default_rng()
    paths = _paths(scene, num_frames, size, rng)
    grid = supersample_grid(size)
    return np.stack([draw_shapes(scene.shape, scene.color, scene.background,
                                 [(cy + ty * f, cx + tx * f, r) for cy, cx, r, ty, tx in paths], size, grid)
                     for f in np.linspace(0, 1, num_frames)])


# --------------------------------------------------------------------------- the judge
def as_frames(video) -> np.ndarray:
    """uint8 (F, H, W, 3) from any of the judge's video formats (module docstring)."""
    if isinstance(video, np.ndarray):
        return video
    if hasattr(video, "detach"):  # a (F, 3, H, W) tensor: rounded to uint8 as the image rewards' PIL images are
        from ..rewards import tensor_to_pil

        video = tensor_to_pil(video)
    return np.stack([np.asarray(frame.convert("RGB")) for frame in video])


def _mean_centre(objects: list) -> Optional[np.ndarray]:
    return np.mean([o.mean(0) for o in objects], axis=0) if objects else None


def read_motion(first: list, last: list, size: int) -> Optional[str]:
    """The direction the objects (find_objects' pixel lists) of the first frame moved to those of the last, None
    where either frame shows none. The mean centre's displacement is the mean of the blobs' own displacements
    whenever both frames show the same blobs, so no blob has to be matched: its dominant axis and sign give the
    direction; under STILL_BELOW of the side `size`, still."""
    a, b = _mean_centre(first), _mean_centre(last)
    if a is None or b is None:
        return None
    dy, dx = b - a
    if max(abs(dy), abs(dx)) < STILL_BELOW * size:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def read_clip(video) -> Dict[str, Optional[object]]:
    """count, color, background: the image judge's most common reading over the frames (one frame's can be off);
    shape: from the median fill of every object in every frame (a small triangle's or a compressed square's outline
    is misread in some frames); direction: from the first and last frames."""
    frames = as_frames(video)
    found = [find_objects(frame) for frame in frames]
    readings = [describe(frame, bg, objects) for frame, (bg, objects) in zip(frames, found)]
    out = {k: _most_common([r[k] for r in readings]) for k in ("count", "color", "background")}
    fills = [fill(o) for _, objects in found for o in objects]
    out["shape"] = shape_of(float(np.median(fills))) if fills else None
    out["direction"] = read_motion(found[0][1], found[-1][1], frames.shape[1])
    return out


def _most_common(values: list):
    return max(values, key=values.count)  # ties: the earliest frame's


def parse_video_prompt(prompt: str) -> Dict[str, Optional[object]]:
    """What a toy-video prompt asks for: count, colour, shape, background, direction (None where it is silent)."""
    want = {k: v for k, v in parse_prompt(prompt).items() if k != "region"}
    words = prompt.lower().replace(",", " ").split()
    want["direction"] = next((d for d in DIRECTIONS if d in words), None)
    return want


def clip_accuracy(video, prompt: str) -> Dict[str, float]:
    """1.0 / 0.0 for each attribute the prompt names (count, color, shape, background, direction), and `all`."""
    return score_reading(parse_video_prompt(prompt), read_clip(video))


# --------------------------------------------------------------------------- the clip set
def write_mp4(path: str, frames: np.ndarray, fps: int = FPS) -> None:
    """uint8 (F, H, W, 3) frames as an H.264 mp4 (4:4:4 chroma, CRF). 4:2:0, what every browser plays, blurs the
    colour of each 2x2 block: a 64 px triangle's tip then reads as a circle's outline (12 of 300 clips misjudged,
    against none here). Every ffmpeg-based reader (PyAV, torchvision, decord) decodes 4:4:4."""
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": str(CRF)})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv444p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def read_mp4(path: str) -> np.ndarray:
    """uint8 (F, H, W, 3): the decoded frames of a video file."""
    import av

    with av.open(path) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _other_direction(direction: str, rng: np.random.Generator) -> str:
    return str(rng.choice([d for d in DIRECTIONS if d != direction]))


def _write_clip(output_dir: str, name: str, frames: np.ndarray, fps: int) -> str:
    write_mp4(os.path.join(output_dir, name), frames, fps)
    return name


def write_clip_set(output_dir: str, num_clips: int, num_frames: int = NUM_FRAMES, size: int = RESOLUTION,
                   seed: int = 0, pairs: bool = False, fps: int = FPS) -> str:
    """Write the clips and captions.jsonl (or, with `pairs`, pairs.jsonl); returns the jsonl's path. Deterministic
    in the arguments."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(output_dir, "clips"), exist_ok=True)
    path = os.path.join(output_dir, "pairs.jsonl" if pairs else "captions.jsonl")
    with open(path, "w") as f:
        for i in range(num_clips):
            scene = random_video_scene(rng)
            text = video_caption(scene, rng)
            right = render_clip(scene, num_frames, size, rng)
            if not pairs:
                row = {"file": _write_clip(output_dir, f"clips/{i:05d}.mp4", right, fps), "caption": text}
            else:
                moved = replace(scene, direction=_other_direction(scene.direction, rng))
                wrong = render_clip(moved, num_frames, size, rng)
                right_first = bool(rng.integers(2))
                clips = (right, wrong) if right_first else (wrong, right)
                row = {f"video_{k}": _write_clip(output_dir, f"clips/{i:05d}_{k}.mp4", clip, fps)
                       for k, clip in enumerate(clips)}
                row.update(label_0=float(right_first), caption=text)
            f.write(json.dumps(row) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="write the toy video world's captioned clips (or video DPO pairs)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_clips", type=int, default=2000, help="clips (with --pairs: pairs)")
    parser.add_argument("--num_frames", type=int, default=NUM_FRAMES)
    parser.add_argument("--size", type=int, default=RESOLUTION, help="pixels (square, even)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=FPS)
    parser.add_argument("--pairs", action="store_true", help="write pairs.jsonl: a right and a wrong clip per caption")
    args = parser.parse_args(argv)
    if args.size < MIN_SIZE or args.size % 2:
        # three moving shapes of at least SMALLEST px radius kept apart: smaller frames have no room (48 px failed)
        parser.error(f"--size must be even and at least {MIN_SIZE} px, got {args.size}; resize at encoding time "
                     f"(python -m utils.preencode --resolution) for a smaller model input")
    path = write_clip_set(args.output_dir, args.num_clips, args.num_frames, args.size, args.seed, args.pairs, args.fps)
    print(f"wrote {args.num_clips} {'pairs' if args.pairs else 'clips'} to {path}")


if __name__ == "__main__":
    main()
