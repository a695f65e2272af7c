#!/usr/bin/env bash
# Tiny offline variant of launchers/draftp_sdxl.sh: DRaFT+ on the tiny SDXL pipeline (two text encoders, time ids).
# tiny-sd / tiny-sdxl (built in code, 64 px), the weight-free color_match reward, a few DDIM steps: it runs on a
# laptop CPU in a minute or two and checks the whole path (sampler, reward, update, save) with no download.
# Values are ours; only the method flags mirror the recipe. (The tiny UNet's LoRA barely moves image colour: append
# --no-use_lora --learning_rate 1e-3 to watch the reward rise within ~10 steps.)
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 1 x 2 x 1 = 2 prompts per optimizer step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

MODEL=${MODEL:-tiny-sdxl}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/tiny-draftp_sdxl}
MAX_STEPS=${MAX_STEPS:-20}
GPUS=${GPUS:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-2}
GRAD_ACCUM=${GRAD_ACCUM:-1}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/single_gpu.yaml}

source launchers/tiny/common.bash  # the flags the tiny DRaFT launchers share, and the launch line
SAMPLING=(--num_inference_steps 5 --timestep_spacing trailing --guidance_scale 7.5)  # the recipe's DDIM spacing
METHOD=(--truncation_steps 1 --kl_coeff 0.1)
tiny_draftp "$@"
