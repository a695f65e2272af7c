"""The toy video world's trend experiment: DRaFT+, Diffusion-DPO and online RL on a Wan model from the same seeds and
budget, evaluated by the toy video judge on held-out prompts. The video counterpart of toyworld_trends.py, whose runner
(runs as subprocesses, --jobs at a time, resume, stop signals), prompt split and seed summary it uses.

Per seed of --seeds: sample --pair_candidates videos per pair from the base model in this process, judge each with the
toy video judge (utils/toy/video_world.py) and pair a judged-right video with a judged-wrong one (pairs.jsonl of mp4
files; pairs the judge cannot tell apart are dropped), pre-encode them (python -m utils.preencode --pairs); train each
method with the project's own script; evaluate base and every run with evaluate.py (the judge's accuracy and the
per-frame toyclip reward). Then average over seeds and check each method's trend on the numbers.

    python experiments/toyvideo_trends.py --seeds 0 1 2 --jobs 6 --heldout_prompts   # one GPU, toy-wan
                                                                      # (experiments/toyworld_pretrain_wan.sh writes it)

    python experiments/toyvideo_trends.py --pretrained_model_name_or_path tiny-wan --max_prompts 3 --heldout_prompts \
        --seeds 0 --max_train_steps 2 --num_frames 5 --reward_frames 3 --resolution 32 --num_inference_steps 2 \
        --train_batch_size 2 --online_prompts 1 --group_size 2 --num_pairs 3 --pair_candidates 2 \
        --pair_verdict attributes --eval_seeds 2 --batch_size 4 --jobs 2   # CPU smoke test (2 cores): about a minute

Methods (--methods): draftp (train_draftp.py on the per-frame --reward_model, a run per --kl_coeffs value, named
draftp-<kl>); dpo and sft (train_dpo.py on the pre-encoded pairs: Diffusion-DPO, or SFT on their preferred videos);
flow_grpo and nft (train_online.py on --online_reward_model, by default the toy video judge as a reward).

Writes to --output_dir: prompts.txt, eval_prompts.txt, args.json; seed<k>/pairs/ (videos/*.mp4, pairs.jsonl),
seed<k>/pairs_encoded/ (the pre-encoder's shards), seed<k>/<method>/ (the run's output, train.log, wall_time.json),
seed<k>/eval/ (evaluate.py's output, eval.log); trends.md, trends.csv, trends.json. A re-run keeps finished pairs, runs
and evaluations and resumes interrupted runs; a stop signal (SIGTERM, Ctrl-C, SIGUSR1) reaches every run in flight,
which checkpoints its last completed step, and the experiment exits 3 (toyworld_trends.InFlight).
"""
import argparse
import csv
import json
import os
import sys

import numpy as np
import torch

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(EXPERIMENTS)
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, EXPERIMENTS)

import evaluate  # noqa: E402
import toyworld_trends as image_trends  # noqa: E402
from utils import UsageError  # noqa: E402
from utils.data import load_prompts  # noqa: E402
from utils.grids import read_gif  # noqa: E402
from utils.models import LORA_WEIGHT_NAME, freeze_frozen_parts, load_pipeline_parts  # noqa: E402
from utils.sampling import sampling_setup  # noqa: E402
from utils.toy.video_world import clip_accuracy, read_mp4, write_mp4  # noqa: E402
from utils.train import run_main  # noqa: E402
from utils.train.checkpoints import list_checkpoints  # noqa: E402
from utils.train.metrics import read_metrics  # noqa: E402
from utils.train.outcome import save_args  # noqa: E402

