#!/usr/bin/env bash
# The GPU session that made the shipped weights (regnet_zoo/pretrained/): 2D and 3D trained side by side on one
# GPU, each from a cache of synthetic pairs drawn by CPU loader processes (the generator runs on the CPU).
#
#   OUT=/tmp/zoo MINUTES=0.8 bash benchmarks/train_zoo_gpu.sh
#
# Writes $OUT/weights/<method>_<2d|3d>.{pt,json} and the logs; copy the weights into regnet_zoo/pretrained/ and
# rewrite the model cards with `python benchmarks/zoo_eval.py ... --cards`. Runs on CPU too (DEVICE=cpu).
# Run it alone on the machine: the one try so far (2026-11-26, H200, 0.8 min per method) shared the 16 CPU cores
# with 13 benchmark processes, and with cudnn autotuning on, PWC and RegNet got one iteration each.
set -u
OUT=${OUT:-/tmp/zoo}
MINUTES=${MINUTES:-0.8}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-7}
PY=${PYTHON:-python3}
mkdir -p "$OUT/weights"
export PYTHONUNBUFFERED=1
common=(benchmarks/train_zoo.py --device "$DEVICE" --methods all --minutes-per-method "$MINUTES" --half
    --keep-going --workers "$WORKERS" --log-every 50 --out "$OUT/weights")
"$PY" "${common[@]}" --dims 2 --batch-size 16 --cache-pairs "${PAIRS2D:-1200}" >"$OUT/train2d.log" 2>&1 &
pid2=$!
"$PY" "${common[@]}" --dims 3 --batch-size 2 --cache-pairs "${PAIRS3D:-240}" >"$OUT/train3d.log" 2>&1 &
pid3=$!
wait $pid2
rc2=$?
wait $pid3
rc3=$?
echo "train 2D exit $rc2, 3D exit $rc3"
exit $((rc2 || rc3))
