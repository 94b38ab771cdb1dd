#!/usr/bin/env bash
# Train the bundled demo model in ONE device call of < 9.5 minutes: synthesize data, train for what is left of the
# wall budget, export the EMA weights (fp16), score them, and hand back the resume checkpoint in parts.
#
#   OUT=/path/to/out bash experiments/demo_model/device.sh            # first call
#   RESUME_FROM=here OUT=... bash experiments/demo_model/device.sh    # a later call on the same machine (data kept)
#   EVAL=0 RESERVE_SECONDS=30 ...                                     # a call that another one continues: no scoring
#   RESUME_FROM=resume OUT=... bash experiments/demo_model/device.sh  # elsewhere: resume/last.pt.part-* carried
#   INIT_FROM=demo OUT=... bash experiments/demo_model/device.sh      # a new run from the shipped model's weights
#
# Run from the repository root; nothing is installed (PYTHONPATH=src; torch, triton, numpy, scipy, soundfile,
# pyyaml, tqdm, matplotlib, safetensors must be there - checked first; wheels in .wheels/ are used if carried).
# Files back in $OUT (<= 8, each < 16 MiB): bsmamba2-demo.safetensors, eval.json, train.log, history.json,
# run.tar.gz (train log, history, config, synth manifest, demo figure and scores) and last.pt.part-aa, -ab, ... (the
# resume checkpoint, 15 MiB parts).
set -euo pipefail
START=$SECONDS
BUDGET=${BUDGET_SECONDS:-500}          # everything done by then (the call's limit is 570 s)
RESERVE=${RESERVE_SECONDS:-80}         # kept for export, evaluation and packing after training
TRAIN_STARTUP=${TRAIN_STARTUP_SECONDS:-45}  # imports, activity detection, kernel compilation before the clock starts
CONFIG=${CONFIG:-experiments/demo_model/bsmamba2-demo.yaml}
WORK=${WORK:-/tmp/demo_model}
OUT=${OUT:?set OUT to the folder whose files come back}
TRACKS=${TRACKS:-400} VALID_TRACKS=${VALID_TRACKS:-8} TEST_TRACKS=${TEST_TRACKS:-16} SONG_SECONDS=${SONG_SECONDS:-30}
LOW_VOICE_TRACKS=${LOW_VOICE_TRACKS:-0}  # extra training songs sung by bass, baritone and tenor voices (a third each)
WORKERS=${WORKERS:-$(nproc)}
DEVICE=${DEVICE:-auto}
TRAIN_SET=${TRAIN_SET:-}               # extra `--set key=value` overrides (the CPU dry run uses this)
INIT_FROM=${INIT_FROM:-}               # a new run starts from these weights (e.g. `demo`: train the shipped model on)
BASELINE=${BASELINE:-src/bsmamba2/assets/demo-bsmamba2-synthetic.safetensors}
RESUME_FROM=${RESUME_FROM:-}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
export BSMAMBA2_BACKEND=${BSMAMBA2_BACKEND:-auto}
PY=${PY:-python3}
RUN=$WORK/run
mkdir -p "$WORK" "$OUT" "$RUN"
LOG=$WORK/device.log
say() { echo "[$((SECONDS - START)) s] $*" | tee -a "$LOG"; }

if ! $PY -c "import torch, numpy, scipy, soundfile, yaml, tqdm, matplotlib, safetensors" 2>/dev/null; then
  if [ -d .wheels ]; then
    $PY -m pip install -q --no-index --find-links .wheels soundfile soxr tqdm pyyaml matplotlib safetensors 2>&1 | tail -2
  fi
  $PY -c "import torch, numpy, scipy, soundfile, yaml, tqdm, matplotlib, safetensors"  # fails loudly, naming the module
fi
say "python: $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')"

# ---- data: training songs of every kind (varied), validation (mixed), held-out test (sparse, seed 7); kept on the
# machine for a later call with the same settings (the songs are a function of the seeds)
STAMP="tracks=$TRACKS low_voices=$LOW_VOICE_TRACKS valid=$VALID_TRACKS test=$TEST_TRACKS seconds=$SONG_SECONDS seeds=1,7"
if [ "$(cat "$WORK/data.stamp" 2>/dev/null)" = "$STAMP" ]; then
  say "data: kept from an earlier call on this machine ($STAMP)"
else
  rm -rf "$WORK/data" "$WORK/test" "$WORK/data.stamp"
  say "synthesizing $TRACKS + $LOW_VOICE_TRACKS (low voices) + $VALID_TRACKS songs of ${SONG_SECONDS} s, $TEST_TRACKS test songs, $WORKERS processes"
  $PY -m bsmamba2 synth --out "$WORK/data" --tracks "$TRACKS" --valid-tracks "$VALID_TRACKS" --seconds "$SONG_SECONDS" \
      --seed 1 --vocal-activity varied --valid-activity mixed --workers "$WORKERS" 2>&1 | tail -1 | tee -a "$LOG"
  SEED=11
  for VOICE in bass baritone tenor; do  # the voices the shipped model separates worst (README, "What holds...")
    N=$((LOW_VOICE_TRACKS / 3))
    if [ "$N" -gt 0 ]; then
      $PY -m bsmamba2 synth --out "$WORK/data" --tracks "$N" --seconds "$SONG_SECONDS" --seed "$SEED" \
          --vocal-activity varied --voice "$VOICE" --workers "$WORKERS" 2>&1 | tail -1 | tee -a "$LOG"
    fi
    SEED=$((SEED + 1))
  done
  $PY -m bsmamba2 synth --out "$WORK/test" --tracks 0 --test-tracks "$TEST_TRACKS" --seconds "$SONG_SECONDS" \
      --seed 7 --vocal-activity sparse --workers "$WORKERS" 2>&1 | tail -1 | tee -a "$LOG"
  echo "$STAMP" > "$WORK/data.stamp"
  say "data done"
fi

# ---- resume: RESUME_FROM=here continues the run left in $RUN by an earlier call on this same machine (it must still
# be the same machine); RESUME_FROM=FOLDER joins the parts of last.pt carried back there; without it a new run starts
RESUME_ARG=()
if [ "$RESUME_FROM" = here ]; then
  if [ ! -f "$RUN/last.pt" ]; then
    echo "RESUME_FROM=here: no $RUN/last.pt on this machine (a fresh one?);" \
         "carry the parts and set RESUME_FROM to their folder" >&2
    exit 1
  fi
  RESUME_ARG=(--resume)
  say "resuming from the run left on this machine ($(du -h "$RUN/last.pt" | cut -f1))"
elif [ -n "$RESUME_FROM" ]; then
  ls "$RESUME_FROM"/last.pt.part-* > /dev/null  # fails loudly when the parts are missing
  rm -rf "$RUN" && mkdir -p "$RUN"
  cat "$RESUME_FROM"/last.pt.part-* > "$RUN/last.pt.tmp" && mv "$RUN/last.pt.tmp" "$RUN/last.pt"
  cp "$CONFIG" "$RUN/config.yaml"
  RESUME_ARG=(--resume)
  say "resuming from $(ls "$RESUME_FROM"/last.pt.part-* | wc -l) parts ($(du -h "$RUN/last.pt" | cut -f1))"
else
  rm -rf "$RUN" && mkdir -p "$RUN"  # a new run, whatever an earlier call left here
  if [ -n "$INIT_FROM" ]; then
    RESUME_ARG=(--init-from "$INIT_FROM")
    say "a new run from the weights of $INIT_FROM"
  fi
fi

# ---- train for what is left of the budget; the time limit stops it cleanly (last.pt written), the hard timeout
# is only a safety net (last.pt is also written every train.save_every_steps)
LEFT=$((BUDGET - RESERVE - (SECONDS - START) - TRAIN_STARTUP))
if [ "$LEFT" -lt 30 ]; then echo "only $LEFT s left for training: lower TRACKS or raise BUDGET_SECONDS" >&2; exit 1; fi
MINUTES=$($PY -c "print(round($LEFT / 60, 2))")
say "training for $MINUTES min"
set +e
timeout --signal=TERM $((LEFT + TRAIN_STARTUP + 30)) $PY -m bsmamba2 train --config "$CONFIG" --data "$WORK/data" \
    --out "$RUN" "${RESUME_ARG[@]}" --set train.time_limit_minutes="$MINUTES" --set train.device="$DEVICE" \
    $TRAIN_SET > "$WORK/train.log" 2>&1
