"""Unit tests of the VAS value models: the Llama trunk against transformers, its KV cache, the
checkpoint format and TD(lambda) targets. Tiny random models only; no vLLM, no hub."""
from __future__ import annotations

import json

import pytest
import torch

from decoders.value_model import (
    LlamaTrunk,
    ValueHead,
    ValueModel,
    load_value_model,
    load_value_models,
    read_meta,
    td_lambda_targets,
    tokenizer_fingerprint,
)

VOCAB = 128


def _write_tokenizer(path, shift: int = 0) -> None:
    vocab = {f"tok{i + shift}": i for i in range(VOCAB - 2)}
    tok = {
        "version": "1.0",
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "tok0"},
        "added_tokens": [{"id": VOCAB - 2, "content": "<|im_start|>"}, {"id": VOCAB - 1, "content": "<|im_end|>"}],
    }
    (path / "tokenizer.json").write_text(json.dumps(tok))


def make_tiny_llama(path, *, layers: int = 3, seed: int = 0, rope_theta: float = 10000.0, shift: int = 0):
    """A random tiny Llama saved like a real base: config.json + model.safetensors + tokenizer.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                      max_position_embeddings=512, rope_theta=rope_theta, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so that their weights matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    _write_tokenizer(path, shift)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    model = make_tiny_llama(path)
    return path, model


@pytest.mark.parametrize("layers", [1, 2])
def test_trunk_matches_transformers(tiny, layers):
    path, model = tiny
    trunk = LlamaTrunk.from_pretrained(path, layers)
    ids = torch.randint(0, VOCAB, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.model(input_ids=ids, output_hidden_states=True).hidden_states[layers][0]
    ours = trunk(ids[0])
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_incremental_decode_equals_full_forward(tiny):
    path, _ = tiny
    trunk = LlamaTrunk.from_pretrained(path, 2)
    ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    full = trunk(ids)
    cache = trunk.new_cache(capacity=4)  # forces the cache to grow several times
    chunks = [ids[:7]] + [[t] for t in ids[7:20]] + [ids[20:26], ids[26:]]
    outs = []
    for chunk in chunks:
        outs.append(trunk.extend([cache], [chunk], return_all=True)[0])
    torch.testing.assert_close(torch.cat(outs), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 30 and cache.tokens == ids
    # the last-token form returns the same row
    cache2 = trunk.new_cache()
    last = trunk.extend([cache2], [ids])
    torch.testing.assert_close(last[0], full[-1], atol=1e-5, rtol=1e-5)


def test_batched_decode_with_different_cache_lengths(tiny):
    path, _ = tiny
    trunk = LlamaTrunk.from_pretrained(path, 2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 6, 1)]
    steps = [torch.randint(0, VOCAB, (4,), generator=g).tolist() for _ in prompts]
    # batched: prefill all rows together (different lengths), then decode 4 steps batched
    caches = [trunk.new_cache() for _ in prompts]
    trunk.extend(caches, prompts)
    batched = []
    for t in range(4):
        batched.append(trunk.extend(caches, [[s[t]] for s in steps]))
    # per row, one at a time
    for r, (p, s) in enumerate(zip(prompts, steps)):
        c = trunk.new_cache()
        trunk.extend([c], [p])
        for t in range(4):
            row = trunk.extend([c], [[s[t]]])[0]
            torch.testing.assert_close(batched[t][r], row, atol=1e-5, rtol=1e-5)
    # mixed step: one row prefills several tokens while the others decode one
    c_mixed = [trunk.new_cache() for _ in range(2)]
    out = trunk.extend(c_mixed, [[5, 6, 7, 8], [9]])
    ref0 = trunk([5, 6, 7, 8])[-1]
    ref1 = trunk([9])[-1]
    torch.testing.assert_close(out[0], ref0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref1, atol=1e-5, rtol=1e-5)


def test_incremental_features_equal_full_forward(tiny):
    """The pooled state features kept in the cache step by step (serving) equal the ones computed
    from one full forward (training)."""
    path, _ = tiny
    trunk = LlamaTrunk.from_pretrained(path, 2)
    prompt, resp = [3, 9, 27, 81 % VOCAB], [5, 6, 7, 8, 9, 10]
    full = trunk.state_features(prompt + resp, len(prompt))  # [len(resp) + 1, 2H]
    assert full.shape == (len(resp) + 1, 128)
    torch.testing.assert_close(full[0, 64:], torch.zeros(64))  # no response token yet
    h = trunk(prompt + resp)
    torch.testing.assert_close(full[3], torch.cat([h[len(prompt) + 2], h[len(prompt):len(prompt) + 3].mean(0)]))
    cache = trunk.new_cache(pool_from=len(prompt))
    steps = [trunk.features([cache], [prompt])[0]]
    steps += [trunk.features([cache], [[t]])[0] for t in resp]
    torch.testing.assert_close(torch.stack(steps), full, atol=1e-5, rtol=1e-5)
    # truncation recomputes the pool; a batch mixing a prefill row and a decode row agrees too
    cache.truncate(len(prompt) + 2)
    torch.testing.assert_close(cache.pooled(), full[2, 64:], atol=1e-5, rtol=1e-5)
    c2 = trunk.new_cache(pool_from=len(prompt))
    out = trunk.features([cache, c2], [[7], prompt + resp[:1]])
    torch.testing.assert_close(out[0], full[3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], full[1], atol=1e-5, rtol=1e-5)


def test_cache_truncate_and_prefix(tiny):
    path, _ = tiny
    trunk = LlamaTrunk.from_pretrained(path, 1)
    ids = list(range(10, 25))
    c = trunk.new_cache()
    trunk.extend([c], [ids])
    assert c.common_prefix(ids[:8] + [99, 98]) == 8
    c.truncate(8)
    out = trunk.extend([c], [[99, 98]])
    torch.testing.assert_close(out[0], trunk(ids[:8] + [99, 98])[-1], atol=1e-5, rtol=1e-5)


def _value_model(path, objective="sentiment", layers=2, seed=0):
    trunk = LlamaTrunk.from_pretrained(path, layers)
    torch.manual_seed(seed)
    head = ValueHead(64, 64, dim=32, dropout=0.3)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    return ValueModel(objective, trunk, head, meta={"td": {"lambda": 0.95, "gamma": 1.0}})


def test_checkpoint_round_trip(tiny, tmp_path):
    path, _ = tiny
    vm = _value_model(path)
    out = vm.save(tmp_path / "ckpt", {"training": {"prompt_set": "x", "samples": 3}})
    meta = read_meta(out)
    assert meta["objective"] == "sentiment" and meta["trunk_layers"] == 2
    assert meta["base_model"]["tokenizer_sha256"] == tokenizer_fingerprint(path)
    assert meta["head"] == {"type": "pooled_bilinear_mlp_v1", "hidden_size": 64, "embed_size": 64, "dim": 32}
    assert meta["training"]["samples"] == 3 and meta["td"]["lambda"] == 0.95
    loaded = load_value_model(out, path)
    h = vm.trunk.state_features([1, 2, 3, 4], 2)[-1:]
    cands = torch.tensor([[5, 9, 17, 100]])
    torch.testing.assert_close(loaded.values(h, cands), vm.values(h, cands))
    # the serving path (precomputed candidate projections) equals the plain head
    loaded.precompute_candidates = False
    direct = loaded.values(h, cands)
    loaded.precompute_candidates = True
    torch.testing.assert_close(loaded.values(h, cands), direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(direct, loaded.head(h, loaded.trunk.embed(cands)), atol=1e-6, rtol=1e-6)
    # several checkpoints with the same depth share one trunk
    vm.save(tmp_path / "ckpt2")
    both = load_value_models({"a": str(out), "b": str(tmp_path / "ckpt2")}, path)
    assert both["a"].trunk is both["b"].trunk and both["b"].objective == "b"


def test_wrong_tokenizer_fingerprint_raises(tiny, tmp_path):
    path, _ = tiny
    out = _value_model(path).save(tmp_path / "ckpt")
    other = tmp_path / "other_base"
    make_tiny_llama(other, shift=1)  # same architecture, different vocabulary
    with pytest.raises(ValueError, match="different tokenizer"):
        load_value_model(out, other)
    with pytest.raises(ValueError, match="different tokenizer"):
        load_value_models({"sentiment": str(out)}, other)


def test_different_trunk_weights_raise(tiny, tmp_path):
    path, _ = tiny
    out = _value_model(path).save(tmp_path / "ckpt")
    other = tmp_path / "other_weights"
    make_tiny_llama(other, seed=5)  # same tokenizer, different weights
    with pytest.raises(ValueError, match="trunk weights"):
        load_value_model(out, other)


def test_td_lambda_targets_hand_computed():
    # one trajectory of 4 actions: q[t] = V(s_t, y_{t+1}); terminal reward R = 1
    q = torch.tensor([[0.1, 0.2, 0.4, 0.8]])
    R = torch.tensor([1.0])
    T = torch.tensor([4])
    torch.testing.assert_close(td_lambda_targets(q, R, T, lam=1.0), torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    torch.testing.assert_close(td_lambda_targets(q, R, T, lam=0.0), torch.tensor([[0.2, 0.4, 0.8, 1.0]]))
    lam = 0.5
    g3 = 1.0
    g2 = 0.5 * 0.8 + 0.5 * g3
    g1 = 0.5 * 0.4 + 0.5 * g2
    g0 = 0.5 * 0.2 + 0.5 * g1
    torch.testing.assert_close(td_lambda_targets(q, R, T, lam=lam), torch.tensor([[g0, g1, g2, g3]]))
    # gamma < 1 with lambda = 1: discounted Monte Carlo
    torch.testing.assert_close(td_lambda_targets(q, R, T, lam=1.0, gamma=0.5),
                               torch.tensor([[0.125, 0.25, 0.5, 1.0]]))


def test_td_lambda_targets_ragged_batch():
    q = torch.tensor([[0.1, 0.2, 0.4, 0.8], [0.3, 0.6, 9.0, 9.0]])  # second has length 2 (padding 9)
    R = torch.tensor([1.0, -1.0])
    T = torch.tensor([4, 2])
    out = td_lambda_targets(q, R, T, lam=0.0)
    torch.testing.assert_close(out, torch.tensor([[0.2, 0.4, 0.8, 1.0], [0.6, -1.0, 0.0, 0.0]]))
