#!/bin/bash
# One recipe experiment (benchmarks/results/recipe.md): train on TRAIN with CONFIG and
# overrides, segment the held-out TEST along each of AXES_LIST, print mIoU and IoU per class.
# usage: [AXES_LIST="z z,y,x"] recipe_experiment.sh NAME TRAIN.zarr TEST.zarr CONFIG [key=value...]
# Runs one torch thread (the measurements ran on one core pinned for them).
set -e
export OMP_NUM_THREADS=1
M=${MAGSEG:-.venv/bin/magseg-hpc}
W=${WORK:-runs/recipe}
mkdir -p $W
name=$1; train=$2; test=$3; cfg=$4; shift 4
out=$W/$name
rm -rf $out
start=$(date +%s)
$M train --config $cfg --output-dir $out data.volume=$train train.threads=1 "$@" > $W/log_$name.txt 2>&1
mid=$(date +%s)
for ax in ${AXES_LIST:-z}; do
  tag=${name}_${ax//,/}
  rm -rf $W/seg_$tag.zarr
  $M segment-volume $test $W/seg_$tag.zarr --model $out/best.pt --workers 1 --threads-per-worker 1 --axes $ax ${SEGARGS} >> $W/log_$name.txt 2>&1
  $M evaluate $W/seg_$tag.zarr $test --report $W/eval_$tag.json >> $W/log_$name.txt 2>&1
  python3 -c "
import json; r=json.load(open('$W/eval_$tag.json')); print('$tag', 'train_s', $mid-$start, 'mIoU', round(r['miou'],4), [round(c['iou'] or 0,3) for c in r['classes']])"
done