# --------------------------------------------------------------------------- the methods, chosen once
# method -> (script, its flags); the placeholders are filled from the arguments and the run (seed, kl, encoded,
# prompts, output_dir). The names are toyworld_trends.METHODS' own, so that its run_names orders them.
VIDEO_FLAGS = ["--num_frames", "{num_frames}", "--reward_frames", "{reward_frames}", "--resolution", "{resolution}"]
METHODS = {
    "draftp": ("train_draftp.py", ["--reward_model", "{reward_model}", "--prompts", "{prompts}", "--kl_coeff", "{kl}",
                                   "--learning_rate", "{draft_learning_rate}", "--truncation_steps", "{truncation_steps}",
                                   "--train_batch_size", "{train_batch_size}", *VIDEO_FLAGS]),
    # the labels are the judge's, in the pairs: no --choice_model (train_dpo.py refuses one on pre-encoded data)
    "dpo": ("train_dpo.py", ["--dataset_name", "{encoded}", "--learning_rate", "{dpo_learning_rate}",
                             "--beta_dpo", "{beta_dpo}", "--train_batch_size", "{train_batch_size}"]),
    "sft": ("train_dpo.py", ["--sft", "--dataset_name", "{encoded}", "--learning_rate", "{dpo_learning_rate}",
                             "--train_batch_size", "{train_batch_size}"]),
    # --online_prompts prompts x --group_size videos per step, sampled and trained in one batch (one update)
    **{method: ("train_online.py", ["--method", method, "--reward_model", "{online_reward_model}", "--prompts", "{prompts}",
                                    "--learning_rate", "{online_learning_rate}", "--group_size", "{group_size}",
                                    "--train_batch_size", "{online_videos}", "--noise_level", "{noise_level}",
                                    *VIDEO_FLAGS])
       for method in ("flow_grpo", "nft")},
}
# One budget for all, LoRA for all (the reference of DRaFT+'s KL and of DPO is the base with its adapters off), a
# constant learning rate without warmup: as toyworld_trends.COMMON_FLAGS.
COMMON_FLAGS = ["--pretrained_model_name_or_path", "{pretrained_model_name_or_path}", "--seed", "{seed}",
                "--max_train_steps", "{max_train_steps}", "--use_lora", "--lora_rank", "{lora_rank}",
                "--lora_alpha", "{lora_rank}", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                "--num_inference_steps", "{num_inference_steps}", "--guidance_scale", "{guidance_scale}",
                "--mixed_precision", "{mixed_precision}", "--report_to", "none", "--output_dir", "{output_dir}"]
PREENCODE_FLAGS = ["-m", "utils.preencode", "--pretrained_model_name_or_path", "{pretrained_model_name_or_path}",
                   "--dataset_name", "{pairs_file}", "--pairs", "--num_frames", "{num_frames}", "--resolution",
                   "{resolution}", "--dtype", "{encode_dtype}", "--batch_size", "{batch_size}", "--output_dir", "{output_dir}"]
JUDGE = "toyvideo_acc"  # evaluate.py's name of the toy video judge: 1.0 when every attribute the prompt names is right
EVAL_FLAGS = ["--pretrained_model_name_or_path", "{pretrained_model_name_or_path}", "--prompts", "{eval_prompts}",
              "--num_seeds", "{eval_seeds}", "--seed", "0", "--reward_models", "{reward_model}", "--judges", JUDGE,
              "--diversity", "pixel", *VIDEO_FLAGS, "--num_inference_steps", "{num_inference_steps}",
              "--guidance_scale", "{guidance_scale}", "--batch_size", "{batch_size}",
              "--mixed_precision", "{mixed_precision}", "--output_dir", "{output_dir}"]
ATTRIBUTES = ("count", "color", "shape", "direction")  # what the judge reads of every toyvideo prompt
ENCODE_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


