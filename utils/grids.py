"""Labelled image grids: a title, a label over each column, a name beside each row and a caption (scores) under each
image, drawn with Pillow's built-in font (no font file needed; `ImageFont.load_default(size)`, Pillow >= 10.1).

Images narrower than MIN_CELL pixels are scaled up by a whole factor with nearest-neighbour, so a 64 px toy-world image
becomes a 128 px cell whose pixels are the original's, each repeated: `read_cells` gets the exact images back from the
PNG with the geometry that `save_grid` keeps in the grid's sidecar json. Videos make animated GIF grids
(`save_animated_grid`), every cell at the same frame.
"""
import json
import math
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import List, Optional, Sequence

import numpy as np

MIN_CELL = 128  # px: a readable cell width for a column label of a few words
GAP = 4  # px between cells and around the label areas
MAX_COLUMN_LINES = 3  # a long prompt over a column is wrapped to this many lines, then cut with "..."
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)
GIF_FRAME_MS = 60  # a GIF frame lasts whole hundredths of a second: about Wan's 16 frames per second


@lru_cache(maxsize=None)
def font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def font_size(cell_width: int) -> int:
    """13 px text on 128 px cells (about 20 characters a line), growing with the cell up to 28 px on 1024 px cells."""
    return max(13, min(28, cell_width // 36))


def line_height(f) -> int:
    return f.getbbox("Ag|")[3] + 3  # the tallest glyphs, plus a little leading


def fit(text: str, f, width: int, max_lines: int) -> List[str]:
    """`text` wrapped at spaces (and at explicit newlines) into lines no wider than `width` px; a word too long for a
    line is cut by characters; past `max_lines` the last line ends with "..."."""
    lines = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if f.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while f.getlength(word) > width and len(word) > 1:  # a word wider than the line: cut it
                cut = max(k for k in range(1, len(word)) if f.getlength(word[:k]) <= width or k == 1)
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and f.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "..."]
    return lines


@dataclass
class GridGeometry:
    """Where everything sits, in pixels of the grid image. Cell (r, c), the image scaled by `scale`, has its top-left
    corner at (left + c * pitch_x, top + r * pitch_y) and is cell_width x cell_height."""
    rows: int
    cols: int
    scale: int
    cell_width: int
    cell_height: int
    left: int  # width of the row-label column (+ gap)
    top: int  # height of the title and the column labels (+ gap)
    pitch_x: int
    pitch_y: int  # cell height + caption lines + gap
    width: int
    height: int

    def cell_box(self, r: int, c: int):
        x, y = self.left + c * self.pitch_x, self.top + r * self.pitch_y
        return x, y, x + self.cell_width, y + self.cell_height

    def to_dict(self) -> dict:
        return asdict(self)


class _Text:
    """The wrapped lines of every label, and the geometry they need."""

    def __init__(self, height, width, row_labels, col_labels, captions, title):
        rows, cols = len(row_labels), len(col_labels)
        if captions is not None and len(captions) != rows * cols:
            raise ValueError(f"{len(captions)} captions for {rows} x {cols} images")
        scale = max(1, math.ceil(MIN_CELL / width))
        cw, ch = width * scale, height * scale
        self.font = font(font_size(cw))
        self.line = line_height(self.font)
        self.columns = [fit(t, self.font, cw, MAX_COLUMN_LINES) for t in col_labels]
        # Row labels get a column as wide as their longest line, at most one cell, and as many lines as fit beside it.
        label_width = min(cw, max([math.ceil(self.font.getlength(t)) for t in row_labels for t in str(t).split("\n")] + [0]))
        self.rows = [fit(t, self.font, label_width, max(1, ch // self.line)) for t in row_labels]
        self.captions = [fit(t, self.font, cw, 4) for t in captions] if captions is not None else None
        self.title = fit(title, self.font, cols * (cw + GAP) + label_width, 1) if title else []
        caption_h = max(len(c) for c in self.captions) * self.line if self.captions else 0
        left = label_width + 2 * GAP if label_width else GAP
        top = (len(self.title) + max(len(c) for c in self.columns)) * self.line + GAP
        pitch_x, pitch_y = cw + GAP, ch + caption_h + GAP
        self.geometry = GridGeometry(rows, cols, scale, cw, ch, left, top, pitch_x, pitch_y,
                                     left + cols * pitch_x, top + rows * pitch_y)


def grid_geometry(height: int, width: int, row_labels: Sequence[str], col_labels: Sequence[str],
                  captions: Optional[Sequence[str]] = None, title: Optional[str] = None) -> GridGeometry:
    """The geometry `labelled_grid` gives images of height x width with these labels."""
    return _Text(height, width, row_labels, col_labels, captions, title).geometry


def labelled_grid(images, row_labels: Sequence[str], col_labels: Sequence[str],
                  captions: Optional[Sequence[str]] = None, title: Optional[str] = None):
    """A PIL image: `images` (rows * cols, 3, H, W) float in [0, 1] (a tensor or array), row-major, one row per
    row label; col_labels over the columns, row_labels to the left, captions[i] (may hold newlines) under image i."""
    from PIL import Image, ImageDraw

    images = np.asarray(images.detach().float().cpu() if hasattr(images, "detach") else images, dtype=np.float32)
    n, _, h, w = images.shape
    if n != len(row_labels) * len(col_labels):
        raise ValueError(f"{n} images for {len(row_labels)} rows x {len(col_labels)} columns")
    text = _Text(h, w, row_labels, col_labels, captions, title)
    g = text.geometry
    # uint8 as torchvision's save_image rounds, then each pixel repeated scale x scale
    pixels = np.clip(images * 255 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # (N, H, W, 3)
    pixels = pixels.repeat(g.scale, axis=1).repeat(g.scale, axis=2)
    canvas = Image.new("RGB", (g.width, g.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    def lines(x_center, y, block, anchor="ma"):
        for k, line in enumerate(block):
            draw.text((x_center, y + k * text.line), line, font=text.font, fill=INK, anchor=anchor)

    lines(g.width // 2, 0, text.title)
    for c, block in enumerate(text.columns):  # bottom-aligned, just over the first row
        x0, y0, x1, _ = g.cell_box(0, c)
        lines((x0 + x1) // 2, y0 - GAP - len(block) * text.line, block)
    for r, block in enumerate(text.rows):  # right-aligned, centred on the row's images
        _, y0, _, y1 = g.cell_box(r, 0)
        lines(g.left - GAP, (y0 + y1 - len(block) * text.line) // 2, block, anchor="ra")
    for i in range(n):
        x0, y0, x1, y1 = g.cell_box(*divmod(i, g.cols))
        canvas.paste(Image.fromarray(pixels[i]), (x0, y0))
        if text.captions:
            lines((x0 + x1) // 2, y1 + 1, text.captions[i])
    return canvas


def save_grid(stem: str, images, row_labels: Sequence[str], col_labels: Sequence[str],
              captions: Optional[Sequence[str]] = None, title: Optional[str] = None, sidecar: Optional[dict] = None):
    """Write <stem>.png (labelled_grid) and <stem>.json: `sidecar` plus "grid", the geometry that read_cells takes.
    Returns the PIL image (for the trackers)."""
    grid = labelled_grid(images, row_labels, col_labels, captions, title)
    _write_sidecar(stem, images, row_labels, col_labels, captions, title, sidecar)
    grid.save(stem + ".png")
    return grid


def save_animated_grid(stem: str, videos, row_labels: Sequence[str], col_labels: Sequence[str],
                       captions: Optional[Sequence[str]] = None, title: Optional[str] = None,
                       sidecar: Optional[dict] = None):
    """save_grid for videos (rows * cols, F, 3, H, W) in [0, 1]: <stem>.gif, whose frame k is the labelled grid of
    every video's frame k (all videos in step), and <stem>.json. Returns the grid's frames (PIL images)."""
    frames = [labelled_grid(videos[:, k], row_labels, col_labels, captions, title) for k in range(videos.shape[1])]
    _write_sidecar(stem, videos, row_labels, col_labels, captions, title, sidecar)
    save_gif(stem + ".gif", frames)
    return frames


def _write_sidecar(stem, images, row_labels, col_labels, captions, title, sidecar):
    geometry = grid_geometry(*images.shape[-2:], row_labels, col_labels, captions, title)
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({**(sidecar or {}), "grid": geometry.to_dict()}, f, indent=1)


def save_gif(path: str, frames, frame_ms: int = GIF_FRAME_MS) -> None:
    """A looping animated GIF of `frames` (uint8 (H, W, 3) arrays or PIL images). GIF keeps 256 colours per frame:
    a file to look at, not the scored pixels."""
    from PIL import Image

    frames = [Image.fromarray(f) if isinstance(f, np.ndarray) else f for f in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)


def read_gif(path: str, frame_ms: int = GIF_FRAME_MS) -> np.ndarray:
    """Every frame of a save_gif file, uint8 (F, H, W, 3): Pillow writes a run of identical frames as one frame
    shown for the run's time, which is repeated here."""
    from PIL import Image, ImageSequence

    frames = []
    with Image.open(path) as gif:
        for frame in ImageSequence.Iterator(gif):
            repeats = max(1, round(frame.info.get("duration", frame_ms) / frame_ms))
            frames += [np.asarray(frame.convert("RGB"))] * repeats
    return np.stack(frames)


def read_cells(image, geometry: dict) -> np.ndarray:
    """The images of a labelled grid (a PIL image or a path) back at their own size: (rows, cols, H, W, 3) uint8."""
    from PIL import Image

    g = GridGeometry(**geometry)
    grid = np.asarray((Image.open(image) if not hasattr(image, "size") else image).convert("RGB"))
    out = []
    for r in range(g.rows):
        row = []
        for c in range(g.cols):
            x0, y0, x1, y1 = g.cell_box(r, c)
            row.append(grid[y0:y1:g.scale, x0:x1:g.scale])
        out.append(np.stack(row))
    return np.stack(out)


def format_score(value: float) -> str:
    return f"{value:.4g}"
