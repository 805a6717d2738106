# Two entry points for users: `make demo` (set up, then run the quickstart on the embedded model)
# and `make test` (set up, then lint, type-check and run the whole test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# llama-cpp-python compiles from source (minutes); build it once, portable (no -march=native),
# into a cache that outlives clones of the repository.
WHEELS ?= $(HOME)/.cache/cosmoforge/wheels
LLAMA_VERSION := 0.3.36

.PHONY: venv demo test lint crd clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	mkdir -p $(WHEELS)
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip wheel --no-deps llama-cpp-python==$(LLAMA_VERSION) -w $(WHEELS)
	$(BIN)/pip install --find-links $(WHEELS) -c constraints.txt -e ".[all,dev]"
	touch $@

demo: venv
	$(BIN)/cosmo run manifests/examples/quickstart.yaml

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# nanotron lives in its own environment (it conflicts with lighteval); tests load the training
# configs we generate with nanotron's own loader there.
.venv-nanotron/.installed: scripts/nanotron-venv.sh
	bash scripts/nanotron-venv.sh .venv-nanotron
	touch $@

test: lint .venv-nanotron/.installed
	$(BIN)/pytest -q

crd: venv
	$(BIN)/cosmo crd --out manifests/crds/generationruns.yaml

clean:
	rm -rf $(VENV) .venv-nanotron cosmoforge-runs .pytest_cache .mypy_cache .ruff_cache