# --------------------------------------------------------------------------- arguments
TOY_WAN = "utils/toy/assets/toy-wan"  # the default base model, written by experiments/toyworld_pretrain_wan.sh


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("world")
    g.add_argument("--pretrained_model_name_or_path", default=TOY_WAN,
                   help="the base Wan pipeline of every method (experiments/toyworld_pretrain_wan.sh writes toy-wan)")
    g.add_argument("--reward_model", default="toyclip", help="DRaFT+'s per-frame reward and the evaluation's")
    g.add_argument("--reward_model_paths", nargs="*", default=[], metavar="NAME=PATH", help="passed to every script")
    g.add_argument("--prompts", default="toyvideo", help="a built-in set, .txt/.jsonl file or dataset")
    g.add_argument("--max_prompts", type=int, default=None, help="the first N prompts only (training, pairs, evaluation)")
    g.add_argument("--heldout_prompts", action="store_true",
                   help="evaluate on every third prompt and train (and sample pairs) on the others "
                        "(toyworld_trends.split_prompts); default: one list for both")
    g = parser.add_argument_group("methods and seeds")
    g.add_argument("--methods", nargs="+", default=["draftp", "dpo", "flow_grpo"], choices=list(METHODS),
                   help="base is always evaluated")
    g.add_argument("--kl_coeffs", nargs="+", type=float, default=[0.1], help="DRaFT+ KL weights, a run each")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="each seed trains and evaluates every method")
    g.add_argument("--jobs", type=int, default=1, help="training runs (and evaluations) at once, as subprocesses")
    g = parser.add_argument_group("budget: the same for every method")
    g.add_argument("--max_train_steps", type=int, default=200, help="optimizer steps")
    g.add_argument("--train_batch_size", type=int, default=4, help="prompts (DRaFT+) or pairs (DPO, SFT) per step")
    g.add_argument("--online_reward_model", default="toyvideo_judge", help="the reward of flow_grpo and nft")
    g.add_argument("--online_prompts", type=int, default=4, help="flow_grpo / nft: prompts per step")
    g.add_argument("--group_size", type=int, default=8, help="flow_grpo / nft: videos per prompt")
    g.add_argument("--online_learning_rate", type=float, default=1e-3, help="flow_grpo and nft")
    g.add_argument("--noise_level", type=float, default=0.7, help="flow_grpo: the SDE's noise level (nft: ignored)")
    g.add_argument("--lora_rank", type=int, default=8)
    g.add_argument("--draft_learning_rate", type=float, default=1e-3, help="DRaFT+")
    g.add_argument("--dpo_learning_rate", type=float, default=3e-4, help="DPO and SFT")
    g.add_argument("--truncation_steps", type=int, default=1, help="K of DRaFT+: sampler steps back-propagated through")
    g.add_argument("--beta_dpo", type=float, default=500.0, help="DPO temperature (toyworld_trends' value)")
    g = parser.add_argument_group("preference pairs (DPO, SFT)")
    g.add_argument("--num_pairs", type=int, default=256,
                   help="pairs sampled per seed before those the judge cannot tell apart are dropped")
    g.add_argument("--pair_candidates", type=int, default=4,
                   help="videos sampled per pair; the judge's best and worst of them make the pair")
    g.add_argument("--pair_verdict", default="all", choices=["all", "attributes"],
                   help="all: the judge's verdict (every attribute right), so that a pair is a right and a wrong video; "
                        "attributes: the fraction of the prompt's attributes judged right, which also ranks two wrong "
                        "videos (a base model that gets no video right, such as tiny-wan, has pairs only so)")
    g = parser.add_argument_group("sampling and evaluation")
    g.add_argument("--num_frames", type=int, default=9, help="frames per video, 1 + 4k (toy-wan was trained on 9)")
    g.add_argument("--reward_frames", type=int, default=None,
                   help="frames (evenly spaced, first and last included) each per-frame reward scores; default all")
    g.add_argument("--resolution", type=int, default=64, help="pixels, square (toy-wan's)")
    g.add_argument("--num_inference_steps", type=int, default=20, help="sampler steps (training, pairs, evaluation)")
    g.add_argument("--guidance_scale", type=float, default=5.0)
    g.add_argument("--eval_seeds", type=int, default=8, help="videos per prompt at evaluation (seeds 0 .. N-1)")
    g.add_argument("--batch_size", type=int, default=16, help="videos per model call when sampling and evaluating")
    g.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="of every run and evaluation")
    g.add_argument("--output_dir", default="outputs/toyvideo-trends")
    args = parser.parse_args(argv)
    image_trends.check_shared_args(args, ["num_frames"], "videos")
    if (args.num_frames - 1) % 4:
        raise UsageError(f"--num_frames must be 1 + 4k (Wan's VAE), got {args.num_frames}")
    args.reward_frames = args.reward_frames or args.num_frames
    if not 2 <= args.reward_frames <= args.num_frames:
        raise UsageError(f"--reward_frames must be in [2, --num_frames], got {args.reward_frames}")
    if args.num_pairs * args.pair_candidates >= image_trends.HELDOUT_OFFSET:
        raise UsageError(f"--num_pairs x --pair_candidates must stay under {image_trends.HELDOUT_OFFSET} (the image "
                         f"seeds of two experiment seeds' pairs would overlap)")
    if args.pretrained_model_name_or_path == TOY_WAN and not os.path.isdir(os.path.join(REPO_ROOT, TOY_WAN)):
        raise UsageError(f"{TOY_WAN} is not built yet: experiments/toyworld_pretrain_wan.sh trains it (minutes on one "
                         f"GPU), or pass --pretrained_model_name_or_path (e.g. tiny-wan for a smoke test)")
    args.online_videos = args.online_prompts * args.group_size
    args.encode_dtype = ENCODE_DTYPES[args.mixed_precision]
    return args


