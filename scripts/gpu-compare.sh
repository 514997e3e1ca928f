#!/bin/bash
# The comparisons of docs/results.md on one GPU with `compare --jobs` (a cascade's networks train at
# once, each in its own process), one after another, as many as LIMIT seconds allow. SWEEPS names
# them (default "per-network equal-flops"); each is a `python cli.py compare` with its options:
#   per-network          (none: the default comparison, realistic, seeds 0-4, both modes, cap 60)
#   equal-flops          --budget equal-flops
#   curves               --train-fraction 0.1,0.25,0.5,1.0 (CURVE_FRACTIONS=0.1,1.0: a share per call)
#   same-regularization  --same-regularization
#   roi                  --roi none,predicted,classical,truth
#   segmentation         --modes shared --segmentation off,on
# A sweep starts from the variants it shares with the default comparison (its kept copy in
# results/compare/per-network, or the one this run just made): equal-flops, same-regularization
# and segmentation its shared ones, curves and roi all of them. FROM=DIR starts a sweep from
# DIR/<sweep> instead (an earlier call's unfinished folder, carried: `compare` resumes it).
# Variants in results/compare/pending/<sweep>/variants (scored on a CPU while the sweep waited for a
# GPU, kept there by `scripts/compare_table.py pending`) join the sweep too: compare keeps them, as it
# keeps the reused ones, and `compare_table.py keep <sweep>` names them and their machine. Wheels the
# machine's image lacks (pydantic, and rich/typer at this venv's versions): `bash
# scripts/gpu-wheels.sh` here, then carry .whl and install them first (that script's header).
# Each compare's wall time and the machine go into machine.json in its folder (read by
# scripts/compare_table.py keep). $OUT gets <sweep>.tgz (scored variants without their checkpoints,
# an unfinished one whole; split into .part files above 15 MB) and logs.tgz. Then, here:
#   tar xzf $OUT/<sweep>.tgz -C runs/compare
#   MTL_MENISCUS_CACHE=/tmp/mtlcache python cli.py compare <options> --out runs/compare/<sweep>
#   python scripts/compare_table.py keep <sweep> runs/compare/<sweep> --command "..."; ... render
# (the same cache path as here, so that the saved data paths agree; a finished comparison only
# rewrites its table. Scored variants also merge under another cache path where /tmp/mtlcache does
# not exist: compare keeps them after checking their test split; an unscored one needs the path.)
# Measured on one H200 (2026-11-30): per-network 6.4 min, equal-flops 2.0,
# same-regularization 3.5 (its last scoring job cut by a 215 s limit); segmentation 9.0 (JOBS=5)
# beside the curves' 0.1 share 7.9 (JOBS=11), two runs of this script at once, each with its own
# W (work folder, default /tmp/cmp) and OUT, the phantom made before either started. The curves' three smaller
# shares are about three times per-network: more than one call's 10 minutes, so one share per call
# (CURVE_FRACTIONS=0.1,1.0 and so on), their variant folders merged here into one comparison folder,
# kept as `compare_table.py keep curves ...` (render gives it a learning-curve table of its own in
# the README). The 0.25 and 0.5 shares' shared variants are in results/compare/pending/curves (a CPU
# ran them, 2026-12-01): CURVE_FRACTIONS=0.25,0.5,1.0 trains those shares' ten cascades alone. roi: a `predicted` cascade's segmentation network trains first, its classifiers then
# at once; an unfinished sweep continues from its carried folder (FROM=DIR).
# Dry run on a CPU (SWEEPS="per-network <sweep>": the sweep reuses the dry run's own per-network variants;
# pending ones are left out with EXTRA, whose settings they do not have):
#   PY=.venv/bin/python JOBS=2 EXTRA="--seeds 0 --max-epochs 1 --steps-per-epoch 2 --tta 1 --bootstrap 10"
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; PY=${PY:-python3}; LIMIT=${LIMIT:-540}; EXTRA=${EXTRA:-}; JOBS=${JOBS:-$(nproc)}
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 MTL_MENISCUS_CACHE=/tmp/mtlcache
W=${W:-/tmp/cmp}; rm -rf $W; mkdir -p $W/logs
START=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - START) )); }
limited() {  # log command...: run it until the time left is spent, then stop it and its workers
  local log=$1; shift
  [ "$(left)" -gt 10 ] || { echo "no time left for: $*" > "$log"; return 124; }
  setsid "$@" > "$log" 2>&1 &  # a process group of its own: compare's worker processes go with it
  local pid=$!
  # the watcher's output goes nowhere: a sleep holding this script's stdout kept a pipe reading
  # it open until the limit, long after the script ended
  ( sleep "$(left)"; kill -INT -- -$pid; sleep 10; kill -KILL -- -$pid ) > /dev/null 2>&1 &
  local watcher=$!
  wait $pid; local rc=$?
  pkill -P $watcher 2>/dev/null; kill $watcher 2>/dev/null
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

options() {  # sweep: compare's options
  case $1 in
    per-network) echo "" ;;
    equal-flops) echo "--budget equal-flops" ;;
    curves) echo "--train-fraction ${CURVE_FRACTIONS:-0.1,0.25,0.5,1.0}" ;;
    same-regularization) echo "--same-regularization" ;;
    roi) echo "--roi none,predicted,classical,truth" ;;
    segmentation) echo "--modes shared --segmentation off,on" ;;
    *) echo "unknown sweep: $1" >&2; exit 2 ;;
  esac
}
reused() {  # sweep: the default comparison's variants it shares (same names, same settings)
  case $1 in
    per-network) echo "" ;;
    curves | roi) echo "*" ;;
    *) echo "shared-*" ;;
  esac
}
SWEEPS=${SWEEPS:-"per-network equal-flops"}
for sweep in $SWEEPS; do options $sweep > /dev/null || exit 2; done
for sweep in $SWEEPS; do
  mkdir -p $W/$sweep/variants
  if [ -n "${FROM:-}" ] && [ -d "$FROM/$sweep" ]; then
    cp -r "$FROM/$sweep/." $W/$sweep/
  elif [ -n "$(reused $sweep)" ]; then
    base=$W/per-network/variants; [ -d $base ] || base=results/compare/per-network/variants
    cp -r $base/$(reused $sweep) $W/$sweep/variants/ 2>/dev/null
    rm -f $W/$sweep/variants/*.log
  fi
  # variants of this sweep scored on another machine (a CPU) while it waited for a GPU; not with
  # EXTRA (a dry run's settings): compare would refuse them as trained with other settings
  pending=results/compare/pending/$sweep/variants
  [ -d $pending ] && [ -z "$EXTRA" ] && cp -r $pending/. $W/$sweep/variants/
  T0=$(date +%s)
  limited $W/logs/$sweep.log $PY cli.py compare $(options $sweep) --jobs $JOBS --wandb disabled --out $W/$sweep $EXTRA
  echo "$sweep: exit $? after $(( $(date +%s) - T0 )) s"
  [ -f $W/$sweep/results.csv ] && machine $W/$sweep/machine.json $(( $(date +%s) - T0 ))
done

cd $W
for c in $SWEEPS; do
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
ls -la $OUT; cat logs/gpu.txt; for c in $SWEEPS; do head -n 4 logs/$c.log; cat $c/results.md 2>/dev/null | head -c 3000; done
echo "all done after $(( $(date +%s) - START )) s"
