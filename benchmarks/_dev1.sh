set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .wheels-min/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 BSMAMBA2_SHARED=$PWD/.devshared
timeout 150 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/test_gated_proj_sm90.py --tb=short > $OUT/t.log 2>&1; tail -3 $OUT/t.log; grep -B2 -A15 "^E  " $OUT/t.log | head -40
timeout 80 python3 benchmarks/ab_scan.py gated --gated-variants default wait0:BSMAMBA2_GP_SM90_OUTSTANDING=0 triton:BSMAMBA2_GP_GLUON=0 --rounds 3 --out $OUT/gated.json 2>&1 | tail -4
timeout 220 python3 benchmarks/ab_scan.py model --model-variants wait0:BSMAMBA2_GP_SM90_OUTSTANDING=0 --rounds 4 --iters 10 --out $OUT/model.json 2>&1 | tail -4
