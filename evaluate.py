"""Score a base model and trained outputs on one prompt set: rewards, diversity, tables, a plot and image grids.

Every model draws the same images' starting noise: image j of every prompt starts from
`torch.randn(1, C, h, w, generator=torch.Generator().manual_seed(seed + j))`, which is what a stock diffusers
pipeline called with `generator=torch.Generator().manual_seed(seed + j)` uses, whatever the batch size or the
number of processes. Diversity is the mean pairwise LPIPS between the N images of a prompt, averaged over
prompts (the DRaFT+ measure; `--diversity pixel` is a feature-free stand-in that needs no download).

Offline, tiny model, two outputs of train_draftp.py (a weight-free reward, the feature-free diversity):

    python evaluate.py --pretrained_model_name_or_path tiny-sd --models quickstart=outputs/quickstart \
        --prompts colored_animals --max_prompts 8 --num_seeds 4 --num_inference_steps 20 \
        --reward_models color_match brightness --diversity pixel --output_dir outputs/eval-quickstart

SD1.5 with PickScore and HPSv2.1, LoRA and full-UNet outputs, prompts split across 8 GPUs:

    accelerate launch --num_processes 8 evaluate.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --models draftp=outputs/draftp-sd15 dpo=outputs/dpo-sd15 --prompts animals --num_seeds 8 \
        --reward_models pickscore hpsv2.1 --mixed_precision bf16 --batch_size 16 --output_dir outputs/eval-sd15

Writes to --output_dir: results.csv and results.md (one row per model: mean and std of each reward over all
images, diversity), reward_vs_diversity.png, grids/<model>.png (rows = prompts, columns = seeds) and comparison.png
(rows = models, columns = prompts at the first seed), labelled, each image's scores under it, with a sidecar json
each; images/<model>/p<prompt>_s<seed>.png, scores.jsonl (one line per image) and args.json.

Video models (Wan 2.1) draw --num_frames frames per prompt x seed, seeded as images are (noise (1, C, f, h, w)). Each
image reward is the mean of its score on --reward_frames evenly spaced frames (default all; scores.jsonl keeps each
frame's under '<reward>_frames'), judges such as toyvideo_acc take the whole video, and diversity compares the middle
frames. They write videos/<model>/p<prompt>_s<seed>.gif and, for each of the first --grid_prompts prompts,
grids/p<prompt>.gif (rows = seeds, columns = models, all videos at the same frame) and comparison.gif.

    python evaluate.py --pretrained_model_name_or_path tiny-wan --models lora=outputs/draftp-tiny-wan \
        --prompts toyvideo --max_prompts 8 --num_frames 5 --resolution 32 --reward_models brightness \
        --judges toyvideo_acc --diversity pixel --output_dir outputs/eval-tiny-wan
"""
import csv
import json
import logging
import math
import os
import re

import numpy as np
import torch
from tqdm.auto import tqdm

from utils import UsageError
from utils.cli import ArgumentParser
from utils.data import load_prompts
from utils.flow import resolve_video_flags
from utils.grids import format_score, read_gif, save_animated_grid, save_gif, save_grid
from utils.models import (LORA_WEIGHT_NAME, build_pipeline, encode_prompts, freeze_frozen_parts, load_pipeline_parts,
                          read_family, warn_long_prompts, weights_subfolder)
from utils.rewards import list_judges, list_rewards, load_judge, load_reward, parse_reward_spec, to_uint8
from utils.sampling import (SAMPLING_DEFAULTS_HELP, cfg_conditioning, decode_latents, resolve_sampling_defaults,
                            sample_latents, sampling_setup)
from utils.train import run_main
from utils.train.cli import (HelpFormatter, add_model_args, add_prompt_args, add_reward_model_paths, add_video_args,
                             parse_name_paths)
from utils.train.distributed import check_mixed_precision, compute_dtype
from utils.train.outcome import save_args
from utils.video_rewards import evenly_spaced_frames, reads_videos, score_frames, score_videos

logger = logging.getLogger("evaluate")
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")  # model names become file names


