#!/usr/bin/env bash
# The synthetic sparse-vocal experiment on one CUDA GPU, in two phases (each under 10 minutes on an H100/H200):
#
#   pip install -e ".[gpu,train]" matplotlib     # once: the package, Triton, TensorBoard, the plot
#   bash experiments/sparse_vocals/device.sh train   # synthesize data, train both small models side by side
#   bash experiments/sparse_vocals/device.sh eval    # export, evaluate (Tables III/IV, leakage, real track), pack
#
# Run from the repository root. Results go to $OUT (default ./device_out); data and runs to $WORK (default
# /tmp/sparse_vocals). Optional settings (environment):
#   REAL_DATA     a MUSDB18-HQ-layout folder whose train/ tracks are also evaluated (default: the shared sample,
#                 ${BSMAMBA2_SHARED:-../shared}/data/musdb18hq-sample; skipped with a note when absent)
#   WHEELS        a folder of wheels to install first on a machine without network access
#   CALL_SECONDS  stop watching the training runs after this many seconds (they keep running; `eval` waits)
set -euo pipefail
PHASE=${1:?train or eval}
WORK=${WORK:-/tmp/sparse_vocals}          # synthesized data (kept between runs)
RUN_ROOT=${RUN_ROOT:-$WORK/exp}           # runs, models and reports of one experiment
OUT=${OUT:-$PWD/device_out}
TRAIN_MINUTES=${TRAIN_MINUTES:-7.5}   # per run; both runs share the GPU side by side
DEADLINE=$((SECONDS + ${CALL_SECONDS:-86400}))   # a lent machine with a per-call limit sets CALL_SECONDS
REAL_DATA=${REAL_DATA:-${BSMAMBA2_SHARED:-$PWD/../shared}/data/musdb18hq-sample}
TRACKS=${TRACKS:-120} TEST_TRACKS=${TEST_TRACKS:-12} SONG_SECONDS=${SONG_SECONDS:-30} WORKERS=${WORKERS:-14}
TRAIN_SET=${TRAIN_SET:-}   # extra `--set key=value` overrides for both runs (a dry run on a CPU uses this)
SWEEP=${SWEEP:-1 2 4 8 12 16}
HERE=experiments/sparse_vocals
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
export BSMAMBA2_BACKEND=${BSMAMBA2_BACKEND:-auto}   # Triton kernels on CUDA
PY=python3
mkdir -p "$WORK" "$RUN_ROOT" "$OUT"

running() {  # true while a training run started by the train phase is still alive
  local f
  for f in "$RUN_ROOT"/*.pid; do
    [ -e "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && return 0
  done
  return 1
}

if [ "$PHASE" = train ]; then
  if [ -n "${WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --find-links "$WHEELS" soundfile soxr tqdm pyyaml matplotlib tensorboard 2>&1 | tail -2
  fi
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
    echo $! > "$RUN_ROOT/$arch.pid"
  done
  # watch the runs until they end (or CALL_SECONDS pass)
  while [ $SECONDS -lt $DEADLINE ] && running; do
    sleep "${POLL:-60}"
    for arch in bsmamba2 bsroformer; do
      echo "[$arch] $(grep -a 'val uSDR' "$RUN_ROOT/$arch.log" | tail -1)"
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true
  done
  cp "$RUN_ROOT"/*.log "$OUT/"
  exit 0
fi

if [ "$PHASE" = eval ]; then
  while running; do sleep 5; done
  mkdir -p "$RUN_ROOT/models" "$RUN_ROOT/reports"
  for arch in bsmamba2 bsroformer; do
    $PY -m bsmamba2 export "$RUN_ROOT/runs/$arch" "$RUN_ROOT/models/$arch-small-fp32.safetensors"
    $PY -c "import sys, torch; from bsmamba2.checkpoint import load_model, save_model, read_metadata
m = load_model(sys.argv[1]); save_model(m, sys.argv[2], read_metadata(sys.argv[1])['metadata'], dtype=torch.float16)" \
      "$RUN_ROOT/models/$arch-small-fp32.safetensors" "$RUN_ROOT/models/$arch-small.safetensors"
    $PY -m bsmamba2 evaluate --checkpoint "$RUN_ROOT/models/$arch-small.safetensors" --data "$WORK/test" \
      --subset test --by-vocal-segment --segment-sweep $SWEEP -o "$RUN_ROOT/reports/$arch-sparse" --no-progress
    if [ -d "$REAL_DATA/train" ]; then
      $PY -m bsmamba2 evaluate --checkpoint "$RUN_ROOT/models/$arch-small.safetensors" --data "$REAL_DATA" \
        --subset train -o "$RUN_ROOT/reports/$arch-real" --no-progress
    else
      echo "no real tracks at $REAL_DATA/train: the real-track evaluation is skipped (set REAL_DATA)"
    fi
    cp "$RUN_ROOT/runs/$arch/history.json" "$RUN_ROOT/reports/$arch-history.json"
    cp "$RUN_ROOT/runs/$arch/config.yaml" "$RUN_ROOT/reports/$arch-config.yaml" 2>/dev/null || true
    cp "$RUN_ROOT/models/$arch-small.safetensors" "$OUT/"
  done
  $PY tools/plot_training.py "$RUN_ROOT"/runs/* --out "$RUN_ROOT/reports/training_curves.png"
  cp "$RUN_ROOT"/*.log "$RUN_ROOT/reports/" 2>/dev/null || true
  tar -C "$RUN_ROOT" -czf "$OUT/reports.tar.gz" reports
  cp "$RUN_ROOT/reports/training_curves.png" "$OUT/"
  exit 0
fi
echo "unknown phase $PHASE" >&2
exit 2