RC=$?
set -e
grep -a "val uSDR\|time limit\|Error\|error" "$WORK/train.log" | tail -12 | tee -a "$LOG" || true
say "training exited with $RC"
cp "$WORK/train.log" "$OUT/"  # back even if what follows runs past the call's limit
cp "$RUN/history.json" "$OUT/" 2>/dev/null || true
if [ ! -f "$RUN/last.pt" ]; then tail -40 "$WORK/train.log" >&2; exit 1; fi

# ---- export the best EMA weights (best.pt, else last.pt) as fp16 safetensors
$PY -m bsmamba2 export "$RUN" "$WORK/model-fp32.safetensors" 2>&1 | tail -1
$PY -c "import sys, torch
from bsmamba2.checkpoint import load_model, read_metadata, save_model
m = load_model(sys.argv[1])
save_model(m, sys.argv[2], read_metadata(sys.argv[1])['metadata'], dtype=torch.float16)
print(f'{sum(p.numel() for p in m.parameters()):,} parameters')" "$WORK/model-fp32.safetensors" \
    "$OUT/bsmamba2-demo.safetensors" | tee -a "$LOG"
say "exported $(du -h "$OUT/bsmamba2-demo.safetensors" | cut -f1)"

# ---- resume checkpoint in 15 MiB parts (before the evaluation, so a slow evaluation cannot lose it)
# (RESUME_PARTS=0 skips them: with the optimizer state they can pass the size a call hands back)
rm -f "$OUT"/last.pt.part-*
if [ "${RESUME_PARTS:-1}" = 1 ]; then
  split -b 15M "$RUN/last.pt" "$OUT/last.pt.part-"
  say "resume checkpoint: $(ls "$OUT"/last.pt.part-* | wc -l) parts"
fi

# ---- held-out evaluation: the demo song and the sparse test songs, new model and the model it replaces
# (EVAL=0 skips it, for a call that a RESUME_FROM=here call follows: a smaller RESERVE_SECONDS then trains longer)
if [ "${EVAL:-1}" = 0 ]; then
  say "evaluation skipped (EVAL=0)"; ls -la "$OUT"; exit 0
fi
BASE_ARG=()
if [ -f "$BASELINE" ]; then BASE_ARG=(--baseline "$BASELINE"); fi
$PY experiments/demo_model/evaluate_demo.py --checkpoint "$OUT/bsmamba2-demo.safetensors" "${BASE_ARG[@]}" \
    --test-data "$WORK/test" --out "$OUT/eval.json" --device "$DEVICE" 2>&1 | tail -3 | tee -a "$LOG"
$PY -m bsmamba2 demo --checkpoint "$OUT/bsmamba2-demo.safetensors" -o "$WORK/demo" --device "$DEVICE" -q || true

# ---- everything else in one archive
mkdir -p "$WORK/pack"
cp "$WORK/train.log" "$LOG" "$WORK/data/synth.json" "$WORK/pack/"
cp "$RUN/history.json" "$RUN/config.yaml" "$WORK/pack/" 2>/dev/null || true
cp "$WORK/demo/spectrograms.png" "$WORK/demo/scores.json" "$WORK/pack/" 2>/dev/null || true
cp "$OUT/eval.json" "$WORK/pack/" 2>/dev/null || true
say "done; packing"
cp "$LOG" "$WORK/pack/"
tar -C "$WORK" -czf "$OUT/run.tar.gz" pack
# at most 8 files come back: the parts, the model and the archive come first; the log, history and scores are
# also in the archive
if [ "$(ls "$OUT" | wc -l)" -gt 8 ]; then
  rm -f "$OUT/eval.json" "$OUT/train.log" "$OUT/history.json"; echo "scores, log and history: in run.tar.gz" >&2
fi
ls -la "$OUT"
