"""Pre-encode video-caption data (or video preference pairs) once for Wan 2.1 training: frames -> VAE posteriors,
captions -> UMT5 embeddings, in safetensors shards with a manifest; train_dpo.py then trains on the folder with no
video decoding, no VAE encoding and no text encoder loaded (as NVIDIA NeMo AutoModel trains Wan 2.1 on its
pre-encoded .meta files).

    python -m utils.preencode --pretrained_model_name_or_path Wan-AI/Wan2.1-T2V-1.3B-Diffusers \
        --dataset_name clips/captions.jsonl --num_frames 81 --height 480 --width 832 --output_dir data/wan-clips
    python -m utils.preencode ... --dataset_name "shards/clips-*.tar"  # webdataset: key.mp4 + key.txt (or key.json)
    accelerate launch --num_processes 8 -m utils.preencode ...      # each process encodes every 8th shard
    accelerate launch train_dpo.py --pretrained_model_name_or_path Wan-AI/Wan2.1-T2V-1.3B-Diffusers --sft \
        --dataset_name data/wan-clips --use_lora --mixed_precision bf16 ...

Rerun the same command to resume: finished shards are skipped, a shard cut off mid-write is written again.
"""
import glob
import io
import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from . import UsageError
from .cli import ArgumentParser
from .data import BadRow, open_image_dataset, require_columns
from .denoising import vae_moments
from .preencoded import EMPTY_PROMPT, FORMAT, MANIFEST, config_hash, module_fingerprint

logger = logging.getLogger("preencode")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", required=True, help="Wan 2.1 pipeline: hub id or local folder")
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default=None)
    p.add_argument("--dataset_name", required=True,
                   help="a captions file, one JSON object a line: {\"file\": \"clip001.mp4\", \"caption\": \"...\"} "
                        "(paths relative to the file's folder, or to --video_folder); webdataset .tar shards (a glob "
                        "such as 'shards/*.tar', one .tar file, or a folder of them; read in sorted order through "
                        "datasets' webdataset builder, which copies them into the datasets cache once); or any source "
                        "train_dpo.py reads (parquet / csv / save_to_disk folder / hub id) whose video column holds "
                        "paths or bytes")
    p.add_argument("--video_folder", default=None, help="folder that relative video paths start from")
    p.add_argument("--split", default="train", help="the split of a hub id or save_to_disk folder")
    p.add_argument("--cache_dir", default=None, help="datasets cache folder")
    p.add_argument("--video_column", default=None,
                   help="the video (path or bytes) of a row (default: file; webdataset: mp4, the member key.mp4)")
    p.add_argument("--caption_column", default=None,
                   help="default: caption; webdataset: txt (the member key.txt) if the shards have one, else "
                        "json.caption (the field 'caption' of key.json; any field f of it is the column json.f)")
    p.add_argument("--pairs", action="store_true",
                   help="preference pairs: --video_0_column, --video_1_column, --label_column and the caption; writes "
                        "latents_0_* / latents_1_* / label_0 for train_dpo.py's DPO (webdataset members "
                        "key.video_0.mp4 and a label in key.json: --video_0_column video_0.mp4 --label_column "
                        "json.label_0)")
    p.add_argument("--video_0_column", default="video_0")
    p.add_argument("--video_1_column", default="video_1")
    p.add_argument("--label_column", default="label_0", help="1: the first video preferred, 0: the second, 0.5: tie")
    p.add_argument("--num_frames", type=int, default=81, help="frames per video, 4k + 1 (Wan's VAE; 81: WanPipeline's)")
    p.add_argument("--frame_stride", type=int, default=1, help="keep every n-th frame from the first")
    p.add_argument("--height", type=int, default=None, help="pixels (default --resolution, else WanPipeline's 480)")
    p.add_argument("--width", type=int, default=None, help="pixels (default --resolution, else WanPipeline's 832)")
    p.add_argument("--resolution", type=int, default=None, help="square videos of this side")
    p.add_argument("--rows_per_shard", type=int, default=64, help="rows per safetensors shard (the unit of resume)")
    p.add_argument("--batch_size", type=int, default=1, help="videos per VAE / text-encoder call, per process")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES),
                   help="the encoders' dtype and the stored tensors' (float32 for exact comparisons)")
    p.add_argument("--max_bad_rows", type=int, default=None,
                   help="unreadable videos (or too short) are skipped and named; stop once more than N were skipped "
                        "by a process in this run (default: no limit)")
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    args.height = args.height or args.resolution or 480
    args.width = args.width or args.resolution or 832
    if args.num_frames < 1 or (args.num_frames - 1) % 4:
        raise UsageError(f"--num_frames must be 4k + 1 (Wan's VAE keeps the first frame and packs 4 into each latent "
                         f"frame after it), got {args.num_frames}")
    if args.height % 16 or args.width % 16 or args.height < 16 or args.width < 16:
        raise UsageError(f"--height / --width must be positive multiples of 16 (8x VAE, 2x2 patches), got "
                         f"{args.height} x {args.width}")
    if min(args.frame_stride, args.rows_per_shard, args.batch_size) < 1:
        raise UsageError("--frame_stride, --rows_per_shard and --batch_size must be >= 1")
    return args


