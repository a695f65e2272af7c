"""The toy world's trend experiment: every alignment method from the same seeds and budget, one table, one plot.

Per seed of --seeds: sample preference pairs from the base model; train each method of METHODS with the project's
own scripts (subprocesses, --jobs at a time); evaluate them all beside the base model with evaluate.py; add prompt
accuracy (utils.toy.world; toy-world prompts only) and Diffusion-DPO's implicit accuracy on held-out pairs. Then
average over seeds and check the published DRaFT+ and Diffusion-DPO trends on the numbers.

    python experiments/toyworld_trends.py --seeds 0 1 2 3 4 --jobs 8 --batch_size 64   # one GPU: about 15 minutes

    python experiments/toyworld_trends.py --pretrained_model_name_or_path tiny-sd --reward_model color_match \
        --prompts colored_animals --max_prompts 4 --methods draft dpo --seeds 0 --max_train_steps 2 \
        --train_batch_size 1 --num_inference_steps 3 --num_pairs 4 --num_heldout_pairs 4 --eval_seeds 2 --jobs 2

    python experiments/toyworld_trends.py --pretrained_model_name_or_path utils/toy/assets/toy-sd3 --heldout_prompts \
        --methods flow_grpo nft draftp --kl_coeffs 0.1 --curve_every 50 --jobs 9   # online RL on the pixel judge

Writes to --output_dir: prompts.txt, args.json; seed<k>/pairs and seed<k>/heldout (Pick-a-Pic layout), seed<k>/<method>/
(the run's output, train.log, wall_time.json), seed<k>/eval/ (evaluate.py's output, eval.log); trends.md, trends.csv,
trends.json, reward_vs_diversity.png (curve.md, curve.json, accuracy_vs_minutes.png with --curve_every). A re-run keeps finished runs and evaluations and resumes interrupted runs. A stop signal
(SIGTERM, Ctrl-C, SIGUSR1) reaches every run in flight, which checkpoints its last completed step; the experiment then
exits 3, and the same command resumes them (a time-limited job or GPU call: `timeout -s TERM`, then run it again).
"""
import argparse
import concurrent.futures
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import evaluate  # noqa: E402
import train_dpo  # noqa: E402
from utils import UsageError  # noqa: E402
from utils.data import PAIR_COLUMNS, decode_image, load_prompts  # noqa: E402
from utils.denoising import default_train_guidance, encode_batch, family_noising, per_sample_error  # noqa: E402
from utils.models import (LORA_WEIGHT_NAME, encode_prompts, freeze_frozen_parts, load_pipeline_parts,  # noqa: E402
                          model_prediction)
from utils.rewards import load_reward, parse_reward_spec  # noqa: E402
from utils.toy.synthetic import png_bytes, write_preference_set  # noqa: E402
from utils.speed import COMPILE_MODES  # noqa: E402
from utils.toy.world import parse_prompt, prompt_accuracy  # noqa: E402
from utils.seeding import step_generator  # noqa: E402
from utils.train import run_main  # noqa: E402
from utils.train.checkpoints import list_checkpoints  # noqa: E402
from utils.train.cli import parse_name_paths  # noqa: E402
from utils.train.guards import STOP_SIGNALS  # noqa: E402
from utils.train.metrics import read_metrics  # noqa: E402
from utils.train.outcome import EXIT_STOPPED, Stopped, save_args  # noqa: E402

# --------------------------------------------------------------------------- the methods, chosen once
# family -> (script, its flags); "draftp" is one run per --kl_coeffs value, named draftp-<kl>. The placeholders
# are filled from the arguments and the run (seed, kl, pairs, prompts, output_dir).
METHODS = {
    "draft": ("train_draftp.py", ["--kl_coeff", "0"]),  # DRaFT-1 (Clark et al. 2023): K = 1, the script's default
    "draftp": ("train_draftp.py", ["--kl_coeff", "{kl}"]),  # DRaFT+ (NeMo-Aligner)
    "draft-lv": ("train_draftp.py", ["--kl_coeff", "0", "--draft_lv_samples", "2"]),  # DRaFT-LV
    "dpo": ("train_dpo.py", ["--dataset_name", "{pairs}", "--choice_model", "{reward_model}"]),  # DPO on AI feedback
    "sft": ("train_dpo.py", ["--sft", "--dataset_name", "{pairs}", "--choice_model", "{reward_model}"]),  # the winners
    # online RL on --online_reward_model (by default the pixel judge: a reward without gradient)
    "flow_grpo": ("train_online.py", ["--method", "flow_grpo"]),
    "nft": ("train_online.py", ["--method", "nft"]),
}
SCRIPT_FLAGS = {
    # weight decay 1e-2 and clipping at 1.0: the values of the published five-seed runs (BENCHMARKS.md), made when
    # they were train_draftp.py's defaults (its defaults are now NeMo-Aligner's: 0 and 10)
    "train_draftp.py": ["--reward_model", "{reward_model}", "--prompts", "{prompts}",
                        "--learning_rate", "{draft_learning_rate}", "--truncation_steps", "{truncation_steps}",
                        "--adam_weight_decay", "1e-2", "--max_grad_norm", "1.0",
                        "--compile_sampler", "{compile_sampler}", "--train_batch_size", "{train_batch_size}"],
    "train_dpo.py": ["--learning_rate", "{dpo_learning_rate}", "--beta_dpo", "{beta_dpo}",
                     "--train_batch_size", "{train_batch_size}"],
    # --online_prompts prompts x --group_size images per step, sampled and trained in one batch (one update)
    "train_online.py": ["--reward_model", "{online_reward_model}", "--prompts", "{prompts}",
                        "--learning_rate", "{online_learning_rate}", "--group_size", "{group_size}",
                        "--train_batch_size", "{online_images}", "--noise_level", "{noise_level}"],
}
# One budget for all. Constant lr, no warmup: train_dpo.py's default (500 warmup steps, made for the paper's
# 2000-step runs) would swallow a short run.
COMMON_FLAGS = ["--pretrained_model_name_or_path", "{pretrained_model_name_or_path}", "--seed", "{seed}",
                "--max_train_steps", "{max_train_steps}", "--use_lora",
                "--lora_rank", "{lora_rank}", "--lora_alpha", "{lora_rank}", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                "--num_inference_steps", "{num_inference_steps}", "--guidance_scale", "{guidance_scale}",
                "--mixed_precision", "{mixed_precision}", "--report_to", "none", "--output_dir", "{output_dir}"]
