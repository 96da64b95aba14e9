# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs first).
# On a fresh 2-core machine the install takes about 3 minutes (torch's wheel, then compiling the extension);
# each step says what it does, and an installed step takes seconds.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check
SAY = @echo "[make $@]"
# the linter is pinned: a new ruff release can add findings to the same rules
RUFF = ruff==0.17.6
CLANG_FORMAT ?= clang-format

.PHONY: install demo test lint format-check bench cuda-check clean

install:
	$(SAY) "1/3 torch 2.13.0, CPU wheel (about 1 minute when it downloads)"
	$(PIP) torch==2.13.0
	$(SAY) "2/3 build and test tools: scikit-build-core, ninja, numpy, scipy, matplotlib, pytest, tensorboard, ruff (about 1 minute)"
	$(PIP) "scikit-build-core>=0.10" ninja numpy scipy tqdm matplotlib pytest pytest-benchmark pytest-timeout hypothesis \
		tensorboard $(RUFF)
	$(SAY) "3/3 haframe_ext, compiling its C++ extension against this torch (about 1 minute the first time)"
	$(PIP) --no-build-isolation -e .
	$(SAY) "installed"

demo: install
	$(SAY) "comparing cross-entropy, hxe, soft-labels and haframe on synthetic data, 3 seeds x 10 epochs each (under 2 minutes)"
	$(PY) -m haframe_ext.cli demo

test: install
	$(SAY) "running the test suite (about 5 minutes on 2 cores)"
	$(PY) -m pytest -q --timeout 600

# ruff over the Python sources (rules and the reason for each ignore: pyproject.toml [tool.ruff]); installs only ruff
lint:
	$(SAY) "ruff check . ($(RUFF))"
	$(PIP) $(RUFF)
	$(PY) -m ruff check .

# Reports the lines of csrc/ that clang-format (.clang-format) would change; rewrites nothing, fails unless clean.
# Not in CI until it is clean; `clang-format --dry-run FILE` shows where.
format-check:
	@command -v $(CLANG_FORMAT) >/dev/null || { echo "[make $@] $(CLANG_FORMAT) not found (apt-get install clang-format)"; exit 1; }
	@n=0; for f in $$(find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' | sort); do \
		c=$$($(CLANG_FORMAT) --style=file "$$f" | diff "$$f" - | grep -c '^<'); \
		if [ "$$c" -gt 0 ]; then echo "$$f: $$c lines would change"; fi; n=$$((n + c)); done; \
	echo "[make $@] $$n lines of csrc/ would change"; [ "$$n" -eq 0 ]

bench: install
	$(PY) -m pytest bench/test_bench_loss.py --benchmark-only --benchmark-group-by=group -q

# Compile the pure-CUDA kernels with nvcc and syntax-check the ATen CUDA host code (no GPU needed).
cuda-check:
	bash .ci/cuda_check.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks .ruff_cache
