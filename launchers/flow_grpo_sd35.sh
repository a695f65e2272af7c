#!/usr/bin/env bash
# Flow-GRPO on Stable Diffusion 3.5 Medium with PickScore, as Flow-GRPO's "pickscore_sd3" recipe.
#
# Sources:
#   yifan123/flow_grpo, config/grpo.py "pickscore_sd3": resolution 512, 10 sampling steps in training (40 at
#     evaluation), guidance_scale 4.5, 24 images per prompt, 48 prompts per epoch, two optimizer updates per epoch
#     (gradient_accumulation_steps = num_batches_per_epoch // 2), timestep_fraction 0.99, beta (KL) 0.01, global
#     std, advantages clipped at 5, clip_range 1e-4; config/base.py: lr 3e-4, AdamW weight decay 1e-4, grad clip 1.0,
#     noise level 0.7; scripts/train_sd3.py: LoRA r 32, alpha 64, "gaussian" init on the joint attention's
#     projections (this toolkit's SD3 targets).
# Ours: the prompts (Flow-GRPO's PickScore prompt set is theirs; 'animals' here, or point PROMPTS at a .txt file),
#   max_train_steps (epochs) and the checkpoint and validation intervals.
#
# Images per epoch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM x UPDATES = 8 x 9 x 8 x 2 = 1152 = 48 prompts x 24 (the
# recipe's 32 GPUs x 9 x 4 batches). Keep the product at 1152 on other GPU counts (e.g. GPUS=4 GRAD_ACCUM=16).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root, whatever the caller's folder
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

MODEL=${MODEL:-stabilityai/stable-diffusion-3.5-medium}
REWARD=${REWARD:-pickscore}
PROMPTS=${PROMPTS:-animals}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/flow-grpo-sd35}
GPUS=${GPUS:-8}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-9}
GRAD_ACCUM=${GRAD_ACCUM:-8}
UPDATES=${UPDATES:-2}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/ddp.yaml}

ARGS=(
  --method flow_grpo
  --pretrained_model_name_or_path "$MODEL"
  --reward_model "$REWARD"
  --prompts "$PROMPTS"
  --output_dir "$OUTPUT_DIR"
  --resolution 512
  --num_inference_steps 10 --guidance_scale 4.5 --noise_level 0.7
  --group_size 24 --updates_per_epoch "$UPDATES"
  --timestep_fraction 0.99 --kl_beta 0.01 --clip_range 1e-4 --adv_clip_max 5 --global_std
  --use_lora --lora_rank 32 --lora_alpha 64
  --learning_rate 3e-4 --adam_weight_decay 1e-4 --max_grad_norm 1.0
  --train_batch_size "$TRAIN_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --max_train_steps 1000
  --mixed_precision bf16
  --gradient_checkpointing
  --checkpointing_steps 60 --validation_steps 60
)
# LAUNCHER replaces the launch command (tests set it to a parser-only stub); it is word-split on purpose.
LAUNCHER=${LAUNCHER:-$ACCELERATE_LAUNCH --config_file $ACCELERATE_CONFIG --num_processes $GPUS}
$LAUNCHER train_online.py "${ARGS[@]}" "$@"