EVAL_FLAGS = ["--pretrained_model_name_or_path", "{pretrained_model_name_or_path}", "--prompts", "{eval_prompts}",
              "--num_seeds", "{eval_seeds}", "--seed", "0", "--reward_models", "{reward_model}", "--diversity", "{diversity}",
              "--num_inference_steps", "{num_inference_steps}", "--guidance_scale", "{guidance_scale}",
              "--batch_size", "{batch_size}", "--mixed_precision", "{mixed_precision}", "--output_dir", "{output_dir}"]
# Image seeds of the sampled pairs: far from evaluate.py's 0 .. --eval_seeds - 1, disjoint per experiment seed.
PAIR_SEED_BASE, HELDOUT_OFFSET = 1_000_000, 500_000


def split_prompts(prompts):
    """(training, evaluation): every third prompt (indices 2, 5, 8, ...) held out for evaluation. On the toy world's
    count x colour x shape list this holds out one shape per count and colour, so every attribute value is in both."""
    if len(prompts) < 3:
        raise UsageError(f"--heldout_prompts needs at least 3 prompts, got {len(prompts)}")
    return [p for i, p in enumerate(prompts) if i % 3 != 2], [p for i, p in enumerate(prompts) if i % 3 == 2]


def run_names(args):
    """The trained methods in table order (draftp-<kl> by kl) among --methods."""
    return [n for family in METHODS if family in args.methods
            for n in ([f"draftp-{kl:g}" for kl in sorted(args.kl_coeffs)] if family == "draftp" else [family])]


# --------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("world")
    g.add_argument("--pretrained_model_name_or_path", default="toy-sd", help="the base pipeline of every method")
    g.add_argument("--reward_model", default="toyclip", help="DRaFT's reward, DPO's AI feedback and the evaluation's score")
    g.add_argument("--reward_model_paths", nargs="*", default=[], metavar="NAME=PATH", help="passed to every script")
    g.add_argument("--prompts", default="toyworld", help="a built-in set, .txt/.jsonl file or dataset")
    g.add_argument("--max_prompts", type=int, default=None, help="the first N prompts only (training, pairs, evaluation)")
    g.add_argument("--heldout_prompts", action="store_true",
                   help="evaluate on every third prompt and train (and sample pairs) on the others, so that prompt "
                        "accuracy is measured on prompts no method saw; default: one list for both")
    g = parser.add_argument_group("methods and seeds")
    g.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="base is always evaluated")
    g.add_argument("--kl_coeffs", nargs="+", type=float, default=[0.01, 0.1, 1.0], help="DRaFT+ KL weights, a run each")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="each seed trains and evaluates every method")
    g.add_argument("--jobs", type=int, default=1, help="training runs (and evaluations) at once, as subprocesses")
    g = parser.add_argument_group("budget: the same for every method")
    g.add_argument("--max_train_steps", type=int, default=200, help="optimizer steps")
    g.add_argument("--train_batch_size", type=int, default=4, help="prompts (DRaFT) or pairs (DPO, SFT) per step")
    g.add_argument("--online_reward_model", default="toyworld_judge",
                   help="the reward of flow_grpo and nft (a reward without gradient serves)")
    g.add_argument("--online_prompts", type=int, default=8, help="flow_grpo / nft: prompts per step")
    g.add_argument("--group_size", type=int, default=8, help="flow_grpo / nft: images per prompt")
    g.add_argument("--online_learning_rate", type=float, default=1e-3, help="flow_grpo and nft")
    g.add_argument("--noise_level", type=float, default=0.7, help="flow_grpo: the SDE's noise level (nft: ignored)")
    g.add_argument("--curve_every", type=int, default=0,
                   help="also evaluate every run's checkpoint-N for N = K, 2K, ... below --max_train_steps: accuracy "
                        "and reward against training time (curve.md); 0: the final weights only")
    # LoRA for all: every method trains the same parameters, and the reference of DRaFT+'s KL and of DPO is the
    # same UNet with its adapters off (no second UNet in memory, so several runs share one GPU), as in the DRaFT+
    # recipe and diffusers' DPO LoRA example. The defaults below are what BENCHMARKS.md's toy-world runs used.
    g.add_argument("--lora_rank", type=int, default=8)
    g.add_argument("--draft_learning_rate", type=float, default=1e-3, help="DRaFT, DRaFT+, DRaFT-LV")
    g.add_argument("--dpo_learning_rate", type=float, default=3e-4, help="DPO and SFT (1e-3 made DPO's images worse)")
    g.add_argument("--truncation_steps", type=int, default=1,
                   help="K of the DRaFT family: with few DDIM steps, K = 1 back-propagates only through the last, "
                        "nearly noise-free step, which can change little of an image in a short run")
    g.add_argument("--beta_dpo", type=float, default=500.0,
                   help="DPO temperature; the paper's 5000 (SD1.5, 64x64 latents) overshot on toy-sd's 32x32 latents: "
                        "training loss above log 2")
    g.add_argument("--num_pairs", type=int, default=1024, help="pairs sampled from the base model for DPO / SFT, per seed")
    g.add_argument("--pair_candidates", type=int, default=4,
                   help="images sampled per pair; toyclip's best and worst of them make the pair (2: a random pair)")
    g.add_argument("--num_heldout_pairs", type=int, default=256, help="held-out pairs (other image seeds), per seed")
    g.add_argument("--implicit_acc_draws", type=int, default=8, help="fixed (timestep, noise) draws per held-out pair")
    g = parser.add_argument_group("sampling and evaluation")
    g.add_argument("--num_inference_steps", type=int, default=10, help="DDIM steps (training, pairs, evaluation)")
    g.add_argument("--guidance_scale", type=float, default=7.5)
    g.add_argument("--eval_seeds", type=int, default=8, help="images per prompt at evaluation (seeds 0 .. N-1)")
    g.add_argument("--diversity", default="pixel", choices=["pixel", "lpips"], help="lpips needs AlexNet in torch hub's cache")
    g.add_argument("--batch_size", type=int, default=32, help="images per UNet call when sampling and evaluating")
    g.add_argument("--compile_sampler", default="off", choices=COMPILE_MODES,
                   help="train_draftp.py's; off: compiling the 4M-parameter toy UNet (about a minute per run on a GPU) "
                        "costs more than it saves in a short run")
    g.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="of every run and evaluation")
    g.add_argument("--output_dir", default="outputs/toyworld-trends")
    args = parser.parse_args(argv)
    if args.curve_every < 0:
        raise UsageError(f"--curve_every must be >= 0, got {args.curve_every}")
    check_shared_args(args, ["num_heldout_pairs", "implicit_acc_draws"], "images", " (kl 0 is the draft method)")
    if max(args.num_pairs, args.num_heldout_pairs) * args.pair_candidates >= HELDOUT_OFFSET:
        raise UsageError(f"--num_pairs x --pair_candidates must stay under {HELDOUT_OFFSET} (the image seeds of the "
                         f"training and the held-out pairs would overlap)")
    if {"dpo", "sft"} & set(args.methods) and args.num_pairs < args.train_batch_size:
        raise UsageError(f"--num_pairs ({args.num_pairs}) must be >= --train_batch_size ({args.train_batch_size})")
    args.online_images = args.online_prompts * args.group_size
    return args


