# Every target bootstraps itself: `make train` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Isolated (-I: no PYTHONPATH, PYTHONSTARTUP, user site; -S: no site-packages until the
# stdlib-only bootstrap has checked them against the sealed manifest).
CP     := $(PY) -I -S pipeline/bootstrap.py
CONFIG ?= configs/digits-cnn.yaml
LOCK   := requirements/main.txt
export TF_CPP_MIN_LOG_LEVEL := 2

UI_PORT ?= 5000

.PHONY: setup lock train verify test test-fast bench ui serve upgrade lint clean

## setup: build .venv from the hash-pinned lock (skipped when the lock and pyproject are unchanged)
SETUP := $(VENV)/.chainproof-setup
setup:
	@$(PYTHON) tools/setup_env.py --venv $(VENV) --lock $(LOCK) && touch $(SETUP)

# What the other targets depend on: make compares mtimes (no interpreter starts when nothing
# changed), then tools/setup_env.py compares contents (a fresh clone, or a checkout that only
# touched the lock, rebuilds nothing and refreshes the stamp). A missing interpreter reruns it.
# The run itself still checks site-packages against the sealed manifest and the lock.
$(SETUP): $(LOCK) pyproject.toml tools/setup_env.py $(PY)
	@$(PYTHON) tools/setup_env.py --venv $(VENV) --lock $(LOCK) && touch $@
$(PY): ;

## lock: recompile the locks with hashes (slow: ~7 minutes for TensorFlow + MLflow)
lock: $(SETUP)
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --pip-args "--isolated" \
	  -o requirements/main.txt requirements/main.in
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe \
	  --no-emit-index-url --no-emit-find-links --pip-args "--isolated" \
	  -o tests/data/locks/small.txt tests/data/locks/small.in
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --pip-args "--isolated" \
	  -o requirements/dev.txt requirements/dev.in

## train: run the default pipeline end to end (source -> train -> package -> deploy), verified
##        (RUN_ARGS="--no-reuse" reruns every stage; RUN_ARGS="--workspace DIR" runs elsewhere)
RUN_ARGS ?=
train: $(SETUP)
	$(CP) run $(CONFIG) $(RUN_ARGS)

## verify: verify the latest run's whole chain
verify: $(SETUP)
	$(CP) verify runs/latest --owner-key-file attestations/keys/owner.pub

## test: the whole test suite (unit + integration), 16-26 minutes on 2 cores (1,090 tests)
test: $(SETUP)
	@$(PYTHON) tools/setup_env.py --venv $(VENV) --lock $(LOCK) --browser
	$(PY) -m pytest -q tests

## test-fast: unit tests only
test-fast: $(SETUP)
	$(PY) -m pytest -q tests/unit

## bench: hashing throughput vs in-toto's recorder, and per-stage pipeline overhead
bench: $(SETUP)
	$(PY) bench/run.py

## ui: the MLflow UI on the embedded store (127.0.0.1 only)
ui: $(SETUP)
	@echo "MLflow UI for $(CURDIR)/mlruns.db: http://127.0.0.1:$(UI_PORT)  (Ctrl-C stops it)"
	@$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns.db \
	  --default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port $(UI_PORT)

## serve: verify the latest release, then serve predictions on 127.0.0.1:$(SERVE_PORT)
SERVE_PORT ?= 8080
serve: $(SETUP)
	@release=$$($(PY) -c "import json; print(json.load(open('runs/latest/run.json')).get('release') or '')"); \
	  test -n "$$release" || { echo "no release yet: run make train first" >&2; exit 2; }; \
	  $(CP) serve "$$release" --owner-key-file attestations/keys/owner.pub --port $(SERVE_PORT)

## upgrade: compile a candidate lock (pip-compile --upgrade, or PACKAGE=x for one) and gate it
upgrade: $(SETUP)
	cp requirements/main.txt requirements/candidate.txt  # start from today's pins
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --pip-args "--isolated" \
	  $(if $(PACKAGE),--upgrade-package $(PACKAGE),--upgrade) \
	  -o requirements/candidate.txt requirements/main.in
	$(CP) candidate $(CONFIG) --lock requirements/candidate.txt

## lint: ruff (format and lint) and mypy, from their own locked environment (.venv-dev)
DEV_VENV := .venv-dev
LINT_PATHS := pipeline stages tests bench tools
lint: $(SETUP)
	@$(PYTHON) tools/setup_env.py --venv $(DEV_VENV) --lock requirements/dev.txt --no-project
	$(DEV_VENV)/bin/ruff format --check $(LINT_PATHS)
	$(DEV_VENV)/bin/ruff check $(LINT_PATHS)
	$(DEV_VENV)/bin/mypy --python-executable $(PY) pipeline stages

clean:
	rm -rf runs attestations/runs releases .chainproof bench/out
