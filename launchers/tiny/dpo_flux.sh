#!/usr/bin/env bash
# Tiny offline variant of launchers/dpo_flux.sh: Diffusion-DPO LoRA on the tiny FLUX pipeline (a flow-matching
# transformer with a guidance embedding, CLIP-L + T5 text encoders, built in code; trained at 32 px) on a synthetic
# preference set whose winner is the brighter image (python -m utils.toy.synthetic, written once into DATA): runs on a
# laptop CPU with no download; the loss starts at log 2. Values are ours; only the method flags mirror the recipe.
# (MODEL=tiny-sd3 runs the same on the tiny SD3 pipeline; drop --train_guidance_scale, SD3 has no guidance embedding.)
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 1 x 4 x 1 = 4 pairs per optimizer step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

MODEL=${MODEL:-tiny-flux}
DATA=${DATA:-outputs/toy_prefs}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/tiny-dpo_flux}
MAX_STEPS=${MAX_STEPS:-30}
GPUS=${GPUS:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-4}
GRAD_ACCUM=${GRAD_ACCUM:-1}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/single_gpu.yaml}

source launchers/tiny/common.bash  # the flags the tiny preference-data launchers share, and the launch line
SAMPLING=(--num_inference_steps 4 --guidance_scale 3.5)
METHOD=(
  --use_lora --lora_rank 8 --beta_dpo 500 --learning_rate 1e-3
  --weighting_scheme none --train_guidance_scale 1.0
)
tiny_dpo "$@"
