#!/usr/bin/env bash
# Compile-checks the CUDA sources without a GPU: every .cu with nvcc (sm_90 and sm_80), and the ATen
# host files (csrc/cuda/*.cpp) with g++ -fsyntax-only against the installed torch's headers.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "cuda-check: nvcc not on PATH, skipped"; exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for f in csrc/cuda/*.cu; do
  echo "nvcc -c $f"
  nvcc -c -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_80,code=sm_80 "$f" -o "$tmp/$(basename "$f").o"
done
cuda_inc=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")/include
for d in "$cuda_inc" /usr/local/cuda/include /usr/local/cuda-*/include; do
  [ -f "$d/cuda_runtime_api.h" ] && { cuda_inc=$d; break; }
done
torch_inc=$(python3 -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null || true)
if [ -n "$torch_inc" ] && [ -f "$cuda_inc/cuda_runtime_api.h" ]; then
  # A CPU torch wheel lacks this generated header; an empty stand-in is enough for a syntax check.
  mkdir -p "$tmp/inc/c10/cuda/impl" && echo '#pragma once' > "$tmp/inc/c10/cuda/impl/cuda_cmake_macros.h"
  for f in csrc/cuda/*.cpp; do
    echo "g++ -fsyntax-only $f"
    g++ -std=c++17 -fsyntax-only -w -I"$tmp/inc" -I"$torch_inc" -I"$torch_inc/torch/csrc/api/include" \
      -I"$cuda_inc" -Icsrc "$f"
  done
else
  echo "cuda-check: torch or CUDA runtime headers missing, host files not checked"
fi
echo "cuda-check: ok"
