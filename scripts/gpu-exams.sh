#!/bin/bash
# Exam-level training recipes on phantom exams in MRNet's layout, all in parallel on one GPU:
# which pooling, batch, loss weighting and image size learn from exam labels alone. Each variant
# is `train --mrnet` with some --set options; $OUT gets every run's history.csv, metrics.json and log.
# SWEEP=1: pooling, batch, loss weighting, augmentation, 256 px; SWEEP=2: the cascade without
# dropout, other data seeds and the realistic level.
# Dry run on a CPU: PY=python EXTRA="--max-epochs 1 --steps-per-epoch 2" N=40.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; PY=${PY:-python3}; LIMIT=${LIMIT:-420}; EXTRA=${EXTRA:-}; N=${N:-600}
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
W=/tmp/exams; rm -rf $W; mkdir -p $W/logs
START=$(date +%s)
SWEEP=${SWEEP:-1}
run() {  # name data options...
  local name=$1 data=$2; shift 2
  timeout $LIMIT $PY cli.py train --mrnet $W/$data --wandb disabled --out $W/$name "$@" $EXTRA > $W/logs/$name.log 2>&1 &
}
phantom() {  # name options...
  local name=$1; shift
  $PY cli.py make-phantom $W/$name --n-exams $N --slices-per-exam 24 --exam-format mrnet "$@" > $W/logs/$name.log 2>&1 &
}
S128="--set data.image_size=128"
B="--batch-size 8 --steps-per-epoch 40 --max-epochs 20"
NODROP="--set model.conv_dropout=0 --set model.dense_dropout=0.2"
if [ "$SWEEP" = 1 ]; then
  phantom p128 --size 128; phantom p128s1 --size 128 --seed 1; phantom p256 --size 256; wait
  echo "phantoms after $(( $(date +%s) - START )) s"
  run max        p128 $S128 $B
  run attention  p128 $S128 $B --set model.exam_pooling=attention
  run posw3      p128 $S128 $B --set train.pos_weights.fissure=3
  run batch16    p128 $S128 --batch-size 16 --steps-per-epoch 40 --max-epochs 20
  run lr3e-4     p128 $S128 $B --lr 0.0003
  run noaug      p128 $S128 $B --set augment.rotation_deg=0 --set augment.translate_frac=0
  run separate   p128 $S128 $B --mode separate
  run max-s1     p128s1 $S128 $B
  run attn-s1    p128s1 $S128 $B --set model.exam_pooling=attention
  run max256     p256 $B
  run attn256    p256 $B --set model.exam_pooling=attention
else
  phantom p128 --size 128; phantom p128s1 --size 128 --seed 1; phantom p128s2 --size 128 --seed 2
  phantom p128r --size 128 --difficulty realistic; wait
  echo "phantoms after $(( $(date +%s) - START )) s"
  run sep-nodrop     p128 $S128 $B --mode separate $NODROP
  run sep-nodrop-s1  p128s1 $S128 $B --mode separate $NODROP
  run sep-nodrop-s2  p128s2 $S128 $B --mode separate $NODROP
  run sep-nodrop-r   p128r $S128 $B --mode separate $NODROP
  run sep-cdrop      p128 $S128 $B --mode separate --set model.conv_dropout=0
  run max-s2         p128s2 $S128 $B
  run max-r          p128r $S128 $B
  run max-lr2e-3     p128 $S128 $B --lr 0.002
  run max-s1-lr2e-3  p128s1 $S128 $B --lr 0.002
  run max-seed1      p128 $S128 $B --seed 1
  run max-nodrop     p128 $S128 $B --set model.dense_dropout=0
fi
wait
echo "all done after $(( $(date +%s) - START )) s"
cd $W
tar czf $OUT/runs.tar.gz logs */history.csv */metrics.json 2>/dev/null
tail -n 3 logs/*.log
