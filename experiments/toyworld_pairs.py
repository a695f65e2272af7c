"""Preference pairs sampled from the base model, for Diffusion-DPO with AI feedback (the DPO quickstart).

Pair j takes prompt j mod P and --pair_candidates images from the base model; the best and the worst of them by
--reward_model make the pair (a tie, kept, where all scored the same: train_dpo.py's --choice_model orders every
pair again). These are the training pairs of experiments/toyworld_trends.py, whose functions this calls: with the
same --seed and sampling flags its seed<k>/pairs begins with the same pairs.

    python experiments/toyworld_pairs.py --output_dir outputs/toy_pairs --num_pairs 128 --seed 0

Writes a `save_to_disk` folder with the Pick-a-Pic columns (jpg_0, jpg_1, label_0, caption) for train_dpo.py's
--dataset_name, and args.json. Progress (a bar over the sampled images) goes to stderr, the closing summary line to
stdout.
"""
import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from experiments.toyworld_trends import PAIR_SEED_BASE, Base  # noqa: E402
from utils import UsageError  # noqa: E402
from utils.data import load_prompts  # noqa: E402
from utils.rewards import parse_reward_spec  # noqa: E402
from utils.toy.synthetic import write_preference_set  # noqa: E402
from utils.train import run_main  # noqa: E402
from utils.train.cli import parse_name_paths  # noqa: E402
from utils.train.outcome import save_args  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default="toy-sd", help="the base model the pairs are sampled from")
    parser.add_argument("--reward_model", default="toyclip", help="the scorer that picks best and worst (the AI feedback)")
    parser.add_argument("--reward_model_paths", nargs="*", default=[], metavar="NAME=PATH")
    parser.add_argument("--prompts", default="toyworld", help="a built-in set, .txt/.jsonl file or dataset")
    parser.add_argument("--max_prompts", type=int, default=None, help="the first N prompts only")
    parser.add_argument("--num_pairs", type=int, default=128, help="pairs to write")
    parser.add_argument("--pair_candidates", type=int, default=4,
                        help="base images sampled per pair; the best and the worst make the pair (2: a random pair)")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"image seeds start at {PAIR_SEED_BASE} x (seed + 1), away from evaluate.py's 0 .. N-1")
    parser.add_argument("--num_inference_steps", type=int, default=10, help="DDIM steps of the sampled images")
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--batch_size", type=int, default=32, help="images per UNet call")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--output_dir", required=True, help="the pair set's folder (train_dpo.py --dataset_name)")
    args = parser.parse_args(argv)
    for name, least in (("num_pairs", 1), ("pair_candidates", 2), ("num_inference_steps", 1), ("batch_size", 1)):
        if getattr(args, name) < least:
            raise UsageError(f"--{name} must be >= {least}, got {getattr(args, name)}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    parse_reward_spec(args.reward_model)
    parse_name_paths(args.reward_model_paths)
    return args


def main(args):
    prompts = load_prompts(args.prompts, max_prompts=args.max_prompts)
    base = Base(args)
    # evaluate.generate, which sample_pairs calls, shows the bar over the num_pairs x pair_candidates images
    print(f"sampling {args.num_pairs} x {args.pair_candidates} images of {args.pretrained_model_name_or_path} and scoring "
          f"them with {args.reward_model}", file=sys.stderr, flush=True)
    rows = base.sample_pairs(prompts, PAIR_SEED_BASE * (args.seed + 1), args.num_pairs, args.pair_candidates, args)
    write_preference_set(rows, args.output_dir)
    save_args(args, args.output_dir)
    ties = sum(r["label_0"] == 0.5 for r in rows)
    print(f"{len(rows)} pairs ({ties} ties) of {len(prompts)} prompts, best and worst of {args.pair_candidates} "
          f"{args.pretrained_model_name_or_path} samples by {args.reward_model}, in {args.output_dir}", flush=True)


if __name__ == "__main__":
    run_main(main, parse_args)
