#!/usr/bin/env bash
# Pre-train the toy world's text-to-video model: a Wan 2.1-layout pipeline (WanPipeline) whose three parts are the
# project's own: Wan's causal 3D VAE (AutoencoderKLWan, 4x spatial and 4x temporal compression, 8 channels) trained
# as an autoencoder on the toy video world's clips; a 2-layer UMT5 text encoder over the character-level T5 tokenizer,
# kept at its random init (frozen: its embeddings are pre-encoded once); and a 6-block WanTransformer3DModel trained
# from a random init by the project's own SFT (train_dpo.py --sft on the pre-encoded clips, flow matching: velocity
# target, logit-normal timesteps shifted by the scheduler's flow_shift, 1.0 here). Writes utils/toy/assets/toy-wan,
# then samples it on the toyvideo prompt set with evaluate.py and prints the toy video judge's accuracy.
#
# Defaults: 8000 clips of 9 frames at 64 px (python -m utils.toy.video_world in 8 processes, about 40 ms a clip on
# one CPU core); the VAE 3000 steps x 16 clips at lr 1e-3 (cosine) on the first 4000 clips, checked on 200 held-out
# ones (the judge's accuracy on its reconstructions is printed); the transformer 5000 steps x 64 clips, lr 5e-4
# cosine, 10 % empty captions, float32; evaluation: the 270 toyvideo prompts x 2 seeds, 20 steps. Not yet timed on a GPU; on a 2-core CPU
# (shared with other jobs) a VAE step of 4 clips of 5 frames took about 10 CPU seconds, an SFT step of 16 clips about 4.
# A smoke run of the whole chain on a CPU (tests/test_toyworld_wan.py runs this):
#   WORK=/tmp/tww TOY_WAN=/tmp/tww/toy-wan NUM_CLIPS=8 CLIP_JOBS=2 NUM_FRAMES=5 VAE_STEPS=2 VAE_BATCH_SIZE=1 \
#     SFT_STEPS=2 TRAIN_BATCH_SIZE=2 EVAL_PROMPTS=1 EVAL_SEEDS=1 EVAL_STEPS=2 bash experiments/toyworld_pretrain_wan.sh
# Extra flags go to train_dpo.py; with --resume_from_checkpoint latest the SFT continues where it stopped (the data,
# the VAE, the initial pipeline and the pre-encoded folder are kept whenever they exist).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WORK=${WORK:-outputs/toyworld-pretrain-wan}
TOY_WAN=${TOY_WAN:-utils/toy/assets/toy-wan}
NUM_CLIPS=${NUM_CLIPS:-8000}
CLIP_JOBS=${CLIP_JOBS:-8}         # processes writing clips
NUM_FRAMES=${NUM_FRAMES:-9}      # 1 + 4k: Wan's VAE keeps the first frame and packs 4 into each latent frame after it
SIZE=${SIZE:-64}                 # pixels; a multiple of 16, at least video_world's MIN_SIZE (56)
VAE_STEPS=${VAE_STEPS:-3000}
VAE_BATCH_SIZE=${VAE_BATCH_SIZE:-16}
VAE_LEARNING_RATE=${VAE_LEARNING_RATE:-1e-3}
VAE_CLIPS=${VAE_CLIPS:-4000}     # the VAE trains on the first N clips, held in memory
SFT_STEPS=${SFT_STEPS:-5000}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-64}
LEARNING_RATE=${LEARNING_RATE:-5e-4}
MIXED_PRECISION=${MIXED_PRECISION:-no}
EVAL_PROMPTS=${EVAL_PROMPTS:-270}
EVAL_SEEDS=${EVAL_SEEDS:-2}
EVAL_STEPS=${EVAL_STEPS:-20}
PYTHON=${PYTHON:-python}

if [ ! -e "$WORK/clips/captions.jsonl" ]; then
  # CLIP_JOBS writers in parallel, writer i seeded i and writing its share into part<i>/; one captions file lists
  # them all with paths relative to it
  rm -rf "$WORK/clips"
  pids=()
  for ((i = 0; i < CLIP_JOBS; i++)); do
    $PYTHON -m utils.toy.video_world --output_dir "$WORK/clips/part$i" --num_clips $(((NUM_CLIPS + i) / CLIP_JOBS)) \
      --num_frames "$NUM_FRAMES" --size "$SIZE" --seed "$i" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  for ((i = 0; i < CLIP_JOBS; i++)); do
    sed "s#\"file\": \"#\"file\": \"part$i/#" "$WORK/clips/part$i/captions.jsonl"
  done > "$WORK/clips/captions.tmp"
  mv "$WORK/clips/captions.tmp" "$WORK/clips/captions.jsonl"
fi
echo "[$SECONDS s] clips ready"
[ -e "$WORK/vae" ] || $PYTHON -m utils.toy.models train-wan-vae --data "$WORK/clips" --out "$WORK/vae" \
  --steps "$VAE_STEPS" --batch_size "$VAE_BATCH_SIZE" --lr "$VAE_LEARNING_RATE" --max_clips "$VAE_CLIPS"
[ -e "$WORK/init" ] || $PYTHON -m utils.toy.models init-wan-pipeline --vae "$WORK/vae" --out "$WORK/init"
echo "[$SECONDS s] VAE and initial pipeline ready"
# posteriors and caption embeddings once, in float32 (rerunning skips finished shards)
$PYTHON -m utils.preencode --pretrained_model_name_or_path "$WORK/init" --dataset_name "$WORK/clips/captions.jsonl" \
  --num_frames "$NUM_FRAMES" --resolution "$SIZE" --dtype float32 --batch_size 32 --rows_per_shard 256 \
  --output_dir "$WORK/latents"
echo "[$SECONDS s] clips pre-encoded"
case " $* " in
  *" --resume_from_checkpoint "*) ;;
  *) rm -rf "$WORK/sft" ;;
esac
# the timesteps and the loss weights are Wan's defaults for --sft (--weighting_scheme logit_normal on the sigmas
# shifted by the scheduler's flow_shift); the empty captions come from the pre-encoded folder's "" embedding
$PYTHON train_dpo.py --sft --pretrained_model_name_or_path "$WORK/init" --dataset_name "$WORK/latents" \
  --proportion_empty_prompts 0.1 --no-use_lora \
  --train_batch_size "$TRAIN_BATCH_SIZE" --learning_rate "$LEARNING_RATE" --lr_scheduler cosine --lr_warmup_steps 100 \
  --max_train_steps "$SFT_STEPS" --checkpointing_steps 500 --checkpoints_total_limit 2 \
  --mixed_precision "$MIXED_PRECISION" --seed 0 --report_to none --output_dir "$WORK/sft" "$@"
echo "[$SECONDS s] transformer trained"
$PYTHON -m utils.toy.models finish-pipeline --init "$WORK/init" --unet "$WORK/sft" --out "$TOY_WAN"
rm -rf "$WORK/eval"
$PYTHON evaluate.py --pretrained_model_name_or_path "$TOY_WAN" --prompts toyvideo --max_prompts "$EVAL_PROMPTS" \
  --num_seeds "$EVAL_SEEDS" --num_frames "$NUM_FRAMES" --resolution "$SIZE" --num_inference_steps "$EVAL_STEPS" \
  --reward_models brightness --judges toyvideo_acc --diversity none --grid_prompts 8 --output_dir "$WORK/eval"
echo "[$SECONDS s] $TOY_WAN sampled on the toyvideo prompts: the toy video judge's accuracy (toyvideo_acc)"
cat "$WORK/eval/results.md"
