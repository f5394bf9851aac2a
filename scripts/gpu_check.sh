#!/usr/bin/env bash
# `make gpu-check`: the GPU path end to end on a machine with an NVIDIA GPU (and a package index):
# a fresh venv with the `gpu` extra (official vLLM), the GPU config served (Model Runner V2, the VAS
# processor for it), the integration tests against it, short serving and alignment benchmarks, and a
# markdown report in $OUT/report.md (the README's GPU section takes its table from there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-check}
VENV=${GPU_VENV:-.venv-gpu}
CONFIG=${GPU_CONFIG:-deploy/gpu-check.yaml}
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi here: this needs an NVIDIA GPU" >&2; exit 2; }
status=0
step() {  # step NAME COMMAND...: run, time, log to $OUT/NAME.log, record the outcome
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then r=ok; else r="FAILED (exit $?)"; status=1; fi
  echo "| $name | $r | $((SECONDS - t0)) s |" >>"$OUT/steps.md"
  echo "gpu-check: $name: $r ($((SECONDS - t0)) s)"
}
: >"$OUT/steps.md"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt"
step install env EXTRA=gpu VENV="$VENV" bash scripts/install.sh
PY="$VENV/bin/python"
export ALIGNSERVE_CONFIG="$CONFIG" PYTHONUNBUFFERED=1
step versions "$PY" -c "import torch, vllm, ray, transformers; from vllm.config import VllmConfig; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); \
print('vllm', vllm.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"
step tests "$PY" -m pytest -q -m integration tests/test_api.py tests/test_alignment_methods.py \
  tests/test_vas_integration.py --junitxml "$OUT/junit.xml"
step bench_serving "$PY" -m loadtests.bench_serving --concurrency 1,16 --requests-per-level 16 --max-tokens 64
step bench_alignment "$PY" -m loadtests.bench_alignment --prompts 6 --max-tokens 32
"$PY" scripts/gpu_report.py "$OUT" >"$OUT/report.md" 2>>"$OUT/report.log" || status=1
cat "$OUT/report.md"
exit $status
