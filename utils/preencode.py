"""Pre-encode video-caption data (or video preference pairs) once for Wan 2.1 training: frames -> VAE posteriors,
captions -> UMT5 embeddings, in safetensors shards with a manifest; train_dpo.py then trains on the folder with no
video decoding, no VAE encoding and no text encoder loaded (as NVIDIA NeMo AutoModel trains Wan 2.1 on its
pre-encoded .meta files).

    python -m utils.preencode --pretrained_model_name_or_path Wan-AI/Wan2.1-T2V-1.3B-Diffusers \
        --dataset_name clips/captions.jsonl --num_frames 81 --height 480 --width 832 --output_dir data/wan-clips
    python -m utils.preencode ... --dataset_name "shards/clips-*.tar"  # webdataset: key.mp4 + key.txt (or key.json)
    python -m utils.preencode ... --buckets 480x832 832x480 624x624   # size buckets instead of --height / --width
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
import re
from fractions import Fraction

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
SIZE_MULTIPLE = 16  # pixels: Wan's VAE downsamples 8x and its transformer packs 2x2 latents into one token


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
    p.add_argument("--buckets", nargs="+", default=None, metavar="HxW",
                   help="size buckets in pixels instead of one size, e.g. 480x832 832x480 624x624 (multiples of 16): "
                        "each video goes to the bucket whose aspect ratio is nearest its own (on a tie, the one listed "
                        "first; pairs: the first video's bucket, both videos cropped to it), is scaled to cover it and "
                        "cropped at the centre; each shard holds one bucket, and train_dpo.py draws every batch from "
                        "one bucket")
    p.add_argument("--rows_per_shard", type=int, default=64, help="rows per safetensors shard (the unit of resume)")
    p.add_argument("--batch_size", type=int, default=1, help="videos per VAE / text-encoder call, per process")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES),
                   help="the encoders' dtype and the stored tensors' (float32 for exact comparisons)")
    p.add_argument("--max_bad_rows", type=int, default=None,
                   help="unreadable videos (or too short) are skipped and named; stop once more than N were skipped "
                        "by a process in this run (default: no limit)")
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    if args.buckets is not None:
        given = [f"--{f}" for f in ("height", "width", "resolution") if getattr(args, f)]
        if given:
            raise UsageError(f"{', '.join(given)} and --buckets: the buckets are the sizes; drop {', '.join(given)}")
        args.buckets = parse_buckets(args.buckets)
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
    if args.buckets is not None:
        args.height = args.width = None  # each bucket has its own size
    return args


def parse_buckets(values) -> list:
    """[(height, width)] of --buckets' HxW values, checked: both positive multiples of SIZE_MULTIPLE, no two buckets of
    one aspect ratio (the later one would never be chosen)."""
    def nearest(n):
        return max(SIZE_MULTIPLE, round(n / SIZE_MULTIPLE) * SIZE_MULTIPLE)

    buckets = []
    for value in values:
        m = re.fullmatch(r"(\d+)x(\d+)", value)
        if not m or any(int(n) % SIZE_MULTIPLE or int(n) < SIZE_MULTIPLE for n in m.groups()):
            right = f"e.g. {nearest(int(m[1]))}x{nearest(int(m[2]))}" if m else "e.g. 480x832"
            raise UsageError(f"--buckets {value}: each bucket is HEIGHTxWIDTH in pixels, both positive multiples of "
                             f"{SIZE_MULTIPLE} (Wan's 8x VAE times its 2x2 patches): {right}")
        buckets.append((int(m[1]), int(m[2])))
    for i, (h, w) in enumerate(buckets):
        for h2, w2 in buckets[:i]:
            if h * w2 == w * h2:
                raise UsageError(f"--buckets {h2}x{w2} and {h}x{w} have one aspect ratio: every video would go to the "
                                 f"first; keep one")
    return buckets


def bucket_name(bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def nearest_bucket(height: int, width: int, buckets) -> int:
    """The index of the bucket whose aspect ratio is nearest height / width: the smallest ratio of the two aspect
    ratios, larger over smaller (|log| distance: 2:1 is as far from 1:1 as 1:2 is), compared exactly as fractions; on a
    tie (a square video between 480x832 and 832x480) the bucket listed first."""
    def distance(bucket):
        a, b = height * bucket[1], width * bucket[0]
        return Fraction(max(a, b), min(a, b))

    return min(range(len(buckets)), key=lambda i: distance(buckets[i]))


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
def pack_rows(rows: dict, pairs: bool, n_videos: int, dtype, parts):
    """The tensors of one shard from the moments, captions and labels of its rows (`encode_rows`' lists)."""
    from .flow import MAX_SEQUENCE_LENGTH, encode_wan_prompts

    tensors = {}
    for v in range(n_videos):
        for name in ("mean", "std"):
            tensors[f"latents_{v}_{name}"] = (torch.cat(rows[name])[:, v] if rows[name] else torch.zeros(0)).to(dtype)
    captions = rows["captions"]
    device = next(parts.text_encoders[0].parameters()).device
    embeds = encode_wan_prompts(parts.tokenizers[0], parts.text_encoders[0], captions, MAX_SEQUENCE_LENGTH["wan"],
                                device) if captions else torch.zeros(0, 0, 1)
    lengths = (embeds.abs().sum(-1) > 0).sum(-1)  # (N,) tokens before the zero padding
    # the rows past every prompt's end are zeros: keep the longest prompt's tokens only (a 20-token caption: 25x less)
    tensors["prompt_embeds"] = embeds[:, :int(lengths.max()) if len(lengths) else 0].to("cpu", dtype).contiguous()
    tensors["prompt_length"] = lengths.cpu()
    if pairs:
        tensors["label_0"] = torch.tensor(rows["labels"], dtype=torch.float32)
    return {k: v.cpu().contiguous() for k, v in tensors.items()}


@torch.no_grad()
def encode_rows(parts, args, ds, rows, base_dir, video_columns):
    """Encode the readable rows of `rows`, `args.batch_size` source rows at a time (with --buckets, those rows' videos
    of each bucket in one VAE call). Returns ({bucket index: (tensors of its shard, captions, source rows kept)},
    [(row, reason)] bad); bucket 0 with no rows when none was readable (the file that records the bad rows)."""
    def no_rows():
        return {"mean": [], "std": [], "labels": [], "captions": [], "kept": []}

    sizes = args.buckets or [(args.height, args.width)]
    found, bad = {}, []
    for start in range(0, len(rows), args.batch_size):
        videos = {}  # bucket index -> [(n, 3, F, H, W)]
        for row in rows[start:start + args.batch_size]:
            item = ds[int(row)]
            try:
                caption = item[args.caption_column]
                if not isinstance(caption, str):
                    raise BadRow(f"caption is {type(caption).__name__}, not a string")
                frames = [read_frames(item[c], base_dir, args.num_frames, args.frame_stride) for c in video_columns]
            except BadRow as e:
                bad.append((int(row), str(e)))
                logger.warning(f"row {row} skipped: {e}")
                continue
            b = nearest_bucket(*frames[0].shape[1:3], sizes) if args.buckets else 0  # pairs: the first video's
            videos.setdefault(b, []).append(torch.stack([resize_center_crop(f, *sizes[b]) for f in frames]))
            kept = found.setdefault(b, no_rows())
            kept["captions"].append(caption)
            kept["kept"].append(int(row))
            if args.pairs:
                kept["labels"].append(float(item[args.label_column]))
        for b, batch in videos.items():
            mean, std = vae_moments(parts.vae, torch.stack(batch))  # each (B, n, C, f, h, w) float32
            found[b]["mean"].append(mean)
            found[b]["std"].append(std)
    found = found or {0: no_rows()}
    shards = {b: (pack_rows(found[b], args.pairs, len(video_columns), DTYPES[args.dtype], parts), found[b]["captions"],
                  found[b]["kept"]) for b in sorted(found)}
    return shards, bad


def settings_of(args, parts, latent_shape, bucket_shapes=None) -> dict:
    """What the shards' numbers depend on: a resume with other settings is refused, and training checks the VAE and
    text encoder (`utils.preencoded.check_encoders`). With --buckets, `latent_shape` is None and `bucket_shapes` holds
    each bucket's latent shape."""
    from .flow import MAX_SEQUENCE_LENGTH

    text_encoder = parts.text_encoders[0]
    buckets = {} if args.buckets is None else {"buckets": [
        {"size": bucket_name(b), "height": b[0], "width": b[1], "latent_shape": list(shape)}
        for b, shape in zip(args.buckets, bucket_shapes)]}
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
        "latent_shape": None if latent_shape is None else list(latent_shape), **buckets, "dtype": args.dtype,
        "max_sequence_length": MAX_SEQUENCE_LENGTH["wan"], "rows_per_shard": args.rows_per_shard,
        # The posterior's mean and std, not one sample: training draws a fresh sample every time it sees a video, as
        # train_dpo.py does from pixels (and finetrainers from its precomputed moments); one fixed sample would train
        # on the same latent every epoch. Costs twice the disk of a sample.
        "latents": "VAE posterior mean and std, before Wan's latents_mean / latents_std normalisation",
    }


