#!/usr/bin/env bash
# Every GPU check of the fast path in one process tree, for one device call (nvidia-h100-x1 or nvidia-h200):
#   kernel and parity tests compiled on the GPU, the inference/training benchmark with its profile, and the
#   `Separator` end to end (paper-size model at batch 8; a small model at small batches, as `evaluate` runs it).
# Run from the repository root. Needs: the wheels of soundfile/soxr/tqdm/pyyaml in $WHEELS (default .wheels-min),
# the official fixtures in $BSMAMBA2_SHARED (default .devshared). Results go to $OUT (or ./device_out).
set -uo pipefail
OUT=${OUT:-$PWD/device_out}
WHEELS=${WHEELS:-.wheels-min}
export BSMAMBA2_SHARED=${BSMAMBA2_SHARED:-$PWD/.devshared} PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
STEPS=${STEPS:-tests bench separate}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --find-links "$WHEELS" soundfile soxr tqdm pyyaml 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for step in $STEPS; do
  case $step in
    tests)
      python3 -m pytest -q -p no:cacheprovider $(ls tests/test_kernels*.py) tests/test_model.py tests/test_spectral.py \
        -k "kernel or conv or fused or parity or official or grouped" 2>&1 \
        | tail -15 | tee "$OUT/gpu_tests.log" ;;
    bench)
      python3 benchmarks/bench_gpu.py --runs mamba:triton,roformer:- --checkpointing both --profile \
        --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log" | tail -60 ;;
    separate)
      python3 benchmarks/bench_separate.py rtf --model paper --seconds 64 --device cuda --precision bf16 \
        --batch-size 8 --repeat 3 --profile 2>&1 | tee "$OUT/separate_paper.log" | tail -45
      # the bundled small model (D=96, L=4) as `evaluate` runs it: the paper's mode, 30-s songs, batch 4
      python3 benchmarks/bench_separate.py rtf --model src/bsmamba2/assets/demo-bsmamba2-synthetic.safetensors \
        --seconds 30 --device cuda --precision bf16 --batch-size 4 --mode paper --repeat 3 2>&1 \
        | tee "$OUT/separate_small.log" | tail -3 ;;
    sweep)
      python3 benchmarks/bench_gpu.py --runs mamba:triton --no-train --scan-sweep --iters 5 2>&1 | tail -40 ;;
  esac
done
