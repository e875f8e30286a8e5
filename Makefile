# Two commands: `make demo` (install + every notebook offline with the demo preset) and `make test`.
# `make demo` also rewrites what the repository shows without a run: figures/demo/, the chapters in
# reports/notebooks/demo/ and reports/results_demo.md (+ .json), one consistent set to commit.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0

.PHONY: install demo test test-fast lint book mutation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, from PyTorch's CPU wheel index: on Linux the plain pin would pull the CUDA build
# and several GB of CUDA packages. Where that index cannot be reached, the plain pin (a machine
# whose pip already offers the CPU wheel, as CI's does). For a CUDA build see the README.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
install: $(BIN)/python
	$(BIN)/pip install -q --retries 1 --timeout 20 --index-url "$(TORCH_INDEX)" "$(TORCH_CPU)" \
		|| $(BIN)/pip install -q "$(TORCH_CPU)"
	$(BIN)/pip install -q -r requirements.txt "$(TORCH_CPU)"
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null

demo: install
	$(BIN)/python -m retrieval_lib notebooks --preset demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not notebook"

lint: install
	$(BIN)/ruff check .

# The course site from the committed chapters (nothing is executed): build/book/html/index.html.
book: install
	$(BIN)/pip install -q -r requirements-book.txt
	$(BIN)/python book/build.py

# mutmut over the core modules (tests/mutation_tool.py; a night on 2 cores, never in CI); it
# rewrites tests/mutation_tool_results.json and the table in docs/tests.md. MODULES=... for some.
mutation: install
	$(BIN)/pip install -q -r requirements-mutation.txt
	$(BIN)/python tests/mutation_tool.py $(MODULES)

# leaves the committed figures/demo/ and reports/ alone
clean:
	rm -rf outputs runs data_cache build .pytest_cache figures/full
