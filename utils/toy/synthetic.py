"""A tiny synthetic preference set in the Pick-a-Pic layout, for tests and the offline DPO quickstart.

Each pair is one random smooth image shown twice: the winner is systematically brighter (or redder) than
the loser, so a model trained with Diffusion-DPO on it should learn to prefer that property. Rows are
written with the Pick-a-Pic v2 columns `jpg_0`, `jpg_1` (PNG bytes), `label_0` (1: jpg_0 preferred, 0: jpg_1,
0.5: a tie) and `caption`; the winner sits in `jpg_0` or `jpg_1` at random.

    python -m utils.toy.synthetic --output_dir data/toy_prefs --num_pairs 64 --seed 0

`--format datasets` (default) writes a `save_to_disk` folder, `parquet` one parquet file, `jsonl` a
metadata.jsonl with image paths relative to it, beside the PNG files.
"""
import argparse
import io
import json
import os
from typing import Optional, Sequence

import numpy as np

from ..data import BUILTIN_PROMPT_SETS

PREFERENCES = ("brightness", "redness")
SHIFT = 0.2  # how far winner and loser move from the shared base image, in [0,1] pixel units


def _base_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random colour field (H, W, 3) in [0.25, 0.75]: a 4x4 grid of colours, bilinearly upsampled."""
    import torch
    import torch.nn.functional as F

    grid = torch.from_numpy(rng.uniform(0.25, 0.75, size=(1, 3, 4, 4)).astype(np.float32))
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=True)[0].permute(1, 2, 0).numpy()


def preference_pair(base: np.ndarray, prefer: str):
    """(winner, loser) float images in [0,1] that differ only in the preferred property."""
    if prefer == "brightness":
        up, down = base + SHIFT, base - SHIFT
    elif prefer == "redness":
        shift = np.array([SHIFT, -SHIFT / 2, -SHIFT / 2], dtype=np.float32)
        up, down = base + shift, base - shift
    else:
        raise ValueError(f"unknown preference {prefer!r}; expected one of {PREFERENCES}")
    return np.clip(up, 0, 1), np.clip(down, 0, 1)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_preference_rows(num_pairs: int, seed: int = 0, prefer: str = "brightness", tie_fraction: float = 0.0,
                              sizes: Sequence = ((64, 64),)):
    """A list of dicts with jpg_0, jpg_1 (PNG bytes), label_0 and caption. `sizes`: (height, width) choices
    per pair (several sizes exercise resize / crop and SDXL's size conditioning). Ties hold a winner/loser pair
    too, labelled 0.5, so training on them would be wrong: they must be dropped."""
    rng = np.random.default_rng(seed)
    prompts = BUILTIN_PROMPT_SETS["animals"]
    rows = []
    for _ in range(num_pairs):
        height, width = sizes[rng.integers(len(sizes))]
        winner, loser = preference_pair(_base_image(rng, height, width), prefer)
        tie = rng.uniform() < tie_fraction
        winner_first = bool(rng.integers(2))
        first, second = (winner, loser) if winner_first else (loser, winner)
        rows.append({"jpg_0": png_bytes(first), "jpg_1": png_bytes(second),
                     "label_0": 0.5 if tie else float(winner_first), "caption": prompts[rng.integers(len(prompts))]})
    return rows


def write_preference_set(rows, output_dir: str, fmt: str = "datasets") -> str:
    """Write rows as a `save_to_disk` folder, a parquet file, or PNGs + metadata.jsonl. Returns what to pass as
    --dataset_name."""
    import datasets

    os.makedirs(output_dir, exist_ok=True)
    if fmt == "jsonl":
        with open(os.path.join(output_dir, "metadata.jsonl"), "w") as f:
            for i, row in enumerate(rows):
                record = dict(row)
                for column in ("jpg_0", "jpg_1"):
                    name = f"{i:05d}_{column}.png"
                    with open(os.path.join(output_dir, name), "wb") as img:
                        img.write(row[column])
                    record[column] = name
                f.write(json.dumps(record) + "\n")
        return os.path.join(output_dir, "metadata.jsonl")
    features = datasets.Features({"jpg_0": datasets.Value("binary"), "jpg_1": datasets.Value("binary"),
                                  "label_0": datasets.Value("float64"), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_list(list(rows), features=features)
    if fmt == "parquet":
        path = os.path.join(output_dir, "train.parquet")
        ds.to_parquet(path)
        return path
    ds.save_to_disk(output_dir)
    return output_dir


def build_synthetic_preferences(output_dir: str, num_pairs: int = 64, seed: int = 0, prefer: str = "brightness",
                                tie_fraction: float = 0.0, sizes: Optional[Sequence] = None, fmt: str = "datasets") -> str:
    rows = synthetic_preference_rows(num_pairs, seed, prefer, tie_fraction, sizes or ((64, 64),))
    return write_preference_set(rows, output_dir, fmt)


def parse_size(text: str):
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 64x80, got {text!r}") from None
    return height, width


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_pairs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefer", default="brightness", choices=PREFERENCES, help="what makes the winner")
    parser.add_argument("--tie_fraction", type=float, default=0.0, help="share of pairs labelled 0.5 (ties), in [0,1]")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(64, 64)], metavar="HxW",
                        help="image sizes in pixels, one drawn per pair")
    parser.add_argument("--format", default="datasets", choices=["datasets", "parquet", "jsonl"])
    args = parser.parse_args(argv)
    path = build_synthetic_preferences(args.output_dir, args.num_pairs, args.seed, args.prefer, args.tie_fraction,
                                       args.sizes, args.format)
    print(f"wrote {args.num_pairs} pairs preferring {args.prefer} to {path}")


if __name__ == "__main__":
    main()
