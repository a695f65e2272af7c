#!/usr/bin/env bash
# SFT of Wan 2.1 text-to-video 1.3B on your captioned videos, as NVIDIA NeMo AutoModel fine-tunes it: the videos are
# encoded once (VAE latents and UMT5 embeddings, python -m utils.preencode), then training reads only those.
#
# Source: NVIDIA-NeMo/Automodel, examples/diffusion/finetune/wan2_1_t2v_flow.yaml: Wan-AI/Wan2.1-T2V-1.3B-Diffusers,
#   full fine-tune, batch 1, AdamW lr 5e-6, weight_decay 0.01, betas 0.9/0.999, timestep_sampling uniform with
#   flow_shift 3.0 (here: --weighting_scheme none, t uniform over the model scheduler's shift-3 sigmas), a checkpoint
#   every 50 steps, seed 42, FSDP2.
# Ours: 81 frames at 480 x 832 (WanPipeline's defaults; NeMo's recipe reads whatever its encoding step wrote),
#   8 GPUs with launchers/accelerate/fsdp.yaml, bf16, gradient checkpointing, a constant lr without warmup (the
#   recipe names none), max_train_steps, and train_dpo.py's defaults otherwise (20 % empty captions).
#
# VIDEOS: a captions.jsonl of {"file": ..., "caption": ...} lines (files relative to it); encoded into DATA the first
# time (encoding runs on every GPU, each taking every n-th shard).
# Effective batch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM = 8 x 1 x 1 = 8 videos per optimizer step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root, whatever the caller's folder
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

MODEL=${MODEL:-Wan-AI/Wan2.1-T2V-1.3B-Diffusers}
VIDEOS=${VIDEOS:-}
DATA=${DATA:-outputs/wan-latents}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sft-wan}
GPUS=${GPUS:-8}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-1}
GRAD_ACCUM=${GRAD_ACCUM:-1}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/fsdp.yaml}

if [ ! -e "$DATA" ]; then
  [ -n "$VIDEOS" ] || { echo "error: set VIDEOS to your captions.jsonl (or DATA to an encoded folder)" >&2; exit 2; }
  $ACCELERATE_LAUNCH --num_processes "$GPUS" -m utils.preencode --pretrained_model_name_or_path "$MODEL" \
    --dataset_name "$VIDEOS" --num_frames 81 --height 480 --width 832 --dtype bfloat16 --output_dir "$DATA"
fi

ARGS=(
  --pretrained_model_name_or_path "$MODEL"
  --dataset_name "$DATA"
  --output_dir "$OUTPUT_DIR"
  --sft
  --no-use_lora
  --learning_rate 5e-6 --adam_weight_decay 0.01 --adam_beta1 0.9 --adam_beta2 0.999
  --lr_scheduler constant --lr_warmup_steps 0
  --weighting_scheme none
  --train_batch_size "$TRAIN_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --max_train_steps 2000
  --mixed_precision bf16
  --gradient_checkpointing
  --seed 42
  --checkpointing_steps 50
)
# LAUNCHER replaces the launch command (tests set it to a parser-only stub); it is word-split on purpose.
LAUNCHER=${LAUNCHER:-$ACCELERATE_LAUNCH --config_file $ACCELERATE_CONFIG --num_processes $GPUS}
$LAUNCHER train_dpo.py "${ARGS[@]}" "$@"
