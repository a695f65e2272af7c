# Sourced by every launchers/tiny/*.sh after it has set its variables (MODEL, OUTPUT_DIR, MAX_STEPS, GPUS,
# TRAIN_BATCH_SIZE, GRAD_ACCUM, ACCELERATE_CONFIG, and DATA for the preference-data ones); not a launcher itself.
# It holds what the tiny launchers share: the flags that are the same in each of them and the launch line. A
# launcher then sets SAMPLING and METHOD (its own flags) and calls tiny_draftp or tiny_dpo with the flags the user
# appended to its command line.
source launchers/env.bash  # PYTHON and ACCELERATE_LAUNCH: the project's .venv if there is one

# LAUNCHER replaces the launch command (tests set it to a parser-only stub); it is word-split on purpose.
LAUNCHER=${LAUNCHER:-$ACCELERATE_LAUNCH --config_file $ACCELERATE_CONFIG --num_processes $GPUS}

BATCH=(
  --train_batch_size "$TRAIN_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --max_train_steps "$MAX_STEPS"
  --mixed_precision no
)

# train_draftp.py with the weight-free color_match reward on the built-in colored_animals prompts, LoRA rank 16.
tiny_draftp() {
  local args=(
    --pretrained_model_name_or_path "$MODEL"
    --reward_model color_match
    --prompts colored_animals
    --output_dir "$OUTPUT_DIR"
    "${SAMPLING[@]}"
    "${METHOD[@]}"
    --learning_rate 3e-3 --lora_rank 16
    "${BATCH[@]}"
    --validation_prompts "a red cat" "a blue dog" --num_validation_images 1 --validation_steps 10
    --report_to none
  )
  $LAUNCHER train_draftp.py "${args[@]}" "$@"
}

# train_dpo.py at 32 px on the synthetic preference set in DATA (the brighter image wins), written once.
tiny_dpo() {
  [ -e "$DATA" ] || $PYTHON -m utils.toy.synthetic --output_dir "$DATA" --num_pairs 64 --seed 0
  local args=(
    --pretrained_model_name_or_path "$MODEL"
    --dataset_name "$DATA"
    --output_dir "$OUTPUT_DIR"
    --resolution 32
    "${METHOD[@]}"
    --lr_warmup_steps 0
    "${BATCH[@]}"
    "${SAMPLING[@]}" --validation_steps 10
    --report_to none
  )
  $LAUNCHER train_dpo.py "${args[@]}" "$@"
}

# train_online.py on the tiny pipeline MODEL with the weight-free brightness reward, groups of 2 images, a few steps.
tiny_online() {
  local args=(
    --pretrained_model_name_or_path "$MODEL"
    --reward_model brightness
    --prompts colored_animals
    --output_dir "$OUTPUT_DIR"
    "${SAMPLING[@]}"
    "${METHOD[@]}"
    --group_size 2
    --learning_rate 1e-3 --lora_rank 8
    "${BATCH[@]}"
    --validation_prompts "a red cat" --num_validation_images 1 --validation_steps 10
    --report_to none
  )
  $LAUNCHER train_online.py "${args[@]}" "$@"
}