def check_shared_args(args, more_counts, samples: str, kl_note: str = ""):
    """The checks of the flags this experiment and toyvideo_trends.py share: the counts (and `more_counts`) >= 1,
    --eval_seeds and --pair_candidates >= 2 (diversity compares two samples, a pair has two), distinct seeds >= 0,
    distinct DRaFT+ KL weights > 0 (`kl_note` added to that error), online groups of two or more `samples`, and the
    reward names and paths (an unknown one fails here)."""
    for name in ("max_train_steps", "train_batch_size", "online_prompts", "jobs", "num_pairs", "num_inference_steps",
                 "batch_size", "eval_seeds", "pair_candidates", *more_counts):
        least = 2 if name in ("eval_seeds", "pair_candidates") else 1
        if getattr(args, name) < least:
            raise UsageError(f"--{name} must be >= {least}, got {getattr(args, name)}")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise UsageError(f"--seeds must be distinct and >= 0, got {args.seeds}")
    if min(args.kl_coeffs) <= 0 or len({f"{kl:g}" for kl in args.kl_coeffs}) != len(args.kl_coeffs):
        raise UsageError(f"--kl_coeffs must be distinct and > 0{kl_note}, got {args.kl_coeffs}")
    if args.group_size < 2:
        raise UsageError(f"--group_size must be >= 2 (advantages compare the {samples} of one prompt), got "
                         f"{args.group_size}")
    parse_reward_spec(args.reward_model)
    parse_reward_spec(args.online_reward_model)
    parse_name_paths(args.reward_model_paths)


# --------------------------------------------------------------------------- runs as subprocesses
def command(args, script, template, **run):
    values = {**vars(args), "prompts": args.prompts_file, "eval_prompts": args.eval_prompts_file, **run}
    paths = ["--reward_model_paths", *args.reward_model_paths] if args.reward_model_paths else []
    return [sys.executable, script, *[flag.format(**values) for flag in template], *paths]


def training_task(args, name, seed):
    """(label, command, log) of one run, or None if its output already holds the final weights."""
    out = os.path.join(args.output_dir, f"seed{seed}", name)
    if os.path.isfile(os.path.join(out, LORA_WEIGHT_NAME)) or os.path.isfile(os.path.join(out, "unet", "config.json")):
        return None
    script, flags = METHODS["draftp" if name.startswith("draftp-") else name]
    cmd = command(args, script, COMMON_FLAGS + SCRIPT_FLAGS[script] + flags, seed=seed, kl=name.split("-", 1)[-1],
                  output_dir=out, pairs=os.path.join(args.output_dir, f"seed{seed}", "pairs"))
    if args.curve_every:
        cmd += ["--checkpointing_steps", str(args.curve_every)]
    if list_checkpoints(out):  # interrupted earlier: continue it (the scripts never overwrite checkpoints)
        return f"seed {seed} {name} (resumed)", cmd + ["--resume_from_checkpoint", "latest"], f"{out}/train.log"
    # interrupted before its first checkpoint: start it over (the scripts refuse an earlier run's folder otherwise)
    return f"seed {seed} {name}", cmd + ["--overwrite_output_dir"], f"{out}/train.log"


