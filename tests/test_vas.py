"""Unit tests of the VAS logits processor on hand-made logits with injected value models.

No engine is started: the processor is built with ``value_models=`` and driven through
``update_state(BatchUpdate)`` / ``apply(logits)`` exactly as vLLM's persistent batch does.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from decoders import vas_processor as vas
from decoders.vas_processor import VAS_CONFIG_ENV, VASLogitsProcessor, parse_vas_params
from decoders.value_model import KVCache, LlamaTrunk, LlamaTrunkConfig, ValueHead, ValueModel

VOCAB = 12
SWAP = MoveDirectionality.SWAP
ONE_WAY = MoveDirectionality.UNIDIRECTIONAL


class FakeTrunk:
    """Features of a state = [number of tokens, sum of tokens]; logs what it is asked to process."""

    def __init__(self):
        self.calls: list[list[list[int]]] = []

    def new_cache(self, pool_from=0):
        return KVCache(1, 1, 1, torch.float32, pool_from=pool_from)

    def features(self, caches, news):
        self.calls.append([list(n) for n in news])
        for c, n in zip(caches, news):
            assert c.length == len(c.tokens)
            c.tokens.extend(n)
            c.length += len(n)
        return torch.tensor([[float(len(c.tokens)), float(sum(c.tokens))] for c in caches])


def v_sentiment(n: int, s: int, z: int) -> float:
    """A known value of candidate z in a state of n tokens summing to s (state and candidate
    interact: state-only terms would cancel in the centering)."""
    return ((z * (s % 5 + 1)) % 7) / 7.0


def v_safety(n: int, s: int, z: int) -> float:
    return 0.25 * ((z + n) % 3)


class FakeValueModel:
    def __init__(self, trunk, fn):
        self.trunk, self.fn, self.calls = trunk, fn, 0

    def values(self, h, cands):
        self.calls += 1
        out = torch.empty(cands.shape, dtype=torch.float32)
        for r in range(cands.shape[0]):
            n, s = int(h[r, 0]), int(h[r, 1])
            for j, z in enumerate(cands[r].tolist()):
                out[r, j] = self.fn(n, s, z)
        return out


@pytest.fixture
def fakes():
    trunk = FakeTrunk()
    return trunk, {"sentiment": FakeValueModel(trunk, v_sentiment), "safety": FakeValueModel(trunk, v_safety)}


def params(request_id=None, weights=None, beta=2.0, top_k=3, vas_on=True):
    if not vas_on:
        return SamplingParams(extra_args=None if request_id is None else {"alignserve": {"request_id": request_id}})
    return SamplingParams(extra_args={"alignserve": {"request_id": request_id, "vas": {
        "weights": weights or {"sentiment": 1.0}, "beta": beta, "top_k": top_k}}})


def upd(size, removed=(), added=(), moved=()):
    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


def expected_row(logits_row: torch.Tensor, tokens: list[int], weights: dict[str, float], beta: float, k: int):
    fns = {"sentiment": v_sentiment, "safety": v_safety}
    top = torch.topk(logits_row.float(), k).indices.tolist()
    out = torch.full_like(logits_row, float("-inf"))
    for z in top:
        adj = 0.0
        for name, w in weights.items():
            vals = [fns[name](len(tokens), sum(tokens), c) for c in top]
            adj += beta * w * (fns[name](len(tokens), sum(tokens), z) - sum(vals) / len(vals))
        out[z] = logits_row[z] + adj
    return out


def rand_logits(B, seed=0):
    return torch.randn(B, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


# ------------------------------------------------------------------------------------------------


def test_exact_adjustment_and_topk_mask(fakes, tmp_path):
    trunk, vms = fakes
    proc = VASLogitsProcessor(None, "cpu", False, value_models=vms, stats_dir=tmp_path)
    prompt, out = [3, 1, 4], [1]
    proc.update_state(upd(1, added=[(0, params("r0", beta=2.0, top_k=4), prompt, out)]))
    logits = torch.tensor([[0.5, 2.0, -1.0, 3.0, 0.0, 1.5, -2.0, 0.1, 0.2, 2.5, -0.5, 1.0]])
    got = proc.apply(logits.clone())
    # by hand: top-4 = {3: 3.0, 9: 2.5, 1: 2.0, 5: 1.5}; tokens sum 9 -> factor 9 % 5 + 1 = 5
    vals = {z: ((z * 5) % 7) / 7 for z in (3, 9, 1, 5)}
    mean = sum(vals.values()) / 4
    want = torch.full((1, VOCAB), float("-inf"))
    for z in vals:
        want[0, z] = logits[0, z] + 2.0 * (vals[z] - mean)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.isinf(got[0]).sum() == VOCAB - 4 and (got[0][torch.isinf(got[0])] < 0).all()
    assert trunk.calls == [[prompt + out]]  # first step: prompt + existing outputs


def test_composition_of_objectives(fakes):
    trunk, vms = fakes
    proc = VASLogitsProcessor(None, "cpu", False, value_models=vms)
    w = {"sentiment": 1.0, "safety": 0.5}
    proc.update_state(upd(1, added=[(0, params("r", weights=w, beta=3.0, top_k=5), [2, 7], [])]))
    logits = rand_logits(1)
    got = proc.apply(logits.clone())
    torch.testing.assert_close(got[0], expected_row(logits[0], [2, 7], w, 3.0, 5), rtol=0, atol=1e-5)
    # value models sharing a trunk: one trunk pass, one head pass each
    assert len(trunk.calls) == 1 and vms["sentiment"].calls == 1 and vms["safety"].calls == 1


def test_non_vas_rows_untouched_and_inert_without_vas_rows(fakes):
    trunk, vms = fakes
    proc = VASLogitsProcessor(None, "cpu", False, value_models=vms)
    proc.update_state(upd(2, added=[(0, params(vas_on=False), [1, 2], []), (1, params("x", vas_on=False), [3], [])]))
    logits = rand_logits(2)
    same = proc.apply(logits)
    assert same is logits and trunk.calls == []  # no VAS row: returned as is, nothing computed
    proc.update_state(upd(4, added=[(2, params("a"), [5], []), (3, params(vas_on=False), [6], [])]))
    logits = rand_logits(4, seed=1)
    orig = logits.clone()
    got = proc.apply(logits)
    for r in (0, 1, 3):
        assert torch.equal(got[r], orig[r])  # bit for bit
    torch.testing.assert_close(got[2], expected_row(orig[2], [5], {"sentiment": 1.0}, 2.0, 3), rtol=0, atol=1e-6)
    assert trunk.calls == [[[5]]]
    # VAS rows first (0, 1), plain rows after them (2, 3): the in-place fast path
    proc.update_state(upd(4, moved=[(0, 2, SWAP)]))
    proc.update_state(upd(4, added=[(1, params("b", top_k=2), [8], [])], removed=[1]))
    logits = rand_logits(4, seed=2).to(torch.bfloat16)  # also: logits in another dtype
    orig = logits.clone()
    got = proc.apply(logits)
    for r in (2, 3):
        assert torch.equal(got[r], orig[r])
    torch.testing.assert_close(got[0].float(), expected_row(orig[0].float(), [5], {"sentiment": 1.0}, 2.0, 3)
                               .to(torch.bfloat16).float(), rtol=0, atol=1e-2)
    torch.testing.assert_close(got[1].float(), expected_row(orig[1].float(), [8], {"sentiment": 1.0}, 2.0, 2)
                               .to(torch.bfloat16).float(), rtol=0, atol=1e-2)


def test_batch_updates_keep_per_request_state(fakes):
    trunk, vms = fakes
    proc = VASLogitsProcessor(None, "cpu", False, value_models=vms)
    reqs = {  # request id -> (prompt, live output list, weights, beta, k)
        "A": ([1, 2], [], {"sentiment": 1.0}, 2.0, 3),
        "B": ([4], [], {"safety": 1.0}, 1.0, 4),
        "C": ([2, 2, 2], [], {"sentiment": 0.5, "safety": 2.0}, 4.0, 2),
        "D": ([7, 1], [], {"sentiment": -1.0}, 2.0, 5),
    }

    def add(index, rid):
        p, o, w, b, k = reqs[rid]
        return (index, params(rid, weights=w, beta=b, top_k=k), p, o)

    layout: dict[int, str] = {}

    def step(seed):
        B = max(layout) + 1
        logits = rand_logits(B, seed)
        got = proc.apply(logits.clone())
        for i, rid in layout.items():
            p, o, w, b, k = reqs[rid]
            torch.testing.assert_close(got[i], expected_row(logits[i], p + o, w, b, k), rtol=0, atol=1e-5)
            o.append(int(torch.argmax(got[i])))  # vLLM appends the sampled token to the live list

    proc.update_state(upd(3, added=[add(0, "A"), add(1, "B"), add(2, "C")]))
    layout.update({0: "A", 1: "B", 2: "C"})
    step(0)
    step(1)
    assert [len(c) for c in trunk.calls[-1]] == [1, 1, 1]  # only the new token per row
    # B finishes and C is preempted; D is added at 2 (replacing C there) and moved down into 1
    # (removed, then added, then moved: the order vLLM specifies)
    proc.update_state(upd(2, removed=[1], added=[add(2, "D")], moved=[(2, 1, ONE_WAY)]))
    layout = {0: "A", 1: "D"}
    step(2)
    assert trunk.calls[-1] == [[reqs["A"][1][-1]], reqs["D"][0]]  # A: its new token; D: its prompt
    # now swap 0 <-> 1 and add C back at 2 (re-added after a preemption: cache reused)
    proc.update_state(upd(3, added=[add(2, "C")], moved=[(0, 1, SWAP)]))
    layout = {0: "D", 1: "A", 2: "C"}
    step(3)
    assert sorted(map(len, trunk.calls[-1])) == [1, 1, 1]  # C's parked cache matched: nothing redone
    step(4)
    assert proc.num_vas_rows == 3
    proc.update_state(upd(0, removed=[2, 1, 0]))
    assert proc.num_vas_rows == 0 and proc.core.stats == {}


def test_unidirectional_move_per_request_isolation(fakes):
    trunk, vms = fakes
    proc = VASLogitsProcessor(None, "cpu", False, value_models=vms)
    oa, ob = [], []
    proc.update_state(upd(3, added=[(0, params("a", top_k=3), [1], oa), (1, params(vas_on=False), [9], []),
                                    (2, params("b", top_k=3), [3, 3], ob)]))
    logits = rand_logits(3)
    proc.apply(logits.clone())
    oa.append(5)
    ob.append(6)
    # the plain request at 1 finishes, b moves down into its place
    proc.update_state(upd(2, removed=[1], moved=[(2, 1, ONE_WAY)]))
    logits = rand_logits(2, 9)
    got = proc.apply(logits.clone())
    torch.testing.assert_close(got[0], expected_row(logits[0], [1, 5], {"sentiment": 1.0}, 2.0, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], expected_row(logits[1], [3, 3, 6], {"sentiment": 1.0}, 2.0, 3), rtol=0, atol=1e-6)
    assert trunk.calls[-1] == [[5], [6]]


def test_validate_params(monkeypatch, tmp_path):
    monkeypatch.setenv(VAS_CONFIG_ENV, json.dumps({"value_models": {"sentiment": str(tmp_path)},
                                                   "stats_dir": str(tmp_path)}))
    ok = VASLogitsProcessor.validate_params
    ok(SamplingParams())
    ok(params(vas_on=False))
    ok(params("r", weights={"sentiment": 1.0}, beta=2.0, top_k=20))

    def bad(vas_args, match):
        sp = SamplingParams(extra_args={"alignserve": {"request_id": "r", "vas": vas_args}})
        with pytest.raises(ValueError, match=match):
            VASLogitsProcessor.validate_params(sp)

    bad({"weights": {"safety": 1.0}}, "safety")
    bad({"weights": {"sentiment": 1.0, "helpfulness": 1.0}}, "helpfulness")
    bad({"weights": {"sentiment": float("nan")}}, "finite")
    bad({"weights": {"sentiment": float("inf")}}, "finite")
    bad({"weights": {"sentiment": "1"}}, "finite")
    bad({"weights": {}}, "weights")
    bad({"weights": {"sentiment": 1.0}, "beta": float("inf")}, "beta")
    bad({"weights": {"sentiment": 1.0}, "beta": float("nan")}, "beta")
    for k in (0, 201, -3, 2.5, True, "5"):
        bad({"weights": {"sentiment": 1.0}, "top_k": k}, "top_k")
    bad({"weights": {"sentiment": 1.0}, "temperature": 1}, "unknown")
    bad([1, 2], "object")
    ok(params("r", top_k=1))
    ok(params("r", top_k=200))
    monkeypatch.delenv(VAS_CONFIG_ENV)
    bad({"weights": {"sentiment": 1.0}}, "sentiment")  # VAS not configured: nothing is loaded


def test_stats_file_and_kl_by_hand(fakes, tmp_path):
    trunk, vms = fakes
    proc = VASLogitsProcessor(None, "cpu", False, value_models=vms, stats_dir=tmp_path)
    out = []
    proc.update_state(upd(1, added=[(0, params("req-1", beta=2.0, top_k=3), [1, 1], out)]))
    logits = torch.tensor([[1.0, 0.0, 2.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    got = proc.apply(logits.clone())[0]
    # by hand, at temperature 1
    zb = sum(math.exp(x) for x in logits[0].tolist())
    p_base = {z: math.exp(float(logits[0, z])) / zb for z in range(VOCAB)}
    top = [2, 0, 4]
    za = sum(math.exp(float(got[z])) for z in top)
    p_al = {z: math.exp(float(got[z])) / za for z in top}
    kl = sum(p_al[z] * math.log(p_al[z] / p_base[z]) for z in top)
    data = json.loads((tmp_path / "req-1.json").read_text())
    assert data["steps"] == 1 and data["objectives"] == ["sentiment"]
    assert data["kl"] == pytest.approx(kl, rel=1e-5)
    assert data["value_model_s"] >= 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    out.append(2)
    proc.apply(logits.clone())
    data2 = json.loads((tmp_path / "req-1.json").read_text())
    assert data2["steps"] == 2 and data2["kl"] > data["kl"]
    # preempted and re-added: the receipt continues from the file (the engine deletes it at finish)
    proc.update_state(upd(0, removed=[0]))
    assert proc.num_vas_rows == 0 and proc.core.stats == {}
    proc.update_state(upd(1, added=[(0, params("req-1", beta=2.0, top_k=3), [1, 1], out)]))
    proc.apply(logits.clone())
    assert json.loads((tmp_path / "req-1.json").read_text())["steps"] == 3
    assert trunk.calls[-1] == [[2]]  # parked cache reused: only the token it had not seen


EOS = 0


def _only_eos(row: torch.Tensor) -> bool:
    return bool(torch.isfinite(row[EOS])) and bool(torch.isinf(torch.cat([row[:EOS], row[EOS + 1:]])).all())


def test_value_model_fault_is_reported_not_fatal(fakes, tmp_path):
    """A value model that raises: the engine step survives, the affected request is stopped at once
    (EOS forced) and its receipt carries the error; a request added later is steered as usual."""
    trunk, vms = fakes

    class Broken(FakeValueModel):
        def values(self, h, cands):
            raise RuntimeError("head exploded")

    vms["safety"] = Broken(trunk, v_safety)
    proc = VASLogitsProcessor(None, "cpu", False, value_models=vms, stats_dir=tmp_path, eos_token_ids=[EOS])
    proc.update_state(upd(1, added=[(0, params("bad", weights={"safety": 1.0}), [1, 2], [])]))
    logits = rand_logits(1)
    assert _only_eos(proc.apply(logits.clone())[0])
    assert "head exploded" in json.loads((tmp_path / "bad.json").read_text())["error"]
    calls = len(trunk.calls)
    assert _only_eos(proc.apply(logits.clone())[0])
    assert len(trunk.calls) == calls  # a failed request is not steered any more
    proc.update_state(upd(2, added=[(1, params("good", weights={"sentiment": 1.0}), [2, 7], [])]))
    logits = rand_logits(2, seed=1)
    got = proc.apply(logits.clone())
    assert _only_eos(got[0])
    torch.testing.assert_close(got[1], expected_row(logits[1], [2, 7], {"sentiment": 1.0}, 2.0, 3), rtol=0, atol=1e-5)
    assert "error" not in json.loads((tmp_path / "good.json").read_text())


def test_a_fault_in_one_request_does_not_fail_the_others_in_its_batch(fakes, tmp_path):
    """A value model that fails on one request's state only (here: a state holding token 11): the
    batched step fails, each row is retried alone; only that request fails, the others are steered
    in the same step as if alone."""
    trunk, vms = fakes

    class PickyValueModel(FakeValueModel):
        def values(self, h, cands):
            if any(int(s) >= 11 and int(s) % 11 == 0 for s in h[:, 1].tolist()):
                raise RuntimeError("cannot score this state")
            return super().values(h, cands)

    vms["sentiment"] = PickyValueModel(trunk, v_sentiment)
    proc = VASLogitsProcessor(None, "cpu", False, value_models=vms, stats_dir=tmp_path, eos_token_ids=[EOS])
    proc.update_state(upd(3, added=[(0, params("ok-1"), [1, 2], []), (1, params("poison"), [11], []),
                                    (2, params("ok-2"), [3, 4], [])]))
    logits = rand_logits(3, seed=4)
    got = proc.apply(logits.clone())
    assert _only_eos(got[1])
    for i, toks in ((0, [1, 2]), (2, [3, 4])):
        torch.testing.assert_close(got[i], expected_row(logits[i], toks, {"sentiment": 1.0}, 2.0, 3), rtol=0, atol=1e-5)
    assert "cannot score" in json.loads((tmp_path / "poison.json").read_text())["error"]
    for rid in ("ok-1", "ok-2"):
        data = json.loads((tmp_path / f"{rid}.json").read_text())
        assert "error" not in data and data["steps"] == 1


def test_zero_beta_is_topk_only_and_zero_kl_when_k_covers(fakes, tmp_path):
    trunk, vms = fakes
    proc = VASLogitsProcessor(None, "cpu", False, value_models=vms, stats_dir=tmp_path)
    proc.update_state(upd(1, added=[(0, params("z", beta=0.0, top_k=VOCAB), [1], [])]))
    logits = rand_logits(1)
    got = proc.apply(logits.clone())
    torch.testing.assert_close(got, logits, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "z.json").read_text())["kl"] == pytest.approx(0.0, abs=1e-6)
    assert trunk.calls == []  # beta 0: no value model runs


def test_env_path_without_config_is_inert(monkeypatch):
    monkeypatch.delenv(VAS_CONFIG_ENV, raising=False)
    proc = VASLogitsProcessor(None, "cpu", False)
    assert proc.value_models == {} and not proc.is_argmax_invariant()
    proc.update_state(upd(1, added=[(0, params("r"), [1], [])]))  # rejected at admission anyway
    logits = rand_logits(1)
    assert torch.equal(proc.apply(logits.clone()), logits)


def test_default_value_model_dirs():
    dirs = vas.default_value_model_dirs()
    for name, d in dirs.items():
        assert d.endswith(name)


def test_real_tiny_value_model_through_processor():
    """A real (random) trunk + head: the processor's incremental, batched path gives the values of
    a full forward of each row's tokens."""
    cfg = LlamaTrunkConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, rms_norm_eps=1e-5,
                           rope_theta=10000.0)
    torch.manual_seed(0)
    trunk = LlamaTrunk(cfg, 2)
    for p in trunk.parameters():
        p.data.normal_(0, 0.3)
    head = ValueHead(32, 32, dim=16)
    for p in head.parameters():
        p.data.normal_(0, 0.3)
    vm = ValueModel("sentiment", trunk, head)
    proc = VASLogitsProcessor(None, "cpu", False, value_models={"sentiment": vm})
    rows = {0: ([1, 2, 3], []), 1: ([4, 5], [6])}  # row 1 arrives with an output token already
    proc.update_state(upd(2, added=[(i, params(f"r{i}", top_k=4, beta=1.5), p, o) for i, (p, o) in rows.items()]))
    for step in range(4):
        logits = rand_logits(2, step)
        got = proc.apply(logits.clone())
        for i, (p, o) in rows.items():
            h = trunk.state_features(p + o, len(p))[-1:]  # full forward, pooled over the response
            top = torch.topk(logits[i], 4).indices
            vals = vm.values(h, top[None])[0]
            want = torch.full((VOCAB,), float("-inf"))
            want[top] = logits[i, top] + 1.5 * (vals - vals.mean())
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
            o.append(int(torch.argmax(got[i])))


def test_parse_vas_params_defaults():
    vp = parse_vas_params({"alignserve": {"request_id": 7, "vas": {"weights": {"a": 1}}}})
    assert vp.beta == vas.DEFAULT_BETA and vp.top_k == vas.DEFAULT_TOP_K and vp.request_id == "7"
    assert parse_vas_params({"alignserve": {"request_id": "x"}}) is None and parse_vas_params(None) is None
