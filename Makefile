# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs first).
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test bench cuda-check clean

install:
	$(PIP) torch==2.13.0
	$(PIP) "scikit-build-core>=0.10" ninja numpy scipy tqdm matplotlib pytest pytest-benchmark pytest-timeout hypothesis \
		tensorboard
	$(PIP) --no-build-isolation -e .

demo: install
	$(PY) -m haframe_ext.cli demo

test: install
	$(PY) -m pytest -q --timeout 600

bench: install
	$(PY) -m pytest bench/test_bench_loss.py --benchmark-only --benchmark-group-by=group -q

# Compile the pure-CUDA kernels with nvcc and syntax-check the ATen CUDA host code (no GPU needed).
cuda-check:
	bash .ci/cuda_check.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks
