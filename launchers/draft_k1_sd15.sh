#!/usr/bin/env bash
# DRaFT-1 (DRaFT-K with K = 1, no KL term) on Stable Diffusion 1.5 with PickScore.
#
# Method: Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards"
# (https://arxiv.org/abs/2309.17400): back-propagate the reward through the last K = 1 sampling step only.
# Sampling and optimizer values: NeMo-Aligner's draftp_sd.yaml (see draftp_sd15.sh: 50 DDIM steps, eta 0,
# guidance 7.5, LoRA 32, lr 1e-4, weight decay 0, warmup 10, clip 10, bf16, global batch 4), with kl_coeff 0,
# which is what makes DRaFT+ plain DRaFT; the scored image is NeMo's too, the last step's predicted x_0
# (--scored_latent pred_x0). The DRaFT paper's own optimizer settings are not copied here.
# Our choices: max_train_steps 2000, prompts 'animals', checkpoint / validation intervals.
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 1 x 1 x 4 = 4 prompts per optimizer step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

MODEL=${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
REWARD=${REWARD:-pickscore}
PROMPTS=${PROMPTS:-animals}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/draft-k1-sd15}
GPUS=${GPUS:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-1}
GRAD_ACCUM=${GRAD_ACCUM:-4}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/single_gpu.yaml}

ARGS=(
  --pretrained_model_name_or_path "$MODEL"
  --reward_model "$REWARD"
  --prompts "$PROMPTS"
  --output_dir "$OUTPUT_DIR"
  --num_inference_steps 50 --eta 0.0 --guidance_scale 7.5
  --truncation_steps 1 --scored_latent pred_x0
  --kl_coeff 0.0
  --use_lora --lora_rank 32
  --learning_rate 1e-4 --adam_weight_decay 0.0
  --lr_scheduler constant_with_warmup --lr_warmup_steps 10
  --max_grad_norm 10
  --train_batch_size "$TRAIN_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --max_train_steps 2000
  --mixed_precision bf16
  --checkpointing_steps 500 --validation_steps 100
)
# LAUNCHER replaces the launch command (tests set it to a parser-only stub); it is word-split on purpose.
LAUNCHER=${LAUNCHER:-$ACCELERATE_LAUNCH --config_file $ACCELERATE_CONFIG --num_processes $GPUS}
$LAUNCHER train_draftp.py "${ARGS[@]}" "$@"
