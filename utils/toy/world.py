"""The toy world: a procedurally drawn, captioned image set, and a judge that reads a scene back from pixels.

The offline proving ground of this project (README, "The toy world"): small models in the SD1.5 layout are
trained on these images by the project's own scripts, and the alignment methods are then compared on them.

A scene is 1-3 copies of one shape (circle, square, triangle) in one colour, placed in one region of the
image (left, right, top, bottom half, or anywhere), on a plain background. Sizes and exact places are drawn at
random, so one caption has many correct images. Captions are plain English and name the count, colour and
shape always, the region and background only sometimes (what they leave out is free):

    "two red circles on the left on a black background", "a photo of a blue square", "three yellow triangles"

    python -m utils.toy.world --output_dir outputs/toyworld-data --num_images 20000 --seed 0

writes a `datasets` folder (`save_to_disk`) with columns `image` (64 px PNG), `text` (the caption) and the
scene's attributes (`count`, `color`, `shape`, `region`, `background`).
"""
import argparse
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import numpy as np

RESOLUTION = 64
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
          "purple": (140, 40, 180), "orange": (250, 140, 20)}
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}
REGIONS = ("anywhere", "left", "right", "top", "bottom")
REGION_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}  # one is said "a" / "an" in captions
PREFIXES = ("", "", "a photo of ", "an image of ", "a drawing of ")
SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down: anti-aliased edges, as a camera would see them


@dataclass(frozen=True)
class Scene:
    count: int
    color: str
    shape: str
    region: str
    background: str


def subject(count: int, color: str, shape: str) -> str:
    """"a red circle", "two blue squares"."""
    article = "an" if color[0] in "aeiou" else "a"
    return f"{COUNT_WORDS[count] if count > 1 else article} {color} {shape}{'s' if count > 1 else ''}"


def prompt_set() -> List[str]:
    """The 54 prompts of the built-in `toyworld` set: every count x colour x shape, nothing else said."""
    return [subject(n, c, s) for n in COUNT_WORDS for c in COLORS for s in SHAPES]


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(int(rng.integers(1, 4)), str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)),
                 str(rng.choice(REGIONS)), str(rng.choice(list(BACKGROUNDS))))


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """Always count, colour and shape; the region half of the time (when there is one), the background a third."""
    text = str(rng.choice(PREFIXES)) + subject(scene.count, scene.color, scene.shape)
    if scene.region != "anywhere" and rng.random() < 0.5:
        text += " " + REGION_WORDS[scene.region]
    return text + background_words(scene.background, rng)


def background_words(background: str, rng: np.random.Generator) -> str:
    """" on a black background" a third of the time, else nothing."""
    return f" on a {background} background" if rng.random() < 1 / 3 else ""


def _region_box(region: str, size: int):
    """(y0, x0, y1, x1) of the part of the image the shapes' centres and extents must stay in."""
    half = size // 2
    return {"anywhere": (0, 0, size, size), "left": (0, 0, size, half), "right": (0, half, size, size),
            "top": (0, 0, half, size), "bottom": (half, 0, size, size)}[region]


def _shape_mask(shape: str, cy: float, cx: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
    if shape == "square":
        side = r * 0.9  # a square of the same visual weight as a circle of radius r
        return (np.abs(yy - cy) <= side) & (np.abs(xx - cx) <= side)
    # upright triangle inscribed in the circle of radius r: apex at the top, base below the centre
    top, bottom = cy - r, cy + r / 2
    half_width = (yy - top) / (bottom - top) * r * np.sqrt(3) / 2
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)


def _apart(shape: str, dy: float, dx: float, r_sum: float) -> bool:
    """Whether two shapes whose centres are (dy, dx) apart leave a gap of over 2 px between them. Squares
    (half side 0.9 r) are tested as squares: their corners reach past the circle of radius r."""
    gap = 2 * SUPERSAMPLE
    if shape == "square":
        return max(abs(dy), abs(dx)) > 0.9 * r_sum + gap
    return dy ** 2 + dx ** 2 > (r_sum + gap) ** 2


def place(count: int, draw, apart, what) -> list:
    """`count` candidates of draw() (None: no room for that one) that are pairwise apart(a, b)."""
    placed = []
    for attempt in range(1000):
        if len(placed) == count:
            return placed
        if attempt % 100 == 99:
            placed = []  # the first shapes can leave no room for the rest (1 in ~5000 scenes of 3): start over
        candidate = draw()
        if candidate is not None and all(apart(candidate, other) for other in placed):
            placed.append(candidate)
    raise RuntimeError(f"could not place {what}")  # never seen: the restarts above always find room


