"""DPO LoRA baselines (decoders/train_baseline.py, issue: Transfer Q* with real aligned baselines):
the preference data, vLLM's CPU LoRA kernels as patched (server/vllm_patches.py), the registry that
makes the shipped adapters the default baselines, the training CLI at a tiny scale, and the adapters
served on the embedded default (listed as models, decoding alone, rolled out by Transfer Q*)."""
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from decoders.baselines import (BaselineConfig, default_baseline_configs, default_baseline_for, load_baselines,
                                packaged_adapters)
from decoders.train_baseline import preference_pairs
from server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent


# --- preference pairs ------------------------------------------------------------------------------

def test_preference_pairs_are_best_vs_worst_by_margin():
    samples = [{"prompt_index": i, "prompt": f"p{i}", "response": f"r{i}-{j}"} for i in range(3) for j in range(3)]
    rewards = [0.1, 0.9, 0.5,      # p0: margin 0.8
               0.3, 0.3, 0.3,      # p1: no margin, no pair
               -1.0, 0.0, 0.2]     # p2: margin 1.2
    pairs = preference_pairs(samples, rewards, limit=10, min_margin=0.0)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("p2", "r2-2", "r2-0"), ("p0", "r0-1", "r0-0")]
    assert pairs[0]["margin"] == pytest.approx(1.2) and pairs[0]["chosen_reward"] == 0.2
    assert [p["prompt"] for p in preference_pairs(samples, rewards, limit=1, min_margin=0.0)] == ["p2"]
    assert [p["prompt"] for p in preference_pairs(samples, rewards, limit=10, min_margin=1.0)] == ["p2"]


# --- vLLM's CPU LoRA ops, as patched ----------------------------------------------------------------

def _reference(x, w, idx, scale=1.0):
    """Per row: scale * x @ W[idx].T for an adapter slot, zeros for -1 (no adapter)."""
    out = torch.zeros(x.shape[0], w.shape[-2])
    for r, i in enumerate(idx.tolist()):
        if i >= 0:
            out[r] = scale * x[r] @ w[i, 0].T
    return out


def test_patched_lora_ops_give_rows_without_an_adapter_no_delta():
    from vllm.lora.ops.torch_ops import lora_ops

    from server import vllm_patches

    vllm_patches.install()
    assert getattr(lora_ops.bgmv_shrink, "_alignserve_masked", False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g)
    a = torch.randn(2, 1, 3, 6, generator=g)     # 2 adapter slots, rank 3, in 6
    b = torch.randn(2, 1, 5, 3, generator=g)     # out 5
    for idx in (torch.tensor([-1, 0, 1, -1]), torch.tensor([-1] * 4), torch.tensor([1, 0, 0, 1])):
        # unpatched, -1 indexed the LAST slot: a request without an adapter got slot 1's
        shrunk = torch.full((4, 3), 7.0)
        lora_ops.bgmv_shrink(x, a, shrunk, idx, 0.5)
        assert torch.allclose(shrunk, _reference(x, a, idx, 0.5), atol=1e-5)
        y = torch.ones(4, 5)
        lora_ops.bgmv_expand(shrunk, b, y, idx, True)
        assert torch.allclose(y, 1 + _reference(shrunk, b, idx), atol=1e-5)
        y = torch.ones(4, 9)
        lora_ops.bgmv_expand_slice(shrunk, b, y, idx, 2, 5, True)
        assert torch.allclose(y[:, 2:7], 1 + _reference(shrunk, b, idx), atol=1e-5)
        assert torch.equal(y[:, :2], torch.ones(4, 2)) and torch.equal(y[:, 7:], torch.ones(4, 2))
        y = torch.ones(4, 5)
        lora_ops.bgmv_expand(shrunk, b, y, idx, False)
        assert torch.allclose(y, _reference(shrunk, b, idx), atol=1e-5)
    # the sgmv ops (prefill) go through the same masked bgmv ops
    y = torch.zeros(4, 3)
    lora_ops.sgmv_shrink(x, a, y, torch.tensor([0, 2]), torch.tensor([2, 2]), torch.tensor([-1, 1]), 2, 2, 4, 1.0)
    assert torch.allclose(y, _reference(x, a, torch.tensor([-1, -1, 1, 1])), atol=1e-5)


