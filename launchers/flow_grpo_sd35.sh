#!/usr/bin/env bash
# Flow-GRPO on Stable Diffusion 3.5 Medium, Flow-GRPO's two SD3.5-M recipes: RECIPE=pickscore (the default) or
# RECIPE=geneval (GenEval's object / count / colour / position checks, scored by a GenEval server over HTTP).
#
# Sources:
#   yifan123/flow_grpo, config/grpo.py "pickscore_sd3" and "geneval_sd3": resolution 512, 10 sampling steps in
#     training (40 at evaluation), guidance_scale 4.5, 24 images per prompt, 48 prompts per epoch, two optimizer
#     updates per epoch (gradient_accumulation_steps = num_batches_per_epoch // 2), timestep_fraction 0.99, beta (KL)
#     0.01 (pickscore) / 0.04 (geneval), global std, advantages clipped at 5, clip_range 1e-4; config/base.py: lr 3e-4,
#     AdamW weight decay 1e-4, grad clip 1.0, noise level 0.7; scripts/train_sd3.py: LoRA r 32, alpha 64, "gaussian"
#     init on the joint attention's projections (this toolkit's SD3 targets). Both recipes set train.ema, but its
#     average is updated only at optimizer steps s with (s + 1) % 8 == 0 and checked once per epoch, after two
#     updates, when s is even: it never moves from the start, so no --ema_decay here.
# Ours: the prompts (Flow-GRPO's PickScore prompt set is theirs; 'animals' here, or point PROMPTS at a .txt file),
#   max_train_steps (epochs) and the checkpoint and validation intervals.
#
# GenEval through a server (RECIPE=geneval): run GenEval (its Mask2Former detector, in its own environment) behind
#   the `http` reward's protocol: POST {"prompts": [...], "images": [base64 PNG, ...]} -> {"scores": [...]}, one
#   score per image (utils/reward_server.py is a template). Only prompts travel, so the server looks each one up in
#   GenEval's metadata (Flow-GRPO's dataset/geneval/{train,test}_metadata.jsonl, one record per prompt: tag,
#   objects, counts, colours, positions) and answers the score Flow-GRPO trains on (flow_grpo/rewards.py
#   geneval_score: the `scores` of its GenEval server, to which it sends JPEGs and the metadata records themselves).
#   PROMPTS is that same metadata file (its "prompt" field), GENEVAL_URL the server's address. The client's timeouts
#   and retries: README, "Rewards without a gradient".
#
# Images per epoch: GPUS x TRAIN_BATCH_SIZE x GRAD_ACCUM x UPDATES = 8 x 9 x 8 x 2 = 1152 = 48 prompts x 24 (the
# recipe's 32 GPUs x 9 x 4 batches). Keep the product at 1152 on other GPU counts (e.g. GPUS=4 GRAD_ACCUM=16).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root, whatever the caller's folder
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

RECIPE=${RECIPE:-pickscore}
MODEL=${MODEL:-stabilityai/stable-diffusion-3.5-medium}
case "$RECIPE" in
  pickscore)
    REWARD=(--reward_model "${REWARD:-pickscore}")
    PROMPTS=${PROMPTS:-animals}
    KL_BETA=0.01 ;;
  geneval)
    : "${GENEVAL_URL:?RECIPE=geneval needs GENEVAL_URL, the GenEval reward server (e.g. http://127.0.0.1:18085/)}"
    REWARD=(--reward_model http --reward_model_paths "http=$GENEVAL_URL")
    PROMPTS=${PROMPTS:-dataset/geneval/train_metadata.jsonl}
    KL_BETA=0.04 ;;
  *)
    echo "RECIPE must be pickscore or geneval, got '$RECIPE'" >&2
    exit 2 ;;
esac
OUTPUT_DIR=${OUTPUT_DIR:-outputs/flow-grpo-sd35-$RECIPE}
GPUS=${GPUS:-8}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-9}
GRAD_ACCUM=${GRAD_ACCUM:-8}
UPDATES=${UPDATES:-2}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launchers/accelerate/ddp.yaml}

ARGS=(
  --method flow_grpo
  --pretrained_model_name_or_path "$MODEL"
  "${REWARD[@]}"
  --prompts "$PROMPTS" --prompt_column prompt
  --output_dir "$OUTPUT_DIR"
  --resolution 512
  --num_inference_steps 10 --guidance_scale 4.5 --noise_level 0.7
  --group_size 24 --updates_per_epoch "$UPDATES"
  --timestep_fraction 0.99 --kl_beta "$KL_BETA" --clip_range 1e-4 --adv_clip_max 5 --global_std
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