def shape_radius(count: int, rng: np.random.Generator, smallest: float = 5.0) -> float:
    """A shape's radius in supersampled pixels: bigger shapes for fewer of them (5-9 px of the image, one: 5-12)."""
    return rng.uniform(smallest, 9.0 if count > 1 else 12.0) * SUPERSAMPLE


def supersample_grid(size: int):
    """(yy, xx): the supersampled canvas's pixel centres."""
    big = size * SUPERSAMPLE
    return np.mgrid[0:big, 0:big].astype(np.float32) + 0.5


def draw_shapes(shape: str, color: str, background: str, centres, size: int, grid=None) -> np.ndarray:
    """(size, size, 3) uint8: shapes at `centres` ((cy, cx, r) in supersampled pixels) on the background.
    `grid`: supersample_grid(size), passed in by callers that draw many frames."""
    big = size * SUPERSAMPLE
    yy, xx = grid if grid is not None else supersample_grid(size)
    canvas = np.empty((big, big, 3), np.float32)
    canvas[:] = BACKGROUNDS[background]
    for cy, cx, r in centres:
        canvas[_shape_mask(shape, cy, cx, r, yy, xx)] = COLORS[color]
    small = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return small.round().clip(0, 255).astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator, size: int = RESOLUTION) -> np.ndarray:
    """(size, size, 3) uint8: the scene's shapes at random, non-overlapping places within its region."""
    y0, x0, y1, x1 = (v * SUPERSAMPLE for v in _region_box(scene.region, size))

    def draw():
        r = shape_radius(scene.count, rng)
        margin = r + SUPERSAMPLE
        if y1 - y0 <= 2 * margin or x1 - x0 <= 2 * margin:
            return None
        return rng.uniform(y0 + margin, y1 - margin), rng.uniform(x0 + margin, x1 - margin), r

    def apart(a, b):
        return _apart(scene.shape, a[0] - b[0], a[1] - b[1], a[2] + b[2])

    centres = place(scene.count, draw, apart, scene)
    return draw_shapes(scene.shape, scene.color, scene.background, centres, size)


SHARDS = 16  # the set is drawn in this many independently seeded shards, so it can be written in parallel


def make_rows(num_images: int, seed, size: int = RESOLUTION):
    """Yield dataset rows: image (uint8 array), text, and the scene's attributes. Deterministic in `seed`
    (an int, or a list of ints such as [seed, shard])."""
    rng = np.random.default_rng(seed)
    for _ in range(num_images):
        scene = random_scene(rng)
        yield {"image": render(scene, rng, size), "text": caption(scene, rng), **asdict(scene)}


def _shard_rows(shards, num_images: int, seed: int, size: int):
    from PIL import Image

    for shard in shards:
        count = num_images // SHARDS + (shard < num_images % SHARDS)
        for row in make_rows(count, [seed, shard], size):
            yield {**row, "image": Image.fromarray(row["image"])}


def build_dataset(output_dir: str, num_images: int, seed: int = 0, size: int = RESOLUTION, num_proc: int = None) -> str:
    """Write the captioned set as a `datasets` folder (`load_from_disk`-able); returns the folder.
    The rows depend on `num_images` and `seed` only, not on the number of processes that draw them."""
    import os

    import datasets

    features = datasets.Features({
        "image": datasets.Image(), "text": datasets.Value("string"), "count": datasets.Value("int32"),
        "color": datasets.Value("string"), "shape": datasets.Value("string"), "region": datasets.Value("string"),
        "background": datasets.Value("string"),
    })
    num_proc = num_proc or min(SHARDS, os.cpu_count() or 1)
    ds = datasets.Dataset.from_generator(
        _shard_rows, features=features, num_proc=num_proc if num_proc > 1 else None,
        gen_kwargs={"shards": list(range(SHARDS)), "num_images": num_images, "seed": seed, "size": size})
    ds.save_to_disk(output_dir)
    return output_dir


# --------------------------------------------------------------------------- the judge
def _nearest(rgb: np.ndarray, table: Dict[str, tuple]) -> str:
    names = list(table)
    return names[int(np.argmin([np.sum((rgb - np.array(table[n], np.float32)) ** 2) for n in names]))]


def find_objects(img: np.ndarray, min_pixels: int = 12):
    """(background RGB, objects): the median border pixel, and the (y, x) pixel lists of the connected groups
    (8-neighbourhood) of at least `min_pixels` pixels that differ from it by more than 60 (RGB distance)."""
    from scipy import ndimage

    img = img.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    mask = np.sqrt(((img - bg) ** 2).sum(-1)) > 60
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    objects = [np.argwhere(labels == i) for i in range(1, n + 1)]
    return bg, [o for o in objects if len(o) >= min_pixels]


