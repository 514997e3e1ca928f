#!/bin/bash
# The calibration sweep and AMX main-job figure of docs/results-archive.md, in one run on a GPU machine (16 cores):
# (1) the main job on the host CPU held to 2 cores, if it has AMX;
# (2) candidate generator settings for `realistic` x data seeds 5 and 6, the separate preset and
#     the shared preset on each, all in parallel on the GPU.
# Results land in $OUT (default /tmp/out): env.txt and cal.tar.gz (logs, metrics, histories).
# Knobs for a dry run on a CPU: DEV=cpu, PHANTOM_N=120, EXTRA="--max-epochs 1 --steps-per-epoch 2",
# PY (python), SWEEP_LIMIT (seconds per training).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEV=${DEV:-cuda}; EXTRA=${EXTRA:-}; SWEEP_LIMIT=${SWEEP_LIMIT:-420}
PY=${PY:-python3}
W=/tmp/cal; rm -rf $W; mkdir -p $W/data $W/runs $W/logs
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
START=$(date +%s)
{
  lscpu | grep -E "Model name|^CPU\(s\)|Flags" | sed 's/Flags:.*/&/' | grep -oE "Model name.*|CPU\(s\).*|amx_tile|avx512_bf16|avx512f " | sort -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import torch,sys;print('torch',torch.__version__,'cap',torch.backends.cpu.get_cpu_capability(),'cuda',torch.cuda.is_available(), sys.version.split()[0])"
  $PY -c "import mtl_meniscus.cli" && echo "package imports: ok"
} > $OUT/env.txt 2>&1
cat $OUT/env.txt
NCPU=$(nproc)

# (1) AMX main job, pinned to cores 0-1, fresh phantom cache: phantom, training, TTA evaluation.
if grep -q amx_tile $OUT/env.txt && [ "$DEV" = cuda ]; then
  ( export OMP_NUM_THREADS=2 MTL_MENISCUS_CACHE=/tmp/amxcache
    s=$(date +%s%N)
    timeout 480 taskset -c 0,1 $PY cli.py train --mode shared --device cpu --wandb disabled --out $W/runs/amx-main > $W/logs/amx-main.log 2>&1
    echo "rc=$? wall_ms=$(( ($(date +%s%N) - s) / 1000000 ))" >> $W/logs/amx-main.log ) &
  SWEEP_CPUS=2-$((NCPU-1))
else
  echo "no AMX on this host (or dry run): main job skipped"
  SWEEP_CPUS=0-$((NCPU-1))
fi

# (2) candidates, written out in full on top of `realistic` (r2 is today's `realistic`, r0 the level before)
declare -A CAND
CAND[r0]="--phantom-setting tear_angle_deg=35 --phantom-setting tear_length=0.5,1.0 --phantom-setting tear_thickness_px=1.0,2.5 --phantom-setting tear_contrast=0.25,0.8 --phantom-setting motion_fraction=0.3"
CAND[r1]="--phantom-setting tear_angle_deg=25 --phantom-setting tear_length=0.7,1.0 --phantom-setting tear_thickness_px=1.5,3.0 --phantom-setting tear_contrast=0.25,0.8 --phantom-setting motion_fraction=0.15"
CAND[r2]=""
CAND[r3]="--phantom-setting tear_angle_deg=25 --phantom-setting tear_length=0.7,1.0 --phantom-setting tear_thickness_px=1.5,3.0 --phantom-setting motion_fraction=0.15 --phantom-setting tear_contrast=0.35,0.9 --phantom-setting noise_sigma=0.03,0.07"
run_one() {  # candidate seed
  local c=$1 s=$2 d=$W/data/$1-s$2
  taskset -c $SWEEP_CPUS $PY cli.py make-phantom $d --n ${PHANTOM_N:-1128} --seed $s --difficulty realistic ${CAND[$c]} > $W/logs/$c-s$s-phantom.log 2>&1 || return
  for mode in separate shared; do
    OMP_NUM_THREADS=1 taskset -c $SWEEP_CPUS timeout $SWEEP_LIMIT $PY cli.py train --mode $mode --data $d --device $DEV \
      --wandb disabled --out $W/runs/$c-s$s-$mode --set train.num_workers=1 $EXTRA > $W/logs/$c-s$s-$mode.log 2>&1 &
  done
  wait
}
for c in r0 r1 r2 r3; do for s in 5 6; do run_one $c $s & done; done
wait
echo "sweep done after $(( $(date +%s) - START )) s"
# (3) one clean GPU timing of the main job's training alone (default easy phantom), if time is left
if [ "$DEV" = cuda ] && [ $(( $(date +%s) - START )) -lt 420 ]; then
  s=$(date +%s%N)
  timeout 90 $PY cli.py train --mode shared --device cuda --wandb disabled --out $W/runs/gpu-main > $W/logs/gpu-main.log 2>&1
  echo "rc=$? wall_ms=$(( ($(date +%s%N) - s) / 1000000 ))" >> $W/logs/gpu-main.log
fi
cd $W && find runs -name metrics.json -o -name history.csv -o -name config.yaml | grep -v "/members/" > files.txt
tar czf $OUT/cal.tar.gz logs $(cat files.txt) data/*/labels.csv 2>/dev/null
ls -la $OUT; tail -n 3 logs/*.log