# --------------------------------------------------------------------------- runs as subprocesses
def seed_dir(args, seed):
    return os.path.join(args.output_dir, f"seed{seed}")


def finished(out):
    return os.path.isfile(os.path.join(out, LORA_WEIGHT_NAME))


def training_task(args, name, seed):
    """(label, command, log) of one run, or None if its output already holds the final weights."""
    out = os.path.join(seed_dir(args, seed), name)
    if finished(out):
        return None
    script, flags = METHODS["draftp" if name.startswith("draftp-") else name]
    cmd = image_trends.command(args, script, COMMON_FLAGS + flags, seed=seed, kl=name.split("-", 1)[-1], output_dir=out,
                               encoded=os.path.join(seed_dir(args, seed), "pairs_encoded"))
    if list_checkpoints(out):  # interrupted earlier: continue it (the scripts never overwrite checkpoints)
        return f"seed {seed} {name} (resumed)", cmd + ["--resume_from_checkpoint", "latest"], f"{out}/train.log"
    return f"seed {seed} {name}", cmd + ["--overwrite_output_dir"], f"{out}/train.log"


def preencode_task(args, seed):
    """(label, command, log) of the seed's pre-encoding, or None if no DPO / SFT run of it still trains. The
    pre-encoder skips the shards a cut-off run finished."""
    if not any(training_task(args, name, seed) for name in ("dpo", "sft") if name in args.methods):
        return None
    out = os.path.join(seed_dir(args, seed), "pairs_encoded")
    values = {**vars(args), "pairs_file": os.path.join(seed_dir(args, seed), "pairs", "pairs.jsonl"), "output_dir": out}
    cmd = [sys.executable, *[flag.format(**values) for flag in PREENCODE_FLAGS]]
    return f"seed {seed} pre-encoding", cmd, f"{out}/preencode.log"


def evaluation_task(args, seed):
    """evaluate.py on the base and every trained method of a seed, or None if its results.csv holds exactly them."""
    out = os.path.join(seed_dir(args, seed), "eval")
    models = {n: os.path.join(seed_dir(args, seed), n) for n in image_trends.run_names(args)}
    if os.path.isfile(os.path.join(out, "results.csv")):
        with open(os.path.join(out, "results.csv")) as f:
            if [r["model"] for r in csv.DictReader(f)] == ["base", *models]:
                return None
    cmd = image_trends.command(args, "evaluate.py", EVAL_FLAGS, output_dir=out)
    return f"seed {seed} evaluation", cmd + ["--models", *[f"{n}={p}" for n, p in models.items()]], f"{out}/eval.log"


