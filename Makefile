# Two commands: `make demo` (install + every notebook offline with the demo preset) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0

.PHONY: install demo test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, from the CPU wheel: an unpinned torch would pull several GB of CUDA packages
install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_CPU)"
	$(BIN)/pip install -q -r requirements.txt "$(TORCH_CPU)"
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null

demo: install
	$(BIN)/python -m retrieval_lib.notebook_utils --preset demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not notebook"

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf outputs runs data_cache figures .pytest_cache
