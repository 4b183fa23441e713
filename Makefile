# prong_ext developer commands. Every target creates .venv (torch 2.13.0 CPU) when it is missing.
PYTHON3 ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deps-installed

# The CUDA architectures of the wheel: sm_80 and sm_90 code, and PTX of sm_90 that the driver
# compiles for newer GPUs.
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
GPU_CHECK_OUT ?= build/gpu-check-dry

.PHONY: build test demo compile-check compile-check-36 triton-39 wheel wheel-cpu bench gpu-check-dry gpu-check-rehearsal lint clean

$(STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt
	touch $@

# Editable install; builds the compiled extension prong_ext._C (CPU-only with this torch).
build: $(STAMP)
	$(PIP) install -q --no-build-isolation -e .

# Without a CUDA device the Triton kernels run under Triton's interpreter; with one they run
# compiled, and TRITON_INTERPRET is unset so that the compiled kernels are what is tested.
test: build
	if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		env -u TRITON_INTERPRET $(PY) -m pytest -q tests; \
	else \
		TRITON_INTERPRET=1 $(PY) -m pytest -q tests; \
	fi

# The main job on the embedded default (scikit-learn's digits).
demo: build
	$(PY) -m prong_ext autoencoder

# Compiles every Triton kernel for sm_80 and sm_90 without a GPU.
compile-check: build
	env -u TRITON_INTERPRET $(PY) -m prong_ext.triton_kernels.compile_check

# The same under Triton 3.6.0, the GPU machine's, in a cached venv (PRONG_EXT_TRITON_VENV, default
# ~/.cache/prong_ext/venv-t3.6.0, made when missing) from this checkout's sources.
compile-check-36:
	bash scripts/triton_check.sh 3.6.0

# Under Triton 3.9.0, the newest supported (venv ~/.cache/prong_ext/venv-t3.9.0): the compile check,
# and the kernels' tests under its interpreter (with prong_ext._C when `make build` made it).
triton-39:
	bash scripts/triton_check.sh 3.9.0 --tests

# The sdist, and the CUDA wheel built from it (torch 2.14.1 CUDA venv in .venv-cuda), checked for
# sm_80 and sm_90 code and sm_90 PTX, into dist/.
wheel:
	TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" bash scripts/build_wheel.sh

# The sdist, a CPU wheel built from it with .venv's torch, installed and run in a fresh venv.
wheel-cpu: $(STAMP)
	bash scripts/build_wheel.sh --cpu

# The benchmark suite, naive against prong_ext, on whatever device is present; writes
# benchmarks/results/ (results.md, results.json, a PNG plot).
bench: build
	$(PY) benchmarks/run.py --out benchmarks/results

# scripts/gpu_check.sh's dry run (no GPU needed, about a minute): every step on a copy of the
# checkout, the summary and the check of its entries in $(GPU_CHECK_OUT).
gpu-check-dry: $(STAMP)
	PYTHON=$(abspath $(PY)) GPU_CHECK_DRY=1 bash scripts/gpu_check.sh $(GPU_CHECK_OUT)

# The same dry run with the GPU machine's torch 2.11.0 (CUDA 13.0) and Triton 3.6.0, in the venv of
# scripts/device_venv.sh (made when missing: about 5 GB, 2 minutes): _C is built with CUDA as there,
# and the output is packed as the lent machine needs it (GPU_CHECK_PACK=1: at most 8 files).
gpu-check-rehearsal:
	py=$$(bash scripts/device_venv.sh) && PYTHON=$$py GPU_CHECK_DRY=1 GPU_CHECK_PACK=1 bash scripts/gpu_check.sh $(GPU_CHECK_OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check prong_ext triton_kernels tests benchmarks scripts setup.py

clean:
	rm -rf build dist *.egg-info prong_ext/_C*.so prong_ext/_build_info.py .pytest_cache
