#!/usr/bin/env bash
# SFT baseline on Stable Diffusion 1.5: noise-prediction fine-tuning on the preferred image of each Pick-a-Pic pair.
#
# Source: the Diffusion-DPO train.py's --sft mode (SalesforceAIResearch/DiffusionDPO, README "--sft run SFT
# instead of DPO"); its repository publishes no SFT launcher. Our choices: the data, batch (2048), schedule and
# lr of dpo_sd15.sh (1e-8 x 2048 with --scale_lr, 500 warmup steps, 2000 steps), bf16.
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 8 x 1 x 256 = 2048 images per optimizer step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

MODEL=${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
DATASET=${DATASET:-yuvalkirstain/pickapic_v2}
CACHE_DIR=${CACHE_DIR:-}  # datasets cache folder; empty: the datasets default
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sft-sd15}
GPUS=${GPUS:-8}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-1}
GRAD_ACCUM=${GRAD_ACCUM:-$((2048 / (GPUS * TRAIN_BATCH_SIZE)))}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/ddp.yaml}

ARGS=(
  --pretrained_model_name_or_path "$MODEL"
  --dataset_name "$DATASET"
  ${CACHE_DIR:+--cache_dir "$CACHE_DIR"}
  --output_dir "$OUTPUT_DIR"
  --sft
  --no-use_lora
  --train_batch_size "$TRAIN_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --learning_rate 1e-8 --scale_lr
  --lr_scheduler constant_with_warmup --lr_warmup_steps 500
  --max_train_steps 2000
  --checkpointing_steps 500
  --dataloader_num_workers 16
  --mixed_precision bf16
)
# LAUNCHER replaces the launch command (tests set it to a parser-only stub); it is word-split on purpose.
LAUNCHER=${LAUNCHER:-$ACCELERATE_LAUNCH --config_file $ACCELERATE_CONFIG --num_processes $GPUS}
$LAUNCHER train_dpo.py "${ARGS[@]}" "$@"
