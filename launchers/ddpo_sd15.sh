#!/usr/bin/env bash
# DDPO on Stable Diffusion 1.5, JPEG compressibility: the DDPO paper's first task.
#
# Sources:
#   Black et al. 2023 (DDPO), and kvablack/ddpo-pytorch config/base.py + config/dgx.py "compressibility": 50 DDIM
#     steps, eta 1.0, guidance 5.0, 512 px, LoRA, lr 3e-4, AdamW weight decay 1e-4, grad clip 1.0, clip_range 1e-4,
#     advantages clipped at 5, timestep_fraction 1.0, prompts from a list of simple animals, reward minus the JPEG
#     size in kB at quality 95 (jpeg_compressibility); 8 GPUs x 8 images x 4 batches = 256 samples per epoch and 4
#     gradient updates per epoch (train batch 4 x accumulation 2 per GPU).
# Ours: the advantages. DDPO normalises each prompt's reward by a running history of that prompt's rewards; here each
#   step draws 16 prompts and 16 images of each (group_size 16) and normalises within the group, as Flow-GRPO does.
#   Also ours: LoRA rank 8, max_train_steps (epochs), the checkpoint and validation intervals.
#
# Images per epoch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM x UPDATES = 8 x 8 x 1 x 4 = 256 = 16 prompts x 16 (DDPO's
# 256 samples per epoch in 4 updates of 64).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root, whatever the caller's folder
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

MODEL=${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
REWARD=${REWARD:-jpeg_compressibility}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/ddpo-sd15}
GPUS=${GPUS:-8}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-8}
GRAD_ACCUM=${GRAD_ACCUM:-1}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/ddp.yaml}

ARGS=(
  --method ddpo
  --pretrained_model_name_or_path "$MODEL"
  --reward_model "$REWARD"
  --prompts animals
  --output_dir "$OUTPUT_DIR"
  --resolution 512
  --num_inference_steps 50 --guidance_scale 5.0 --noise_level 1.0
  --group_size 16 --updates_per_epoch 4
  --timestep_fraction 1.0 --clip_range 1e-4 --adv_clip_max 5 --no-global_std --kl_beta 0
  --use_lora --lora_rank 8
  --learning_rate 3e-4 --adam_weight_decay 1e-4 --max_grad_norm 1.0
  --train_batch_size "$TRAIN_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --max_train_steps 200
  --mixed_precision bf16
  --checkpointing_steps 20 --validation_steps 20
)
# LAUNCHER replaces the launch command (tests set it to a parser-only stub); it is word-split on purpose.
LAUNCHER=${LAUNCHER:-$ACCELERATE_LAUNCH --config_file $ACCELERATE_CONFIG --num_processes $GPUS}
$LAUNCHER train_online.py "${ARGS[@]}" "$@"
