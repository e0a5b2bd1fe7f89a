#!/bin/bash
# claims (#14) device run: RegNet single- vs multi-scale and the B-spline U-Net Table-1 sweeps, side by side.
# env: OUT (results folder, required), DATA (default .gpu/data: oasis2d/slices/*.nii.gz or *.nrrd and
# oasis3d_pair/{imagesTr,labelsTr}), PY (python3), DEV (cuda), RS (RegNet steps), BS (B-spline steps),
# RB (RegNet minutes per variant, a safety cap). Results: $OUT/res.tgz (refreshed every 15 s).
set -u
cd "$(dirname "$0")/.."  # the repository root
PY=${PY:-python3}; DEV=${DEV:-cuda}; RS=${RS:-3000}; BS=${BS:-2000}; D=${DATA:-.gpu/data}
R=/tmp/claims_res; rm -rf $R; mkdir -p $R
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
(while true; do tar czf $OUT/res.tgz.part -C $R . 2>/dev/null && mv $OUT/res.tgz.part $OUT/res.tgz; sleep 15; done) &
TARLOOP=$!
$PY benchmarks/regnet_bench.py --device $DEV --data $D --no-affine --steps $RS --batch 4 --epoch-steps $((RS / 10)) \
  --eval-every $((RS / 12)) --workers 6 --threads 2 --budget-minutes ${RB:-3.2} --out $R/regnet_bench.json > $R/regnet.log 2>&1 &
b() { tag=$1; shift; $PY benchmarks/bspline_unet_bench.py --device $DEV --data-dir $D --steps $BS --batch-size 16 "$@" \
  --out $R/b_$tag.json > $R/b_$tag.log 2>&1; }
for f in 2 4; do
  C="--factor $f --voxel-size $(awk "BEGIN {print $f / 4}")"
  b f${f}a $C --vary delta --multipliers 0 0.1 1 &
  b f${f}b $C --vary delta --multipliers 10 100 &
  b f${f}c $C --vary alpha --multipliers 0 0.1 &
  b f${f}d $C --vary alpha --multipliers 10 100 &
  b f${f}e $C --vary beta --multipliers 0 0.1 &
  b f${f}f $C --vary beta --multipliers 10 100 &
done
wait $(jobs -p | grep -v "^$TARLOOP$")
for f in 2 4; do
  $PY benchmarks/bspline_unet_bench.py --merge $R/b_f${f}?.json --out $R/bspline_f$f.json > $R/merge_f$f.log 2>&1
done
kill $TARLOOP
tar czf $OUT/res.tgz -C $R .
tail -n 30 $R/regnet.log; cat $R/merge_f*.log
