"""Prompt sets (DRaFT) and preference / image-caption datasets (Diffusion-DPO, SFT)."""
import io
import json
import logging
import os
from typing import Callable, List, Optional, Union

import numpy as np
import torch

from . import UsageError
from .plugins import load_plugins
from .seeding import step_generator

logger = logging.getLogger(__name__)

# Simple animal prompts, as the DRaFT and DDPO papers train on; written for this project.
ANIMALS = ["cat", "dog", "horse", "rabbit", "fox", "owl", "turtle", "elephant", "penguin", "deer", "bear", "parrot",
           "lion", "tiger", "frog", "goat", "duck", "hedgehog", "koala", "otter"]
ANIMAL_ACTIVITIES = ["sitting in a field", "riding a bike", "reading a book", "playing chess", "wearing a hat",
                     "in the snow", "on the beach", "drinking coffee"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]

BUILTIN_PROMPT_SETS = {
    "animals": [f"a photo of a {a}" for a in ANIMALS],
    "animal_activities": [f"a {a} {act}" for a in ANIMALS for act in ANIMAL_ACTIVITIES],
    "colored_animals": [f"a {c} {a}" for c in COLORS for a in ANIMALS],
}


def register_prompt_set(name: str, prompts: Union[List[str], Callable[[], List[str]]]):
    """Make `name` a prompt set of --prompts (plugins, utils/plugins.py): the prompts, or a function that returns them
    when the set is first asked for (a plugin need not import its modules when it is loaded)."""
    BUILTIN_PROMPT_SETS[name] = prompts if callable(prompts) else list(prompts)


def prompt_sets() -> List[str]:
    """The names --prompts accepts besides files and datasets: the built-in sets and the plugins'."""
    load_plugins()
    return list(BUILTIN_PROMPT_SETS)


def load_prompts(source: str, column: str = "prompt", split: str = "train", max_prompts: Optional[int] = None) -> List[str]:
    """Prompts from a built-in set name, a .txt (one per line) or .jsonl file (UTF-8), or a datasets id / folder.

    Blank lines of a .txt file are skipped. In a .jsonl file or a dataset, a prompt that is null or blank is dropped
    with one warning naming its lines (as a .txt file's blank lines: a missing caption, not a prompt to train on);
    a number, list or object where the prompt belongs is an error (the wrong column or format)."""
    if source in prompt_sets():
        if callable(BUILTIN_PROMPT_SETS[source]):
            BUILTIN_PROMPT_SETS[source] = list(BUILTIN_PROMPT_SETS[source]())
        prompts = list(BUILTIN_PROMPT_SETS[source])
    elif source.endswith(".txt"):
        prompts = [line.strip() for line in _read_utf8_lines(source) if line.strip()]
    elif source.endswith(".jsonl"):
        values = []
        for i, line in enumerate(_read_utf8_lines(source), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"--prompts {source} line {i} is not JSON ({e.msg}); a .jsonl file holds one "
                                     f"object per line, e.g. {{\"{column}\": \"a photo of a cat\"}}") from None
                if not isinstance(row, dict) or column not in row:
                    found = f"found {sorted(row)}" if isinstance(row, dict) else f"found a {type(row).__name__}"
                    raise UsageError(f"--prompts {source} line {i} has no {column!r} field ({found}); "
                                     f"set --prompt_column")
                values.append((f"line {i}", row[column]))
        prompts = _keep_prompts(values, f"--prompts {source}", column)
    else:
        prompts = _prompts_from_datasets(source, column, split)
    if max_prompts:
        prompts = prompts[:max_prompts]
    if not prompts:
        raise UsageError(f"--prompts {source} holds no prompts")
    return prompts


def _must_exist(path):
    if not os.path.isfile(path):
        raise UsageError(f"--prompts {path}: file not found; expected a .txt (one prompt per line) or .jsonl file, "
                         f"or a built-in set: {', '.join(prompt_sets())}")