# --------------------------------------------------------------------------- sources
def webdataset_shards(source: str):
    """The .tar shards that `source` names, sorted (the rows' order): a glob, one .tar file, or a folder holding .tar
    files. None when `source` is no webdataset (a captions file, parquet, save_to_disk folder, hub id ...)."""
    if glob.has_magic(source):
        return sorted(glob.glob(os.path.expanduser(source)))
    if source.lower().endswith(".tar"):
        return [source]
    if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, f))
                                         for f in ("dataset_dict.json", "state.json")):
        shards = sorted(glob.glob(os.path.join(glob.escape(source), "*.tar")))
        return shards or None
    return None


def open_videos(args):
    """(datasets.Dataset, base_dir, where): the source of --dataset_name, its video columns left undecoded (read_frames
    decodes them, so that a broken video names its row), and the column flags left at None set to the source's
    defaults."""
    import datasets

    shards = webdataset_shards(args.dataset_name)
    if shards is None:
        ds, base_dir, where = open_image_dataset(args.dataset_name, None, args.split, args.cache_dir)
        args.video_column = args.video_column or "file"
        args.caption_column = args.caption_column or "caption"
    else:
        where = f"--dataset_name {args.dataset_name}"
        if not shards:
            raise UsageError(f"{where}: no .tar file matches")
        try:
            ds = datasets.load_dataset("webdataset", data_files=shards, split="train", cache_dir=args.cache_dir)
        except Exception as e:
            raise UsageError(f"{where}: could not read the .tar shards as a webdataset ({type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[0][:200]})") from None
        ds = ds.flatten()  # a key.json member's fields become the columns json.<field>
        base_dir = None  # videos are the members' bytes
        args.video_column = args.video_column or "mp4"
        args.caption_column = args.caption_column or ("txt" if "txt" in ds.column_names else "json.caption")
    for column, feature in ds.features.items():
        if isinstance(feature, datasets.Video) and feature.decode:
            ds = ds.cast_column(column, datasets.Video(decode=False))  # {"bytes", "path"}
    return ds, base_dir, where


