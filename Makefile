# make demo   - set everything up, then run the whole flow on the embedded default model
# make demo-offline - the same trip with sovpack itself carried across: the secure side has no network (root)
# make test   - set everything up, then run the whole test suite
# make fuzz   - the fuzz tests of every untrusted-input parser, with 50 times as many cases (minutes)
# make lint   - ruff: lint and format check
# make bench  - run every benchmark in bench/ and regenerate docs/benchmarks.md
#               (the first run builds llama.cpp's llama-server, the serve reference, into .cache/llama-server/)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL := .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: demo demo-offline test fuzz lint format bench model clean

demo: $(STAMP) $(MODEL)
	$(BIN)/python scripts/demo.py

demo-offline: $(STAMP) $(MODEL)
	$(BIN)/python scripts/demo_offline.py

test: $(STAMP) $(MODEL)
	$(BIN)/python -m pytest

fuzz: $(STAMP)
	SOVPACK_FUZZ=1 $(BIN)/python -m pytest tests/test_fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) $(MODEL)
	$(BIN)/python bench/run.py

model: $(MODEL)

# llama-cpp-python compiles llama.cpp from source the first time (about 5 minutes on 2 cores);
# pip caches the built wheel, so later installs take seconds.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[serve,pkcs11,test,lint]'
	touch $(STAMP)

$(MODEL): scripts/get_model.py | $(STAMP)
	$(BIN)/python scripts/get_model.py $(MODEL)

clean:
	rm -rf $(VENV) demo-output bench/out