# --------------------------------------------------------------------------- preference pairs, in this process
def verdict(frames, prompt, kind):
    """The judge's score of a video (F, H, W, 3) for --pair_verdict `kind`: 1.0 / 0.0 for every attribute right or
    not ("all"), or the fraction of the prompt's attributes judged right ("attributes")."""
    accuracy = clip_accuracy(frames, prompt)
    return accuracy["all"] if kind == "all" else float(np.mean([v for k, v in accuracy.items() if k != "all"]))


class VideoBase:
    """The base pipeline, sampling videos as evaluate.py does (its sampler, noise and decoding)."""

    def __init__(self, args):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
        self.parts = load_pipeline_parts(args.pretrained_model_name_or_path)
        if not self.parts.is_video:
            raise UsageError(f"{args.pretrained_model_name_or_path} is not a video pipeline (Wan 2.1)")
        freeze_frozen_parts(self.parts, self.device, self.dtype)
        self.parts.unet.requires_grad_(False).eval().to(self.device, self.dtype)
        _, self.latent_shape, self.uncond = sampling_setup(self.parts, args.resolution, self.device, args.num_frames)

    def sample(self, prompts, items, args):
        """Yield (item, uint8 video (F, H, W, 3)) for `items` = [(prompt index, seed), ...]."""
        for batch, videos in evaluate.generate(self.parts, self.parts.unet, items, prompts, self.uncond,
                                               self.latent_shape, args, self.device, self.dtype, desc="pair videos"):
            yield from zip(batch, videos)


def write_pairs(base, args, seed):
    """seed<k>/pairs: pair j of prompt j mod P from seeds first + c*j .. first + c*j + c - 1 (c = --pair_candidates),
    every candidate written as mp4 and judged as read back (the frames the pre-encoder reads); the judge's best and
    worst make the pair (toyworld_trends.extreme_pairs), and pairs it scores the same are dropped. pairs.jsonl is
    written last: a folder with it is complete."""
    folder = os.path.join(seed_dir(args, seed), "pairs")
    path = os.path.join(folder, "pairs.jsonl")
    if os.path.isfile(path):
        return
    os.makedirs(os.path.join(folder, "videos"), exist_ok=True)
    first, c, prompts = image_trends.PAIR_SEED_BASE * (seed + 1), args.pair_candidates, args.prompt_list
    items = [(j % len(prompts), first + c * j + k) for j in range(args.num_pairs) for k in range(c)]
    files, scores = [], []
    for (i, image_seed), video in base.sample(prompts, items, args):
        files.append(f"videos/p{i:04d}_s{image_seed}.mp4")
        write_mp4(os.path.join(folder, files[-1]), video)
        scores.append(verdict(read_mp4(os.path.join(folder, files[-1])), prompts[i], args.pair_verdict))
    rows = [{"video_0": files[a], "video_1": files[b], "label_0": label_0, "caption": prompts[items[a][0]],
             "verdict_0": scores[a], "verdict_1": scores[b]}
            for a, b, label_0 in image_trends.extreme_pairs(scores, c) if label_0 != 0.5]
    if len(rows) < args.train_batch_size:
        raise UsageError(f"seed {seed}: the judge ({args.pair_verdict}) told apart the videos of {len(rows)} of "
                         f"{args.num_pairs} pairs, fewer than --train_batch_size {args.train_batch_size}: raise "
                         f"--num_pairs or --pair_candidates, or take --pair_verdict attributes")
    with open(path + ".partial", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".partial", path)
    print(f"seed {seed}: {len(rows)} of {args.num_pairs} pairs told apart by the judge, in {path}", flush=True)


