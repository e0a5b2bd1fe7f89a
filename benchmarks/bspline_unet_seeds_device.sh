#!/bin/bash
# #14 device runs, each a set of trainings side by side (2000 steps of 16 pairs; seed 0 is the full GPU sweep,
# benchmarks/claims_device.sh). SET=ngf_labels (default): does NGF + labels beat labels alone (delta x0) at
# 80x112 over seeds and both subject directions, and does delta x100 fall below the identity at 40x56 over
# seeds? SET=labels_add: do labels add to NGF (beta x0 vs x1) at 40x56 and 80x112 over seeds, and where does
# delta x100 land at 80x112 over seeds? SET=alpha0: does the field fold without curvature (alpha x0) over seeds?
# env: OUT (results folder, required), DATA (default .gpu/data: oasis2d/slices), PY (python3), DEV (cuda).
# Results: $OUT/<name>.json, committed as benchmarks/results/bspline_unet_<name>.json
set -u
cd "$(dirname "$0")/.."  # the repository root
PY=${PY:-python3}; DEV=${DEV:-cuda}; D=${DATA:-.gpu/data}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p "$OUT"
b() { tag=$1; shift; timeout 450 $PY benchmarks/bspline_unet_bench.py --device $DEV --data-dir $D --steps 2000 \
  --batch-size 16 --threads 1 "$@" --out $OUT/$tag.json > $OUT/$tag.log 2>&1; }
F2="--factor 2 --voxel-size 0.5"; F4="--factor 4 --voxel-size 1"
case ${SET:-ngf_labels} in
  ngf_labels)
    for s in 1 2 3; do b ngf_labels_gpu_80x112_seed$s $F2 --vary delta --multipliers 0 1 --seed $s & done
    for s in 0 1; do
      b ngf_labels_gpu_80x112_subject2_seed$s $F2 --vary delta --multipliers 0 1 --seed $s --train-subject 2 &
    done
    for s in 1 2; do b delta100_gpu_40x56_seed$s $F4 --vary delta --multipliers 100 --seed $s & done ;;
  labels_add)
    for s in 1 2 3; do
      b labels_add_gpu_40x56_seed$s $F4 --vary beta --multipliers 0 1 --seed $s &
      b labels_add_gpu_80x112_seed$s $F2 --vary beta --multipliers 0 1 --seed $s &
    done
    for s in 1 2; do b delta100_gpu_80x112_seed$s $F2 --vary delta --multipliers 100 --seed $s & done ;;
  alpha0)
    for s in 1 2; do
      b alpha0_gpu_40x56_seed$s $F4 --vary alpha --multipliers 0 --seed $s &
      b alpha0_gpu_80x112_seed$s $F2 --vary alpha --multipliers 0 --seed $s &
    done ;;
  *) echo "SET must be ngf_labels, labels_add or alpha0"; exit 2 ;;
esac
wait
for f in $OUT/*.log; do echo "== $f"; tail -n 4 "$f"; done
