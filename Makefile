# The README's two commands: `make demo` (the main job) and `make test` (the whole test suite).
# Both work on a fresh machine with only Python: they make a virtual environment in .venv, install
# torch==2.13.0 when it has none (never a newer torch), the other requirements, and build ctxkern._C.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
CSRC := $(shell find csrc -type f)

.PHONY: demo test bench build deps clean

# The main job: sentence embeddings on the bundled all-MiniLM-L6-v2 (polysemy, search), then a quick benchmark.
POLYSEMY := "The bank approved my loan application." "I sat on the bank of the river." "Please bank the fire before leaving."

demo: build
	$(PY) -m ctxkern info
	$(PY) -m ctxkern embed $(POLYSEMY)
	$(PY) -m ctxkern embed --word bank $(POLYSEMY) "Interest rates at the central bank rose again this year."
	$(PY) -m ctxkern search --query "How do neural networks learn?" --top 3
	$(PY) -m ctxkern bench --device cpu --quick --out bench-out

# pytest exits 5 when it collected no test: a run that tests nothing is a failure.
test: build
	$(PY) -m pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest ran no test" >&2; exit 1; fi; exit $$rc

# The pytest-benchmark suites (not part of `make test`).
bench: build
	$(PY) -m pytest benchmarks --benchmark-columns=median,iqr,rounds --benchmark-sort=name

build: $(VENV)/.built
deps: $(VENV)/.deps

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install -r requirements.txt -c $(VENV)/constraints.txt
	touch $@

# The README's install command as written (its requirements are already in place: nothing is fetched).
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	$(PY) -m pip install --no-build-isolation -e ".[models]" -c $(VENV)/constraints.txt
	touch $@

# Every built module (ctxkern/_C and each ctxkern/_cpu_<isa>, as `pip install -e .` writes them in place) and
# the build stamp, so that the next `make` builds again; only build outputs, never a source.
clean:
	rm -rf build dist *.egg-info bench-out
	rm -f ctxkern/*.so $(VENV)/.built