# --------------------------------------------------------------------------- results
def seed_results(args, seed):
    """{model: reward and diversity (results.csv), judge accuracy and per attribute, run times} of one seed. The
    judge's verdict ("all") is evaluate.py's on the sampled frames; per attribute, the judge re-reads the saved GIFs
    (256 colours a frame), which evaluate.py keeps no per-attribute score of."""
    eval_dir = os.path.join(seed_dir(args, seed), "eval")
    with open(os.path.join(eval_dir, "results.csv")) as f:
        results = {r["model"]: {"reward": float(r[f"{args.reward_model}_mean"]), "diversity": float(r["diversity_pixel"])}
                   for r in csv.DictReader(f)}
    accuracy = {}
    with open(os.path.join(eval_dir, "scores.jsonl")) as f:
        for r in map(json.loads, f):
            read = clip_accuracy(read_gif(os.path.join(eval_dir, r["video"])), r["prompt"])
            for key, value in [("all", r[JUDGE]), *((k, read[k]) for k in ATTRIBUTES if k in read)]:
                accuracy.setdefault(r["model"], {}).setdefault(key, []).append(value)
    for name, by_key in accuracy.items():
        results[name]["prompt_accuracy"] = {k: float(np.mean(v)) for k, v in by_key.items()}
    for name in image_trends.run_names(args):
        steps = [m.get("step_seconds", 0.0) for m in read_metrics(os.path.join(seed_dir(args, seed), name))]
        results[name].update(first_step_seconds=round(steps[0], 2), train_seconds=round(sum(steps[1:]), 2))
        wall_time = os.path.join(seed_dir(args, seed), name, "wall_time.json")
        if os.path.isfile(wall_time):  # absent if the run came from elsewhere
            with open(wall_time) as f:
                results[name]["wall_seconds"] = json.load(f)["wall_seconds"]
    return results


def trend_check(args, rows, per_seed):
    """A line per trained method: its trend (DRaFT+ on the reward, the others on the judge) and whether it holds,
    computed from the means over seeds; with the seeds it holds in and the direction of motion alone."""
    by = {r["method"]: r for r in rows}
    base, lines = by["base"], []
    for r in rows[1:]:
        name = r["method"]
        key, what = (("reward", f"raises {args.reward_model} over base") if name.startswith("draftp")
                     else ("prompt_acc_all", "raises the judge's accuracy"))
        seeds = sum((s[name]["reward"] > s["base"]["reward"]) if key == "reward"
                    else (s[name]["prompt_accuracy"]["all"] > s["base"]["prompt_accuracy"]["all"])
                    for s in per_seed.values())
        holds = r[f"{key}_mean"] > base[f"{key}_mean"]
        lines.append(f"- {name} {what}: {str(holds).lower()} ({image_trends.fmt(r, key)} vs base "
                     f"{image_trends.fmt(base, key)}; above base in {seeds}/{len(per_seed)} seeds; direction of motion "
                     f"{image_trends.fmt(r, 'prompt_acc_direction')} vs base {image_trends.fmt(base, 'prompt_acc_direction')})")
    return lines


