#!/usr/bin/env bash
# Pre-train the toy world's models from nothing: data -> VAE -> two CLIPs -> pipeline -> UNet by SFT.
# Writes the committed models utils/assets/toy-sd (the pipeline) and utils/assets/toyclip (the scorer).
#
# All values are ours (README, "The toy world"). The UNet trains with the project's own train_dpo.py --sft on
# the image-caption set: GPUS x TRAIN_BATCH_SIZE x 1 = 1 x 256 = 256 images per optimizer step.
# Measured: about 9 minutes on one H100 (BENCHMARKS.md); the defaults are far too slow for a CPU, where
# NUM_IMAGES=600 VAE_STEPS=20 CLIP_STEPS=20 SFT_STEPS=3 TRAIN_BATCH_SIZE=8 runs the whole chain in ~2 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WORK=${WORK:-outputs/toyworld-pretrain}       # data and intermediate models
TOY_SD=${TOY_SD:-utils/assets/toy-sd}         # where the finished pipeline goes
TOYCLIP=${TOYCLIP:-utils/assets/toyclip}      # where the scorer goes
NUM_IMAGES=${NUM_IMAGES:-50000}
VAE_STEPS=${VAE_STEPS:-6000}
CLIP_STEPS=${CLIP_STEPS:-4000}
SFT_STEPS=${SFT_STEPS:-6000}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-256}
LEARNING_RATE=${LEARNING_RATE:-3e-4}
MIXED_PRECISION=${MIXED_PRECISION:-bf16}
PYTHON=${PYTHON:-python}

# Each stage whose output exists is skipped, so a later run (say with more SFT steps) reuses the earlier ones.
DATA=$WORK/data
[ -e "$DATA" ] || $PYTHON -m utils.toyworld --output_dir "$DATA" --num_images "$NUM_IMAGES" --seed 0
echo "[$SECONDS s] data ready"
# The VAE and the two CLIPs do not depend on each other: on a GPU they train side by side.
PIDS=()
[ -e "$WORK/vae" ] || { $PYTHON -m utils.toyworld_models train-vae --data "$DATA" --steps "$VAE_STEPS" --seed 0 --out "$WORK/vae" & PIDS+=($!); }
[ -e "$WORK/text-clip" ] || { $PYTHON -m utils.toyworld_models train-clip --data "$DATA" --steps "$CLIP_STEPS" --seed 0 --out "$WORK/text-clip" & PIDS+=($!); }
[ -e "$TOYCLIP/config.json" ] || { $PYTHON -m utils.toyworld_models train-clip --data "$DATA" --steps "$CLIP_STEPS" --seed 1 --out "$TOYCLIP" & PIDS+=($!); }
for pid in "${PIDS[@]}"; do wait "$pid"; done  # set -e: a failed one stops the script here
echo "[$SECONDS s] VAE and CLIPs ready"
[ -e "$WORK/init" ] || $PYTHON -m utils.toyworld_models init-pipeline --vae "$WORK/vae" --text_clip "$WORK/text-clip" --out "$WORK/init"

# The UNet: noise-prediction training on every caption (10 % empty, for classifier-free guidance), no flips
# (they would swap left and right), latents cached once, min-SNR weighting.
rm -rf "$WORK/sft"
$PYTHON train_dpo.py --sft --pretrained_model_name_or_path "$WORK/init" --dataset_name "$DATA" \
  --image_column image --caption_column text --resolution 64 --no_hflip --cache_latents \
  --proportion_empty_prompts 0.1 --snr_gamma 5 --no-use_lora \
  --train_batch_size "$TRAIN_BATCH_SIZE" --learning_rate "$LEARNING_RATE" --lr_scheduler cosine \
  --lr_warmup_steps 200 --max_train_steps "$SFT_STEPS" --mixed_precision "$MIXED_PRECISION" --seed 0 \
  --validation_prompts "two red circles on the left" "a blue square on a white background" "three yellow triangles" \
  --validation_steps 100000 --num_inference_steps 20 --report_to none --output_dir "$WORK/sft" "$@"
echo "[$SECONDS s] UNet trained"
$PYTHON -m utils.toyworld_models finish-pipeline --init "$WORK/init" --unet "$WORK/sft" --out "$TOY_SD"
