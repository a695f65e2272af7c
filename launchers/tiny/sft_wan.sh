#!/usr/bin/env bash
# Tiny offline variant of launchers/sft_wan.sh: SFT of tiny-wan (built in code) on clips of the toy video world
# (python -m utils.toy.video_world: shapes moving the way the caption says), 5 frames at 32 px, pre-encoded once into
# DATA. Runs on a laptop CPU with no download; values are ours, only the method flags mirror the recipe.
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 1 x 4 x 1 = 4 videos per optimizer step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

MODEL=${MODEL:-tiny-wan}
VIDEOS=${VIDEOS:-outputs/toy_videos}
DATA=${DATA:-outputs/toy_videos_tiny-wan}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/tiny-sft_wan}
MAX_STEPS=${MAX_STEPS:-20}
GPUS=${GPUS:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-4}
GRAD_ACCUM=${GRAD_ACCUM:-1}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/single_gpu.yaml}

source launchers/tiny/common.bash  # the shared batch flags and the launch line
if [ ! -e "$DATA" ]; then
  [ -e "$VIDEOS" ] || $PYTHON -m utils.toy.video_world --output_dir "$VIDEOS" --num_clips 32 --num_frames 5 --size 64 --seed 0
  $PYTHON -m utils.preencode --pretrained_model_name_or_path "$MODEL" --dataset_name "$VIDEOS/captions.jsonl" \
    --num_frames 5 --resolution 32 --output_dir "$DATA"
fi
ARGS=(
  --pretrained_model_name_or_path "$MODEL"
  --dataset_name "$DATA"
  --output_dir "$OUTPUT_DIR"
  --sft --no-use_lora --learning_rate 1e-4 --lr_scheduler constant --lr_warmup_steps 0
  --weighting_scheme none
  "${BATCH[@]}"
  --report_to none
)
$LAUNCHER train_dpo.py "${ARGS[@]}" "$@"
