# kept here as .scratch/head.sh (ignored by git), which call1.sh to call3.sh source
# sourced at the start of each device call: wheels, results folder, a time guard
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T0=$(date +%s); TOTAL=${TOTAL:-570}
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
mkdir -p /tmp/r
pack() { (cd /tmp && tar czf $OUT/r.tgz r) ; }
trap pack EXIT
{ nvidia-smi; python3 -c "import torch, diffusers, transformers, accelerate, peft; print(torch.__version__, diffusers.__version__, transformers.__version__, accelerate.__version__, peft.__version__)"; git log --oneline -1; nproc; } > /tmp/r/machine.txt 2>&1
