#!/usr/bin/env bash
# Diffusion-DPO LoRA on FLUX.1-dev with Pick-a-Pic v2: diffusers' Diffusion-DPO LoRA recipe on diffusers' FLUX
# training set-up.
#
# Sources:
#   huggingface/diffusers, examples/research_projects/diffusion_dpo/README.md, "SDXL training command" (the LoRA
#     Diffusion-DPO run): rank 8, learning_rate 1e-5, lr_scheduler constant, lr_warmup_steps 0, train_batch_size 8 x
#     gradient_accumulation_steps 2 = 16 pairs per step, max_train_steps 2000, checkpointing_steps 500,
#     validation_steps 50, gradient checkpointing, seed 0.
#   SalesforceAIResearch/DiffusionDPO (the paper's code): dataset yuvalkirstain/pickapic_v2, max_grad_norm 1.0,
#     proportion_empty_prompts 0.2 (both defaults of train_dpo.py), resolution 1024 for the 1024-px model
#     (launchers/sdxl.sh).
#   Flow-GRPO (scripts/train_sd3_dpo.py, config/dpo.py: train.beta = 100 with the same -0.5 * beta form; SD3.5-M),
#     the only published Diffusion-DPO on a flow model: beta_dpo 100, train_dpo.py's default for SD3 / FLUX. The
#     paper's 5000 is for eps errors; velocity errors move about 1 / (1 - sigma)^2 as much, and at 5000 the loss
#     saturates within the first steps (bench/results/cpu-2026-12-07-flow-dpo-beta.md, toy-sd3).
#   huggingface/diffusers, examples/dreambooth/train_dreambooth_lora_flux.py and README_flux.md: weighting_scheme
#     none (t uniform, the script's default), the guidance embedding at 1 in training (the README's commands pass
#     --guidance_scale=1; here --train_guidance_scale), bf16; FluxPipeline's defaults for the validation images:
#     guidance 3.5, 28 steps; the LoRA targets with --lora_layers unset (--lora_targets diffusers): the double blocks'
#     attention projections of both streams (attn.to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out) and feed-forward
#     layers (ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2), and the single blocks' proj_mlp.
# Ours: beta 100 taken from SD3 to FLUX unchanged (not yet validated on FLUX: keep the loss near log 2 = 0.69 in
#   the first steps; lower beta if it jumps to several units, raise it if it never leaves log 2); 1 GPU with 2 pairs
#   x 8 accumulation (diffusers' 8 x 2 per GPU would hold 16 images of 4096 tokens of a 12B transformer in one
#   pass); LoRA alpha = rank (diffusers' DPO scripts).
#
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 1 x 2 x 8 = 16 pairs per optimizer step (diffusers' 8 x 2).
# With more GPUs keep the product at 16 (GRAD_ACCUM follows GPUS and TRAIN_BATCH_SIZE).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

MODEL=${MODEL:-black-forest-labs/FLUX.1-dev}
DATASET=${DATASET:-yuvalkirstain/pickapic_v2}
CACHE_DIR=${CACHE_DIR:-}  # datasets cache folder (Pick-a-Pic v2 is large); empty: the datasets default
OUTPUT_DIR=${OUTPUT_DIR:-outputs/dpo-flux}
GPUS=${GPUS:-1}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-2}
GRAD_ACCUM=${GRAD_ACCUM:-$((16 / (GPUS * TRAIN_BATCH_SIZE)))}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/single_gpu.yaml}

ARGS=(
  --pretrained_model_name_or_path "$MODEL"
  --dataset_name "$DATASET"
  ${CACHE_DIR:+--cache_dir "$CACHE_DIR"}
  --output_dir "$OUTPUT_DIR"
  --resolution 1024
  --use_lora --lora_rank 8 --lora_targets diffusers
  --beta_dpo 100
  --weighting_scheme none --train_guidance_scale 1.0
  --learning_rate 1e-5 --lr_scheduler constant --lr_warmup_steps 0
  --train_batch_size "$TRAIN_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --max_train_steps 2000
  --checkpointing_steps 500 --validation_steps 50
  --num_inference_steps 28 --guidance_scale 3.5
  --gradient_checkpointing
  --dataloader_num_workers 8
  --mixed_precision bf16
  --seed 0
)
# LAUNCHER replaces the launch command (tests set it to a parser-only stub); it is word-split on purpose.
LAUNCHER=${LAUNCHER:-$ACCELERATE_LAUNCH --config_file $ACCELERATE_CONFIG --num_processes $GPUS}
$LAUNCHER train_dpo.py "${ARGS[@]}" "$@"
