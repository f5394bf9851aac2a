"""The value-model training CLI end to end at a tiny scale: sample from the frozen base model through
vLLM, score with a registered objective, fit by TD(lambda), write a checkpoint that loads."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def test_train_value_cli_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "sentiment"
    cmd = [sys.executable, "-m", "decoders.train_value", "--objective", "sentiment", "--prompts", "rotten_tomatoes",
           "--samples", "32", "--samples-per-prompt", "4", "--max-tokens", "12", "--epochs", "24",
           "--val-fraction", "0", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    meta = json.loads((out / "value_model.json").read_text())
    assert meta["objective"] == "sentiment" and (out / "head.safetensors").stat().st_size > 0
    # The trained head predicts the final reward better than a constant (explained variance > 0 on the
    # samples it was fit on; the constant, the mean, explains none). 24 epochs: at 6 the fit of 32
    # samples was marginal (0.15, 0.06, -0.002 in three runs; vLLM-CPU sampling is not bit-reproducible),
    # at 24 it was 0.66, in the same time (sampling dominates). No held-out prompts at this scale: the
    # default 15 % of 8 prompts is one prompt, and where its 4 answers had near-equal rewards the epoch
    # chosen on them was the first, an untrained head (explained variance 0.0 in about 1 run of 6); chosen
    # on the training TD loss, the last epoch wins (0.93-0.94 in three runs).
    assert meta["training"]["quality"]["train"]["explained_variance_all_prefixes"] > 0.0, meta["training"]["quality"]
    from decoders.value_model import load_value_model
    from decoders.base_model import materialize_embedded

    vm = load_value_model(str(out), materialize_embedded())
    assert vm is not None
