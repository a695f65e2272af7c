"""Preference pairs at training time: AI feedback ordering a pair, the VAE posterior caches, scanning for unreadable
rows, and the data-loader workers."""
import logging
import math
import os

import torch
from tqdm.auto import tqdm

from . import UsageError
from .data import CACHE_STEP, LatentCacheDataset, collate_images, scan_rows
from .denoising import vae_moments

logger = logging.getLogger(__name__)

# --latent_cache auto keeps the VAE posteriors of a run that sees its data more than once up to this size (CPU memory;
# SD1.5 at 512 px: 64 KiB per image and flip in bf16, so 4 GiB hold 32k pairs with both flips).
LATENT_CACHE_AUTO_BYTES = 4 * 2**30


@torch.no_grad()
def choose_winners(scorer, batch):
    """AI feedback: (B,) bool, True where the scoring model prefers the second image of the pair."""
    first, second = [p[0] for p in batch["pil"]], [p[1] for p in batch["pil"]]
    scores = scorer.score(first + second, batch["prompt"] * 2)  # one batched call for all 2B images
    n = len(first)
    return torch.tensor([scores[n + i] > scores[i] for i in range(n)])


PER_IMAGE_FIELDS = ("pixels", "original_size", "crop", "latent_mean", "latent_std")  # (B, 2, ...) in a batch


def swap_pairs(batch, swap):
    """Swap first and second image of the rows where `swap` (B,) is True, in every per-image field."""
    out = dict(batch)
    for key in PER_IMAGE_FIELDS:
        if key in batch:
            value = batch[key]
            out[key] = torch.where(swap.view(-1, *[1] * (value.dim() - 1)), value.flip(1), value)
    if "pil" in batch:
        out["pil"] = [p[::-1] if s else p for p, s in zip(batch["pil"], swap.tolist())]
    return out


def default_num_workers(num_processes: int, decodes_images: bool = True) -> int:
    """Data-loader workers per process when not given: decode images off the training process where that pays (4 or
    more cores per process, a platform that forks); none where nothing is decoded (latents cached up front)."""
    import multiprocessing

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", num_processes)))
    if not decodes_images or per_process < 4 or multiprocessing.get_start_method() == "spawn":
        return 0  # nothing to decode; workers would take cores from the step; spawned workers re-import everything
    return min(8, per_process // 2)


def latent_cache_applies(mode: str, num_rows: int, n_images: int, flips: int, latent_shape, dtype: torch.dtype,
                         batches_drawn: int, global_batch: int) -> bool:
    """A posterior cache: `mode` on, off, or (auto) on where it pays: the run draws more batches (`batches_drawn`)
    than one epoch holds (each epoch is a permutation cut into whole global batches), and the posteriors of every
    image (`n_images` per row) and flip (1 or 2) fit LATENT_CACHE_AUTO_BYTES."""
    if mode != "auto":
        return mode == "on"
    one_image = 2 * math.prod(latent_shape) * dtype.itemsize  # mean and std
    size = num_rows * n_images * flips * one_image
    return batches_drawn > num_rows // global_batch and size <= LATENT_CACHE_AUTO_BYTES


def scan_dataset(dataset, then: str, num_workers: int, accelerator):
    """--scan_data: every process reads its share of the rows (with `num_workers` data-loader workers); the main
    process lists the unreadable ones. `then` exit: stop here (exit code 0 if none, 2 if some); continue: train
    without them."""
    from accelerate.utils import gather_object

    share = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    found = scan_rows(dataset, share, num_workers, accelerator.is_local_main_process)
    found = sorted(gather_object(found))
    for _, reason in found:
        logger.warning(f"--scan_data: {reason}")
    logger.info(f"--scan_data: {len(found)} of {len(dataset)} rows are unreadable")
    if then == "exit":
        accelerator.end_training()
        if found:
            raise UsageError(f"--scan_data: {len(found)} of {len(dataset)} rows are unreadable (listed above)")
        raise SystemExit(0)
    keep = sorted(set(range(len(dataset))) - {position for position, _ in found})
    if not keep:
        raise UsageError(f"--scan_data continue: all {len(dataset)} rows are unreadable (listed above); check the "
                         f"image and caption columns and where image paths point")
    dataset.rows, dataset.winner_first = dataset.rows[keep], dataset.winner_first[keep]
    return dataset


def dataset_prompt(dataset, position):
    """The caption of a row, for the default validation prompts."""
    if isinstance(dataset, LatentCacheDataset):
        return dataset.prompts[position]
    value = dataset.ds[int(dataset.rows[position])][dataset.caption_column]
    return value if isinstance(value, str) else str(value[0])


@torch.no_grad()
def build_latent_cache(dataset, vae, scorer, batch_size: int, proportion_empty_prompts: float, seed: int,
                       show_progress: bool):
    """--cache_latents: every row through the VAE once, `batch_size` rows at a time (after the scoring model has
    ordered the pair)."""
    means, stds, originals, crops, prompts = [], [], [], [], []
    for start in tqdm(range(0, len(dataset), batch_size), disable=not show_progress, desc="caching latents"):
        items = [dataset[(i, CACHE_STEP, i)] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate_images(items)
        if "pil" in batch:
            batch = swap_pairs(batch, choose_winners(scorer, batch))
        mean, std = vae_moments(vae, batch["pixels"])
        means.append(mean.cpu())
        stds.append(std.cpu())
        originals.append(batch["original_size"])
        crops.append(batch["crop"])
        prompts += batch["prompt"]
    return LatentCacheDataset(torch.cat(means), torch.cat(stds), torch.cat(originals), torch.cat(crops), prompts,
                              dataset.rows, proportion_empty_prompts, seed)
