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
setup:
	@$(PYTHON) tools/setup_env.py --venv $(VENV) --lock $(LOCK)

## lock: recompile the locks with hashes (slow: ~7 minutes for TensorFlow + MLflow)
lock: setup
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
train: setup
	$(CP) run $(CONFIG)

## verify: verify the latest run's whole chain
verify: setup
	$(CP) verify runs/latest --owner-key-file attestations/keys/owner.pub

## test: the whole test suite (unit + integration), about 26 minutes on 2 cores (1,063 tests)
test: setup
	@$(PYTHON) tools/setup_env.py --venv $(VENV) --lock $(LOCK) --browser
	$(PY) -m pytest -q tests

## test-fast: unit tests only
test-fast: setup
	$(PY) -m pytest -q tests/unit

## bench: hashing throughput vs in-toto's recorder, and per-stage pipeline overhead
bench: setup
	$(PY) bench/run.py

## ui: the MLflow UI on the embedded store (127.0.0.1 only)
ui: setup
	@echo "MLflow UI for $(CURDIR)/mlruns.db: http://127.0.0.1:$(UI_PORT)  (Ctrl-C stops it)"
	@$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns.db \
	  --default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port $(UI_PORT)

## serve: verify the latest release, then serve predictions on 127.0.0.1:$(SERVE_PORT)
SERVE_PORT ?= 8080
serve: setup
	@release=$$($(PY) -c "import json; print(json.load(open('runs/latest/run.json')).get('release') or '')"); \
	  test -n "$$release" || { echo "no release yet: run make train first" >&2; exit 2; }; \
	  $(CP) serve "$$release" --owner-key-file attestations/keys/owner.pub --port $(SERVE_PORT)

## upgrade: compile a candidate lock (pip-compile --upgrade, or PACKAGE=x for one) and gate it
upgrade: setup
	cp requirements/main.txt requirements/candidate.txt  # start from today's pins
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --pip-args "--isolated" \
	  $(if $(PACKAGE),--upgrade-package $(PACKAGE),--upgrade) \
	  -o requirements/candidate.txt requirements/main.in
	$(CP) candidate $(CONFIG) --lock requirements/candidate.txt

## lint: ruff (format and lint) and mypy, from their own locked environment (.venv-dev)
DEV_VENV := .venv-dev
LINT_PATHS := pipeline stages tests bench tools
lint: setup
	@$(PYTHON) tools/setup_env.py --venv $(DEV_VENV) --lock requirements/dev.txt --no-project
	$(DEV_VENV)/bin/ruff format --check $(LINT_PATHS)
	$(DEV_VENV)/bin/ruff check $(LINT_PATHS)
	$(DEV_VENV)/bin/mypy --python-executable $(PY) pipeline stages

clean:
	rm -rf runs attestations/runs releases .chainproof bench/out