def fill(obj: np.ndarray) -> float:
    """How much of its bounding box an object ((y, x) pixel list) fills."""
    height, width = obj.max(0) - obj.min(0) + 1
    return len(obj) / float(height * width)


def shape_of(fill: float) -> str:
    """triangle ~0.5, circle ~0.79, square ~1."""
    return "triangle" if fill < 0.64 else "circle" if fill < 0.9 else "square"


def read_scene(image: np.ndarray, min_pixels: int = 12) -> Dict[str, Optional[object]]:
    """Read count, colour, shape and region back from an image (H, W, 3) uint8, without any learned model.

    Background: the median of the border pixels. Objects: connected groups (8-neighbourhood) of at least
    `min_pixels` pixels that differ from the background by more than 60 (RGB distance). Colour: the nearest
    palette colour to the objects' median pixel. Shape: from how much of its bounding box the largest object
    fills (triangle ~0.5, circle ~0.79, square ~1). Regions: the halves that hold all objects' centres.
    Good enough to tell whether a generated image shows what its prompt says (the tests check it against the
    drawn scenes); the fields are None where nothing was found.
    """
    return describe(image, *find_objects(image, min_pixels))


def describe(image: np.ndarray, bg: np.ndarray, objects: list) -> Dict[str, Optional[object]]:
    """read_scene's reading of the image from what find_objects found in it."""
    img = image.astype(np.float32)
    size = img.shape[0]
    out = {"count": len(objects), "color": None, "shape": None, "regions": [],
           "background": _nearest(bg, BACKGROUNDS)}
    if not objects:
        return out
    pixels = img[np.concatenate(objects)[:, 0], np.concatenate(objects)[:, 1]]
    out["color"] = _nearest(np.median(pixels, axis=0), COLORS)
    out["shape"] = shape_of(fill(max(objects, key=len)))
    centres = np.array([o.mean(0) for o in objects])  # (n, 2): y, x
    half = (size - 1) / 2
    out["regions"] = [region for region, inside in (("left", centres[:, 1] < half), ("right", centres[:, 1] > half),
                                                    ("top", centres[:, 0] < half), ("bottom", centres[:, 0] > half))
                      if inside.all()]
    return out


def parse_prompt(prompt: str) -> Dict[str, Optional[object]]:
    """What a toy-world prompt asks for: count, colour, shape, region, background (None where it is silent)."""
    words = prompt.lower().replace(",", " ").split()
    text = " ".join(words)
    count = next((n for n, w in COUNT_WORDS.items() if n > 1 and w in words), None)
    shape = next((s for s in SHAPES if s in words or s + "s" in words), None)
    color = next((c for c in COLORS if c in words), None)
    if count is None and shape is not None and shape in words:
        count = 1
    region = next((r for r, phrase in REGION_WORDS.items() if phrase in text), None)
    background = next((b for b in BACKGROUNDS if f"{b} background" in text), None)
    return {"count": count, "color": color, "shape": shape, "region": region, "background": background}


def prompt_accuracy(image: np.ndarray, prompt: str) -> Dict[str, float]:
    """1.0 / 0.0 for each attribute the prompt names (count, color, shape, region, background), and `all`
    (every named attribute right)."""
    return score_reading(parse_prompt(prompt), read_scene(image))


def score_reading(want: Dict[str, Optional[object]], got: Dict[str, object]) -> Dict[str, float]:
    """1.0 / 0.0 for each attribute `want` names (a region is right when it holds every shape), and `all`."""
    scores = {k: float(v in got["regions"] if k == "region" else got[k] == v) for k, v in want.items() if v is not None}
    scores["all"] = float(all(scores.values())) if scores else 0.0
    return scores


def main(argv=None):
    parser = argparse.ArgumentParser(description="write the toy world's captioned image set")
    parser.add_argument("--output_dir", required=True, help="the datasets folder to write")
    parser.add_argument("--num_images", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=RESOLUTION, help="pixels (square)")
    parser.add_argument("--num_proc", type=int, default=None,
                        help=f"processes drawing the shards (default: up to {SHARDS}, one per CPU); the rows are the same")
    args = parser.parse_args(argv)
    build_dataset(args.output_dir, args.num_images, args.seed, args.resolution, args.num_proc)
    print(f"wrote {args.num_images} images to {args.output_dir}")


if __name__ == "__main__":
    main()
