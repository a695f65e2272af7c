"""Training on pre-encoded videos (written by `python -m utils.preencode`): the manifest, the check that its latents
come from the run's own VAE and text encoder, and the dataset of stored VAE posteriors and prompt embeddings that
train_dpo.py reads instead of pixels and captions."""
import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from . import UsageError
from .data import AUGMENT_TAG, check_enough_rows, select_pairs
from .seeding import step_generator

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
EMPTY_PROMPT = "empty_prompt.safetensors"  # the "" embedding: CFG dropout (--proportion_empty_prompts) in training
FORMAT = 1


def is_preencoded(source) -> bool:
    return bool(source) and os.path.isfile(os.path.join(source, MANIFEST))


def config_hash(config) -> str:
    """sha256 of a model config without its bookkeeping (`_name_or_path`, versions, dtype): the architecture."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    kept = {k: v for k, v in values.items()
            if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def module_fingerprint(module) -> str:
    """The config hash and 64 evenly spaced float32 values of every weight: two checkpoints of one architecture
    differ here, while the device, the folder or a hub id against its local copy do not. Taken before any cast."""
    h = hashlib.sha256(config_hash(module.config).encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().flatten()
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def read_manifest(folder: str) -> dict:
    with open(os.path.join(folder, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise UsageError(f"--dataset_name {folder}: manifest format {manifest.get('format')}, this code reads "
                         f"{FORMAT}; re-encode it with python -m utils.preencode")
    return manifest


def check_encoders(manifest: dict, folder: str, parts, args):
    """Refuse latents or prompt embeddings from other encoders than the run's model: the VAE by its weights (loaded
    for its latent scaling), the text encoder, which training does not load, by its config."""
    from transformers import AutoConfig

    again = (f"re-encode with python -m utils.preencode --pretrained_model_name_or_path "
             f"{args.pretrained_model_name_or_path}, or train the model it was encoded with ({manifest['model']})")
    if parts.family != manifest["family"]:
        raise UsageError(f"--dataset_name {folder} holds {manifest['family']} latents; --pretrained_model_name_or_path "
                         f"{args.pretrained_model_name_or_path} is {parts.name}: {again}")
    if module_fingerprint(parts.vae) != manifest["vae"]["fingerprint"]:
        flag = "--pretrained_vae_model_name_or_path" if args.pretrained_vae_model_name_or_path else \
            "--pretrained_model_name_or_path"
        raise UsageError(f"--dataset_name {folder} was encoded by another VAE than the one of {flag} "
                         f"{getattr(args, flag[2:])} (weights differ): {again}")
    text_config = AutoConfig.from_pretrained(parts.path, subfolder="text_encoder", revision=args.revision)
    if config_hash(text_config) != manifest["text_encoder"]["config"]:
        raise UsageError(f"--dataset_name {folder} was encoded by another text encoder than the one of "
                         f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: {again}")


@dataclass
class PreencodedData:
    """The shards of a pre-encoded folder and the rows a run trains on (ties dropped, winner first)."""

    folder: str
    manifest: dict
    index: list          # (shard file, row in shard) per kept row
    winner_first: np.ndarray
    captions: list
    n_ties: int
    buckets: np.ndarray = None  # per kept row, its bucket's index in the manifest's "buckets" (None: one size)

    def __len__(self):  # rows in the folder, before ties are dropped
        return self.manifest["num_rows"]

    @property
    def latent_shape(self):
        """(C, f, h, w) of every row; None for a folder of size buckets, whose batches each carry their own."""
        return None if self.buckets is not None else tuple(self.manifest["latent_shape"])

    @property
    def bucket_names(self) -> list:
        return [b["size"] for b in self.manifest.get("buckets", [])]

    def dataset(self, n_videos: int, proportion_empty: float, seed: int) -> "PreencodedDataset":
        from safetensors.torch import load_file

        empty = load_file(os.path.join(self.folder, EMPTY_PROMPT))["prompt_embeds"][0]
        return PreencodedDataset(self, n_videos, proportion_empty, seed, empty)


def open_preencoded(folder: str, max_samples, seed: int) -> PreencodedData:
    """Read the manifest and each shard's labels and captions (no latents); the rows and their order as
    `utils.data.select_pairs` chooses them for images: pairs with a tie dropped, pairs whose second video won
    swapped, `max_samples` a seeded random subset."""
    from safetensors import safe_open

    manifest = read_manifest(folder)
    bucket_index = {b["size"]: i for i, b in enumerate(manifest.get("buckets", []))}
    index, labels, captions, buckets = [], [], [], []
    for shard in manifest["shards"]:
        with safe_open(os.path.join(folder, shard["file"]), "pt") as f:
            shard_captions = json.loads(f.metadata()["captions"])
            if manifest["pairs"]:
                labels += f.get_tensor("label_0").tolist()
        index += [(shard["file"], i) for i in range(len(shard_captions))]
        captions += shard_captions
        if bucket_index:
            buckets += [bucket_index[shard["bucket"]]] * len(shard_captions)
    rows, winner_first, n_ties = (select_pairs({"label_0": labels}, "label_0", max_samples, seed) if manifest["pairs"]
                                  else select_pairs(index, None, max_samples, seed))
    return PreencodedData(folder, manifest, [index[r] for r in rows], winner_first, [captions[r] for r in rows], n_ties,
                          np.asarray(buckets, dtype=np.int64)[rows] if bucket_index else None)


def check_preencoded_args(args, data: PreencodedData):
    """What a pre-encoded folder rules out: its frames, size and posteriors are fixed, its pixels are gone."""
    where = f"--dataset_name {data.folder}"
    if not args.sft and not data.manifest["pairs"]:
        raise UsageError(f"{where} holds single videos: DPO trains on pairs (pre-encode with --pairs), or pass --sft")
    given = [f"--{f}" for f in ("choice_model", "image_column", "resolution", "scan_data", "train_data_dir")
             if getattr(args, f)]
    given += [f"--{f}" for f in ("random_crop", "cache_latents") if getattr(args, f)]
    if args.latent_cache == "on":
        given.append("--latent_cache on")
    if given:
        raise UsageError(f"{', '.join(given)}: {where} is pre-encoded (latents and prompt embeddings, frames and size "
                         f"fixed at encoding; no pixels): drop them")
    args.latent_cache = "off"  # the posteriors are stored already
    num_processes = int(os.environ.get("WORLD_SIZE", 1))
    check_enough_rows(len(data.index), args.train_batch_size, num_processes, data.n_ties, "label_0")
    if data.buckets is not None:
        check_bucket_rows(data.buckets, data.bucket_names, args.train_batch_size, num_processes, where)


def check_bucket_rows(buckets, names, per_process: int, num_processes: int, where: str):
    """Every global batch comes from one bucket: at least one bucket must hold a global batch; a bucket holding fewer
    rows is never trained on (named in a warning), and each bucket's last incomplete global batch is left out of each
    epoch (as `utils.data.GlobalBatchSampler` leaves out the epoch's)."""
    counts = np.bincount(buckets, minlength=len(names))
    global_batch = per_process * num_processes
    held = ", ".join(f"{name} {n}" for name, n in zip(names, counts))
    if counts.max() < global_batch:
        raise UsageError(f"{where}: every batch comes from one size bucket, and none holds a global batch "
                         f"({num_processes} processes x --train_batch_size {per_process}) of usable rows ({held})")
    small = [f"{name} ({n} rows)" for name, n in zip(names, counts) if 0 < n < global_batch]
    if small:
        logger.warning(f"{where}: buckets {', '.join(small)} hold fewer rows than a global batch of {global_batch}: "
                       f"never trained on")


class PreencodedDataset(torch.utils.data.Dataset):
    """Items keyed (position, micro_step, global_row) as `utils.data.ImagePairDataset`'s, read from the shards when
    asked: latent_mean / latent_std (n, C, f, h, w) float32 (winner first; SFT on pairs: the winner alone),
    prompt_embeds (L, D) padded back to the manifest's max_sequence_length with zeros (WanPipeline's padding), the
    empty prompt's in place of the caption's with probability `proportion_empty` (drawn per step, as the image
    datasets draw it)."""

    def __init__(self, data: PreencodedData, n_videos: int, proportion_empty: float, seed: int, empty_embeds):
        self.data, self.n, self.proportion_empty, self.seed = data, n_videos, proportion_empty, seed
        self.empty = empty_embeds  # (L, D)
        self.prompts = data.captions  # the default validation prompts' source (utils.pairs.dataset_prompt)
        self._files = {}

    def __len__(self):
        return len(self.data.index)

    def __getstate__(self):  # open shard handles stay in the process that opened them (data-loader workers)
        return {**self.__dict__, "_files": {}}

    def _shard(self, name):
        from safetensors import safe_open

        if name not in self._files:
            self._files[name] = safe_open(os.path.join(self.data.folder, name), "pt")
        return self._files[name]

    def __getitem__(self, key):
        position, micro_step, global_row = key[:3]
        name, i = self.data.index[position]
        f = self._shard(name)
        order = (0, 1) if self.data.winner_first[position] else (1, 0)
        mean, std = (torch.stack([f.get_slice(f"latents_{v}_{m}")[i] for v in order[:self.n]]).float()
                     for m in ("mean", "std"))
        u = torch.rand(1, generator=step_generator(self.seed, AUGMENT_TAG, micro_step, global_row)).item()
        if u < self.proportion_empty:
            embeds = self.empty
        else:
            length = int(f.get_slice("prompt_length")[i])
            embeds = torch.zeros_like(self.empty)  # (max_sequence_length, D), as WanPipeline pads
            embeds[:length] = f.get_slice("prompt_embeds")[i][:length]
        return {"latent_mean": mean, "latent_std": std, "prompt_embeds": embeds,
                "caption": "" if u < self.proportion_empty else self.data.captions[position],
                "prompt": self.data.captions[position], "row": position}