def test_patched_lora_wrapper_skips_a_batch_without_adapters():
    """The CPU wrapper adds nothing (and runs no LoRA op) while no token of the batch has an adapter;
    once a token has one, the delta is added again (server/vllm_patches.py)."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from server import vllm_patches

    vllm_patches.install()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, generator=g)
    a = (torch.randn(1, 1, 4, 6, generator=g),)      # 1 adapter slot, rank 4, in 6
    b = (torch.randn(1, 1, 5, 4, generator=g),)      # out 5
    wrapper = PunicaWrapperCPU(max_num_batched_tokens=8, max_batches=4, device="cpu")
    for index, idle in (((0, 0, 0), True), ((0, 7, 0), False), ((0, 0, 0), True)):
        wrapper.update_metadata(LoRAMapping(index, index), [7], 1, 100)
        assert wrapper.alignserve_idle is idle
        y = torch.ones(3, 5)
        wrapper.add_lora_linear(y, x, a, b, 1.0, (5,))
        rows = torch.tensor([i == 7 for i in index])
        assert torch.equal(y[~rows], torch.ones(int((~rows).sum()), 5))
        assert torch.allclose(y[rows], 1 + x[rows] @ a[0][0, 0].T @ b[0][0, 0].T, atol=1e-4)


# --- the registry --------------------------------------------------------------------------------

def test_shipped_adapters_are_the_default_baselines_of_the_embedded_model():
    adapters = packaged_adapters()
    assert set(adapters) >= {"sentiment", "safety"}
    for name in ("sentiment", "safety"):
        bl = adapters[name]
        assert bl.kind == "lora" and bl.aligned_to == [name] and Path(bl.path, "adapter_model.safetensors").is_file()
        card = json.loads(Path(bl.path, "card.json").read_text())
        assert card["data"]["split"] == "training" and card["evaluation"]["kl_to_base"]["n"] > 0
        assert Path(bl.path, "adapter_model.safetensors").stat().st_size < 8 * 2**20   # a few MB
    bls = default_baseline_configs()
    assert {"sentiment", "safety", "positive", "harmless", "warm_harmless"} <= set(bls)
    assert default_baseline_for({"sentiment": 1.0}, bls) == "sentiment"
    assert default_baseline_for({"safety": 1.0}, bls) == "safety"
    # a mixture an adapter was not trained for is still rolled out by an adapter (indirect transfer)
    assert default_baseline_for({"sentiment": 2.0, "safety": 1.0}, bls) == "sentiment"
    assert default_baseline_for({"relevance": 1.0}, bls) == "on_topic"      # no adapter for it: prompted
    assert default_baseline_for({"sentiment": -1.0}, bls) != "sentiment"   # the opposite of what it learnt

    cfg = ServerConfig()
    assert {"sentiment", "safety"} <= set(cfg.baseline_registry())
    from server.engine import lora_adapters, lora_args

    assert set(lora_adapters(cfg)) == {"sentiment", "safety"}
    assert lora_args(cfg) == {"enable_lora": True, "max_lora_rank": 16, "max_loras": 2}
    # another model does not get the embedded model's adapters; enable_lora false drops them
    other = ServerConfig(model="/models/other")
    assert lora_adapters(other) == {} and lora_args(other) == {} and "positive" in other.baseline_registry()
    off = ServerConfig.model_validate({"engine": {"enable_lora": False}})
    assert lora_args(off) == {} and not any(b.kind == "lora" for b in off.baseline_registry().values())
    assert set(load_baselines(None, ["sentiment"], embedded=False)) == {"positive"}
    assert load_baselines({"x": BaselineConfig(aligned_to=["sentiment"])}, ["sentiment"]).keys() == {"x"}


# --- the training CLI, tiny ---------------------------------------------------------------------------

@pytest.mark.integration
def test_train_baseline_cli_writes_an_adapter_vllm_serves(tmp_path):
    """Base samples of training prompts (given: sampling from the frozen base is the value CLI's, tested
    in test_train_value_cli; one vLLM start less here), scored, paired best vs worst, DPO of a LoRA for one
    step, then evaluated served by vLLM as LoRA on held-out prompts: the card has rewards and a KL estimate."""
    from decoders.prompts import training_prompts

    out = tmp_path / "sentiment"
    answers = ["I loved it, a wonderful and happy film.", "It was awful, a sad and terrible waste."]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"prompt_index": i, "prompt": p, "response": a}) + "\n"
                               for i, p in enumerate(training_prompts("rotten_tomatoes", limit=4)) for a in answers))
    cmd = [sys.executable, "-m", "decoders.train_baseline", "--objective", "sentiment", "--prompts", "rotten_tomatoes",
           "--out", str(out), "--pairs", "8", "--samples-from", str(samples),
           "--max-tokens", "12", "--epochs", "1", "--lr", "1e-3", "--eval-prompts", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.bfloat16 for t in weights.values())
    card = json.loads((out / "card.json").read_text())
    from decoders.prompts import heldout_prompts

    assert card["data"]["pairs"] == 4 and card["training"]["steps"] >= 1
    assert card["data"]["samples_from"] == str(samples)
    assert set(e["prompt"] for e in card["evaluation"]["examples"]) <= set(heldout_prompts("rotten_tomatoes"))
    assert not set(training_prompts("rotten_tomatoes", limit=8)) & set(heldout_prompts("rotten_tomatoes"))
    ev = card["evaluation"]
    assert ev["reward_base"]["n"] == ev["reward_adapter"]["n"] == ev["kl_to_base"]["n"] == 4
    assert "KL(adapter" in (out / "README.md").read_text()


# --- served ------------------------------------------------------------------------------------------

def _chat(client, model, prompt, alignment=None, **kw):
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          extra_body={"alignment": alignment} if alignment else None, **kw)


PROMPTS = ["Write a short review of the movie Titanic.", "Describe your last holiday.",
           "Continue this text: The neighbours were loud again and I"]


@pytest.mark.integration
def test_adapters_are_listed_and_decode_as_models(client, model_name):
    models = client.models.list().data
    ids = [m.id for m in models]
    assert ids[0] == model_name and {f"{model_name}-sentiment", f"{model_name}-safety"} <= set(ids[1:])
    card = client.models.retrieve(f"{model_name}-sentiment")
    assert card.id == f"{model_name}-sentiment" and card.model_extra["parent"] == model_name
    base = [_chat(client, model_name, p, temperature=0).choices[0].message.content for p in PROMPTS]
    tuned = [_chat(client, f"{model_name}-sentiment", p, temperature=0) for p in PROMPTS]
    assert tuned[0].model == f"{model_name}-sentiment"
    assert any(t.choices[0].message.content != b for t, b in zip(tuned, base)), (base, tuned)
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        _chat(client, f"{model_name}-charisma", "hi")
    assert f"{model_name}-sentiment" in e.value.body["message"]


@pytest.mark.integration
def test_base_requests_are_not_steered_by_adapters_in_the_same_batch(client, model_name):
    """Base-model answers stay the base model's while adapter requests of both adapters run in the same
    continuous batch (vLLM's CPU LoRA ops gave them the last adapter slot's weights; fixed in
    server/vllm_patches.py)."""
    alone = [_chat(client, model_name, p, temperature=0, max_tokens=16).choices[0].message.content for p in PROMPTS]
    stop = threading.Event()

    def adapters():
        while not stop.is_set():
            for suffix in ("sentiment", "safety"):
                _chat(client, f"{model_name}-{suffix}", PROMPTS[0], max_tokens=48, temperature=1.0)

    threads = [threading.Thread(target=adapters) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        mixed = [_chat(client, model_name, p, temperature=0, max_tokens=16).choices[0].message.content for p in PROMPTS]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert mixed == alone


@pytest.mark.integration
def test_transfer_q_rolls_out_the_adapter_direct_and_indirect(client, model_name):
    r = _chat(client, model_name, PROMPTS[0], {"method": "transfer_q", "weights": {"sentiment": 1}, "block": 8,
                                               "rollout_tokens": 8}, seed=1)
    receipt = r.model_extra["alignment"]
    assert receipt["baseline"] == "sentiment" and receipt["transfer"] == "direct"
    assert receipt["cost"]["rollout_tokens"] > 0
    r = _chat(client, model_name, PROMPTS[0], {"method": "transfer_q", "weights": {"sentiment": 1, "safety": 1},
                                               "block": 8, "rollout_tokens": 8}, seed=1)
    receipt = r.model_extra["alignment"]
    assert receipt["baseline"] in ("sentiment", "safety") and receipt["transfer"] == "indirect"
    assert receipt["baseline_objectives"] == [receipt["baseline"]] and receipt["mean_weight"] > 0
    # the prompted baselines stay available by name
    r = _chat(client, model_name, PROMPTS[0], {"method": "transfer_q", "weights": {"sentiment": 1}, "block": 8,
                                               "rollout_tokens": 8, "baseline": "positive"}, seed=1)
    assert r.model_extra["alignment"]["baseline"] == "positive"


@pytest.mark.integration
def test_prompt_logprobs_work_with_lora_enabled(server, model_name):
    """echo + logprobs (lm-eval's loglikelihood) asks vLLM for prompt log-probs, which crashed its CPU
    LoRA logits path (server/vllm_patches.py); for the base model and for an adapter."""
    import httpx

    for model in (model_name, f"{model_name}-safety"):
        r = httpx.post(f"{server.base_url}/completions", json={
            "model": model, "prompt": "The cat sat on the mat", "max_tokens": 1, "echo": True, "logprobs": 1,
            "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert lp[0] is None and all(isinstance(x, float) for x in lp[1:])
    assert httpx.get(f"{server.base_url.removesuffix('/v1')}/health", timeout=30).status_code == 200
