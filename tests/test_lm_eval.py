"""lm-evaluation-harness against the server, as users run it: `lm_eval --model local-completions`.

That model scores multiple-choice tasks through /v1/completions with batched token-id prompts
(`int[][]`), `echo: true`, `logprobs: 1` and `max_tokens: 1` (the prompt's log-probs), and runs
generation tasks with plain completions and stop strings. A small local task (tests/data/lm_eval,
8 questions) runs both offline against the session server.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data" / "lm_eval" / "capitals_and_facts.jsonl"
MODEL = "SmolLM2-135M-Instruct"

TASKS = """
task: alignserve_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""

GEN_TASK = """
task: alignserve_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.mark.integration
def test_lm_eval_local_completions_scores_and_generates(server, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from decoders.base_model import materialize_embedded

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    (tmp_path / "mc.yaml").write_text(TASKS.format(data=DATA))
    (tmp_path / "gen.yaml").write_text(GEN_TASK.format(data=DATA))
    model_args = (f"model={MODEL},base_url={server.url}/v1/completions,tokenizer={materialize_embedded()},"
                  "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1,"
                  "batch_size=4")
    out = lm_eval.simple_evaluate(model="local-completions", model_args=model_args,
                                  tasks=["alignserve_tiny_mc", "alignserve_tiny_gen"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    mc, gen = out["results"]["alignserve_tiny_mc"], out["results"]["alignserve_tiny_gen"]
    # Every question scored (its 4 choices' log-likelihoods came back), better than chance on these.
    assert len(out["samples"]["alignserve_tiny_mc"]) == 8 and len(out["samples"]["alignserve_tiny_gen"]) == 8
    assert mc["acc,none"] >= 0.5, mc
    assert 0.0 <= gen["exact_match,none"] <= 1.0
    # The log-likelihoods are real (finite, negative), not placeholders.
    resps = [r for s in out["samples"]["alignserve_tiny_mc"] for r in s["filtered_resps"]]
    assert all(-1000 < float(ll[0]) < 0 for ll in resps), resps[:4]
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"
