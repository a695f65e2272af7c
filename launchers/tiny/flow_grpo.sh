#!/usr/bin/env bash
# Tiny offline variant of launchers/flow_grpo_sd35.sh: Flow-GRPO on tiny-sd3 (built in code, 64 px), the weight-free brightness reward,
# groups of 2 images, 3 sampling steps: it runs on a laptop CPU in a minute and checks the whole online path
# (sampling, reward, advantages, update, save) with no download. Values are ours; only the method flags mirror the
# recipe.
#
# Images per step: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM x updates per epoch, in groups of 2 images per prompt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

MODEL=${MODEL:-tiny-sd3}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/tiny-flow_grpo}
MAX_STEPS=${MAX_STEPS:-10}
GPUS=${GPUS:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-2}
GRAD_ACCUM=${GRAD_ACCUM:-2}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/single_gpu.yaml}

source launchers/tiny/common.bash  # the flags the tiny launchers share, and the launch line
SAMPLING=(--num_inference_steps 3)
METHOD=(--method flow_grpo --updates_per_epoch 2)
tiny_online "$@"