def evaluation_task(args, seed):
    """evaluate.py on the base and every trained method of a seed, or None if its results.csv holds exactly them."""
    out = os.path.join(args.output_dir, f"seed{seed}", "eval")
    models = {n: os.path.join(args.output_dir, f"seed{seed}", n) for n in run_names(args)}
    models.update({f"{n}_step{k}": os.path.join(args.output_dir, f"seed{seed}", n, f"checkpoint-{k}")
                   for n in run_names(args) for k in curve_steps(args)})
    if os.path.isfile(os.path.join(out, "results.csv")):
        with open(os.path.join(out, "results.csv")) as f:
            if [r["model"] for r in csv.DictReader(f)] == ["base", *models]:
                return None
    models = [f"{name}={path}" for name, path in models.items()]
    cmd = command(args, "evaluate.py", EVAL_FLAGS, output_dir=out) + ["--models", *models]
    return f"seed {seed} evaluation", cmd, f"{out}/eval.log"


def curve_steps(args):
    """The steps whose checkpoints are evaluated besides the final weights (--curve_every)."""
    return list(range(args.curve_every, args.max_train_steps, args.curve_every)) if args.curve_every else []


class InFlight:
    """The runs in flight, each in a process group of its own. A stop signal to the experiment (a scheduler's
    SIGTERM, Ctrl-C, SLURM's SIGUSR1) goes on to each as SIGTERM, so that every run checkpoints its last completed
    step and exits (the scripts' stop protocol, exit code 3), and no run starts after it: the same command run again
    resumes them. A run's group is killed once the run ends, so no worker outlives it."""

    def __init__(self):
        self.groups, self.lock, self.stopping = set(), threading.Lock(), False

    def install(self):
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.stop)

    def stop(self, signum=None, frame=None):
        with self.lock:
            self.stopping = True
            for group in self.groups:
                _signal_group(group, signal.SIGTERM)

    def run(self, cmd, log, env) -> int:
        with self.lock:
            if self.stopping:
                return EXIT_STOPPED
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            self.groups.add(proc.pid)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.groups.discard(proc.pid)
            _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(group: int, sig) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


IN_FLIGHT = InFlight()


def run_logged(cmd, log_path, env):
    """Run `cmd` in the repository root (IN_FLIGHT); output to `log_path`, wall time to wall_time.json beside it;
    exit code."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    started = time.time()
    with open(log_path, "w") as log:
        code = IN_FLIGHT.run(cmd, log, env)
    with open(os.path.join(os.path.dirname(log_path), "wall_time.json"), "w") as f:
        json.dump({"wall_seconds": round(time.time() - started, 1), "exit_code": code}, f)
    return code


def run_all(jobs, tasks, env):
    """Run the tasks `jobs` at a time; if any failed, stop the experiment naming their logs; if told to stop, end
    with the scripts' stop exit code once every run in flight has checkpointed."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_logged, cmd, log, env): (label, log) for label, cmd, log in filter(None, tasks)}
        for future in concurrent.futures.as_completed(futures):
            label, log = futures[future]
            code = future.result()
            print(f"{label}: {'done' if code == 0 else 'stopped' if code == EXIT_STOPPED else 'FAILED'}, log {log}",
                  flush=True)
    if IN_FLIGHT.stopping:
        raise Stopped("the experiment was told to stop: its runs checkpointed their last completed step; run the same "
                      "command again to resume them")
    failed = [f"{label} ({log})" for future, (label, log) in futures.items() if future.result() != 0]
    if failed:
        sys.exit(f"error: {len(failed)} run(s) failed: {'; '.join(failed)}. A re-run keeps the finished ones.")


