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
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

MODEL=${MODEL:-tiny-sd3}
RESOLUTION=${RESOLUTION:-64}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/tiny-draftp_sd3}
MAX_STEPS=${MAX_STEPS:-20}
GPUS=${GPUS:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-2}
GRAD_ACCUM=${GRAD_ACCUM:-1}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/single_gpu.yaml}

ARGS=(
  --pretrained_model_name_or_path "$MODEL"
  --resolution "$RESOLUTION"
  --reward_model color_match
  --prompts colored_animals
  --output_dir "$OUTPUT_DIR"
  --num_inference_steps 5 --guidance_scale 4.5
  --truncation_steps 1 --kl_coeff 0.1
  --learning_rate 3e-3 --lora_rank 16
  --train_batch_size "$TRAIN_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --max_train_steps "$MAX_STEPS"
  --mixed_precision no
  --validation_prompts "a red cat" "a blue dog" --num_validation_images 1 --validation_steps 10
  --report_to none
)
# LAUNCHER replaces the launch command (tests set it to a parser-only stub); it is word-split on purpose.
LAUNCHER=${LAUNCHER:-$ACCELERATE_LAUNCH --config_file $ACCELERATE_CONFIG --num_processes $GPUS}
$LAUNCHER train_draftp.py "${ARGS[@]}" "$@"
