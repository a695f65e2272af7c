#!/usr/bin/env bash
# Pre-train the toy world's flow-matching model: an SD3-layout pipeline (a small MMDiT) on toy-sd's trained VAE and
# text encoder, its transformer trained from a random init by the project's own SFT (train_dpo.py --sft, flow
# matching: velocity target, SD3's logit-normal timesteps). Writes utils/toy/assets/toy-sd3.
#
# The defaults are what made the committed model (README, "The toy world"): 5000 steps x 64 images from the
# 20,000-image set, lr 5e-4 cosine, 10 % empty captions, float32, on one H200 in about 10 minutes (8-9 steps a
# second, beside a benchmark on a second GPU; a 10-minute limit stopped it after step 4222 and
# `--resume_from_checkpoint latest` finished it). On a 2-core CPU a step of 32 images takes about 2 s.
# A smoke run of the whole chain on a CPU in about a minute:
#   WORK=/tmp/twf TOY_SD3=/tmp/twf/toy-sd3 NUM_IMAGES=600 SFT_STEPS=3 bash experiments/toyworld_pretrain_flow.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WORK=${WORK:-outputs/toyworld-pretrain-flow}
TOY_SD3=${TOY_SD3:-utils/toy/assets/toy-sd3}
NUM_IMAGES=${NUM_IMAGES:-20000}
SFT_STEPS=${SFT_STEPS:-5000}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-64}
LEARNING_RATE=${LEARNING_RATE:-5e-4}
MIXED_PRECISION=${MIXED_PRECISION:-no}
PYTHON=${PYTHON:-python}

[ -e "$WORK/data" ] || $PYTHON -m utils.toy.world --output_dir "$WORK/data" --num_images "$NUM_IMAGES" --seed 0
[ -e "$WORK/init" ] || $PYTHON -m utils.toy.models init-flow-pipeline --out "$WORK/init"
echo "[$SECONDS s] data and initial pipeline ready"
# no flips (they would swap left and right), latents cached once; the timesteps and the loss weights are SD3's
# defaults for --sft on an SD3 pipeline (--weighting_scheme logit_normal)
case " $* " in  # extra flags go to train_dpo.py; with --resume_from_checkpoint the run continues where it stopped
  *" --resume_from_checkpoint "*) ;;
  *) rm -rf "$WORK/sft" ;;
esac
$PYTHON train_dpo.py --sft --pretrained_model_name_or_path "$WORK/init" --dataset_name "$WORK/data" \
  --image_column image --caption_column text --resolution 64 --no_hflip --cache_latents \
  --proportion_empty_prompts 0.1 --no-use_lora \
  --train_batch_size "$TRAIN_BATCH_SIZE" --learning_rate "$LEARNING_RATE" --lr_scheduler cosine --lr_warmup_steps 100 \
  --max_train_steps "$SFT_STEPS" --checkpointing_steps 200 --checkpoints_total_limit 2 \
  --mixed_precision "$MIXED_PRECISION" --seed 0 \
  --validation_prompts "two red circles on the left" "three yellow triangles" \
  --validation_steps 100000 --num_inference_steps 20 --report_to none --output_dir "$WORK/sft" "$@"
echo "[$SECONDS s] transformer trained"
$PYTHON -m utils.toy.models finish-pipeline --init "$WORK/init" --unet "$WORK/sft" --out "$TOY_SD3"
