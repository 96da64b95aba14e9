#!/usr/bin/env bash
# Issue 17's 10^5-class comparison on a lent GPU (through the device tool, from the repo root):
#   device run: bash bench/gpu_large_k.sh            (about 6-8 minutes on an H100, build included)
# Cross-entropy against HAFrame with the trainer's defaults (cosine_scale auto, frame directions and kernel
# from the features) on random:100000 (Hierarchy.random, seed 0), dim 512, synthetic features at difficulty
# 0.1, 4 samples per class, 4 epochs, batch 64, gamma 0.7, seed 0: the task where cross-entropy has seen
# each class 16 times (on random:10000 that took it to 51% top-1, bench/RESULTS.md "HAFrame at large K").
# Needs CPU hours on the development machine (one 1-thread GEMM step at K = 10^5 takes 0.2 s there).
# Writes $OUT/gpu_large_k.{json,md} and the two runs' logs; copy the table into bench/RESULTS.md.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
PY=${PY:-python3}
# build the extension with CUDA as the GPU check does (and record the machine); no tests, no benchmarks
SKIP="tests sanitize profile bench" bash bench/gpu_check.sh || { echo "BUILD FAILED"; exit 1; }
$PY -c "import torch, haframe_ext as hx; assert torch.cuda.is_available(); print('native', hx.native_available())"
timeout ${LIMIT:-480} $PY bench/train_large_k.py --classes 100000 --dim 512 --n-per-class 4 --difficulty 0.1 \
  --epochs 4 --batch-size 64 --eval-samples 20000 --gamma 0.7 --seeds 0 --methods cross-entropy haframe \
  --extra=--device=cuda --out "$OUT/gpu_large_k"
rc=$?
cp "$OUT"/gpu_large_k_runs/*.log "$OUT"/ 2>/dev/null
rm -rf "$OUT/gpu_large_k_runs"
exit $rc