# --------------------------------------------------------------------------- the base model, in this process
class Base:
    """The base pipeline and the scorer: sampling preference pairs, and the held-out implicit accuracy."""

    def __init__(self, args):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
        self.parts = load_pipeline_parts(args.pretrained_model_name_or_path)
        freeze_frozen_parts(self.parts, self.device, self.dtype)
        self.parts.unet.requires_grad_(False).eval().to(self.device, self.dtype)
        self.switcher = evaluate.ModelSwitcher(self.parts, self.device, self.dtype)  # loads outputs as evaluate.py does
        self.resolution, factor = self.parts.default_resolution, self.parts.vae_scale_factor
        self.latent_shape = (self.parts.unet.config.in_channels, self.resolution // factor, self.resolution // factor)
        self.uncond = encode_prompts(self.parts, [""], self.device, self.resolution)
        self.scorer = load_reward(args.reward_model, paths=parse_name_paths(args.reward_model_paths), device=self.device,
                                  dtype=self.dtype)

    def sample_pairs(self, prompts, first_seed, num_pairs, candidates, args):
        """Pick-a-Pic rows. Pair j: prompt j mod P, `candidates` images from seeds first_seed + c*j .. + c*j + c - 1
        (evaluate.py's sampler and noise), all scored; the best and the worst of them make the pair (extreme_pairs).
        candidates = 2 is a plain random pair."""
        from PIL import Image

        items = [(j % len(prompts), first_seed + candidates * j + k) for j in range(num_pairs) for k in range(candidates)]
        images, scores = [], []
        for batch, pixels in evaluate.generate(self.parts, self.parts.unet, items, prompts, self.uncond, self.latent_shape,
                                               args, self.device, self.dtype):
            images += list(pixels)
            scores += self.scorer.score([Image.fromarray(p) for p in pixels], [prompts[i] for i, _ in batch])
        return [{"jpg_0": png_bytes(images[a] / 255), "jpg_1": png_bytes(images[b] / 255),
                 "caption": prompts[j % len(prompts)], "label_0": label_0}
                for j, (a, b, label_0) in enumerate(extreme_pairs(scores, candidates))]

    @torch.no_grad()
    def pair_errors(self, unet, pixels, captions, draws, seed, batch_size):
        """Denoising error of winner and loser of each pair through train_dpo.py's own functions, averaged over
        `draws` fixed draws of (timestep, noise, VAE posterior sample) that every model shares: (N, 2)."""
        n = len(captions)
        noising, guidance = self.noising()
        sizes, crops = torch.full((n, 2, 2), self.resolution), torch.zeros(n, 2, 2, dtype=torch.long)
        errors = torch.zeros(n, 2)
        for draw in range(draws):
            g = step_generator(seed, draw)
            timesteps = noising.draw(n, g)
            noise = torch.randn(n, *self.latent_shape, generator=g)
            posterior_eps = torch.randn(n, 2, *self.latent_shape, generator=g)  # the VAE posterior sample of each image
            for s in range(0, n, batch_size):
                rows = slice(s, s + batch_size)
                batch = {"pixels": pixels[rows], "original_size": sizes[rows], "crop": crops[rows], "caption": captions[rows]}
                latents, cond = encode_batch(self.parts, batch, posterior_eps[rows], 2, self.resolution)
                noisy, target, t = noising.pairs(latents, noise[rows].to(self.device), timesteps[rows].to(self.device))
                err = per_sample_error(model_prediction(unet, noisy.to(self.dtype), t, cond, guidance), target)
                errors[rows] += torch.stack(err.cpu().chunk(2), dim=1)  # [winners; losers] (2b,) -> (b, 2)
        return errors / draws

    def noising(self):
        """train_dpo.py's timesteps and noising for the base model's family with its default flags (DDPM steps
        uniform; SD3 / FLUX: the family's default weighting scheme), and FLUX's training guidance: (Noising, guidance)."""
        return family_noising(self.parts), default_train_guidance(self.parts.family)

    def implicit_accuracy(self, heldout_dir, trained, args, seed):
        """{name: held-out implicit accuracy and DPO loss} of each output against its reference, the base UNet (for
        LoRA the same as its adapters off), from train_dpo.dpo_loss on the draw-averaged errors."""
        import datasets

        ds = datasets.load_from_disk(heldout_dir)
        pairs = [[np.asarray(decode_image(row[c])) for c in PAIR_COLUMNS][:: 1 if row["label_0"] > 0.5 else -1] for row in ds]
        pixels = torch.from_numpy(np.stack(pairs)).permute(0, 1, 4, 2, 3).float() / 127.5 - 1  # (N, 2, 3, R, R) winner first
        shared = (pixels, list(ds["caption"]), args.implicit_acc_draws, seed, args.batch_size)
        reference, out = self.pair_errors(self.parts.unet, *shared), {}
        for name, path in trained.items():
            model = self.pair_errors(self.switcher.unet(name, path), *shared)
            self.switcher.release(path)
            _, m = train_dpo.dpo_loss(model[:, 0], model[:, 1], reference[:, 0], reference[:, 1], args.beta_dpo)
            out[name] = {"implicit_acc": float(m["implicit_acc"]), "heldout_dpo_loss": float(m["loss"]),
                         "heldout_pairs": len(ds)}
        return out


def extreme_pairs(scores, candidates):
    """[(a, b, label_0)] per group of `candidates` consecutive scores: the indices of its best- and worst-scored
    image in index order, label_0 = 1 / 0 where a / b scores higher, 0.5 if every candidate scored the same."""
    out = []
    for start in range(0, len(scores), candidates):
        group = np.asarray(scores[start:start + candidates])
        a, b = sorted([int(group.argmax()), int(group.argmin())])
        if a == b:  # all equal: two of them, a tie
            a, b = 0, 1
        out.append((start + a, start + b, float(np.sign(group[a] - group[b]) / 2 + 0.5)))
    return out


def write_pairs(base, args, seed):
    """seed<k>/pairs to train on (ties kept: --choice_model orders every pair), sampled only while a DPO or SFT run
    of the seed still needs them, and seed<k>/heldout (ties dropped)."""
    first = PAIR_SEED_BASE * (seed + 1)
    to_train = any(training_task(args, name, seed) for name in ("dpo", "sft") if name in run_names(args))
    for name, num_pairs, start in (("pairs", args.num_pairs, first),
                                   ("heldout", args.num_heldout_pairs, first + HELDOUT_OFFSET)):
        folder = os.path.join(args.output_dir, f"seed{seed}", name)
        if name == "pairs" and not to_train:
            continue
        if not os.path.isfile(os.path.join(folder, "state.json")):  # save_to_disk writes state.json last
            rows = base.sample_pairs(args.prompt_list, start, num_pairs, args.pair_candidates, args)
            write_preference_set([r for r in rows if name == "pairs" or r["label_0"] != 0.5], folder)
            print(f"seed {seed}: {num_pairs} {name} sampled from the base model into {folder}", flush=True)


# --------------------------------------------------------------------------- results
def seed_results(args, base, seed):
    """{method: reward and diversity (evaluate.py), prompt accuracy, implicit accuracy, run times} of one seed."""
    from PIL import Image

    seed_dir = os.path.join(args.output_dir, f"seed{seed}")
    eval_dir = os.path.join(seed_dir, "eval")
    with open(os.path.join(eval_dir, "results.csv")) as f:
        results = {r["model"]: {"reward": float(r[f"{args.reward_model}_mean"]),
                                "diversity": float(r[f"diversity_{args.diversity}"])} for r in csv.DictReader(f)}
    if all(parse_prompt(p)["shape"] is not None for p in args.eval_prompt_list):  # toy-world prompts: the judge applies
        accuracy = {}
        with open(os.path.join(eval_dir, "scores.jsonl")) as f:
            for r in map(json.loads, f):
                image = np.asarray(Image.open(os.path.join(eval_dir, r["image"])).convert("RGB"))
                for key, value in prompt_accuracy(image, r["prompt"]).items():
                    accuracy.setdefault(r["model"], {}).setdefault(key, []).append(value)
        for name, by_key in accuracy.items():
            results[name]["prompt_accuracy"] = {k: float(np.mean(v)) for k, v in by_key.items()}
    results["base"]["implicit_acc"] = 0.5  # the reference against itself: every pair a tie
    trained = {n: os.path.join(seed_dir, n) for n in ("dpo", "sft") if n in run_names(args)}
    for name, values in (base.implicit_accuracy(f"{seed_dir}/heldout", trained, args, seed) if trained else {}).items():
        results[name].update(values)
    for name in run_names(args):
        # the first step holds the one-off warm-up (torch.compile of the sampler on a GPU): reported apart
        steps = [m.get("step_seconds", 0.0) for m in read_metrics(f"{seed_dir}/{name}")]
        results[name].update(first_step_seconds=round(steps[0], 2), train_seconds=round(sum(steps[1:]), 2))
        for k in curve_steps(args):  # the curve's time: every step up to the checkpoint, the first included
            results[f"{name}_step{k}"]["elapsed_seconds"] = round(sum(steps[:k]), 2)
        results[name]["elapsed_seconds"] = round(sum(steps), 2)
        if os.path.isfile(f"{seed_dir}/{name}/wall_time.json"):  # absent if the run came from elsewhere
            with open(f"{seed_dir}/{name}/wall_time.json") as f:
                results[name]["wall_seconds"] = json.load(f)["wall_seconds"]
    return results


def summarize(per_seed, names):
    """One row per method: mean and std over seeds of every number (the base's std is 0: its images never change)."""
    def mean_std(values):
        values = [v for v in values if v is not None]
        return (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0) if values else (None, None)

    rows = []
    for name in names:
        runs = [per_seed[seed][name] for seed in per_seed]
        kl = float(name.split("-", 1)[1]) if name.startswith("draftp-") else 0.0 if name.startswith("draft") else None
        row = {"method": name, "kl_coeff": kl, "seeds": len(runs)}
        for key in ("reward", "diversity", "implicit_acc", "train_seconds", "first_step_seconds", "wall_seconds"):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r.get(key) for r in runs])
        for key in runs[0].get("prompt_accuracy", {}):
            row[f"prompt_acc_{key}_mean"], row[f"prompt_acc_{key}_std"] = mean_std([r["prompt_accuracy"][key] for r in runs])
        rows.append(row)
    return rows


