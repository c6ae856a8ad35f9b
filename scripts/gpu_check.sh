#!/usr/bin/env bash
# One prepared GPU session (run through the device tool, or by hand on any CUDA box):
# CUDA correctness checks, then the benchmark set on the real architecture with random weights.
# Results: $OUT/bench.jsonl (one JSON object per measurement), $OUT/*.log.
#   OUT=out bash scripts/gpu_check.sh            # MODEL=tiny-random for a dry run on CPU
#   QUICK=1 bash scripts/gpu_check.sh            # checks + the headline numbers only (~3 min)
set -u
OUT=${OUT:-out}
MODEL=${MODEL:-random-full}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # the pinned transformers/tokenizers wheels, when the box has others
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) | tee "$OUT/gpu.log"
(nvidia-smi --query-compute-apps=pid,used_memory --format=csv || true) | tee -a "$OUT/gpu.log"
date -u | tee -a "$OUT/gpu.log"
B="python3 scripts/bench.py --model $MODEL --out $OUT/bench.jsonl"
step() { echo "=== $*" | tee -a "$OUT/steps.log"; timeout "$@" 2>&1 | grep -v Warning | tee -a "$OUT/steps.log"; clocks; }
# clocks, power and throttle reasons after each step: a throttled or shared GPU shows here
clocks() { nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active,utilization.gpu --format=csv,noheader >> "$OUT/gpu.log" 2>&1 || true; }

step 200 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
if [ -n "${QUICK:-}" ]; then
  step 150 $B --mode engine --batch-sizes 1,16,64,256 --decoders fast-base,fast
  step 150 $B --mode job --images 512 --staging host,pinned
  step 90 $B --mode concurrent --images 64
  step 90 python3 scripts/gpu_profile.py
  echo "=== done" | tee -a "$OUT/steps.log"
  exit 0
fi
step 240 $B --mode engine --batch-sizes 1,4,16,64,128,256 --decoders fast,fast-base,hf --compare-naive --naive-images 16
step 150 $B --mode job --images 512 --staging host,pinned
step 90 $B --mode concurrent --images 64
step 120 $B --mode engine --num-beams 1 --batch-sizes 1,64,256 --decoders fast,hf
step 90 env BLIP_CUDA_GRAPHS=0 $B --mode engine --batch-sizes 1,4,16 --decoders fast
step 90 $B --mode engine --dtype bfloat16 --batch-sizes 1,64,256 --decoders fast
step 60 $B --mode load
echo "=== done" | tee -a "$OUT/steps.log"
