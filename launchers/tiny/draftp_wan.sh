#!/usr/bin/env bash
# Tiny offline variant of launchers/draftp_wan.sh: DRaFT+ on the tiny Wan 2.1 pipeline (a 3-D transformer, the causal
# video VAE and a UMT5 text encoder, built in code), 5-frame videos at 32 px, the weight-free color_match reward on 2
# frames per video: it runs on a laptop CPU in a minute and checks the whole video path (sampler, frame reward through
# the causal decode, update, save) with no download. Values are ours; only the method flags mirror the recipe.
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 1 x 2 x 1 = 2 videos per optimizer step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

MODEL=${MODEL:-tiny-wan}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/tiny-draftp_wan}
MAX_STEPS=${MAX_STEPS:-20}
GPUS=${GPUS:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-2}
GRAD_ACCUM=${GRAD_ACCUM:-1}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/single_gpu.yaml}

source launchers/tiny/common.bash  # the flags the tiny DRaFT launchers share, and the launch line
SAMPLING=(
  --resolution 32 --num_frames 5
  --num_inference_steps 3 --guidance_scale 5.0
)
METHOD=(--truncation_steps 1 --kl_coeff 0.1 --reward_frames 2)
tiny_draftp "$@"