def shard_name(k: int, bucket=None) -> str:
    """Shard k holds source rows k * rows_per_shard onwards; with --buckets, those of them in `bucket`."""
    return f"shard-{k:05d}.safetensors" if bucket is None else f"shard-{k:05d}-{bucket_name(bucket)}.safetensors"


def chunk_files(folder: str, k: int, bucketed: bool):
    """The shard files of source rows k * rows_per_shard onwards once all are written, else None. With --buckets they
    are one file per bucket that holds any of those rows, each naming all of them (their metadata's "chunk"): a run cut
    off between two of them writes them all again."""
    from safetensors import safe_open

    if not bucketed:
        return [shard_name(k)] if os.path.exists(os.path.join(folder, shard_name(k))) else None
    written = sorted(glob.glob(os.path.join(glob.escape(folder), f"shard-{k:05d}-*.safetensors")))
    if not written:
        return None
    with safe_open(written[0], "pt") as f:
        files = json.loads(f.metadata()["chunk"])
    return files if all(os.path.exists(os.path.join(folder, name)) for name in files) else None


def check_earlier_shards(folder: str, settings: dict):
    """Shards already in `folder` (a resumed run's) must have these settings: a rerun with another model, size or
    source would mix latents. Checked before anything is written."""
    from safetensors import safe_open

    for name in sorted(os.listdir(folder)):
        if name.startswith("shard-") and name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                theirs = json.loads(f.metadata()["settings"])
            if theirs != settings:
                differ = sorted(k for k in {**theirs, **settings} if theirs.get(k) != settings.get(k))
                raise UsageError(f"--output_dir {folder} holds shards encoded with other settings ({name}: "
                                 f"{', '.join(differ)}; e.g. model, frames, size or --buckets, source, columns or "
                                 f"dtype); use another --output_dir or empty it")


