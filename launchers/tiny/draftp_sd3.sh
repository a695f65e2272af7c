#!/usr/bin/env bash
# Tiny offline variant of launchers/draftp_sd35.sh: DRaFT+ on the tiny SD3 pipeline (a flow-matching transformer,
# CLIP-L + CLIP-G + T5 text encoders, built in code, 64 px), the weight-free color_match reward, a few Euler steps:
# it runs on a laptop CPU in a minute and checks the whole flow-matching path (sampler, reward, update, save) with
# no download. Values are ours; only the method flags mirror the recipe. (MODEL=tiny-flux RESOLUTION=64 runs the same
# on the tiny FLUX pipeline; pass --guidance_scale 3.5 for its guidance embedding.)
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 1 x 2 x 1 = 2 prompts per optimizer step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

MODEL=${MODEL:-tiny-sd3}
RESOLUTION=${RESOLUTION:-64}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/tiny-draftp_sd3}
MAX_STEPS=${MAX_STEPS:-20}
GPUS=${GPUS:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-2}
GRAD_ACCUM=${GRAD_ACCUM:-1}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/single_gpu.yaml}

source launchers/tiny/common.bash  # the flags the tiny DRaFT launchers share, and the launch line
SAMPLING=(
  --resolution "$RESOLUTION"
  --num_inference_steps 5 --guidance_scale 4.5
)
METHOD=(--truncation_steps 1 --kl_coeff 0.1)
tiny_draftp "$@"
