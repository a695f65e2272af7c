#!/usr/bin/env bash
# DRaFT+ on Wan 2.1 text-to-video 1.3B with PickScore on a few frames of each video: NeMo-Aligner's DRaFT+ method
# values on WanPipeline's sampling, the video reward of train_draftp.py (README, "DRaFT+ for video").
#
# Sources:
#   NVIDIA/NeMo-Aligner, examples/mm/stable_diffusion/conf/draftp_sd.yaml ("sd_draftp_train", the DRaFT+ method):
#     truncation_steps 1 (and kl_coeff 1.0 for SD1.5, scaled below), reward_model pickscore, fused_adam lr 1e-4,
#     weight_decay 0, betas 0.9/0.999, WarmupHoldPolicy warmup 10 steps, gradient_clip_val 10, precision bf16,
#     global_batch_size 4 on 1 device, LoRA rank 32.
#   Wan-AI/Wan2.1-T2V-1.3B-Diffusers: WanPipeline.__call__'s guidance_scale 5.0; the model card's 480p for the 1.3B
#     model; the scheduler config's flow_shift 3.0 (480p), which the sampler takes from the model.
#   launchers/draftp_sd35.sh (Flow-GRPO's SD3.5 LoRA set-up): lora_alpha 64 for rank 32, on the attention projections.
# Ours: kl_coeff 0.2, NeMo's 1.0 carried over from eps to velocity as in launchers/draftp_sd35.sh: Wan's shift-3
#   Euler schedule ends, as SD3's, at sigma 0.0089 (any step count), where SD1.5's 50 DDIM steps give
#   d(x_0)/d(eps) = -0.0413, so 0.2 keeps NeMo's balance of reward and KL gradients.
#   Also ours: square 480 px (train_draftp.py samples squares; WanPipeline's default is 480 x 832); 33 frames (9
#   latent frames), not the pipeline's 81, and 20 Euler steps, not its 50, to bound a step's cost; 4 frames scored
#   per video (--reward_frames), no temporal term; prompts 'animals'; max_train_steps 2000; gradient checkpointing
#   (memory); checkpoint and validation intervals.
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 1 x 1 x 4 = 4 videos per optimizer step (NeMo's
# global_batch_size 4). With more GPUs keep the product at 4 (e.g. GPUS=4 GRAD_ACCUM=1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root, whatever the caller's folder
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

MODEL=${MODEL:-Wan-AI/Wan2.1-T2V-1.3B-Diffusers}
REWARD=${REWARD:-pickscore}
PROMPTS=${PROMPTS:-animals}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/draftp-wan}
GPUS=${GPUS:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-1}
GRAD_ACCUM=${GRAD_ACCUM:-4}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/single_gpu.yaml}

ARGS=(
  --pretrained_model_name_or_path "$MODEL"
  --reward_model "$REWARD"
  --prompts "$PROMPTS"
  --output_dir "$OUTPUT_DIR"
  --resolution 480 --num_frames 33
  --num_inference_steps 20 --guidance_scale 5.0
  --reward_frames 4 --temporal_weight 0
  --truncation_steps 1
  --kl_coeff 0.2
  --use_lora --lora_rank 32 --lora_alpha 64
  --learning_rate 1e-4 --adam_weight_decay 0.0 --adam_beta1 0.9 --adam_beta2 0.999
  --lr_scheduler constant_with_warmup --lr_warmup_steps 10
  --max_grad_norm 10
  --train_batch_size "$TRAIN_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --max_train_steps 2000
  --mixed_precision bf16
  --gradient_checkpointing
  --seed 1234
  --checkpointing_steps 500 --validation_steps 100
)
# LAUNCHER replaces the launch command (tests set it to a parser-only stub); it is word-split on purpose.
LAUNCHER=${LAUNCHER:-$ACCELERATE_LAUNCH --config_file $ACCELERATE_CONFIG --num_processes $GPUS}
$LAUNCHER train_draftp.py "${ARGS[@]}" "$@"
