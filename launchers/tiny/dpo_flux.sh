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
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

MODEL=${MODEL:-tiny-flux}
DATA=${DATA:-outputs/toy_prefs}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/tiny-dpo_flux}
MAX_STEPS=${MAX_STEPS:-30}
GPUS=${GPUS:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-4}
GRAD_ACCUM=${GRAD_ACCUM:-1}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/single_gpu.yaml}

[ -e "$DATA" ] || $PYTHON -m utils.toy.synthetic --output_dir "$DATA" --num_pairs 64 --seed 0

ARGS=(
  --pretrained_model_name_or_path "$MODEL"
  --dataset_name "$DATA"
  --output_dir "$OUTPUT_DIR"
  --resolution 32
  --use_lora --lora_rank 8 --beta_dpo 500 --learning_rate 1e-3
  --weighting_scheme none --train_guidance_scale 1.0
  --lr_warmup_steps 0
  --train_batch_size "$TRAIN_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --max_train_steps "$MAX_STEPS"
  --mixed_precision no
  --num_inference_steps 4 --guidance_scale 3.5 --validation_steps 10
  --report_to none
)
# LAUNCHER replaces the launch command (tests set it to a parser-only stub); it is word-split on purpose.
LAUNCHER=${LAUNCHER:-$ACCELERATE_LAUNCH --config_file $ACCELERATE_CONFIG --num_processes $GPUS}
$LAUNCHER train_dpo.py "${ARGS[@]}" "$@"
