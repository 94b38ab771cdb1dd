#!/usr/bin/env bash
# The synthetic sparse-vocal experiment on a lent GPU machine, in two phases of < 10 minutes each:
#
#   bash experiments/sparse_vocals/device.sh train   # synthesize data, train both small models side by side
#   bash experiments/sparse_vocals/device.sh eval    # export, evaluate (Tables III/IV, leakage, real track), pack
#
# Run from the repository root with the wheels of the pure-Python dependencies in .wheels/ and the shared sample
# track in .devdata/ (both carried; the machine has no network). Results go to $OUT (or ./device_out).
set -euo pipefail
PHASE=${1:?train or eval}
WORK=${WORK:-/tmp/sparse_vocals}          # synthesized data (kept between runs)
RUN_ROOT=${RUN_ROOT:-$WORK/exp}           # runs, models and reports of one experiment
OUT=${OUT:-$PWD/device_out}
TRAIN_MINUTES=${TRAIN_MINUTES:-7.5}   # per run; both runs share the GPU side by side
DEADLINE=$((SECONDS + ${CALL_SECONDS:-585}))   # stay inside the device's 10-minute call
TRACKS=${TRACKS:-120} TEST_TRACKS=${TEST_TRACKS:-12} SONG_SECONDS=${SONG_SECONDS:-30} WORKERS=${WORKERS:-14}
TRAIN_SET=${TRAIN_SET:-}   # extra `--set key=value` overrides for both runs (a dry run on a CPU uses this)
SWEEP=${SWEEP:-1 2 4 8 12 16}
HERE=experiments/sparse_vocals
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
export BSMAMBA2_BACKEND=${BSMAMBA2_BACKEND:-auto}   # Triton kernels on CUDA
PY=python3
mkdir -p "$WORK" "$RUN_ROOT" "$OUT"

if [ "$PHASE" = train ]; then
  $PY -m pip install -q --no-index --find-links .wheels soundfile soxr tqdm pyyaml matplotlib tensorboard 2>&1 | tail -2
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  # training set: mixed vocal activity; validation: 8 tracks; test: sparse vocals, other seeds
  $PY -m bsmamba2 synth --out "$WORK/data" --tracks "$TRACKS" --valid-tracks 8 --seconds "$SONG_SECONDS" \
      --seed 1 --vocal-activity mixed --workers "$WORKERS"
  $PY -m bsmamba2 synth --out "$WORK/test" --tracks 0 --test-tracks "$TEST_TRACKS" --seconds "$SONG_SECONDS" \
      --seed 7 --vocal-activity sparse --workers "$WORKERS"
  for arch in bsmamba2 bsroformer; do
    # both runs get the same wall-clock budget on the same GPU, stopping cleanly at the limit
    setsid nohup $PY -m bsmamba2 train --config "$HERE/$arch-small.yaml" --data "$WORK/data" \
      --out "$RUN_ROOT/runs/$arch" --set train.time_limit_minutes="$TRAIN_MINUTES" $TRAIN_SET \
      > "$RUN_ROOT/$arch.log" 2>&1 < /dev/null &
  done
  # stay in the call (the machine is released when idle) until the runs end
  while [ $SECONDS -lt $DEADLINE ] && pgrep -f "bsmamba2 train" > /dev/null; do
    sleep "${POLL:-60}"
    for arch in bsmamba2 bsroformer; do
      echo "[$arch] $(grep -a 'val uSDR' "$RUN_ROOT/$arch.log" | tail -1)"
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader || true
  done
  cp "$RUN_ROOT"/*.log "$OUT/"
  exit 0
fi

if [ "$PHASE" = eval ]; then
  while pgrep -f "bsmamba2 train" > /dev/null; do sleep 5; done
  mkdir -p "$RUN_ROOT/models" "$RUN_ROOT/reports"
  for arch in bsmamba2 bsroformer; do
    $PY -m bsmamba2 export "$RUN_ROOT/runs/$arch" "$RUN_ROOT/models/$arch-small-fp32.safetensors"
    $PY -c "import sys, torch; from bsmamba2.checkpoint import load_model, save_model, read_metadata
m = load_model(sys.argv[1]); save_model(m, sys.argv[2], read_metadata(sys.argv[1])['metadata'], dtype=torch.float16)" \
      "$RUN_ROOT/models/$arch-small-fp32.safetensors" "$RUN_ROOT/models/$arch-small.safetensors"
    $PY -m bsmamba2 evaluate --checkpoint "$RUN_ROOT/models/$arch-small.safetensors" --data "$WORK/test" \
      --subset test --by-vocal-segment --segment-sweep $SWEEP -o "$RUN_ROOT/reports/$arch-sparse" --no-progress
    $PY -m bsmamba2 evaluate --checkpoint "$RUN_ROOT/models/$arch-small.safetensors" --data .devdata/musdb18hq-sample \
      --subset train -o "$RUN_ROOT/reports/$arch-real" --no-progress
    cp "$RUN_ROOT/runs/$arch/history.json" "$RUN_ROOT/reports/$arch-history.json"
    cp "$RUN_ROOT/runs/$arch/config.yaml" "$RUN_ROOT/reports/$arch-config.yaml" 2>/dev/null || true
    cp "$RUN_ROOT/models/$arch-small.safetensors" "$OUT/"
  done
  $PY benchmarks/plot_training.py "$RUN_ROOT"/runs/* --out "$RUN_ROOT/reports/training_curves.png"
  cp "$RUN_ROOT"/*.log "$RUN_ROOT/reports/" 2>/dev/null || true
  tar -C "$RUN_ROOT" -czf "$OUT/reports.tar.gz" reports
  cp "$RUN_ROOT/reports/training_curves.png" "$OUT/"
  exit 0
fi
echo "unknown phase $PHASE" >&2
exit 2
