#!/usr/bin/env bash
# Pre-train the toy world's models from nothing: data -> two CLIPs -> VAE -> pipeline -> UNet by SFT.
# Writes the committed models utils/toy/assets/toyclip (the scorer) and utils/toy/assets/toy-sd (the pipeline).
#
# The defaults are what made the committed models (README, "The toy world"; times in BENCHMARKS.md):
# the CLIPs on one H100 (4000 steps x 512 pairs from a 50,000-image set), the VAE and the UNet on a 2-core CPU
# (VAE: the tiny VAE fine-tuned for 700 steps x 16 images; UNet: train_dpo.py --sft, 1400 steps x 32 images
# from a 20,000-image set, i.e. GPUS x TRAIN_BATCH_SIZE x 1 = 1 x 32 = 32 images per optimizer step).
# A smoke run of the whole chain on a CPU in ~2 minutes:
#   WORK=/tmp/tw TOY_SD=/tmp/tw/toy-sd TOYCLIP=/tmp/tw/toyclip CLIP_IMAGES=600 NUM_IMAGES=600 CLIP_STEPS=20 \
#   VAE_STEPS=20 SFT_STEPS=3 MIXED_PRECISION=no bash experiments/toyworld_pretrain.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WORK=${WORK:-outputs/toyworld-pretrain}       # data and intermediate models
TOY_SD=${TOY_SD:-utils/toy/assets/toy-sd}         # where the finished pipeline goes
TOYCLIP=${TOYCLIP:-utils/toy/assets/toyclip}      # where the scorer goes
CLIP_IMAGES=${CLIP_IMAGES:-50000}             # the CLIPs' image-caption set
NUM_IMAGES=${NUM_IMAGES:-20000}               # the VAE's and the UNet's
CLIP_STEPS=${CLIP_STEPS:-4000}
VAE_STEPS=${VAE_STEPS:-700}
SFT_STEPS=${SFT_STEPS:-1400}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-32}
LEARNING_RATE=${LEARNING_RATE:-5e-4}
MIXED_PRECISION=${MIXED_PRECISION:-no}
PYTHON=${PYTHON:-python}

# Each stage whose output exists is skipped, so a later run (say with more SFT steps) reuses the earlier ones.
[ -e "$WORK/clip-data" ] || $PYTHON -m utils.toy.world --output_dir "$WORK/clip-data" --num_images "$CLIP_IMAGES" --seed 0
[ -e "$WORK/data" ] || $PYTHON -m utils.toy.world --output_dir "$WORK/data" --num_images "$NUM_IMAGES" --seed 0
echo "[$SECONDS s] data ready"
# Two independent CLIPs: the text tower of the first becomes the pipeline's text encoder (as SD1.5 uses CLIP
# ViT-L's), the second is the scorer, so the reward is not the generator's own text model.
[ -e "$WORK/text-clip" ] || $PYTHON -m utils.toy.models train-clip --data "$WORK/clip-data" --steps "$CLIP_STEPS" --seed 0 --out "$WORK/text-clip"
[ -e "$TOYCLIP/config.json" ] || $PYTHON -m utils.toy.models train-clip --data "$WORK/clip-data" --steps "$CLIP_STEPS" --seed 1 --out "$TOYCLIP"
echo "[$SECONDS s] CLIPs ready"
[ -e "$WORK/vae" ] || $PYTHON -m utils.toy.models train-vae --data "$WORK/data" --from_tiny_vae --steps "$VAE_STEPS" \
  --batch_size 16 --lr 3e-4 --seed 0 --out "$WORK/vae"
echo "[$SECONDS s] VAE ready"
[ -e "$WORK/init" ] || $PYTHON -m utils.toy.models init-pipeline --vae "$WORK/vae" --text_clip "$WORK/text-clip" --out "$WORK/init"

# The UNet: noise-prediction training on every caption (10 % empty, for classifier-free guidance), no flips
# (they would swap left and right), latents cached once, min-SNR weighting.
rm -rf "$WORK/sft"
$PYTHON train_dpo.py --sft --pretrained_model_name_or_path "$WORK/init" --dataset_name "$WORK/data" \
  --image_column image --caption_column text --resolution 64 --no_hflip --cache_latents \
  --proportion_empty_prompts 0.1 --snr_gamma 5 --no-use_lora \
  --train_batch_size "$TRAIN_BATCH_SIZE" --learning_rate "$LEARNING_RATE" --lr_scheduler cosine --lr_warmup_steps 100 \
  --max_train_steps "$SFT_STEPS" --checkpointing_steps 200 --checkpoints_total_limit 2 \
  --mixed_precision "$MIXED_PRECISION" --seed 0 \
  --validation_prompts "two red circles on the left" "three yellow triangles" \
  --validation_steps 100000 --num_inference_steps 20 --report_to none --output_dir "$WORK/sft" "$@"
echo "[$SECONDS s] UNet trained"
$PYTHON -m utils.toy.models finish-pipeline --init "$WORK/init" --unet "$WORK/sft" --out "$TOY_SD"
