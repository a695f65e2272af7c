#!/usr/bin/env bash
# DiffusionNFT on Stable Diffusion 3.5 Medium with PickScore, as DiffusionNFT's "sd3_pickscore" recipe.
#
# Sources:
#   NVlabs/DiffusionNFT, config/nft.py (_get_config for sd3, sd3_pickscore): resolution 512, 10 sampling steps,
#     sampling without CFG (guidance_scale 1.0, a deterministic solver), 24 images per prompt, 48 groups per epoch,
#     beta 1.0 (the mixing of trained and old policy), decay_type 1 (old policy decay min(0.001 t, 0.5)), KL weight
#     1e-4 (train.beta); config/base.py: lr 3e-4, AdamW weight decay 1e-4, grad clip 1.0, advantages clipped at 5,
#     timestep_fraction 0.99; LoRA r 32, alpha 64 as Flow-GRPO's SD3 set-up.
# Ours: the ODE sampler (ours is Euler; theirs a second-order DPM solver), the prompts, max_train_steps (epochs) and
#   the checkpoint and validation intervals.
#
# Images per epoch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM x UPDATES = 8 x 9 x 16 x 1 = 1152 = 48 groups x 24.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root, whatever the caller's folder
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

MODEL=${MODEL:-stabilityai/stable-diffusion-3.5-medium}
REWARD=${REWARD:-pickscore}
PROMPTS=${PROMPTS:-animals}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/nft-sd35}
GPUS=${GPUS:-8}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-9}
GRAD_ACCUM=${GRAD_ACCUM:-16}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/ddp.yaml}

ARGS=(
  --method nft
  --pretrained_model_name_or_path "$MODEL"
  --reward_model "$REWARD"
  --prompts "$PROMPTS"
  --output_dir "$OUTPUT_DIR"
  --resolution 512
  --num_inference_steps 10 --guidance_scale 1.0
  --group_size 24
  --nft_beta 1.0 --nft_decay 1 --kl_beta 1e-4 --adv_clip_max 5 --timestep_fraction 0.99 --global_std
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
