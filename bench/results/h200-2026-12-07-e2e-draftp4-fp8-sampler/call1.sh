# call 1: DRaFT+ batch 4 end to end, defaults then --fp8_sampler, same machine; then a profile of the defaults' steps
source .scratch/head.sh
echo "start $(date)"
timeout $(( $(left) - 300 )) python3 bench/e2e.py --out /tmp/r/base --assets .bench_assets --sections draftp4 --steps 15 5 --no_plain > /tmp/r/base.log 2>&1; echo "base rc $? left $(left)"
timeout $(( $(left) - 15 )) python3 bench/e2e.py --out /tmp/r/fp8 --assets .bench_assets --sections draftp4 --steps 15 5 --no_plain --draftp_flags=--fp8_sampler > /tmp/r/fp8.log 2>&1; echo "fp8 rc $? left $(left)"
cat /tmp/r/base/e2e.md /tmp/r/fp8/e2e.md 2>/dev/null
if [ $(left) -gt 90 ]; then
  M=/tmp/bench-models
  timeout $(( $(left) - 10 )) python3 bench/profile_steps.py --out /tmp/r/prof --steps 8 11 -- train_draftp.py --pretrained_model_name_or_path $M/sd15 --reward_model pickscore --reward_model_paths pickscore=$M/pickscore --train_batch_size 4 --max_train_steps 11 --resolution 512 --num_inference_steps 50 --truncation_steps 1 --seed 0 --prompts animals --guidance_scale 7.5 --kl_coeff 0.1 --lora_rank 8 --gradient_checkpointing --checkpointing_steps 100000 --report_to none --output_dir /tmp/prof-run --mixed_precision bf16 > /tmp/r/prof.log 2>&1; echo "prof rc $? left $(left)"
  cp /tmp/prof-run/metrics.jsonl /tmp/r/prof/ 2>/dev/null; rm -f /tmp/r/prof/trace.json.gz
  python3 -c "import json; d=json.load(open('/tmp/r/prof/profile.json')); print({k: d[k] for k in ('wall_s_per_step','gpu_busy_s_per_step','busy_pct','kernel_launches_per_step','gpu_s_per_step_by_kind')})" 2>&1 | tail -2
fi
