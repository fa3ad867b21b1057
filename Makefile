# Two entry points, both self-installing on a fresh machine:
#   make demo   build (and later train, export and serve) a small family end to end
#   make test   the test suite
# The virtual environment lives in .venv and is reused until pyproject.toml changes.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0: the CPU build this machine installs from local disk.
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# ---- the demo: corpus -> tokenizer -> tokens -> family -> a Hugging Face member -----------------

$(RUN)/corpus/corpus.json: | $(VENV)/.installed
	$(BIN)/flow corpus $(RUN)/corpus --max-mb 4

$(RUN)/corpus/tokenizer.json: $(RUN)/corpus/corpus.json
	$(BIN)/flow tokenizer $(RUN)/corpus --vocab-size 4096

$(RUN)/corpus/tokens.json: $(RUN)/corpus/tokenizer.json
	$(BIN)/flow tokenize $(RUN)/corpus

$(RUN)/family/family.json: $(RUN)/corpus/tokens.json
	$(BIN)/flow new $(RUN)/family --preset demo --tokenizer $(RUN)/corpus/tokenizer.json --force

demo: $(RUN)/family/family.json
	$(BIN)/flow info $(RUN)/family
	$(BIN)/flow export-hf $(RUN)/family $(RUN)/member0-hf --exit 0 --force

clean:
	rm -rf runs build .pytest_cache
