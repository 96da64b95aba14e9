#!/usr/bin/env bash
# Checks the label-error path on the GPU machine (it crashed there once: a statically linked
# libstdc++), then the full fused-op test file on CUDA.
set -u
export PATH=/usr/local/cuda/bin:$PATH
echo "g++: $(command -v g++) $(g++ -dumpversion)"; g++ -dumpspecs 2>/dev/null | grep -o "static-libstdc++[^ ]*" | head -2
SKIP="tests sanitize bench" bash bench/gpu_check.sh > /tmp/build_stage.log 2>&1 || { tail -20 /tmp/build_stage.log; exit 1; }
so=$(python3 -c "import importlib.util as u; print(u.find_spec('haframe_ext._C').origin)")
ldd "$so" | grep -E "stdc|gcc_s"
python3 -X faulthandler bench/diag_errors.py 2>&1 | grep -E "Error|error|Fatal|done" | head -12
timeout 200 python3 -m pytest tests/test_ops.py -q -p no:cacheprovider --tb=short 2>&1 | tail -15
