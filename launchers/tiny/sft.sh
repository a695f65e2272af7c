#!/usr/bin/env bash
# Tiny offline variant of launchers/sft_sd15.sh: SFT on the preferred images.
# tiny-sd / tiny-sdxl (built in code; trained at 32 px) on a synthetic preference set whose winner is the brighter image
# (python -m utils.toy.synthetic, written once into DATA): runs on a laptop CPU with no download. Values are ours; only the method flags mirror the recipe.
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 1 x 4 x 1 = 4 pairs per optimizer step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

MODEL=${MODEL:-tiny-sd}
DATA=${DATA:-outputs/toy_prefs}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/tiny-sft}
MAX_STEPS=${MAX_STEPS:-30}
GPUS=${GPUS:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-4}
GRAD_ACCUM=${GRAD_ACCUM:-1}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/single_gpu.yaml}

source launchers/tiny/common.bash  # the flags the tiny preference-data launchers share, and the launch line
SAMPLING=(--num_inference_steps 20)
METHOD=(--sft --no-use_lora --learning_rate 1e-4)
tiny_dpo "$@"