# --------------------------------------------------------------------------- videos
def read_frames(value, base_dir, num_frames: int, stride: int) -> torch.Tensor:
    """(num_frames, H, W, 3) uint8: frames 0, stride, 2 stride, ... of a video file (a path, relative to `base_dir`,
    or its bytes; a datasets Video / Image-style dict {"bytes", "path"}). BadRow when unreadable or too short."""
    import av

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(value))
    elif isinstance(value, str):
        source = value if os.path.isabs(value) or base_dir is None else os.path.join(base_dir, value)
    else:
        raise BadRow(f"expected a video path or bytes, got {type(value).__name__}")
    frames = []
    try:
        with av.open(source) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i % stride == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == num_frames:
                    break
    except (av.FFmpegError, OSError, IndexError) as e:  # IndexError: no video stream
        named = f" {value}" if isinstance(value, str) else ""  # the row's own entry: the error's text may be cut
        raise BadRow(f"unreadable video{named} ({type(e).__name__}: {str(e).strip()[:120]})") from None
    if len(frames) < num_frames:
        raise BadRow(f"{len(frames)} frames at --frame_stride {stride}, fewer than --num_frames {num_frames} "
                     f"(needs {(num_frames - 1) * stride + 1} frames)")
    return torch.from_numpy(np.stack(frames))


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (3, F, height, width) in [-1, 1], the VAE's input: scaled (bilinear, antialiased) so that
    the video covers height x width, then cropped at the centre."""
    x = frames.permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W)
    scale = max(height / x.shape[2], width / x.shape[3])
    size = (max(height, round(x.shape[2] * scale)), max(width, round(x.shape[3] * scale)))
    if size != tuple(x.shape[2:]):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return (x[:, :, top:top + height, left:left + width] * 2 - 1).permute(1, 0, 2, 3)


# --------------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_rows(parts, args, ds, rows, base_dir, video_columns):
    """Encode the readable rows of `rows`: (tensors of the shard, captions, source rows kept, [(row, reason)] bad)."""
    from .flow import MAX_SEQUENCE_LENGTH, encode_wan_prompts

    means, stds, labels, captions, kept, bad = [], [], [], [], [], []
    for start in range(0, len(rows), args.batch_size):
        videos = []
        for row in rows[start:start + args.batch_size]:
            item = ds[int(row)]
            try:
                caption = item[args.caption_column]
                if not isinstance(caption, str):
                    raise BadRow(f"caption is {type(caption).__name__}, not a string")
                pixels = [resize_center_crop(read_frames(item[c], base_dir, args.num_frames, args.frame_stride),
                                             args.height, args.width) for c in video_columns]
            except BadRow as e:
                bad.append((int(row), str(e)))
                logger.warning(f"row {row} skipped: {e}")
                continue
            videos.append(torch.stack(pixels))  # (n, 3, F, H, W)
            captions.append(caption)
            kept.append(int(row))
            if args.pairs:
                labels.append(float(item[args.label_column]))
        if videos:
            mean, std = vae_moments(parts.vae, torch.stack(videos))  # each (B, n, C, f, h, w) float32
            means.append(mean)
            stds.append(std)
    dtype = DTYPES[args.dtype]
    tensors = {}
    for v in range(len(video_columns)):
        for name, parts_list in (("mean", means), ("std", stds)):
            tensors[f"latents_{v}_{name}"] = (torch.cat(parts_list)[:, v] if parts_list else torch.zeros(0)).to(dtype)
    device = next(parts.text_encoders[0].parameters()).device
    embeds = encode_wan_prompts(parts.tokenizers[0], parts.text_encoders[0], captions, MAX_SEQUENCE_LENGTH["wan"],
                                device) if captions else torch.zeros(0, 0, 1)
    lengths = (embeds.abs().sum(-1) > 0).sum(-1)  # (N,) tokens before the zero padding
    # the rows past every prompt's end are zeros: keep the longest prompt's tokens only (a 20-token caption: 25x less)
    tensors["prompt_embeds"] = embeds[:, :int(lengths.max()) if len(lengths) else 0].to("cpu", dtype).contiguous()
    tensors["prompt_length"] = lengths.cpu()
    if args.pairs:
        tensors["label_0"] = torch.tensor(labels, dtype=torch.float32)
    return {k: v.cpu().contiguous() for k, v in tensors.items()}, captions, kept, bad


def settings_of(args, parts, latent_shape) -> dict:
    """What the shards' numbers depend on: a resume with other settings is refused, and training checks the VAE and
    text encoder (`utils.preencoded.check_encoders`)."""
    from .flow import MAX_SEQUENCE_LENGTH

    text_encoder = parts.text_encoders[0]
    return {
        "format": FORMAT, "family": parts.family, "model": args.pretrained_model_name_or_path,
        "revision": args.revision, "variant": args.variant,
        "vae": {"class": type(parts.vae).__name__, "fingerprint": module_fingerprint(parts.vae)},
        "text_encoder": {"class": type(text_encoder).__name__, "config": config_hash(text_encoder.config),
                         "fingerprint": module_fingerprint(text_encoder)},
        "source": args.dataset_name, "split": args.split, "pairs": args.pairs,
        "columns": {"video": [args.video_0_column, args.video_1_column] if args.pairs else [args.video_column],
                    "caption": args.caption_column, **({"label": args.label_column} if args.pairs else {})},
        "num_frames": args.num_frames, "frame_stride": args.frame_stride, "height": args.height, "width": args.width,
        "latent_shape": list(latent_shape), "dtype": args.dtype, "max_sequence_length": MAX_SEQUENCE_LENGTH["wan"],
        "rows_per_shard": args.rows_per_shard,
        # The posterior's mean and std, not one sample: training draws a fresh sample every time it sees a video, as
        # train_dpo.py does from pixels (and finetrainers from its precomputed moments); one fixed sample would train
        # on the same latent every epoch. Costs twice the disk of a sample.
        "latents": "VAE posterior mean and std, before Wan's latents_mean / latents_std normalisation",
    }


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def check_earlier_shards(folder: str, settings: dict):
    """Shards already in `folder` (a resumed run's) must have these settings: a rerun with another model, size or
    source would mix latents. Checked before anything is written."""
    from safetensors import safe_open

    for name in sorted(os.listdir(folder)):
        if name.startswith("shard-") and name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                if json.loads(f.metadata()["settings"]) != settings:
                    raise UsageError(f"--output_dir {folder} holds shards encoded with other settings (model, frames, "
                                     f"size, source, columns or dtype: {name}); use another --output_dir or empty it")


def write_shard(path: str, tensors: dict, settings: dict, captions, kept, bad):
    from safetensors.torch import save_file

    tmp = path + ".partial"  # rewritten by a rerun; renamed only when complete
    save_file(tensors, tmp, metadata={"settings": json.dumps(settings), "captions": json.dumps(captions),
                                      "rows": json.dumps(kept), "bad": json.dumps(bad)})
    os.replace(tmp, path)


def write_manifest(folder: str, settings: dict, num_shards: int):
    """The main process, once every shard is written: the settings, each shard's rows, the bad rows."""
    from safetensors import safe_open

    shards, bad = [], []
    for k in range(num_shards):
        with safe_open(os.path.join(folder, shard_name(k)), "pt") as f:
            meta = f.metadata()
        shards.append({"file": shard_name(k), "rows": len(json.loads(meta["rows"]))})
        bad += json.loads(meta["bad"])
    manifest = {**settings, "num_rows": sum(s["rows"] for s in shards), "bad_rows": bad, "shards": shards}
    with open(os.path.join(folder, MANIFEST + ".partial"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(os.path.join(folder, MANIFEST + ".partial"), os.path.join(folder, MANIFEST))
    return manifest


def main(args):
    from accelerate import PartialState
    from safetensors.torch import save_file

    from .models import freeze_frozen_parts, load_pipeline_parts, read_family
    from .flow import MAX_SEQUENCE_LENGTH, encode_wan_prompts

    state = PartialState()
    with state.main_process_first():  # one process converts the source into the datasets cache, the others reuse it
        ds, base_dir, where = open_videos(args)
    base_dir = args.video_folder or base_dir
    video_columns = [args.video_0_column, args.video_1_column] if args.pairs else [args.video_column]
    columns = {"--caption_column": args.caption_column, **({"--label_column": args.label_column} if args.pairs else {}),
               **{f"--{'video_%d' % i if args.pairs else 'video'}_column": c for i, c in enumerate(video_columns)}}
    require_columns(ds, columns, where)
    family, _ = read_family(args.pretrained_model_name_or_path, args.revision)
    if family != "wan":
        raise UsageError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: utils.preencode "
                         f"encodes videos for Wan 2.1 pipelines; this one is {family}")
    parts = load_pipeline_parts(args.pretrained_model_name_or_path, args.revision, args.variant)
    channels, frames = parts.latent_shape(args.height, args.num_frames)[:2]
    latent_shape = (channels, frames, args.height // parts.vae_scale_factor, args.width // parts.vae_scale_factor)
    settings = settings_of(args, parts, latent_shape)  # fingerprints of the float32 weights, before the cast
    freeze_frozen_parts(parts, state.device, DTYPES[args.dtype])
    os.makedirs(args.output_dir, exist_ok=True)
    check_earlier_shards(args.output_dir, settings)
    num_shards = -(-len(ds) // args.rows_per_shard)
    mine = range(state.process_index, num_shards, state.num_processes)
    if state.is_main_process:
        logger.info(f"{len(ds)} rows from {where} in {num_shards} shards of {args.rows_per_shard}; "
                    f"{state.num_processes} processes; {args.num_frames} frames every {args.frame_stride} at "
                    f"{args.height}x{args.width} -> latents {latent_shape}")
        empty = encode_wan_prompts(parts.tokenizers[0], parts.text_encoders[0], [""], MAX_SEQUENCE_LENGTH["wan"],
                                   state.device)
        save_file({"prompt_embeds": empty.to("cpu", DTYPES[args.dtype]).contiguous()},
                  os.path.join(args.output_dir, EMPTY_PROMPT))
    n_bad = 0
    for k in mine:
        path = os.path.join(args.output_dir, shard_name(k))
        if os.path.exists(path):  # complete: shards are renamed into place when written
            logger.info(f"{shard_name(k)} already written: skipped")
            continue
        rows = np.arange(k * args.rows_per_shard, min((k + 1) * args.rows_per_shard, len(ds)))
        tensors, captions, kept, bad = encode_rows(parts, args, ds, rows, base_dir, video_columns)
        write_shard(path, tensors, settings, captions, kept, bad)
        n_bad += len(bad)
        logger.info(f"{shard_name(k)}: {len(kept)} rows, {len(bad)} skipped")
        if args.max_bad_rows is not None and n_bad > args.max_bad_rows:
            raise UsageError(f"{n_bad} unreadable videos skipped by this process, more than --max_bad_rows "
                             f"{args.max_bad_rows} (each named above); fix or drop them, then rerun: finished shards "
                             f"are kept")
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = write_manifest(args.output_dir, settings, num_shards)
        logger.info(f"{manifest['num_rows']} rows encoded, {len(manifest['bad_rows'])} skipped; "
                    f"{os.path.join(args.output_dir, MANIFEST)}")


if __name__ == "__main__":
    import sys

    from .train.outcome import quiet_libraries

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()  # weight-loading bars and warnings
    try:
        main(parse_args())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