def _read_utf8_lines(path: str):
    """The lines of a UTF-8 prompt file (a leading byte-order mark dropped; \\r\\n and \\r read as \\n). Another
    encoding is refused, not guessed: a fallback such as Latin-1 decodes any bytes, so a Windows-1252 or UTF-16 file
    would become other letters without a word, and only the user knows which encoding they wrote."""
    _must_exist(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UsageError(f"--prompts {path}: line {line} is not UTF-8 (byte 0x{data[e.start]:02x}); prompt files must "
                         f"be UTF-8 text: convert it, e.g. iconv -f latin1 -t utf-8 for a Latin-1 file") from None
    return io.StringIO(text, newline=None)


# the warnings load_prompts gave in this process: the scripts load the prompts more than once (flag checks, the run,
# the validation prompts) and each warning is to be read once
_PROMPT_WARNINGS = set()


def _keep_prompts(values, where: str, column: str) -> List[str]:
    """The string prompts of `values` [(where in the source, value)]: null and blank ones dropped with one warning,
    anything else but a string refused."""
    prompts, dropped = [], []
    for place, value in values:
        if value is None or (isinstance(value, str) and not value.strip()):
            dropped.append(place)
        elif isinstance(value, str):
            prompts.append(value)
        else:
            raise UsageError(f"{where} {place}: {column!r} holds {type(value).__name__} {str(value)[:60]!r}, "
                             f"expected a prompt string")
    if dropped:
        shown = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        message = f"{where}: dropped {len(dropped)} null or blank {column!r} prompts ({shown})"
        if message not in _PROMPT_WARNINGS:
            _PROMPT_WARNINGS.add(message)
            logger.warning(message)
    return prompts


def _prompts_from_datasets(source, column, split):
    ds = open_dataset(source, f"--prompts {source}", split)
    if column not in ds.column_names:
        raise UsageError(f"--prompts {source}: no column {column!r}; found {ds.column_names}; set --prompt_column")
    return _keep_prompts([(f"row {i}", p) for i, p in enumerate(ds[column])], f"--prompts {source}", column)


# =========================================================================== preference and image-caption datasets
# Diffusion-DPO / SFT data: Pick-a-Pic layout (two images, a label, a caption) or plain image-caption rows.
# Rows are addressed by keys (position, micro_step, global_row): every random choice of a sample (crop, flip,
# empty prompt) is drawn from a generator seeded by those numbers, so the batches of a run do not depend on
# the number of processes, on data-loader workers, or on whether the run was resumed.
PAIR_COLUMNS = ("jpg_0", "jpg_1")  # Pick-a-Pic v2 column names: the defaults of the column flags
LABEL_COLUMN, CAPTION_COLUMN = "label_0", "caption"
AUGMENT_TAG, PERMUTE_TAG = 104729, 7919  # make the data streams' seeds differ from the noise stream's
BUCKET_TAG = 6563  # the order of the size buckets' batches (BucketBatchSampler)
CACHE_STEP = -1  # micro-step of the keys used to build a latent cache: one fixed augmentation per row
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def _looks_local(source: str) -> bool:
    """A path rather than a hub id: written as one, or naming a data file. Hub ids may hold dots
    (`owner/name.v2`), so a dot alone does not make a path."""
    return source.startswith((".", "/", "~")) or source.lower().endswith((*FILE_BUILDERS, ".txt"))


def open_dataset(source: str, where: str, split: str = "train", cache_dir: Optional[str] = None,
                 imagefolder: bool = False):
    """A `datasets.Dataset` (lazy) from a folder written by `save_to_disk`, a .parquet / .jsonl / .json / .csv
    file, a hub id or a folder `datasets.load_dataset` reads (`imagefolder`: an image folder with
    metadata.jsonl). `where` names the flag and value in the one-line errors."""
    import datasets

    if (imagefolder or _looks_local(source)) and not os.path.exists(source):
        raise UsageError(f"{where}: no such file or folder")
    ext = os.path.splitext(source)[1].lower()
    if os.path.isfile(source) and ext not in FILE_BUILDERS:
        raise UsageError(f"{where}: unsupported file type {ext!r}; expected one of {', '.join(FILE_BUILDERS)}")
    try:
        if imagefolder:
            ds = datasets.load_dataset("imagefolder", data_dir=source, split=split, cache_dir=cache_dir)
        elif os.path.isdir(source) and any(os.path.exists(os.path.join(source, f)) for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(source)
        elif os.path.isfile(source):
            ds = datasets.load_dataset(FILE_BUILDERS[ext], data_files=source, split="train", cache_dir=cache_dir)
        else:
            ds = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise UsageError(f"{where}: could not load it as a dataset ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UsageError(f"{where}: no split {split!r}; found {list(ds)}; set --split")
        ds = ds[split]
    return ds


def open_image_dataset(dataset_name: Optional[str] = None, train_data_dir: Optional[str] = None, split: str = "train",
                       cache_dir: Optional[str] = None):
    """Open a dataset of images (lazily; no image is decoded). Returns (datasets.Dataset, base_dir, where).

    `dataset_name`: anything `open_dataset` reads (image columns hold bytes or paths; relative paths are
    relative to the file's folder). `train_data_dir`: an image folder with metadata.jsonl (datasets'
    imagefolder, as the diffusers text-to-image examples). `where` names the flag and value for error messages.
    """
    if not dataset_name and not train_data_dir:
        raise UsageError("pass --dataset_name (hub id, datasets folder, parquet or jsonl file) or --train_data_dir")
    source = dataset_name or train_data_dir
    where = f"{'--dataset_name' if dataset_name else '--train_data_dir'} {source}"
    imagefolder = bool(train_data_dir) and not dataset_name
    ds = open_dataset(source, where, split, cache_dir, imagefolder=imagefolder)
    looks_local = bool(train_data_dir) or _looks_local(source)
    base_dir = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else source if looks_local else None
    return ds, base_dir, where


def require_columns(ds, columns: dict, where: str):
    """`columns` maps flag -> column name; a missing one is a one-line error listing the columns found."""
    for flag, column in columns.items():
        if column not in ds.column_names:
            raise UsageError(f"{where} has no column {column!r} (found: {', '.join(ds.column_names)}); set {flag}")


def select_pairs(ds, label_column: Optional[str], max_samples: Optional[int] = None, seed: int = 0):
    """Rows to train on and their order. Returns (rows, winner_first, n_ties).

    label_0 > 0.5: jpg_0 won; < 0.5: jpg_1 won (the pair is swapped); = 0.5: a tie, dropped (Pick-a-Pic's
    "no preference"). Without a label column (a scoring model decides, or plain images) every row is kept in
    its stored order. `max_samples` keeps a seeded random subset, as the Diffusion-DPO train.py does.
    """
    if label_column is None:
        rows, winner_first, n_ties = np.arange(len(ds)), np.ones(len(ds), dtype=bool), 0
    else:
        try:
            labels = np.asarray(list(ds[label_column]), dtype=np.float64)
        except (TypeError, ValueError):
            raise UsageError(f"column {label_column!r} must hold numbers (1: first image preferred, 0: second, "
                             f"0.5: tie)") from None
        if labels.ndim != 1 or not np.isfinite(labels).all():
            raise UsageError(f"column {label_column!r} must hold one finite number per row")
        keep = labels != 0.5
        rows, winner_first, n_ties = np.nonzero(keep)[0], labels[keep] > 0.5, int((~keep).sum())
    if max_samples is not None and max_samples < len(rows):
        chosen = np.sort(np.random.default_rng(seed).permutation(len(rows))[:max_samples])
        rows, winner_first = rows[chosen], winner_first[chosen]
    return rows, winner_first, n_ties


def check_enough_rows(num_rows: int, per_process: int, num_processes: int, n_ties: int = 0, label_column: str = ""):
    """At least one global batch of usable rows; `n_ties` dropped ties are named, since a set of only ties (or
    nearly) is the usual cause. Called before any model loads, and again by GlobalBatchSampler."""
    if num_rows < per_process * num_processes:
        dropped = f" ({n_ties} pairs with a tie, {label_column} = 0.5, were dropped)" if n_ties else ""
        raise UsageError(f"the dataset has {num_rows} usable rows{dropped}, fewer than one global batch "
                         f"({num_processes} processes x --train_batch_size {per_process})")


# Rows read before any model loads, in order, until one is readable: the first row alone would make one unreadable
# row 0 stop a run that skips (and counts) unreadable rows everywhere else.
PROBE_ROWS = 16


def check_some_row_readable(dataset, where: str, limit: int = PROBE_ROWS):
    """Read the first rows of `dataset` (an ImagePairDataset) in order until one is readable (images decoded, caption
    checked), at most `limit`: a wrong column, image folder or caption type fails in seconds, in one line, before the
    models load. The unreadable rows read on the way are named in a warning each (training skips them, replaced by
    the next readable row, and counts them for --max_bad_rows); the error comes only when none of them is readable."""
    problems = []
    for position in range(min(limit, len(dataset))):
        problem = dataset.row_problem(position)
        if problem is None:
            for problem in problems:
                logger.warning(f"{problem}; training skips it (replaced by the next readable row)")
            return
        problems.append(problem)
    if len(problems) == len(dataset):
        raise UsageError(f"no row of the data set is readable; {problems[0]}; {where}: check the image and caption "
                         f"columns and where image paths point")
    raise UsageError(f"none of the first {len(problems)} of {len(dataset)} rows is readable; {problems[0]}; {where}: "
                     f"check the image and caption columns and where image paths point, or list every unreadable row "
                     f"with --scan_data exit")


def decode_image(value, base_dir: Optional[str] = None):
    """An RGB PIL image from encoded bytes, a path (relative to `base_dir`), a datasets Image dict or a PIL image."""
    from PIL import Image

    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, str):
        path = value if os.path.isabs(value) or base_dir is None else os.path.join(base_dir, value)
        image = Image.open(path)
    else:
        raise TypeError(f"expected image bytes or a path, got {type(value).__name__}")
    image.load()
    return image.convert("RGB")


def resize_crop_flip(image, resolution: int, random_crop: bool, flip: bool, u_top: float, u_left: float):
    """The Diffusion-DPO train.py transform, with the numbers SDXL's micro-conditioning needs.

    Resize the shortest side to `resolution` (bilinear), crop a square (center, or at offsets drawn from the
    uniforms u in [0,1)), flip horizontally if `flip`, map to [-1, 1]. Returns (pixels (3,R,R), original
    (h, w), crop (top, left)); crop is measured on the image as shown, so a flip mirrors the left offset.
    """
    import torchvision.transforms.functional as TF

    original = (image.height, image.width)
    image = TF.resize(image, resolution, interpolation=TF.InterpolationMode.BILINEAR)
    h, w = image.height, image.width
    if random_crop:
        top, left = int(u_top * (h - resolution + 1)), int(u_left * (w - resolution + 1))
    else:  # torchvision CenterCrop's offsets
        top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    pixels = TF.to_tensor(TF.crop(image, top, left, resolution, resolution))
    if flip:
        pixels, left = pixels.flip(-1), w - resolution - left
    return pixels * 2 - 1, original, (top, left)


def _pick_caption(value, u_empty: float, u_pick: float, proportion_empty: float, row: int, column: str):
    """(caption fed to the text encoder, the real caption). Lists of captions give one at random."""
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0:
        value = value[min(int(u_pick * len(value)), len(value) - 1)]
    if not isinstance(value, str):
        raise UsageError(f"row {row}: column {column!r} holds {type(value).__name__}, expected a caption string")
    return ("" if u_empty < proportion_empty else value), value


class ImagePairDataset(torch.utils.data.Dataset):
    """Pairs (winner first) or single images with their caption, decoded and transformed on access.

    Indexed by keys (position, micro_step, global_row) from `GlobalBatchSampler`; position indexes `rows`.
    `image_columns`: the two pair columns, or one column of plain image-caption data. `decode`: how many
    images to decode per row, winner first (1 for SFT on pairs: the loser is never read). `keep_pil` adds the
    untransformed images (a scoring model then picks the winner).
    """

    def __init__(self, ds, image_columns, caption_column: str, rows, winner_first, resolution: int,
                 random_crop: bool = False, hflip: bool = True, proportion_empty_prompts: float = 0.0, seed: int = 0,
                 decode: Optional[int] = None, keep_pil: bool = False, base_dir: Optional[str] = None):
        import datasets

        for column in image_columns:  # decode ourselves, so a broken image can name its row
            if isinstance(ds.features.get(column), datasets.Image):
                ds = ds.cast_column(column, datasets.Image(decode=False))
        self.ds, self.image_columns, self.caption_column = ds, list(image_columns), caption_column
        self.rows, self.winner_first = np.asarray(rows), np.asarray(winner_first, dtype=bool)
        self.resolution, self.random_crop, self.hflip = resolution, random_crop, hflip
        self.proportion_empty, self.seed, self.base_dir = proportion_empty_prompts, seed, base_dir
        self.decode, self.keep_pil = decode or len(self.image_columns), keep_pil

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        """The item of `key`. An unreadable row (image or caption) is replaced by the next readable row in `rows`,
        with the same random draws, so the batch keeps its size on every process (DDP) and stays a function of
        the key. The item's `bad_rows` (counted by the training loop) lists the drawn row when it was replaced:
        only that row, not the other unreadable rows the search passed over on its way to a readable one. Each
        position is drawn at most once per epoch (GlobalBatchSampler's permutation, on whichever process; the rows
        of an incomplete last global batch are not drawn that epoch), so an unreadable row is counted once per pass
        over the data, however many of its neighbours are unreadable too; listing the rows passed over would count
        a row again each time a neighbour's search crosses it.

        A 4th element of the key (SkipCachedSampler) lists, per image, whether its VAE posterior is cached: those
        images are not decoded (zeros in `pixels`, `original_size`, `crop`; `skipped` marks them)."""
        position, micro_step, global_row, *cached = key
        problem = None  # why the drawn row is unreadable
        for attempt in range(len(self.rows)):
            candidate = (position + attempt) % len(self.rows)
            # a replaced row is not the one whose images are cached: decode all of it
            skip = None if not cached else cached[0] if attempt == 0 else (False,) * len(cached[0])
            try:
                item = self._item(candidate, micro_step, global_row, skip)
            except BadRow as e:
                problem = problem or str(e)
                continue
            if problem is not None:
                logger.warning(f"{problem}; skipped (replaced by row {item['row']})")
            item["bad_rows"] = [] if problem is None else [int(self.rows[position])]
            return item
        raise UsageError(f"no row of the data set is readable; {problem}")

    def row_problem(self, position: int) -> Optional[str]:
        """Why the row at `position` cannot be trained on (one line), or None: `--scan_data`."""
        try:
            self._read(position)
        except BadRow as e:
            return str(e)
        return None

    def _columns(self, position: int):
        """The image columns of a row in the order the loss sees them (winner first), as many as are decoded."""
        return (self.image_columns if self.winner_first[position] else self.image_columns[::-1])[: self.decode]

    def _draws(self, micro_step: int, global_row: int):
        # A fixed number of draws, whatever the options: flip, crop top, crop left per image; empty prompt; caption.
        return torch.rand(3 * len(self.image_columns) + 2,
                          generator=step_generator(self.seed, AUGMENT_TAG, micro_step, global_row)).tolist()

    def image_keys(self, position: int, micro_step: int, global_row: int):
        """What decides each decoded image's pixels (center crop): (row, column, flipped), without decoding it."""
        u = self._draws(micro_step, global_row)
        return [(int(self.rows[position]), column, self.hflip and u[3 * i] < 0.5)
                for i, column in enumerate(self._columns(position))]

    def _read(self, position: int, skip=()):
        """(decoded images, winner first, None where `skip` says so; caption value) of a row, or BadRow naming the
        row and the column."""
        row = int(self.rows[position])
        record = self.ds[row]
        images = []
        for i, column in enumerate(self._columns(position)):
            if i < len(skip) and skip[i]:
                images.append(None)
                continue
            try:
                images.append(decode_image(record[column], self.base_dir))
            except Exception as e:
                raise BadRow(f"row {row}: column {column!r} is not a readable image ({type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[0][:120]})") from None
        caption = record[self.caption_column]
        if isinstance(caption, (list, tuple, np.ndarray)) and len(caption) > 0:
            bad = [c for c in caption if not isinstance(c, str)]
        else:
            bad = [] if isinstance(caption, str) else [caption]
        if bad:
            raise BadRow(f"row {row}: column {self.caption_column!r} holds {type(bad[0]).__name__}, "
                         f"expected a caption string")
        return images, caption

    def _item(self, position, micro_step, global_row, skip=None):
        row = int(self.rows[position])
        u = self._draws(micro_step, global_row)
        images, caption_value = self._read(position, skip or ())
        pixels, originals, crops = [], [], []
        for i, image in enumerate(images):
            if image is None:  # cached: the training process fills in its posterior, size and crop
                p, original, crop = torch.zeros(3, self.resolution, self.resolution), (0, 0), (0, 0)
            else:
                p, original, crop = resize_crop_flip(image, self.resolution, self.random_crop,
                                                     self.hflip and u[3 * i] < 0.5, u[3 * i + 1], u[3 * i + 2])
            pixels.append(p)
            originals.append(original)
            crops.append(crop)
        caption, prompt = _pick_caption(caption_value, u[-2], u[-1], self.proportion_empty, row, self.caption_column)
        item = {"pixels": torch.stack(pixels), "original_size": torch.tensor(originals), "crop": torch.tensor(crops),
                "caption": caption, "prompt": prompt, "row": row}
        if skip is not None:  # --latent_cache: which images the cache fills in, and the keys to file the others under
            item["skipped"] = torch.tensor([image is None for image in images])
            item["image_keys"] = self.image_keys(position, micro_step, global_row)
        if self.keep_pil:
            item["pil"] = images
        return item


class BadRow(Exception):
    """A row whose image or caption cannot be read (one line naming the row and the column)."""


class LatentCacheDataset(torch.utils.data.Dataset):
    """`--cache_latents`: the VAE moments of every row, computed once (one fixed crop/flip per image).

    Same keys and items as `ImagePairDataset`, with `latent_mean` / `latent_std` (n, C, h, w) instead of pixels;
    the empty-prompt draw still happens per step.
    """

    def __init__(self, latent_mean, latent_std, original_size, crop, prompts, rows, proportion_empty_prompts=0.0,
                 seed: int = 0):
        self.latent_mean, self.latent_std, self.original_size, self.crop = latent_mean, latent_std, original_size, crop
        self.prompts, self.rows, self.proportion_empty, self.seed = prompts, rows, proportion_empty_prompts, seed

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        position, micro_step, global_row = key
        u = torch.rand(2, generator=step_generator(self.seed, AUGMENT_TAG, micro_step, global_row)).tolist()
        prompt = self.prompts[position]
        return {"latent_mean": self.latent_mean[position], "latent_std": self.latent_std[position],
                "original_size": self.original_size[position], "crop": self.crop[position],
                "caption": "" if u[0] < self.proportion_empty else prompt, "prompt": prompt,
                "row": int(self.rows[position])}


class PosteriorCache:
    """`--latent_cache`: the VAE posterior (mean, std) of each image as first encoded, kept on the CPU in the VAE's
    dtype (the moments come out of the VAE in that dtype, so keeping them loses nothing), with the image's
    original size and crop; keyed by (row, column, flipped) of `ImagePairDataset.image_keys` (center crop only).
    The posterior sample is still drawn per step: only the encoder's work and the image decoding are saved."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.entries = dtype, {}

    def __contains__(self, key):
        return key in self.entries

    def moments(self, encode, batch, n: int, device):
        """The first `n` images of each row of `batch`: (mean, std) each (B, n, C, h, w) float32 on `device`, and
        the batch with the cached images' original sizes and crops filled in. Images the batch carries pixels for
        are encoded with `encode` ((1, 1, 3, R, R) -> moments) and cached. One image per encoder call: the batch
        size changes the kernels' summation order, so an image's moments would otherwise depend on the batch it
        first came in, and a resumed run (empty cache) would not continue the uninterrupted one exactly."""
        keys = [[tuple(key) for key in row_keys[:n]] for row_keys in batch["image_keys"]]  # pin_memory of older
        # torch versions turns tuples into lists
        skipped = batch["skipped"][:, :n] if "skipped" in batch else torch.zeros(len(keys), n, dtype=torch.bool)
        fresh = (~skipped).nonzero().tolist()  # [(b, i)] to encode
        if fresh:
            moments = [encode(batch["pixels"][b, i][None, None]) for b, i in fresh]  # each (1, 1, C, h, w)
            mean, std = (torch.cat([m[j][:, 0] for m in moments]) for j in (0, 1))  # (F, C, h, w)
            for k, (b, i) in enumerate(fresh):
                self.entries[keys[b][i]] = (mean[k].to("cpu", self.dtype), std[k].to("cpu", self.dtype),
                                            batch["original_size"][b, i].clone(), batch["crop"][b, i].clone())
        rows = [[self.entries[key] for key in row_keys] for row_keys in keys]
        mean, std = (torch.stack([torch.stack([e[j] for e in r]) for r in rows]).to(device).float() for j in (0, 1))
        out = dict(batch)
        for j, name in ((2, "original_size"), (3, "crop")):
            out[name] = batch[name].clone()
            out[name][:, :n] = torch.stack([torch.stack([e[j] for e in r]) for r in rows])
        return mean, std, out


class SkipCachedSampler(torch.utils.data.Sampler):
    """Wraps a batch sampler of `ImagePairDataset` keys: each key gets a 4th element, per image, whether the cache
    holds it, so the data-loader workers skip decoding those images. The keys are computed in this process, where
    the cache is; a key sent out before its image was cached (the workers run a few batches ahead) just decodes it."""

    def __init__(self, batch_sampler, dataset, cache: PosteriorCache):
        self.batch_sampler, self.dataset, self.cache = batch_sampler, dataset, cache

    def __iter__(self):
        for keys in self.batch_sampler:
            yield [(*key, tuple(k in self.cache for k in self.dataset.image_keys(*key))) for key in keys]


def collate_images(items):
    """Stack tensors (B, n, ...); keep strings, ints and PIL images as lists."""
    return {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k]) else [it[k] for it in items]
            for k in items[0]}


class _RowCheck(torch.utils.data.Dataset):
    """(position, why it is unreadable or None) for each position: the scan's items, decoded in the workers."""

    def __init__(self, dataset, positions):
        self.dataset, self.positions = dataset, positions

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, i):
        position = int(self.positions[i])
        return position, self.dataset.row_problem(position)


def scan_rows(dataset, positions, num_workers: int = 0, show_progress: bool = False):
    """`--scan_data`: read every row at `positions` (this process's share) with `num_workers` DataLoader workers.
    Returns [(position, reason)] of the unreadable rows."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(_RowCheck(dataset, positions), batch_size=None, num_workers=num_workers)
    return [(position, reason) for position, reason in tqdm(loader, total=len(positions), disable=not show_progress,
                                                            desc="scanning rows") if reason is not None]


def check_bad_rows(total: int, limit: Optional[int]):
    """`--max_bad_rows`: the run ends with one line once more rows than the limit were skipped (`total`: the drawn
    rows that were replaced, ImagePairDataset's `bad_rows`: each unreadable row once per pass over the data)."""
    if limit is not None and total > limit:
        raise UsageError(f"{total} unreadable rows skipped, more than --max_bad_rows {limit} (each is named in a "
                         f"warning above; a row counts once per pass over the data); fix or drop them (--scan_data "
                         f"continue lists and drops them up front)")


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This process's share of each global batch, as lists of keys (position, micro_step, global_row).

    Each epoch is a seeded permutation of the rows cut into global batches of num_processes x per_process
    (the last incomplete one dropped, as the Diffusion-DPO train.py); process p takes rows
    p*per_process:(p+1)*per_process of each. So one process with batch 2 sees the same pairs as two processes
    with batch 1, and starting at `start_micro_step` continues a run exactly (no batches to skip).
    """

    def __init__(self, num_rows: int, per_process: int, num_processes: int = 1, process_index: int = 0, seed: int = 0,
                 start_micro_step: int = 0):
        self.global_batch = per_process * num_processes
        check_enough_rows(num_rows, per_process, num_processes)
        self.num_rows, self.per_epoch, self.seed, self.start = num_rows, num_rows // self.global_batch, seed, start_micro_step
        self.mine = range(process_index * per_process, (process_index + 1) * per_process)
        self._epoch, self._permutation = None, None

    def global_positions(self, micro_step: int) -> torch.Tensor:
        epoch, k = divmod(micro_step, self.per_epoch)
        if self._epoch != epoch:
            self._epoch = epoch
            self._permutation = torch.randperm(self.num_rows, generator=step_generator(self.seed, PERMUTE_TAG, epoch))
        return self._permutation[k * self.global_batch : (k + 1) * self.global_batch]

    def __iter__(self):
        micro_step = self.start
        while True:
            positions = self.global_positions(micro_step)
            yield [(int(positions[r]), micro_step, r) for r in self.mine]
            micro_step += 1


class BucketBatchSampler(GlobalBatchSampler):
    """GlobalBatchSampler for rows of several sizes (pre-encoded video buckets, `groups`: each position's bucket):
    every global batch comes from one bucket, so its latents stack and share one noise shape on every process.

    Each epoch permutes the positions of each bucket (seeded by epoch and bucket) and cuts them into global batches,
    the last incomplete one of each bucket dropped (GlobalBatchSampler drops the epoch's); a seeded permutation of all
    these batches then orders the epoch. The batch of a micro-step is a function of (seed, micro_step), so resuming at
    `start_micro_step` and any number of processes with the same global batch see the same rows."""

    def __init__(self, groups, per_process: int, num_processes: int = 1, process_index: int = 0, seed: int = 0,
                 start_micro_step: int = 0):
        self.groups = np.asarray(groups)
        self.global_batch = per_process * num_processes
        self.per_epoch = int((np.bincount(self.groups) // self.global_batch).sum())
        if self.per_epoch == 0:
            raise UsageError(f"no bucket holds one global batch ({num_processes} processes x --train_batch_size "
                             f"{per_process}) of rows: every batch comes from one bucket")
        self.num_rows, self.seed, self.start = len(self.groups), seed, start_micro_step
        self.mine = range(process_index * per_process, (process_index + 1) * per_process)
        self._epoch, self._batches = None, None

    def global_positions(self, micro_step: int) -> torch.Tensor:
        epoch, k = divmod(micro_step, self.per_epoch)
        if self._epoch != epoch:
            batches = []
            for group in np.unique(self.groups):
                positions = torch.from_numpy(np.nonzero(self.groups == group)[0])
                g = step_generator(self.seed, PERMUTE_TAG, epoch, int(group))
                positions = positions[torch.randperm(len(positions), generator=g)]
                batches += [positions[i:i + self.global_batch]
                            for i in range(0, len(positions) - self.global_batch + 1, self.global_batch)]
            order = torch.randperm(len(batches), generator=step_generator(self.seed, BUCKET_TAG, epoch))
            self._epoch, self._batches = epoch, [batches[i] for i in order]
        return self._batches[k]


def next_batch(iterator):
    """next() on a DataLoader iterator; a UsageError raised in a worker comes back as its own one-line message."""
    try:
        return next(iterator)
    except UsageError as e:  # workers re-raise with the worker's traceback in the message: keep its last line
        raise UsageError(str(e).strip().splitlines()[-1].split("UsageError: ", 1)[-1]) from None
