#!/usr/bin/env bash
# A real training run of the paper-size BSMamba2 on one CUDA GPU, in two parts of under 10 minutes each (as a
# machine lent by the call would run it); the second resumes the first from its last checkpoint.
#
#   pip install -e ".[gpu,train]" matplotlib     # once: the package, Triton, TensorBoard, the plot
#   bash experiments/training_curve/device.sh start    # synthesize songs, add the real sample track, train ~8 min
#   bash experiments/training_curve/device.sh resume   # resume the same run for RESUME_MINUTES more, plot the curve
#
# Run from the repository root. Results go to $OUT (default ./device_out); data and the run to $WORK (default
# /tmp/training_curve; keep it between the two parts). Optional settings (environment):
#   REAL_DATA  a MUSDB18-HQ-layout folder whose train/ tracks join the synthetic training songs (default: the
#              shared sample, ${BSMAMBA2_SHARED:-../shared}/data/musdb18hq-sample; skipped with a note when absent)
#   WHEELS     a folder of wheels to install first on a machine without network access
set -euo pipefail
PHASE=${1:?start or resume}
WORK=${WORK:-/tmp/training_curve}       # data and run directory; /tmp survives between calls on a warm machine
OUT=${OUT:-$PWD/device_out}
START_MINUTES=${START_MINUTES:-8.2} RESUME_MINUTES=${RESUME_MINUTES:-4}
TRACKS=${TRACKS:-60} SONG_SECONDS=${SONG_SECONDS:-60} WORKERS=${WORKERS:-14}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TQDM_DISABLE=1
PY=python3
mkdir -p "$WORK" "$OUT"
REAL_DATA=${REAL_DATA:-${BSMAMBA2_SHARED:-$PWD/../shared}/data/musdb18hq-sample}
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --find-links "$WHEELS" soundfile soxr tqdm pyyaml matplotlib tensorboard 2>&1 | tail -2
fi

if [ "$PHASE" = start ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  rm -rf "$WORK/data" "$WORK/run"
  $PY -m bsmamba2 synth --out "$WORK/data" --tracks "$TRACKS" --valid-tracks 8 --seconds "$SONG_SECONDS" \
      --seed 11 --vocal-activity mixed --workers "$WORKERS"
  if [ -d "$REAL_DATA/train" ]; then
    cp -r "$REAL_DATA"/train/* "$WORK/data/train/"   # the real MUSDB18-HQ track(s) join training
  else
    echo "no real tracks at $REAL_DATA/train: training on synthetic songs only (set REAL_DATA)"
  fi
  # the paper's model, loss, optimizer, bf16 and EMA; batch 5 on one GPU without accumulation (more updates in the
  # budget); an epoch of 80 steps, each followed by validation of the EMA weights on 8 unseen songs
  $PY -m bsmamba2 train --config bsmamba2-paper --data "$WORK/data" --out "$WORK/run" \
      --set train.effective_batch=5 --set train.epoch_samples=400 --set data.valid_max_excerpts=16 \
      --set data.num_workers=12 --set train.time_limit_minutes="$START_MINUTES" 2>&1 | tee "$OUT/train_start.log"
elif [ "$PHASE" = resume ]; then
  $PY -m bsmamba2 train --out "$WORK/run" --resume \
      --set train.time_limit_minutes="$RESUME_MINUTES" 2>&1 | tee "$OUT/train_resume.log"
  $PY tools/plot_training.py "$WORK/run" --out "$OUT/training_curve.png"
else
  echo "unknown phase $PHASE" >&2
  exit 2
fi
cp "$WORK/run/history.json" "$OUT/"
