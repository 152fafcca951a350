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
	@echo "== 1. What this machine has: versions, devices, and which kernel backends can run"
	@$(PY) -m ctxkern info
	@echo
	@echo "== 2. Three sentences with the word 'bank', embedded by all-MiniLM-L6-v2 on ctxkern's kernels:"
	@echo "==    how alike each pair of sentences is as a whole (cosine similarity of their embeddings)"
	@$(PY) -m ctxkern embed $(POLYSEMY)
	@echo
	@echo "== 3. The same word in four sentences: its contextual embedding changes with its sense"
	@$(PY) -m ctxkern embed --word bank $(POLYSEMY) "Interest rates at the central bank rose again this year."
	@echo
	@echo "== 4. Semantic search: the built-in 20-sentence corpus ranked by meaning against a question"
	@$(PY) -m ctxkern search --query "How do neural networks learn?" --top 3
	@echo
	@echo "== 5. A persistent index: encode the corpus once (read from stdin), then search it by line number"
	@$(PY) -c "from ctxkern.search import DEFAULT_CORPUS; print(*DEFAULT_CORPUS, sep='\n')" | \
		$(PY) -m ctxkern index build - --out demo-index --no-progress
	@echo "==    (the \`ctxkern\` command answers a saved index without loading torch: the index stores an ONNX query encoder)"
	@$(VENV)/bin/ctxkern search --index demo-index --query "Where does money come from?" --top 3
	@echo
	@echo "== 6. A quick benchmark of every kernel against PyTorch (small shapes; tables in bench-out/)"
	@$(PY) -m ctxkern bench --device cpu --quick --out bench-out

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
	rm -rf build dist *.egg-info bench-out demo-index
	rm -f ctxkern/*.so $(VENV)/.built
