#!/usr/bin/env bash
# AlignProp-style random truncation on Stable Diffusion 1.5 with HPSv2.
#
# Sources (mihirp1998/AlignProp, config/align_prop.py, function hps()):
#   reward hps, truncated_backprop_rand True with truncated_backprop_minmax (0, 50) -> here K drawn uniformly
#   from [1, 50] once per batch (K >= 1 here: K = 0 would back-propagate nothing); lr 1e-3,
#   adam_weight_decay 0.1, max_grad_norm 5.0, loss_coeff 0.01 (-> --reward_scale 0.01), 50 steps
#   (config.steps), guidance 7.5 (sd_guidance_scale), mixed precision fp16, gradient checkpointing on,
#   total_batch_size 128 with per_gpu_capacity 4. AlignProp's main.py decodes the last DDIM step's prev_sample
#   (x_{t-1}, as a diffusers pipeline does): --scored_latent x_prev.
# Our choices: bf16 instead of fp16 (fewer overflows in the long backward pass); LoRA rank 4 (AlignProp trains
# LoRA attention processors; its rank was not checked for this file); prompts 'animals' (AlignProp's hps()
# uses the HPSv2 prompt list; pass it with PROMPTS=file.txt); max_train_steps 1000; eta 0.
# Drawing K once per batch, not once per denoising step, fixes AlignProp's own bias (see train_draftp.py).
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 4 x 4 x 8 = 128 prompts per optimizer step
# (AlignProp: total_batch_size 128 = 4 GPUs x 4 per GPU x 8 accumulation). Keep the product at 128.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

MODEL=${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
REWARD=${REWARD:-hpsv2}
PROMPTS=${PROMPTS:-animals}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/alignprop-sd15}
GPUS=${GPUS:-4}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-4}
GRAD_ACCUM=${GRAD_ACCUM:-$((128 / (GPUS * TRAIN_BATCH_SIZE)))}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/ddp.yaml}

ARGS=(
  --pretrained_model_name_or_path "$MODEL"
  --reward_model "$REWARD"
  --reward_scale 0.01
  --prompts "$PROMPTS"
  --output_dir "$OUTPUT_DIR"
  --num_inference_steps 50 --eta 0.0 --guidance_scale 7.5
  --truncation_steps_random 1,50 --scored_latent x_prev
  --gradient_checkpointing
  --kl_coeff 0.0
  --use_lora --lora_rank 4
  --learning_rate 1e-3 --adam_weight_decay 0.1
  --max_grad_norm 5.0
  --train_batch_size "$TRAIN_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --max_train_steps 1000
  --mixed_precision bf16
  --checkpointing_steps 100 --validation_steps 50
)
# LAUNCHER replaces the launch command (tests set it to a parser-only stub); it is word-split on purpose.
LAUNCHER=${LAUNCHER:-$ACCELERATE_LAUNCH --config_file $ACCELERATE_CONFIG --num_processes $GPUS}
$LAUNCHER train_draftp.py "${ARGS[@]}" "$@"
