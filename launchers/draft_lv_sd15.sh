#!/usr/bin/env bash
# DRaFT-LV on Stable Diffusion 1.5 with PickScore: DRaFT-1 plus n re-noised copies of the final sample.
#
# Method: Clark et al. 2023 (https://arxiv.org/abs/2309.17400), DRaFT-LV (Algorithm 2): the whole chain runs without
# gradients; its finished x_0 is re-noised to the last timestep n times and each is denoised once with gradients;
# the loss uses the mean of the n rewards. (--truncation_steps stays 1: larger K is refused with DRaFT-LV.)
# n = 2 (--draft_lv_samples 2) is the value we read in the DRaFT paper's DRaFT-LV description; it was not
# re-checked against the paper text for this file, so treat it as our choice until verified.
# Everything else as draft_k1_sd15.sh (NeMo-Aligner draftp_sd.yaml sampling / optimizer values, kl_coeff 0, the
# predicted x_0 of each re-sample step scored: --scored_latent pred_x0).
# Our choices: max_train_steps 2000, prompts 'animals', checkpoint / validation intervals.
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 1 x 1 x 4 = 4 prompts per optimizer step
# (each prompt gives n = 2 decoded images to score).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

MODEL=${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
REWARD=${REWARD:-pickscore}
PROMPTS=${PROMPTS:-animals}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/draft-lv-sd15}
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
  --draft_lv_samples 2
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
