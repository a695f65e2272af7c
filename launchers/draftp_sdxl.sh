#!/usr/bin/env bash
# DRaFT+ on SDXL 1.0 with PickScore: NeMo-Aligner's SDXL DRaFT+ defaults, on this toolkit's DDIM sampler.
#
# Sources (NVIDIA/NeMo-Aligner, examples/mm/stable_diffusion/conf/draftp_sdxl.yaml, "sdxl_draftp_train"):
#   kl_coeff 1.0, truncation_steps 1, 1024 x 1024, 40 sampling steps, CFG scale 5.0, reward_model pickscore,
#   LoRA ("sdlora", adapter_dim 32), fused_adam lr 1e-4, weight_decay 0, gradient_clip_val 10, precision bf16,
#   micro_batch_size 1, global_batch_size 1.
#   Its sampler (sampling.base): EulerEDMSampler, LegacyDDPMDiscretization, 40 steps, s_churn 0. NeMo's
#   discretizer.py (NVIDIA/NeMo, nemo/collections/multimodal/modules/stable_diffusion/diffusionmodules/) takes the
#   timesteps np.linspace(999, 0, 40, endpoint=False).astype(int) = 999, 974, ..., 24 and appends sigma 0, so its last
#   model call is at t = 24 (sigma 0.15) and the last Euler step lands on that call's predicted x_0, which is what
#   NeMo's megatron_sdxl_draftp_model.py decodes and scores. DDIM with --timestep_spacing trailing takes the same 40
#   timesteps (diffusers' DDIMScheduler: 999 ... 24), and a DDIM step at eta 0 is that Euler step in x / sqrt(alpha_bar);
#   with --scored_latent pred_x0 the scored latent is NeMo's. d(latent)/d(eps) at t = 24 is -0.152, 3.7x the -0.041
#   of t = 1 that SD's own 'leading' spacing ends at: with 'leading', kl_coeff 1.0 would regularise like about 3.7
#   here. (x_{t-1} instead of pred_x0 would be 1.24x weaker at t = 24.)
# Differences, our choices: NeMo's sampler is EulerEDMSampler; this toolkit's differentiable sampler is DDIM with the
# same timesteps and guidance (above). NeMo's SDXL file warms the lr up over 10000 steps (WarmupHoldPolicy); we use
# 10 as in its SD1.5 file, since 10000 exceeds the run. max_train_steps 2000, prompts 'animals', the fp16-fix
# VAE (decoding in bf16 is fine with either VAE; it matters for fp16), gradient checkpointing (memory at 1024 px).
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 1 x 1 x 1 = 1 prompt per optimizer step (NeMo's
# global_batch_size 1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

MODEL=${MODEL:-stabilityai/stable-diffusion-xl-base-1.0}
VAE=${VAE:-madebyollin/sdxl-vae-fp16-fix}
REWARD=${REWARD:-pickscore}
PROMPTS=${PROMPTS:-animals}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/draftp-sdxl}
GPUS=${GPUS:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-1}
GRAD_ACCUM=${GRAD_ACCUM:-1}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/single_gpu.yaml}

ARGS=(
  --pretrained_model_name_or_path "$MODEL"
  --pretrained_vae_model_name_or_path "$VAE"
  --reward_model "$REWARD"
  --prompts "$PROMPTS"
  --output_dir "$OUTPUT_DIR"
  --resolution 1024
  --num_inference_steps 40 --timestep_spacing trailing --eta 0.0 --guidance_scale 5.0
  --truncation_steps 1 --scored_latent pred_x0
  --kl_coeff 1.0
  --use_lora --lora_rank 32
  --gradient_checkpointing
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
