# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs first).
# On a fresh 2-core machine the install takes about 3 minutes (torch's wheel, then compiling the extension);
# each step says what it does, and an installed step takes seconds.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check
SAY = @echo "[make $@]"

.PHONY: install demo test bench cuda-check clean

install:
	$(SAY) "1/3 torch 2.13.0, CPU wheel (about 1 minute when it downloads)"
	$(PIP) torch==2.13.0
	$(SAY) "2/3 build and test tools: scikit-build-core, ninja, numpy, scipy, matplotlib, pytest, tensorboard (about 1 minute)"
	$(PIP) "scikit-build-core>=0.10" ninja numpy scipy tqdm matplotlib pytest pytest-benchmark pytest-timeout hypothesis \
		tensorboard
	$(SAY) "3/3 haframe_ext, compiling its C++ extension against this torch (about 1 minute the first time)"
	$(PIP) --no-build-isolation -e .
	$(SAY) "installed"

demo: install
	$(SAY) "comparing cross-entropy, hxe, soft-labels and haframe on synthetic data, 3 seeds x 10 epochs each (under 2 minutes)"
	$(PY) -m haframe_ext.cli demo

test: install
	$(SAY) "running the test suite (about 5 minutes on 2 cores)"
	$(PY) -m pytest -q --timeout 600

bench: install
	$(PY) -m pytest bench/test_bench_loss.py --benchmark-only --benchmark-group-by=group -q

# Compile the pure-CUDA kernels with nvcc and syntax-check the ATen CUDA host code (no GPU needed).
cuda-check:
	bash .ci/cuda_check.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks
