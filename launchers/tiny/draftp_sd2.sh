#!/usr/bin/env bash
# Tiny offline variant of launchers/draftp_sd21.sh: DRaFT+ (K = 1, KL to the base model) on tiny-sd2, the SD 2.x
# layout built in code (v prediction, heads per block, linear projections, OpenCLIP-style text encoder; 64 px), with
# the weight-free color_match reward and a few DDIM steps: it checks the v-prediction path (the sampler's predicted
# x_0, the KL on v, update, save) on a laptop CPU with no download. Values are ours; only the method flags mirror
# the recipe. Append --rescale_zero_terminal_snr to sample on the zero-terminal-SNR schedule from t = 999.
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 1 x 2 x 1 = 2 prompts per optimizer step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

MODEL=${MODEL:-tiny-sd2}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/tiny-draftp_sd2}
MAX_STEPS=${MAX_STEPS:-20}
GPUS=${GPUS:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-2}
GRAD_ACCUM=${GRAD_ACCUM:-1}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/single_gpu.yaml}

source launchers/tiny/common.bash  # the flags the tiny DRaFT launchers share, and the launch line
SAMPLING=(--num_inference_steps 5 --guidance_scale 7.5)
METHOD=(--truncation_steps 1 --kl_coeff 0.1 --scored_latent pred_x0)
tiny_draftp "$@"
