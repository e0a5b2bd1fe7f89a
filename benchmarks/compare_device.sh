#!/bin/bash
# #20 device run: every deep method of compare.py trained (several seeds, with and without the affine stage)
# and evaluated (with and without instance optimisation) on one GPU, on the real 3D datasets; one process per
# dataset and method, side by side. The classic baselines run on the CPU machine; merge both with
# `compare.py --merge` (see README, "Real 3D data").
#
#   OUT=out DATA=.gpu/data bash benchmarks/compare_device.sh
#
# env: OUT (results, required), DATA (a folder holding prostate_mr_us/ and oasis3d_pair/ as in ../shared/data),
# PY (python3), DEV (cuda), B (training minutes per method, seed and stage), IO (instance-optimisation steps),
# SEEDS ("0 1 2"), DATASETS ("prostate3d oasis3d"), METHODS, T (seconds before a process is stopped).
# Writes $OUT/compare_<dataset>.tgz: one folder per method with its results.json, results.md and plots.
# The reports are derived from ../shared/data: they stay on the machine that has the data (never committed).
# With the defaults on one H200 (2026-11-26, 409 s) the 12 processes shared the GPU and 16 cores, so 0.75 min
# was short of convergence: a larger B, and fewer METHODS per run, give each network more iterations.
# SimpleITK is not needed for the deep rows; where it is missing (the GPU image here), a stand-in module that
# fails on any use lets the imports pass, so a deep row that did call it would fail loudly, not silently.
set -u
cd "$(dirname "$0")/.."  # the repository root
PY=${PY:-python3}; DEV=${DEV:-cuda}; B=${B:-0.75}; IO=${IO:-50}; SEEDS=${SEEDS:-0 1 2}; T=${T:-450}
DATASETS=${DATASETS:-prostate3d oasis3d}
METHODS=${METHODS:-voxelmorph pwc regnet ddrnet bspline_unet discrete_corr}
R=/tmp/compare_device; rm -rf $R; mkdir -p $R
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 REGNET_ZOO_SHARED_DATA=$(realpath "${DATA:-.gpu/data}")
if ! $PY -c "import SimpleITK" 2>/dev/null; then
  mkdir -p $R/stub
  printf 'def __getattr__(name):\n    raise ImportError(f"SimpleITK is not installed (SimpleITK.{name})")\n' \
    > $R/stub/SimpleITK.py
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$R/stub
fi
pack() { for d in $DATASETS; do
  tar czf $OUT/compare_$d.tgz.part --exclude='dataset_*' --exclude='models' -C $R $(cd $R && ls -d ${d}_* 2>/dev/null) \
    2>/dev/null && mv $OUT/compare_$d.tgz.part $OUT/compare_$d.tgz; done; }
(while true; do sleep 20; pack; done) &
PACK=$!
pids=()
for d in $DATASETS; do
  for m in $METHODS; do
    extra=()  # RegNet draws its synthetic 3D crops on the CPU: loader processes, the bundle's 3D batch of 2
    [ $m = regnet ] && extra=(--batch-size 2 --workers ${RW:-4})
    timeout $T $PY benchmarks/compare.py --dataset $d --methods $m --pre-align none affine --seeds $SEEDS \
      --instance-steps $IO --budget-minutes $B --device $DEV --threads 1 "${extra[@]}" --out $R/${d}_$m \
      > $R/${d}_$m.log 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait $p; done
kill $PACK
for d in $DATASETS; do for m in $METHODS; do
  mv $R/${d}_$m.log $R/${d}_$m/run.log 2>/dev/null
  [ -f $R/${d}_$m/results.json ] && echo "$d $m: results.json" || echo "$d $m: NO RESULTS (see its run.log)"
done; done
pack
grep -h -E "Error|error:" $R/*/run.log | sort | uniq -c | head -20
ls -la $OUT
