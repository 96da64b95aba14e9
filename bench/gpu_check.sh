#!/usr/bin/env bash
# The prepared GPU check (run on the lent H100/H200 through the device tool, from the repo root):
# builds the extension from source, runs the tests on CUDA, compute-sanitizer memcheck + racecheck
# on a small case, and the GPU benchmarks; logs and tables go to $OUT (at most 8 files).
#   device run: bash bench/gpu_check.sh            (carry .whl for Liger-Kernel, optional)
# .whl/ is git-ignored; fill it on the CPU machine first with
#   pip download liger-kernel==0.8.5 --no-deps -d .whl
# then run with carry [".whl"]. The test stages run with HAFRAME_DEBUG_POISON=1; the second one with
# HAFRAME_CUDA_TUNED=1 too. If both are green, the tuned path can become the default (tuned_path_enabled
# in csrc/cuda/fused_loss.cpp); compare fused and fused_tuned in gpu_bench.md first.
# Stages can be skipped with SKIP="tests sanitize profile bench".
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} HAFRAME_WITH_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=16
[ -d /usr/local/cuda/bin ] && export PATH=/usr/local/cuda/bin:$PATH
# The image's default CXX (/opt/gcc/bin/g++) links libstdc++ statically into shared objects; that
# private copy crashes on every numeric error message (seen 2026-11-27). Build with the system g++.
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
PY=${PY:-python3}
SKIP=${SKIP:-}
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }

{
  stamp "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

stamp "build"
# a build folder configured with another compiler (a warm machine) would make CMake refuse: start over
if ls build/*/CMakeCache.txt >/dev/null 2>&1 && [ -n "${CXX:-}" ] \
   && ! grep -q "CMAKE_CXX_COMPILER:[A-Z]*=${CXX}\$" build/*/CMakeCache.txt; then rm -rf build; fi
if ! $PY -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -E "build CUDA|warning" "$OUT/build.log" | head -20
so=$($PY -c "import importlib.util as u; print(u.find_spec('haframe_ext._C').origin)")
ldd "$so" | grep -q "libstdc++" || echo "WARNING: $so does not load the shared libstdc++ (static copy linked in)"
cd /tmp && $PY -c "import haframe_ext as hx; print('native', hx.native_available(), hx.native_error())" && cd - >/dev/null

if [[ " $SKIP " != *" tests "* ]]; then
  stamp "tests (CUDA and CPU) of the fused op"
  # the fused op's CUDA parity/error tests, its hostile-value tests and the modules that call it;
  # TESTS=all runs the whole suite (about 2 minutes more)
  tests="tests/test_ops.py tests/test_ops_inputs.py tests/test_nn.py"
  [ "${TESTS:-}" = all ] && tests=tests
  # every output and work buffer of the CUDA op starts as NaN (HAFRAME_DEBUG_POISON): unwritten rows show up
  HAFRAME_DEBUG_POISON=1 timeout 300 $PY -m pytest $tests -q -p no:cacheprovider --timeout 120 --tb=short > "$OUT/tests.log" 2>&1
  tail -30 "$OUT/tests.log"
  stamp "CUDA tests of the op on the tuned path (HAFRAME_CUDA_TUNED=1)"
  HAFRAME_CUDA_TUNED=1 HAFRAME_DEBUG_POISON=1 timeout 200 $PY -m pytest tests/test_ops.py tests/test_ops_inputs.py -q -k cuda \
    -p no:cacheprovider --timeout 120 --tb=short >> "$OUT/tests.log" 2>&1
  tail -15 "$OUT/tests.log"
fi

if [[ " $SKIP " != *" sanitize "* ]]; then
  stamp "compute-sanitizer memcheck"
  timeout 100 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 9 $PY bench/sanitize_case.py \
    > "$OUT/sanitizer.log" 2>&1; echo "memcheck rc=$?" | tee -a "$OUT/sanitizer.log"
  stamp "compute-sanitizer racecheck"
  timeout 100 compute-sanitizer --tool racecheck --error-exitcode 9 $PY bench/sanitize_case.py \
    >> "$OUT/sanitizer.log" 2>&1; echo "racecheck rc=$?" | tee -a "$OUT/sanitizer.log"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|rc=|sanitize case" "$OUT/sanitizer.log"
fi

if [[ " $SKIP " != *" profile "* ]]; then
  stamp "profile: host vs device time per step"
  timeout 120 $PY -m bench.profile_step --device cuda --shapes ${PROFILE_SHAPES:-inat,sq4096_bf16} --steps 10 \
    > "$OUT/profile.txt" 2>&1; grep -E "^\[|ERROR" "$OUT/profile.txt"
fi

if [[ " $SKIP " != *" bench "* ]]; then
  stamp "benchmarks"
  timeout ${BENCH_TIMEOUT:-240} $PY -m bench.run_quick --device cuda --shapes ${BENCH_SHAPES:-gpu} --budget 1 --ceilings --out "$OUT/gpu_bench.md" 2>&1 \
    | tee "$OUT/bench.log" | tail -60
fi
stamp "done"
