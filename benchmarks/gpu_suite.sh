#!/usr/bin/env bash
# Every GPU check of the fast path in one go, on one CUDA GPU (Hopper for the sm_90 kernels):
#   kernel and parity tests compiled on the GPU, the inference/training benchmark with its profile, and the
#   `Separator` end to end (paper-size model at batch 8; the bundled small model at batch 4, as `evaluate` runs it).
#
#   pip install -e ".[gpu,test]"            # once: the package, Triton, pytest
#   bash benchmarks/gpu_suite.sh            # from the repository root; STEPS="bench" for the benchmark alone
#
# Settings (environment):
#   OUT              where logs and JSON go (default ./device_out)
#   STEPS            any of: tests bench separate sweep memory catalog base basetrain basestep
#                    (default "tests bench separate")
#                    memory: training peak and step time, checkpointing off/auto/full and a simulated 24 GB card;
#                    catalog: 64 songs through `torchrun ... separate` against the model alone;
#                    base: inference throughput of this tree and of the tree in $BASE (a `git archive` of an
#                    earlier commit's src/ and benchmarks/bench_gpu.py), alternated in separate processes;
#                    basetrain: the same for the training step without checkpointing (peak memory and s/step; a
#                    $BASE from before the recomputing backward, e.g. 25ec704, needs an H200's memory)
#                    basestep: the same for the shipped config's full step (paper loss, AdamW, EMA; bench_memory.py),
#                    checkpointing off and auto
#   BSMAMBA2_SHARED  the shared test material (official-format fixture); default ../shared beside the checkout.
#                    Without it the official-fixture parity tests fail with a message saying so.
#   WHEELS           optional: a folder of wheels (soundfile, soxr, tqdm, pyyaml) to install first on a machine
#                    without network access
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
STEPS=${STEPS:-tests bench separate}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --find-links "$WHEELS" soundfile soxr tqdm pyyaml 2>&1 | tail -1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for step in $STEPS; do
  case $step in
    tests)
      # the whole output goes to the log as it comes (a run cut short by a time limit still leaves what passed)
      python3 -m pytest -q -p no:cacheprovider -rfE tests/test_kernels*.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
      python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/test_model.py tests/test_spectral.py \
        tests/test_memory.py tests/test_catalog.py tests/test_separate.py 2>&1 | tee -a "$OUT/gpu_tests.log" | tail -8 ;;
    bench)
      python3 benchmarks/bench_gpu.py --runs mamba:triton,roformer:- --checkpointing both --profile \
        --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log" | tail -60 ;;
    separate)
      python3 benchmarks/bench_separate.py rtf --model paper --seconds 64 --device cuda --precision bf16 \
        --batch-size 8 --repeat 3 --profile 2>&1 | tee "$OUT/separate_paper.log" | tail -45
      python3 benchmarks/bench_separate.py rtf --model src/bsmamba2/assets/demo-bsmamba2-synthetic.safetensors \
        --seconds 30 --device cuda --precision bf16 --batch-size 4 --mode paper --repeat 3 2>&1 \
        | tee "$OUT/separate_small.log" | tail -3 ;;
    memory)
      python3 benchmarks/bench_memory.py --archs bsmamba2 --modes saved,off,auto,full,cap --steps 3 --warmup 1 \
        --out "$OUT/bench_memory.json" 2>&1 | tee "$OUT/bench_memory.log" | tail -30 ;;
    catalog)
      python3 benchmarks/bench_catalog.py --songs 64 --device cuda --precision bf16 --check 2 --work /tmp/bench_catalog \
        2>&1 | tee "$OUT/bench_catalog.log" | tail -25 ;;
    base)
      for round in 1 2; do
        python3 benchmarks/bench_gpu.py --runs mamba:triton,roformer:- --no-train --iters 10 \
          --out "$OUT/bench_gpu_head_$round.json" 2>&1 | tail -4 | tee -a "$OUT/base.log"
        (cd "${BASE:?set BASE to an earlier tree}" && PYTHONPATH=$PWD/src python3 benchmarks/bench_gpu.py \
          --runs mamba:triton,roformer:- --no-train --iters 10 --out "$OUT/bench_gpu_base_$round.json" 2>&1 \
          | tail -4 | tee -a "$OUT/base.log")
      done ;;
    basetrain)
      for round in 1 2; do
        python3 benchmarks/bench_gpu.py --runs mamba:triton --checkpointing off --iters 1 --steps 5 \
          --out "$OUT/bench_train_head_$round.json" 2>&1 | tail -3 | tee -a "$OUT/basetrain.log"
        (cd "${BASE:?set BASE to an earlier tree}" && PYTHONPATH=$PWD/src python3 benchmarks/bench_gpu.py \
          --runs mamba:triton --checkpointing off --iters 1 --steps 5 --out "$OUT/bench_train_base_$round.json" 2>&1 \
          | tail -3 | tee -a "$OUT/basetrain.log")
      done ;;
    basestep)
      # the shipped config's full step (paper loss, AdamW, EMA) without checkpointing and with `auto`, this tree
      # against $BASE (a `git archive` of an earlier commit's src/ and benchmarks/), alternated in separate processes
      for round in 1 2; do
        python3 benchmarks/bench_memory.py --archs bsmamba2 --modes off,auto --steps 4 --warmup 1 \
          --out "$OUT/step_head_$round.json" 2>&1 | tail -4 | tee -a "$OUT/basestep.log"
        (cd "${BASE:?set BASE to an earlier tree}" && PYTHONPATH=$PWD/src python3 benchmarks/bench_memory.py \
          --archs bsmamba2 --modes off,auto --steps 4 --warmup 1 --out "$OUT/step_base_$round.json" 2>&1 \
          | tail -4 | tee -a "$OUT/basestep.log")
      done ;;
    sweep)
      python3 benchmarks/bench_gpu.py --runs mamba:triton --no-train --scan-sweep --iters 5 2>&1 | tail -40 ;;
    *)
      echo "unknown step $step (tests, bench, separate, sweep, memory, catalog, base, basetrain, basestep)" >&2
      exit 2 ;;
  esac
done