def curve_rows(args, per_seed):
    """Prompt accuracy and reward against training time: one row per (method, step) of --curve_every and the final
    step, means and stds over seeds; the base at time 0."""
    def stats(values):
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    seeds = list(per_seed.values())
    base = seeds[0]["base"]
    rows = [{"method": "base", "step": 0, "minutes": 0.0, "accuracy": (base.get("prompt_accuracy", {}).get("all"), 0.0),
             "reward": (base["reward"], 0.0)}]
    for name in run_names(args):
        for k in [*curve_steps(args), args.max_train_steps]:
            runs = [s[name if k == args.max_train_steps else f"{name}_step{k}"] for s in seeds]
            accuracy = [r["prompt_accuracy"]["all"] for r in runs if "prompt_accuracy" in r]
            rows.append({"method": name, "step": k, "minutes": float(np.mean([r["elapsed_seconds"] for r in runs])) / 60,
                         "accuracy": stats(accuracy) if accuracy else (None, None),
                         "reward": stats([r["reward"] for r in runs])})
    return rows


def write_curve(args, rows):
    lines = [f"# Prompt accuracy against training time: {args.pretrained_model_name_or_path}", "",
             f"Minutes: the sum of the run's step_seconds up to the step (sampling, reward and update; --jobs "
             f"{args.jobs} runs shared the device), mean over seeds {', '.join(map(str, args.seeds))}. Accuracy: the "
             f"pixel judge's every-attribute-right rate on {len(args.eval_prompt_list)} "
             f"{'held-out ' if args.heldout_prompts else ''}prompts x {args.eval_seeds} seeds.", "",
             f"| method | step | minutes | prompt accuracy (mean ± std) | {args.reward_model} |", "|---|---|---|---|---|"]
    for r in rows:
        acc = "n/a" if r["accuracy"][0] is None else f"{r['accuracy'][0]:.3f} ± {r['accuracy'][1]:.2g}"
        lines.append(f"| {r['method']} | {r['step']} | {r['minutes']:.2f} | {acc} | {r['reward'][0]:.4g} ± {r['reward'][1]:.2g} |")
    with open(os.path.join(args.output_dir, "curve.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.output_dir, "curve.json"), "w") as f:
        json.dump(rows, f, indent=2)
    if rows[0]["accuracy"][0] is None:  # not toy-world prompts: no judge, no plot
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in run_names(args):
        points = [rows[0]] + [r for r in rows if r["method"] == name]
        ax.errorbar([r["minutes"] for r in points], [r["accuracy"][0] for r in points],
                    yerr=[r["accuracy"][1] for r in points], marker="o", capsize=3, label=name)
    ax.set(xlabel=f"training minutes (mean over seeds; {args.jobs} runs shared the device)",
           ylabel="prompt accuracy (judge), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, "accuracy_vs_minutes.png"), dpi=120)
    plt.close(fig)


def fmt(row, key=None, std=True):
    mean = row if key is None else row.get(f"{key}_mean")
    return "n/a" if mean is None else f"{mean:.4g} ± {row[f'{key}_std']:.2g}" if key and std else f"{mean:.4g}"


def yes(ok):
    return "yes" if ok else "no"


def trend_check(rows, per_seed):
    """Each published trend with the numbers that bear on it; whether it holds is computed, never written by hand."""
    by = {r["method"]: r for r in rows}
    base, trained = by["base"], [r for r in rows if r["method"] != "base"]
    wins = {r["method"]: sum(s[r["method"]]["reward"] > s["base"]["reward"] for s in per_seed.values()) for r in trained}
    gains = [f"{r['method']} {r['reward_mean'] - base['reward_mean']:+.3g} (above base in {wins[r['method']]}/"
             f"{len(per_seed)} seeds)" for r in trained]
    above = sum(r["reward_mean"] > base["reward_mean"] for r in trained)
    lines = [f"1. Every method's reward > base ({fmt(base, 'reward', False)}): holds: {yes(above == len(trained))}, "
             f"{above} of {len(trained)}. Reward minus base: {'; '.join(gains)}."]
    chain = sorted((r for r in trained if r["method"].startswith("draftp-")), key=lambda r: r["kl_coeff"])
    rewards, divs = [r["reward_mean"] for r in chain], [r["diversity_mean"] for r in chain]
    falls, rises = all(a > b for a, b in zip(rewards, rewards[1:])), all(a < b for a, b in zip(divs, divs[1:]))
    lines.append(f"2. Lower KL gives higher reward and lower diversity: holds: {yes(falls and rises)}. DRaFT+ at kl "
                 f"{', '.join('%g' % r['kl_coeff'] for r in chain)}: reward {', '.join(map(fmt, rewards))} (falls as kl "
                 f"rises: {yes(falls)}); diversity {', '.join(map(fmt, divs))} (rises as kl rises: {yes(rises)})."
                 if len(chain) >= 2 else "2. Lower KL gives higher reward and lower diversity: not checked (needs two or "
                 "more DRaFT+ runs).")
    if "draft" in by and chain:
        d = by["draft"]
        p = min(chain, key=lambda r: abs(r["reward_mean"] - d["reward_mean"]))
        gap, spread = abs(p["reward_mean"] - d["reward_mean"]), max(p["reward_std"], d["reward_std"])
        lines.append(f"3. At equal reward DRaFT+ keeps more diversity than DRaFT: holds: "
                     f"{yes(p['diversity_mean'] > d['diversity_mean'])}. {p['method']} has the reward closest to draft's: "
                     f"{fmt(p, 'reward')} vs {fmt(d, 'reward')} (gap {gap:.3g}, {'within' if gap <= spread else 'larger than'} "
                     f"the larger std over seeds, {spread:.2g}); diversity {fmt(p, 'diversity')} vs {fmt(d, 'diversity')}.")
    else:
        lines.append("3. At equal reward DRaFT+ keeps more diversity than DRaFT: not checked (needs draft and draftp).")
    if "dpo" in by:
        r = by["dpo"]
        acc, gain = r["implicit_acc_mean"] > 0.5, r["reward_mean"] > base["reward_mean"]
        lines.append(f"4. DPO held-out implicit accuracy > 0.5 and reward > base: holds: {yes(acc and gain)}. Implicit "
                     f"accuracy {fmt(r, 'implicit_acc')} ({yes(acc)}); reward {fmt(r, 'reward')} vs base "
                     f"{fmt(base, 'reward')} ({yes(gain)}).")
    else:
        lines.append("4. DPO held-out implicit accuracy > 0.5 and reward > base: not checked (dpo not in --methods).")
    online = [r for r in trained if r["method"] in ("flow_grpo", "nft")]
    if online and base.get("prompt_acc_all_mean") is not None:
        parts = []
        for r in online:
            above = sum(s[r["method"]]["prompt_accuracy"]["all"] > s["base"]["prompt_accuracy"]["all"]
                        for s in per_seed.values())
            parts.append(f"{r['method']} {fmt(r, 'prompt_acc_all')} (>= 0.5: {yes(r['prompt_acc_all_mean'] >= 0.5)}; "
                         f"above base in {above}/{len(per_seed)} seeds)")
        lines.append(f"5. Online RL on the judge raises prompt accuracy from the base's "
                     f"{fmt(base, 'prompt_acc_all', False)}: {'; '.join(parts)}.")
    return lines


def write_outputs(args, rows, per_seed, checks):
    with open(os.path.join(args.output_dir, "trends.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.output_dir, "trends.json"), "w") as f:
        json.dump({"args": vars(args), "methods": METHODS, "script_flags": SCRIPT_FLAGS, "common_flags": COMMON_FLAGS,
                   "per_seed": per_seed, "summary": rows, "trend_check": checks}, f, indent=2)
    header = ["method", f"{args.reward_model} (mean ± std over seeds)", f"diversity_{args.diversity}", "prompt accuracy",
              "held-out implicit acc", "train s / run (after step 1)"]
    lines = [f"# Toy-world trends: {args.pretrained_model_name_or_path}, reward {args.reward_model}", "",
             f"Seeds {', '.join(map(str, args.seeds))}; {args.max_train_steps} steps x batch {args.train_batch_size}, LoRA rank "
             f"{args.lora_rank}; {args.num_inference_steps} DDIM steps, guidance {args.guidance_scale}; evaluated on "
             f"{len(args.eval_prompt_list)} {'held-out ' if args.heldout_prompts else ''}prompts x {args.eval_seeds} seeds. DPO / SFT: {args.num_pairs} pairs per seed, each the "
             f"best and worst of {args.pair_candidates} base samples by {args.reward_model}, beta {args.beta_dpo:g}, lr "
             f"{args.dpo_learning_rate:g} (DRaFT family: lr {args.draft_learning_rate:g}). Flow-GRPO / NFT: "
             f"{args.online_prompts} prompts x {args.group_size} images per step on {args.online_reward_model}, lr "
             f"{args.online_learning_rate:g}. The base's implicit accuracy is 0.5 by definition.",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([r["method"], fmt(r, "reward"), fmt(r, "diversity"), fmt(r, "prompt_acc_all"),
                                 fmt(r, "implicit_acc"), fmt(r, "train_seconds", False)]) + " |" for r in rows]
    lines += ["", "## Trend check", "", *checks, "", "Per-attribute prompt accuracy, wall times and every seed's numbers: "
              "trends.csv, trends.json. The plot: reward_vs_diversity.png."]
    with open(os.path.join(args.output_dir, "trends.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(args, rows):
    """Reward vs diversity, one point per method with error bars over seeds; DRaFT (kl 0) and DRaFT+ joined by kl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for k, r in enumerate(rows):
        ax.errorbar(r["diversity_mean"], r["reward_mean"], xerr=r["diversity_std"], yerr=r["reward_std"], fmt="o", capsize=3)
        ax.annotate(r["method"], (r["diversity_mean"], r["reward_mean"]), textcoords="offset points",
                    xytext=(5, 5 if k % 2 else -12))  # alternate above / below: close points keep readable labels
    chain = sorted((r for r in rows if r["method"] == "draft" or r["method"].startswith("draftp-")),
                   key=lambda r: r["kl_coeff"])
    if len(chain) > 1:
        ax.plot([r["diversity_mean"] for r in chain], [r["reward_mean"] for r in chain], "--", color="gray",
                label="DRaFT (kl 0), then DRaFT+ by rising kl")
        ax.legend(loc="best", fontsize=8)
    ax.set(xlabel=f"diversity ({args.diversity}), mean ± std over seeds", ylabel=f"{args.reward_model}, mean ± std over seeds")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, "reward_vs_diversity.png"), dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(args):
    args.output_dir = os.path.abspath(args.output_dir)  # the scripts run in the repository root
    os.makedirs(args.output_dir, exist_ok=True)
    prompts = load_prompts(args.prompts, max_prompts=args.max_prompts)
    # one training list and one evaluation list for every script
    args.prompt_list, args.eval_prompt_list = split_prompts(prompts) if args.heldout_prompts else (prompts, prompts)
    args.prompts_file = os.path.join(args.output_dir, "prompts.txt")
    args.eval_prompts_file = os.path.join(args.output_dir, "eval_prompts.txt")
    for path, listed in ((args.prompts_file, args.prompt_list), (args.eval_prompts_file, args.eval_prompt_list)):
        with open(path, "w") as f:
            f.write("\n".join(listed) + "\n")
    save_args(args, args.output_dir)
    IN_FLIGHT.install()  # a stop signal: every run checkpoints and ends, and a re-run resumes them
    # Several processes on one machine: share the CPU threads out rather than oversubscribe them.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))}
    base = Base(args) if {"dpo", "sft"} & set(args.methods) else None

    # ---- sample: preference pairs from the base model (DPO / SFT data, held-out pairs)
    for seed in args.seeds if base else []:
        write_pairs(base, args, seed)

    # ---- train, then evaluate: every method of every seed, --jobs subprocesses at a time
    run_all(args.jobs, [training_task(args, name, seed) for seed in args.seeds for name in run_names(args)], env)
    run_all(args.jobs, [evaluation_task(args, seed) for seed in args.seeds], env)

    # ---- aggregate over seeds: table, trend check, plot
    per_seed = {seed: seed_results(args, base, seed) for seed in args.seeds}
    rows = summarize(per_seed, ["base", *run_names(args)])  # the final weights; checkpoints: curve_rows
    checks = trend_check(rows, per_seed)
    write_outputs(args, rows, per_seed, checks)
    plot(args, rows)
    if args.curve_every:
        write_curve(args, curve_rows(args, per_seed))
    with open(os.path.join(args.output_dir, "trends.md")) as f:
        print(f.read(), flush=True)


if __name__ == "__main__":
    run_main(main, parse_args)
