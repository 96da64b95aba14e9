#!/usr/bin/env bash
# Locates a crash of the label-error path on the GPU machine: each case in its own process, then a
# backtrace of the first crashing one under cuda-gdb (which also debugs host code).
set -u
export PATH=/usr/local/cuda/bin:$PATH
SKIP="tests sanitize bench" bash bench/gpu_check.sh > /tmp/build_stage.log 2>&1 || { tail -20 /tmp/build_stage.log; exit 1; }
so=$(python3 -c "import importlib.util as u; print(u.find_spec('haframe_ext._C').origin)")
ldd "$so" | grep -E "stdc|gcc_s|c10|libc\.so"
for c in below_autograd raw_op haframe_loss cuda_raw_op; do
  python3 -X faulthandler bench/diag_errors.py $c > /tmp/diag_$c.log 2>&1; echo "$c rc=$?"; grep -E "Error|error|no error" /tmp/diag_$c.log | head -2
done
python3 - <<'PY'
import torch, torch.nn.functional as F
import haframe_ext
h = torch.randn(4, 6); w = F.normalize(torch.randn(5, 6), dim=1)
for name, args in {"two_extras": (h, w, torch.zeros(4, dtype=torch.long), w @ w.T, w.T @ w, 0.4, -100, 0, True),
                   "bad_alpha": (h, w, torch.zeros(4, dtype=torch.long), w @ w.T, None, 2.0, -100, 0, True)}.items():
    try:
        torch.ops.haframe_ext.fused_loss(*args); print(name, "no error")
    except Exception as e:
        print(name, type(e).__name__, str(e).splitlines()[0], flush=True)
PY
echo "check rc=$?"
cuda-gdb -batch -ex run -ex "bt 5" -ex "x/6i \$pc-12" -ex "info sharedlibrary" --args python3 bench/diag_errors.py below_autograd 2>&1 \
  | grep -v "^\[New Thread\|^\[Thread\|^\[Detaching" | grep -E "^#|=>|signal|stdc|gcc_s|libc10|^ *0x" | head -40
timeout 120 python3 -m pytest tests/test_ops.py -q -p no:cacheprovider --tb=short -k "input_errors or checks_labels or alpha_out or reduction_and_backend or trainable or mismatched or nan_or_inf or empty_batch or all_rows" 2>&1 | tail -15