def write_outputs(args, rows, per_seed, checks, pairs):
    with open(os.path.join(args.output_dir, "trends.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.output_dir, "trends.json"), "w") as f:
        json.dump({"args": vars(args), "methods": METHODS, "common_flags": COMMON_FLAGS, "pairs": pairs,
                   "per_seed": per_seed, "summary": rows, "trend_check": checks}, f, indent=2)
    header = ["method", f"judge accuracy ({JUDGE})", *ATTRIBUTES, f"{args.reward_model} (per frame)",
              "diversity_pixel", "train s / run (after step 1)"]
    pair_counts = ", ".join(f"seed {s}: {n}" for s, n in pairs.items())
    lines = [f"# Toy-video trends: {args.pretrained_model_name_or_path}", "",
             f"Seeds {', '.join(map(str, args.seeds))}; {args.max_train_steps} steps, LoRA rank {args.lora_rank}; "
             f"{args.num_frames} frames at {args.resolution} px, {args.num_inference_steps} sampler steps, guidance "
             f"{args.guidance_scale:g}; evaluated on {len(args.eval_prompt_list)} "
             f"{'held-out ' if args.heldout_prompts else ''}prompts x {args.eval_seeds} seeds. Means ± std over seeds. "
             f"DRaFT+: {args.train_batch_size} prompts per step on {args.reward_model} ({args.reward_frames} frames), "
             f"lr {args.draft_learning_rate:g}. DPO / SFT: {args.train_batch_size} pairs per step, beta "
             f"{args.beta_dpo:g}, lr {args.dpo_learning_rate:g}, on the judge's pairs ({args.pair_verdict}; "
             f"{pair_counts or 'none sampled'} of {args.num_pairs}). Flow-GRPO / NFT: {args.online_prompts} prompts x "
             f"{args.group_size} videos per step on {args.online_reward_model}, lr {args.online_learning_rate:g}. "
             f"Judge accuracy: every attribute right (evaluate.py); per attribute: the judge re-reading the saved GIFs.",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([r["method"], image_trends.fmt(r, "prompt_acc_all"),
                                 *[image_trends.fmt(r, f"prompt_acc_{k}") for k in ATTRIBUTES],
                                 image_trends.fmt(r, "reward"), image_trends.fmt(r, "diversity"),
                                 image_trends.fmt(r, "train_seconds", False)]) + " |" for r in rows]
    lines += ["", "## Trend check", "", *checks, "", "Every seed's numbers and wall times: trends.csv, trends.json."]
    with open(os.path.join(args.output_dir, "trends.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def pair_count(args, seed):
    path = os.path.join(seed_dir(args, seed), "pairs", "pairs.jsonl")
    return sum(1 for _ in open(path)) if os.path.isfile(path) else None


# --------------------------------------------------------------------------- main
def main(args):
    args.output_dir = os.path.abspath(args.output_dir)  # the scripts run in the repository root
    os.makedirs(args.output_dir, exist_ok=True)
    prompts = load_prompts(args.prompts, max_prompts=args.max_prompts)
    args.prompt_list, args.eval_prompt_list = image_trends.split_prompts(prompts) if args.heldout_prompts else (prompts, prompts)
    args.prompts_file = os.path.join(args.output_dir, "prompts.txt")
    args.eval_prompts_file = os.path.join(args.output_dir, "eval_prompts.txt")
    for path, listed in ((args.prompts_file, args.prompt_list), (args.eval_prompts_file, args.eval_prompt_list)):
        with open(path, "w") as f:
            f.write("\n".join(listed) + "\n")
    save_args(args, args.output_dir)
    image_trends.IN_FLIGHT.install()  # a stop signal: every run checkpoints and ends, and a re-run resumes them
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))}

    # ---- sample and judge: preference pairs from the base model, for the seeds whose DPO / SFT still trains
    needs_pairs = [seed for seed in args.seeds if preencode_task(args, seed)]
    if needs_pairs:
        base = VideoBase(args)
        for seed in needs_pairs:
            write_pairs(base, args, seed)
        del base  # its memory back to the runs, which share the device
        torch.cuda.empty_cache()

    # ---- train, then evaluate: the pairs' pre-encoding beside the runs that need no pairs, then DPO / SFT
    paired = [n for n in image_trends.run_names(args) if n in ("dpo", "sft")]
    unpaired = [n for n in image_trends.run_names(args) if n not in paired]
    image_trends.run_all(args.jobs, [preencode_task(args, seed) for seed in args.seeds]
                         + [training_task(args, name, seed) for seed in args.seeds for name in unpaired], env)
    image_trends.run_all(args.jobs, [training_task(args, name, seed) for seed in args.seeds for name in paired], env)
    image_trends.run_all(args.jobs, [evaluation_task(args, seed) for seed in args.seeds], env)

    # ---- aggregate over seeds: table and trend check
    per_seed = {seed: seed_results(args, seed) for seed in args.seeds}
    rows = [{k: v for k, v in r.items() if not k.startswith("implicit_acc")}  # an image-trends number: no held-out pairs here
            for r in image_trends.summarize(per_seed, ["base", *image_trends.run_names(args)])]
    checks = trend_check(args, rows, per_seed)
    pairs = {seed: n for seed in args.seeds if (n := pair_count(args, seed)) is not None}
    write_outputs(args, rows, per_seed, checks, pairs)
    with open(os.path.join(args.output_dir, "trends.md")) as f:
        print(f.read(), flush=True)


if __name__ == "__main__":
    run_main(main, parse_args)