# --------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = add_model_args(parser, "models", "the base pipeline, always evaluated, as 'base': ")
    g.add_argument("--models", nargs="*", default=[], metavar="NAME=PATH",
                   help="trained outputs of train_draftp.py / train_dpo.py (or a checkpoint-N folder): a LoRA folder "
                        f"holding {LORA_WEIGHT_NAME}, or a full-UNet output holding unet/ (SD3 / FLUX: transformer/)")
    g = add_prompt_args(parser, "prompts and seeds")
    g.add_argument("--max_prompts", type=int, default=None, help="use the first N prompts only")
    g.add_argument("--num_seeds", type=int, default=4, help="images per prompt (seeds --seed ... --seed + N - 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of each prompt's first image")
    g = parser.add_argument_group("scoring")
    g.add_argument("--reward_models", nargs="+", default=["pickscore"], metavar="NAME",
                   help=f"one or more scoring models, each its own column: {', '.join(list_rewards())} "
                        "(or a weighted sum such as 'pickscore:1.0,aesthetic:0.05')")
    add_reward_model_paths(g)
    g.add_argument("--diversity", default="lpips", choices=["lpips", "pixel", "none"],
                   help="lpips: mean pairwise LPIPS (AlexNet) of a prompt's images (the DRaFT+ measure); pixel: mean "
                        "pairwise RMS pixel difference (no weights needed); none: skip")
    g.add_argument("--judges", nargs="*", default=[], metavar="NAME",
                   help=f"also judge each image against its prompt from its pixels, one column each; registered judges: "
                        f"{', '.join(list_judges()) or 'none'} (toyworld_acc: count, colour, shape, region and background "
                        f"of a toy-world prompt, 1 if all that it names is right)")
    g.add_argument("--toyworld_accuracy", action="store_true", help="the same as --judges toyworld_acc")
    g.add_argument("--lpips_weights", default=None, metavar="PATH",
                   help="torchvision AlexNet state dict for LPIPS's trunk (default: torch hub's cache, downloaded once)")
    g = parser.add_argument_group("sampling")
    g.add_argument("--num_inference_steps", type=int, default=None,
                   help=f"DDIM steps (SD3 / FLUX: Euler steps; {SAMPLING_DEFAULTS_HELP['num_inference_steps']})")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help=f"classifier-free guidance scale (1 = no guidance); FLUX.1-dev: its guidance embedding's value "
                        f"({SAMPLING_DEFAULTS_HELP['guidance_scale']})")
    g.add_argument("--resolution", type=int, default=None, help="pixels; default: the model's own (512 SD1.5, 1024 SDXL)")
    g.add_argument("--batch_size", type=int, default=8, help="images per UNet call, per process")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="dtype of every model (default: what `accelerate config` says)")
    add_video_args(parser, "each image reward is averaged over this many evenly spaced frames of each video, first "
                           "and last included; default: all (a reward that reads whole videos, such as toyvideo_judge, "
                           "takes every frame)")
    g = parser.add_argument_group("output")
    g.add_argument("--output_dir", default="outputs/eval", help="where the tables, plot, grids and images go")
    g.add_argument("--grid_prompts", type=int, default=16,
                   help="the first N prompts: rows of each grids/<model>.png, columns of comparison.png")
    g.add_argument("--verbose", action="store_true",
                   help="show the libraries' warnings and weight-loading progress bars (hidden by default)")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be checked before a model is loaded."""
    for name in ("num_inference_steps", "batch_size", "num_seeds", "grid_prompts", "num_frames", "reward_frames"):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # None: the family's default
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir} is a file; pass a folder (it is made if missing)")
    if args.diversity != "none" and args.num_seeds < 2:
        raise UsageError(f"--diversity {args.diversity} compares a prompt's images in pairs: --num_seeds must be >= 2, "
                         f"got {args.num_seeds} (or pass --diversity none)")
    for spec in args.reward_models:
        parse_reward_spec(spec)  # unknown names fail here, listing the valid ones
    if len(set(args.reward_models)) != len(args.reward_models):
        raise UsageError(f"--reward_models lists a scoring model twice: {args.reward_models}")
    args.reward_paths = parse_name_paths(args.reward_model_paths)
    args.model_paths = {}
    for name, path in parse_name_paths(args.models, flag="--models").items():
        if name == "base" or not NAME_RE.match(name):
            raise UsageError(f"--models {name}={path}: NAME must be letters, digits, '.', '_' or '-' and not 'base' "
                             f"(the base model is always evaluated as 'base')")
        if name in args.model_paths:
            raise UsageError(f"--models names {name!r} twice")
        args.model_paths[name] = path
        output_kind(path)  # a missing or unrecognised folder fails here
    if args.prompts.endswith((".txt", ".jsonl")):
        load_prompts(args.prompts, args.prompt_column)  # a missing or empty file fails here
    if args.toyworld_accuracy and "toyworld_acc" not in args.judges:
        args.judges = [*args.judges, "toyworld_acc"]
    if args.judges:
        prompts = load_prompts(args.prompts, args.prompt_column, args.prompt_split, args.max_prompts)
        for name in args.judges:
            load_judge(name).check_prompts(prompts)  # an unknown judge or prompts it cannot judge: one line


def output_kind(path: str) -> str:
    """'lora' or 'full': what train_draftp.py / train_dpo.py wrote into `path` (or into a checkpoint-N)."""
    if not os.path.isdir(path):
        raise UsageError(f"--models: {path!r} is not a folder; expected the --output_dir of a training run")
    if os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):
        return "lora"
    if any(os.path.isfile(os.path.join(path, folder, "config.json")) for folder in ("unet", "transformer")):
        return "full"
    raise UsageError(f"--models: {path!r} holds neither {LORA_WEIGHT_NAME} (a LoRA run) nor unet/config.json "
                     f"(a full-UNet run); is the run finished? (its checkpoint-N folders hold the same files)")


# --------------------------------------------------------------------------- models
class ModelSwitcher:
    """Puts each evaluated model's UNet into the one base pipeline, one model at a time.

    LoRA outputs load through diffusers' own `load_lora_weights` (so the adapter's rank and alpha come from
    the file) and are removed again afterwards; full UNets are loaded, used and freed.
    """

    def __init__(self, parts, device, dtype):
        self.parts, self.device, self.dtype = parts, device, dtype
        self.pipe = build_pipeline(parts)

    def unet(self, name: str, path: str = None):
        if path is None:
            return self.parts.unet
        if output_kind(path) == "lora":
            # peft refuses '.' in adapter names, which our model names allow (draftp-0.1)
            self.pipe.load_lora_weights(path, weight_name=LORA_WEIGHT_NAME, adapter_name=name.replace(".", "_"))
            denoiser = self.pipe.transformer if self.parts.is_flow else self.pipe.unet
            return denoiser.to(self.device, self.dtype)
        # unet/ (SD1.5, SDXL) or transformer/ (SD3, FLUX), of the base's own class
        base = self.parts.unet
        return type(base).from_pretrained(path, subfolder=weights_subfolder(base)).to(self.device, self.dtype).eval()

    def release(self, path: str = None):
        if path is not None and output_kind(path) == "lora":
            self.pipe.unload_lora_weights()  # back to the plain base UNet
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@torch.no_grad()
def generate(parts, unet, items, prompts, uncond, latent_shape, args, device, dtype, desc="images", show_progress=True):
    """Yield (items of the batch, uint8 images (B, H, W, 3) or videos (B, F, H, W, 3)) for `items` = [(prompt
    index, seed), ...].

    A progress bar on stderr (`desc`, in images) counts each batch once the caller is done with it."""
    resolution = latent_shape[-1] * parts.vae_scale_factor
    with tqdm(total=len(items), desc=desc, unit="img", disable=not show_progress) as progress:
        for start in range(0, len(items), args.batch_size):
            batch = items[start : start + args.batch_size]
            texts = [prompts[i] for i, _ in batch]
            # one generator per image: its noise does not depend on the batch it lands in
            x_T = torch.cat([torch.randn(1, *latent_shape, generator=torch.Generator().manual_seed(s)) for _, s in batch])
            cond = cfg_conditioning(encode_prompts(parts, texts, device, resolution), uncond, args.guidance_scale)
            latents = sample_latents(unet, parts.scheduler, cond, x_T.to(device, dtype), args.num_inference_steps,
                                     args.guidance_scale).latents
            images = decode_latents(parts.vae, latents)  # (B, 3, H, W), videos (B, F, 3, H, W), in [0, 1]
            yield batch, to_uint8(images)
            progress.update(len(batch))


def score_samples(samples: np.ndarray, texts, scorers, frame_ids, args) -> dict:
    """{column: a value per sample} for uint8 images (B, H, W, 3) or videos (B, F, H, W, 3): each reward, a video's
    averaged over its frames `frame_ids` (each frame's scores under '<reward>_frames'), and each judge."""
    from PIL import Image

    scores = {}
    for spec, scorer in scorers.items():
        if samples.ndim == 4:
            scores[spec] = scorer.score([Image.fromarray(im) for im in samples], texts)
            continue
        if reads_videos(scorer):  # a video judge as a reward (or a sum with one): a score per video, none per frame
            scores[spec] = score_videos(scorer, samples, texts, frame_ids)
            continue
        per_frame = score_frames(scorer, samples, texts, frame_ids)
        scores[spec] = [float(np.mean(values)) for values in per_frame]
        scores[f"{spec}_frames"] = per_frame
    for judge in args.judges:
        scores[judge] = [load_judge(judge).judge(sample, text) for sample, text in zip(samples, texts)]
    return scores


def save_sample(sample: np.ndarray, path: str):
    """An image as PNG; a video (F, H, W, 3) as an animated GIF."""
    from PIL import Image

    if sample.ndim == 4:
        save_gif(path, sample)
    else:
        Image.fromarray(sample).save(path)


def read_sample(path: str) -> np.ndarray:
    from PIL import Image

    return read_gif(path) if path.endswith(".gif") else np.asarray(Image.open(path).convert("RGB"))


def diversity_image(sample: np.ndarray) -> np.ndarray:
    """What diversity compares: the image, or a video's middle frame (LPIPS compares images, and one frame per video
    costs what an image does)."""
    return sample[len(sample) // 2] if sample.ndim == 4 else sample


def diversity_of(images: np.ndarray, args, lpips_model) -> float:
    """Diversity of one prompt's N images (N, H, W, 3) uint8."""
    from utils.diversity import mean_pairwise_distance, mean_pairwise_lpips

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W) in [0, 1]
    if args.diversity == "lpips":
        return mean_pairwise_lpips(x, model=lpips_model, device=next(lpips_model.parameters()).device)
    return mean_pairwise_distance(x)


# --------------------------------------------------------------------------- results
def summarize(records, diversities, model_names, reward_names, args):
    """One row per model: mean and std (over all its images) of each reward, and the mean diversity over prompts."""
    rows = []
    for name in model_names:
        mine = [r for r in records if r["model"] == name]
        row = {"model": name, "path": args.model_paths.get(name, args.pretrained_model_name_or_path), "images": len(mine)}
        for reward in reward_names:
            values = np.array([r[reward] for r in mine], dtype=np.float64)
            row[f"{reward}_mean"] = float(values.mean())
            row[f"{reward}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        if args.diversity != "none":
            row[f"diversity_{args.diversity}"] = float(np.mean([d["diversity"] for d in diversities if d["model"] == name]))
        rows.append(row)
    return rows


def write_tables(rows, args):
    with open(os.path.join(args.output_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    rewards = [k[: -len("_mean")] for k in rows[0] if k.endswith("_mean")]
    diversity = [k for k in rows[0] if k.startswith("diversity_")]
    header = ["model", *[f"{r} (mean ± std)" for r in rewards], *diversity, "images"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], *[f"{row[r + '_mean']:.4f} ± {row[r + '_std']:.4f}" for r in rewards],
                 *[f"{row[d]:.4f}" for d in diversity], str(row["images"])]
        lines.append("| " + " | ".join(cells) + " |")
    video = (f"; {args.num_frames} frames per video, rewards averaged over {args.reward_frames} of them, diversity of "
             f"the middle frames" if args.num_frames else "")
    note = (f"\n{len(rows)} models; {args.num_seeds} seeds per prompt; {args.num_inference_steps} sampling steps, guidance "
            f"{args.guidance_scale}; diversity: {args.diversity}{video}. Paths are in results.csv.\n")
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n" + note)


def plot_reward_vs_diversity(rows, args):
    """One panel per reward: each model a labelled point at (diversity, mean reward), as the DRaFT+ trade-off figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = [k[: -len("_mean")] for k in rows[0] if k.endswith("_mean")]
    div_key = f"diversity_{args.diversity}"
    fig, axes = plt.subplots(1, len(rewards), figsize=(4.5 * len(rewards), 4), squeeze=False)
    for ax, reward in zip(axes[0], rewards):
        for row in rows:
            x = row.get(div_key, 0.0)
            sem = row[f"{reward}_std"] / math.sqrt(max(row["images"], 1))
            ax.errorbar(x, row[f"{reward}_mean"], yerr=sem, fmt="o", capsize=3)
            ax.annotate(row["model"], (x, row[f"{reward}_mean"]), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel(f"diversity ({args.diversity})" if args.diversity != "none" else "diversity (not measured)")
        ax.set_ylabel(f"{reward} (mean ± s.e.m.)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, "reward_vs_diversity.png"), dpi=120)
    plt.close(fig)


def write_grids(records, model_names, columns, args):
    """grids/<model>.png: rows = the first --grid_prompts prompts, columns = seeds; comparison.png: rows = models,
    columns = the same prompts at the first seed. From the saved images, each with its scores (`columns`) under it.
    Videos: grids/p<prompt>.gif for each of those prompts (rows = seeds, columns = models) and comparison.gif."""
    video = "video" in records[0]
    file_key = "video" if video else "image"
    prompt_ids = sorted({r["prompt_index"] for r in records})[: args.grid_prompts]
    seeds = sorted({r["seed"] for r in records})
    by_key = {(r["model"], r["prompt_index"], r["seed"]): r for r in records}
    prompts = [by_key[(model_names[0], p, seeds[0])]["prompt"] for p in prompt_ids]

    def grid(stem, keys, row_labels, col_labels, title):
        files = [by_key[k][file_key] for k in keys]
        tiles = np.stack([read_sample(os.path.join(args.output_dir, f)) for f in files])  # (N, [F,] H, W, 3)
        captions = ["\n".join(f"{c} {format_score(by_key[k][c])}" for c in columns) for k in keys]
        sidecar = {"rows": row_labels, "columns": col_labels, f"{file_key}s": files}
        save = save_animated_grid if video else save_grid
        save(os.path.join(args.output_dir, stem), np.moveaxis(tiles, -1, -3) / 255, row_labels, col_labels, captions,
             title, sidecar)

    if video:  # base and trained side by side, a prompt at a time
        for p, prompt in zip(prompt_ids, prompts):
            grid(os.path.join("grids", f"p{p:04d}"), [(name, p, s) for s in seeds for name in model_names],
                 [f"seed {s}" for s in seeds], model_names, title=prompt)
    else:
        for name in model_names:
            grid(os.path.join("grids", name), [(name, p, s) for p in prompt_ids for s in seeds], prompts,
                 [f"seed {s}" for s in seeds], title=name)
    grid("comparison", [(name, p, seeds[0]) for name in model_names for p in prompt_ids], model_names, prompts,
         title=f"seed {seeds[0]}")


# --------------------------------------------------------------------------- main
def main(args):
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_mixed_precision(accelerator)
    device, dtype = accelerator.device, compute_dtype(accelerator)
    # the family's steps and guidance where not given (model_index.json only), before args.json is written
    family, is_sdxl = read_family(args.pretrained_model_name_or_path, args.revision)
    resolve_sampling_defaults(args, family, is_sdxl)
    resolve_video_flags(args, family)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        save_args(args, args.output_dir)

    # ---- scorers and LPIPS first: a missing weight file fails before any image is drawn
    scorers = {spec: load_reward(spec, paths=args.reward_paths, device=device, dtype=dtype) for spec in args.reward_models}
    lpips_model = None
    if args.diversity == "lpips":
        from utils.diversity import load_lpips

        lpips_model = load_lpips("alex", args.lpips_weights, device)

    # ---- the base pipeline; trained UNets are swapped in one at a time
    parts = load_pipeline_parts(args.pretrained_model_name_or_path, args.revision, args.variant,
                                args.pretrained_vae_model_name_or_path)
    freeze_frozen_parts(parts, device, dtype)
    parts.unet.requires_grad_(False).eval().to(device, dtype)
    switcher = ModelSwitcher(parts, device, dtype)
    resolution, latent_shape, uncond = sampling_setup(parts, args.resolution, device, args.num_frames)
    frame_ids = evenly_spaced_frames(args.num_frames, args.reward_frames) if parts.is_video else None
    kind, ext = ("videos", "gif") if parts.is_video else ("images", "png")
    prompts = load_prompts(args.prompts, args.prompt_column, args.prompt_split, args.max_prompts)
    warn_long_prompts(parts, prompts)  # the text encoders cut them: say so once
    seeds = [args.seed + j for j in range(args.num_seeds)]
    models = {"base": None, **args.model_paths}
    frames = f", {args.num_frames} frames ({args.reward_frames} scored)" if parts.is_video else ""
    logger.info(f"{len(models)} models x {len(prompts)} prompts x {len(seeds)} seeds at {resolution}px{frames} on "
                f"{accelerator.num_processes} process(es); rewards {', '.join(args.reward_models)}; diversity {args.diversity}")

    # ---- generate, score, measure diversity: each process takes its share of the prompts
    records, diversities = [], []
    with accelerator.split_between_processes(list(range(len(prompts)))) as my_prompts:
        items = [(i, s) for i in my_prompts for s in seeds]
        for name, path in models.items():
            os.makedirs(os.path.join(args.output_dir, kind, name), exist_ok=True)
            unet = switcher.unet(name, path)
            pending = {}  # prompt index -> its finished images, until all N are there
            for batch, images in generate(parts, unet, items, prompts, uncond, latent_shape, args, device, dtype,
                                          desc=name, show_progress=accelerator.is_local_main_process):
                scores = score_samples(images, [prompts[i] for i, _ in batch], scorers, frame_ids, args)
                for k, (i, seed) in enumerate(batch):
                    rel = os.path.join(kind, name, f"p{i:04d}_s{seed}.{ext}")
                    save_sample(images[k], os.path.join(args.output_dir, rel))
                    records.append({"model": name, "prompt_index": i, "prompt": prompts[i], "seed": seed,
                                    kind[:-1]: rel, **({"frames": frame_ids} if frame_ids else {}),
                                    **{column: values[k] for column, values in scores.items()}})
                    pending.setdefault(i, []).append(diversity_image(images[k]))
                    if len(pending[i]) == len(seeds) and args.diversity != "none":
                        diversities.append({"model": name, "prompt_index": i,
                                            "diversity": diversity_of(np.stack(pending.pop(i)), args, lpips_model)})
            del unet
            switcher.release(path)

    # ---- gather on the main process and write the results
    records, diversities = gather_object(records), gather_object(diversities)
    if accelerator.is_main_process:
        order = {name: k for k, name in enumerate(models)}
        records.sort(key=lambda r: (order[r["model"]], r["prompt_index"], r["seed"]))
        with open(os.path.join(args.output_dir, "scores.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        columns = args.reward_models + args.judges
        rows = summarize(records, diversities, list(models), columns, args)
        write_tables(rows, args)
        plot_reward_vs_diversity(rows, args)
        write_grids(records, list(models), columns, args)
        logger.info(f"wrote results.csv, results.md, reward_vs_diversity.png, grids/ and comparison.{ext} to "
                    f"{args.output_dir}")
        # the results table is the output (stdout, e.g. `evaluate.py ... > results.md`); logs and bars go to stderr
        with open(os.path.join(args.output_dir, "results.md")) as f:
            print(f.read(), end="", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main, parse_args)