def write_shard(path: str, tensors: dict, settings: dict, captions, kept, bad, **bucketed):
    """One shard file; with --buckets, `bucketed` puts its "bucket" and the "chunk" of files written with it in its
    metadata."""
    from safetensors.torch import save_file

    tmp = path + ".partial"  # rewritten by a rerun; renamed only when complete
    save_file(tensors, tmp, metadata={"settings": json.dumps(settings), "captions": json.dumps(captions),
                                      "rows": json.dumps(kept), "bad": json.dumps(bad),
                                      **{k: json.dumps(v) for k, v in bucketed.items()}})
    os.replace(tmp, path)


def write_manifest(folder: str, settings: dict, num_shards: int):
    """The main process, once every shard is written: the settings, each shard's rows (and bucket, with its latent
    shape), the bad rows, and with --buckets how many rows each bucket holds."""
    from safetensors import safe_open

    buckets = {b["size"]: b for b in settings.get("buckets", [])}
    shards, bad = [], []
    for k in range(num_shards):
        for name in chunk_files(folder, k, bool(buckets)):
            with safe_open(os.path.join(folder, name), "pt") as f:
                meta = f.metadata()
            shards.append({"file": name, "rows": len(json.loads(meta["rows"]))})
            if buckets:
                bucket = json.loads(meta["bucket"])
                shards[-1].update(bucket=bucket, latent_shape=buckets[bucket]["latent_shape"])
            bad += json.loads(meta["bad"])
    manifest = {**settings, "num_rows": sum(s["rows"] for s in shards), "bad_rows": bad, "shards": shards}
    if buckets:
        manifest["buckets"] = [{**b, "rows": sum(s["rows"] for s in shards if s["bucket"] == b["size"])}
                               for b in settings["buckets"]]
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
    channels, frames = parts.latent_shape(args.height or SIZE_MULTIPLE, args.num_frames)[:2]
    shapes = [(channels, frames, h // parts.vae_scale_factor, w // parts.vae_scale_factor)
              for h, w in args.buckets or [(args.height, args.width)]]
    latent_shape = None if args.buckets else shapes[0]
    # fingerprints of the float32 weights, before the cast
    settings = settings_of(args, parts, latent_shape, shapes if args.buckets else None)
    freeze_frozen_parts(parts, state.device, DTYPES[args.dtype])
    os.makedirs(args.output_dir, exist_ok=True)
    check_earlier_shards(args.output_dir, settings)
    num_shards = -(-len(ds) // args.rows_per_shard)
    mine = range(state.process_index, num_shards, state.num_processes)
    if state.is_main_process:
        sizes = (f"{args.height}x{args.width} -> latents {latent_shape}" if not args.buckets else "buckets " +
                 ", ".join(f"{bucket_name(b)} -> latents {shape}" for b, shape in zip(args.buckets, shapes)))
        logger.info(f"{len(ds)} rows from {where} in {num_shards} shards of {args.rows_per_shard}"
                    f"{' (one file per bucket each)' if args.buckets else ''}; {state.num_processes} processes; "
                    f"{args.num_frames} frames every {args.frame_stride} at {sizes}")
        empty = encode_wan_prompts(parts.tokenizers[0], parts.text_encoders[0], [""], MAX_SEQUENCE_LENGTH["wan"],
                                   state.device)
        save_file({"prompt_embeds": empty.to("cpu", DTYPES[args.dtype]).contiguous()},
                  os.path.join(args.output_dir, EMPTY_PROMPT))
    n_bad = 0
    for k in mine:
        if chunk_files(args.output_dir, k, bool(args.buckets)):  # complete: shards are renamed into place when written
            logger.info(f"{shard_name(k) if not args.buckets else f'shard-{k:05d}-*'} already written: skipped")
            continue
        rows = np.arange(k * args.rows_per_shard, min((k + 1) * args.rows_per_shard, len(ds)))
        shards, bad = encode_rows(parts, args, ds, rows, base_dir, video_columns)
        if not args.buckets:
            [(tensors, captions, kept)] = shards.values()
            write_shard(os.path.join(args.output_dir, shard_name(k)), tensors, settings, captions, kept, bad)
            logger.info(f"{shard_name(k)}: {len(kept)} rows, {len(bad)} skipped")
        else:
            names = [shard_name(k, args.buckets[b]) for b in shards]
            for i, (b, (tensors, captions, kept)) in enumerate(shards.items()):  # the bad rows in the first file
                write_shard(os.path.join(args.output_dir, names[i]), tensors, settings, captions, kept,
                            bad if i == 0 else [], bucket=bucket_name(args.buckets[b]), chunk=names)
            logger.info(f"{shard_name(k)}: " + ", ".join(f"{bucket_name(args.buckets[b])} {len(kept)} rows"
                                                         for b, (_, _, kept) in shards.items()) +
                        f", {len(bad)} skipped")
        n_bad += len(bad)
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
