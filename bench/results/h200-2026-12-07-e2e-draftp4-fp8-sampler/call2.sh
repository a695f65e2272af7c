# call 2: bench.py sd15_fp8 (image difference of the FP8 sampler first, then composed b4 rows and profiles)
source .scratch/head.sh
timeout $(( $(left) - 10 )) python3 bench/bench.py --out /tmp/r/fp8bench --sections sd15_fp8 > /tmp/r/fp8bench.log 2>&1; echo "rc $? left $(left)"
cat /tmp/r/fp8bench/bench.md 2>/dev/null | head -60
