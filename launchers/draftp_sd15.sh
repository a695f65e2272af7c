#!/usr/bin/env bash
# DRaFT+ on Stable Diffusion 1.5 with PickScore: NeMo-Aligner's DRaFT+ defaults.
#
# Sources (NVIDIA/NeMo-Aligner, examples/mm/stable_diffusion/conf/draftp_sd.yaml, "sd_draftp_train"):
#   kl_coeff 1.0, truncation_steps 1, DDIM, 50 inference steps, eta 0, guidance 7.5, 512 px,
#   reward_model pickscore, LoRA ("sdlora", adapter_dim 32), fused_adam lr 1e-4, weight_decay 0, betas 0.9/0.999,
#   WarmupHoldPolicy warmup 10 steps then constant, gradient_clip_val 10, precision bf16, seed 1234,
#   micro_batch_size 1, global_batch_size 4 on 1 device.
#   NeMo's DRaFT+ decodes and scores the last DDIM step's predicted x_0: --scored_latent pred_x0 (our default too).
#   Scoring x_{t-1} instead (--scored_latent x_prev, a diffusers pipeline's output) makes the reward gradient 3.4x
#   weaker on this schedule, so kl_coeff 1.0 would weigh the KL like kl_coeff 3.4 does in NeMo.
#   (NeMo's launch_draftp_workstation.sh overrides some of these: KL 0.1, lr 1e-3, 25 steps, full UNet.)
# Our choices (not in that file): max_train_steps 2000; prompts: the built-in 'animals' set (NeMo trained on an
# animals45 webdataset); checkpoint / validation intervals. NeMo also keeps an EMA of the weights
# (exp_manager.ema, decay 0.9999); this toolkit has no EMA.
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 1 x 1 x 4 = 4 prompts per optimizer step (NeMo's
# global_batch_size 4). With more GPUs keep the product at 4 (e.g. GPUS=4 GRAD_ACCUM=1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root, whatever the caller's folder
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

MODEL=${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
REWARD=${REWARD:-pickscore}
PROMPTS=${PROMPTS:-animals}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/draftp-sd15}
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
  --kl_coeff 1.0
  --use_lora --lora_rank 32
  --learning_rate 1e-4 --adam_weight_decay 0.0 --adam_beta1 0.9 --adam_beta2 0.999
  --lr_scheduler constant_with_warmup --lr_warmup_steps 10
  --max_grad_norm 10
  --train_batch_size "$TRAIN_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --max_train_steps 2000
  --mixed_precision bf16
  --seed 1234
  --checkpointing_steps 500 --validation_steps 100
)
# LAUNCHER replaces the launch command (tests set it to a parser-only stub); it is word-split on purpose.
LAUNCHER=${LAUNCHER:-$ACCELERATE_LAUNCH --config_file $ACCELERATE_CONFIG --num_processes $GPUS}
$LAUNCHER train_draftp.py "${ARGS[@]}" "$@"
