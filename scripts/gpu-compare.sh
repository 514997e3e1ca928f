#!/bin/bash
# The default comparison of docs/results-archive.md at `realistic` (both budgets, seeds 0-2) on one GPU: nine
# one-variant compares in parallel, plus one more calibration run of the cascade (data seed 7).
# $OUT gets shared/pernet/total.tar.gz (the scored variant folders) and logs.tar.gz. Merge and
# summarize anywhere (same MTL_MENISCUS_CACHE path, so the saved data paths agree):
#   mkdir -p cmp/variants cmp-total/variants; for g in shared pernet total; do tar xzf $OUT/$g.tar.gz; done
#   cp -r shared-*/variants/* pernet-*/variants/* cmp/variants/
#   cp -r shared-*/variants/* total-*/variants/* cmp-total/variants/
#   MTL_MENISCUS_CACHE=/tmp/mtlcache python cli.py compare --out cmp
#   MTL_MENISCUS_CACHE=/tmp/mtlcache python cli.py compare --out cmp-total --budget equal-images
# Dry run on a CPU: PY=python EXTRA="--max-epochs 1 --steps-per-epoch 2 --tta 1 --bootstrap 10".
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; PY=${PY:-python3}; LIMIT=${LIMIT:-380}; EXTRA=${EXTRA:-}
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 MTL_MENISCUS_CACHE=/tmp/mtlcache OMP_NUM_THREADS=1
W=/tmp/cmp; rm -rf $W; mkdir -p $W/logs
START=$(date +%s)
# the built-in realistic phantom (seed 0), made once before the parallel runs read it
$PY -c "from mtl_meniscus.phantom import ensure_phantom; print(ensure_phantom(1128, 0, difficulty='realistic'))" > $W/logs/phantom.log 2>&1 || { cat $W/logs/phantom.log; exit 1; }
$PY cli.py make-phantom $W/data-s7 --seed 7 --difficulty realistic > $W/logs/data-s7.log 2>&1 &
for k in 0 1 2; do
  timeout $LIMIT $PY cli.py compare --modes shared --seeds $k --wandb disabled --out $W/shared-$k $EXTRA > $W/logs/shared-$k.log 2>&1 &
  timeout $LIMIT $PY cli.py compare --modes separate --seeds $k --budget per-network --wandb disabled --out $W/pernet-$k $EXTRA > $W/logs/pernet-$k.log 2>&1 &
  timeout $LIMIT $PY cli.py compare --modes separate --seeds $k --budget equal-images --wandb disabled --out $W/total-$k $EXTRA > $W/logs/total-$k.log 2>&1 &
done
sleep 20; wait %1 2>/dev/null
timeout $((LIMIT-30)) $PY cli.py train --mode separate --data $W/data-s7 --wandb disabled --out $W/calib-s7 ${CAL_EXTRA:-} > $W/logs/calib-s7.log 2>&1 &
wait
echo "all done after $(( $(date +%s) - START )) s"
cd $W
tar czf $OUT/logs.tar.gz logs calib-s7/metrics.json calib-s7/history.csv */results_per_seed.csv 2>/dev/null
for g in shared pernet total; do
  tar czf $OUT/$g.tar.gz --exclude='*/wandb' --exclude='last.pt' --exclude='*.png' $g-*/variants 2>/dev/null
done
ls -la $OUT; tail -n 4 logs/*.log
