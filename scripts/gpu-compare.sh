#!/bin/bash
# The comparison of docs/results.md on one GPU with `compare --jobs` (a cascade's networks train at
# once, each in its own process): first the default comparison (`python cli.py compare`: realistic,
# seeds 0-4, both modes, each network until its plateau rule stops it, at most 60 epochs), then the
# cascade under `--budget equal-flops` beside the default comparison's shared variants (copied in:
# the budget changes the cascade only). Each compare's wall time and the machine go into
# machine.json in its folder (scripts/compare_table.py keep reads it).
# $OUT gets per-network.tgz and equal-flops.tgz (scored variants without their checkpoints; an
# unfinished one whole, so that `compare` resumes it) and logs.tgz. Then, in the repository:
#   for f in per-network equal-flops; do tar xzf $OUT/$f.tgz -C runs/compare; done
#   MTL_MENISCUS_CACHE=/tmp/mtlcache python cli.py compare --out runs/compare/per-network
#   MTL_MENISCUS_CACHE=/tmp/mtlcache python cli.py compare --budget equal-flops --out runs/compare/equal-flops
# (the same cache path as here, so that the saved data paths agree; a finished comparison only
# rewrites its table). Dry run on a CPU:
#   PY=.venv/bin/python JOBS=2 EXTRA="--seeds 0 --max-epochs 1 --steps-per-epoch 2 --tta 1 --bootstrap 10"
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; PY=${PY:-python3}; LIMIT=${LIMIT:-540}; EXTRA=${EXTRA:-}; JOBS=${JOBS:-$(nproc)}
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 MTL_MENISCUS_CACHE=/tmp/mtlcache
W=/tmp/cmp; rm -rf $W; mkdir -p $W/logs
START=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - START) )); }
limited() {  # log command...: run it until the time left is spent, then stop it and its workers
  local log=$1; shift
  [ "$(left)" -gt 10 ] || { echo "no time left for: $*" > "$log"; return 124; }
  setsid "$@" > "$log" 2>&1 &  # a process group of its own: compare's worker processes go with it
  local pid=$!
  ( sleep "$(left)"; kill -INT -- -$pid; sleep 10; kill -KILL -- -$pid ) 2>/dev/null &
  local watcher=$!
  wait $pid; local rc=$?
  kill $watcher 2>/dev/null
  return $rc
}
machine() {  # folder seconds: the machine and the compare's wall time, for scripts/compare_table.py keep
  $PY -c "import json, sys; from mtl_meniscus.commands.bench import machine_info
info = machine_info() | {'wall_seconds': float(sys.argv[2])}; json.dump(info, open(sys.argv[1], 'w'), indent=2)" "$@"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $W/logs/gpu.txt 2>&1
# the built-in realistic phantom (seed 0), made once before the workers read it
$PY -c "from mtl_meniscus.phantom.slices import ensure_phantom; print(ensure_phantom(1128, 0, difficulty='realistic'))" \
  > $W/logs/phantom.log 2>&1 || { cat $W/logs/phantom.log; exit 1; }
echo "phantom after $(( $(date +%s) - START )) s"

T0=$(date +%s)
limited $W/logs/per-network.log $PY cli.py compare --jobs $JOBS --wandb disabled --out $W/per-network $EXTRA
echo "per-network: exit $? after $(( $(date +%s) - T0 )) s"
[ -f $W/per-network/results.csv ] && machine $W/per-network/machine.json $(( $(date +%s) - T0 ))

mkdir -p $W/equal-flops/variants
cp -r $W/per-network/variants/shared-* $W/equal-flops/variants/ 2>/dev/null
T0=$(date +%s)
limited $W/logs/equal-flops.log $PY cli.py compare --budget equal-flops --jobs $JOBS --wandb disabled --out $W/equal-flops $EXTRA
echo "equal-flops: exit $? after $(( $(date +%s) - T0 )) s"
[ -f $W/equal-flops/results.csv ] && machine $W/equal-flops/machine.json $(( $(date +%s) - T0 ))

cd $W
for c in per-network equal-flops; do
  # a scored variant's checkpoints are left behind (its table needs result.json and its predictions)
  find $c -name wandb -prune -o -name '*.png' -o -type f -print | while read -r f; do
    v=$(echo "$f" | cut -d/ -f1-3)
    case "$f" in *.pt) [ -f "$v/result.json" ] && continue;; esac
    echo "$f"
  done > $c.list
  tar czf $OUT/$c.tgz -T $c.list
  # files come back at most 16 MiB each: cat $c.tgz.part* > $c.tgz puts a larger one together again
  if [ $(stat -c %s $OUT/$c.tgz) -gt 15000000 ]; then split -b 15000000 -d $OUT/$c.tgz $OUT/$c.tgz.part; rm $OUT/$c.tgz; fi
done
tar czf $OUT/logs.tgz logs
ls -la $OUT; cat logs/gpu.txt; head -n 4 logs/per-network.log; cat per-network/results.md equal-flops/results.md 2>/dev/null | head -c 6000
echo "all done after $(( $(date +%s) - START )) s"
