#!/usr/bin/env bash
# A real training run of the paper-size BSMamba2 on one lent GPU, longer than one 10-minute device call: two calls on
# the same warm machine, the second resuming the first from its last checkpoint.
#
#   bash experiments/training_curve/device.sh start    # synthesize songs, add the shared real track, train ~8 min
#   bash experiments/training_curve/device.sh resume   # resume the same run for RESUME_MINUTES more, plot the curve
#
# Run from the repository root with the wheels of the pure-Python dependencies in .wheels/ and the shared sample
# track in .devdata/ (both carried: the machine has no network). Results go to $OUT (or ./device_out).
set -euo pipefail
PHASE=${1:?start or resume}
WORK=${WORK:-/tmp/training_curve}       # data and run directory; /tmp survives between calls on a warm machine
OUT=${OUT:-$PWD/device_out}
START_MINUTES=${START_MINUTES:-8.2} RESUME_MINUTES=${RESUME_MINUTES:-4}
TRACKS=${TRACKS:-60} SONG_SECONDS=${SONG_SECONDS:-60} WORKERS=${WORKERS:-14}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TQDM_DISABLE=1
PY=python3
mkdir -p "$WORK" "$OUT"
$PY -m pip install -q --no-index --find-links .wheels soundfile soxr tqdm pyyaml matplotlib tensorboard 2>&1 | tail -2

if [ "$PHASE" = start ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  rm -rf "$WORK/data" "$WORK/run"
  $PY -m bsmamba2 synth --out "$WORK/data" --tracks "$TRACKS" --valid-tracks 8 --seconds "$SONG_SECONDS" \
      --seed 11 --vocal-activity mixed --workers "$WORKERS"
  cp -r .devdata/musdb18hq-sample/train/* "$WORK/data/train/"   # the shared real MUSDB18-HQ track joins training
  # the paper's model, loss, optimizer, bf16 and EMA; batch 5 on one GPU without accumulation (more updates in the
  # budget); an epoch of 80 steps, each followed by validation of the EMA weights on 8 unseen songs
  $PY -m bsmamba2 train --config bsmamba2-paper --data "$WORK/data" --out "$WORK/run" \
      --set train.effective_batch=5 --set train.epoch_samples=400 --set data.valid_max_excerpts=16 \
      --set data.num_workers=12 --set train.time_limit_minutes="$START_MINUTES" 2>&1 | tee "$OUT/train_start.log"
elif [ "$PHASE" = resume ]; then
  $PY -m bsmamba2 train --out "$WORK/run" --resume \
      --set train.time_limit_minutes="$RESUME_MINUTES" 2>&1 | tee "$OUT/train_resume.log"
  $PY benchmarks/plot_training.py "$WORK/run" --out "$OUT/training_curve.png"
else
  echo "unknown phase $PHASE" >&2
  exit 2
fi
cp "$WORK/run/history.json" "$OUT/"
