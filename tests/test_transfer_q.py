"""Transfer Q* / ARGS decoding against a fake engine and a fake reward service.

The fakes are test doubles for the vLLM engine and the reward deployment with known outputs;
the decoder, the selection rule, the importance weighting and the baseline registry are the real code.
"""
from __future__ import annotations

import asyncio
import json
import math

import pytest

from decoders.base import Completion, ParamError, TokenLogprob, TopLogprob
from decoders.baselines import (BASELINE_PARAM, BaselineConfig, RolloutTarget, baseline_messages,
                                build_rollout_context, build_rollout_prompt, default_baseline_configs,
                                default_baseline_for, prepare_rollout, resolve_baseline, resolve_transfer,
                                rollout_extra_params, rollout_generator_name, validate_baselines)
from decoders.rewards import Mixture, Objective
from decoders.transfer_q import (RECOMMENDED_DEFAULTS, TransferQParams, TransferQSearch, importance_weights,
                                 indirect_q, select_candidate, step_rng)
from server.config import LimitsConfig



def TQ(**kw) -> TransferQParams:
    """Transfer Q* params at token level with k = 10 (the papers' setting) unless a test says otherwise."""
    return TransferQParams(**{"block": 1, "top_k": 10, **kw})


# --- fakes -------------------------------------------------------------------------------------

EOS = 0
WORDS = {0: "<eos>", 1: "good", 2: "bad", 3: "ok", 4: "meh", 5: "great", 6: "awful", 7: "fine", 8: "so", 9: "very"}
PROMPT = [100, 101]          # base prompt ids
CONTEXT = [200, 201, 202]    # baseline context ids


class FakeGen:
    """A deterministic engine. ``dist(prompt) -> {token: logprob}`` answers candidate calls
    (max_tokens=1 with logprobs); ``blocks(prompt, max_tokens, seed) -> [(ids, cum_logprob, finish)]``
    answers n>1 calls; ``rollout(prompt, max_tokens) -> ids`` answers greedy rollouts."""

    def __init__(self, dist=None, blocks=None, rollout=None):
        self.dist = dist or (lambda prompt: {1: -0.5, 2: -1.0, 3: -2.0, 0: -3.0})
        self.blocks = blocks
        self.rollout = rollout or (lambda prompt, n: [4] * n)
        self.calls: list[tuple[list[list[int]], dict]] = []

    async def generate(self, prompts, params):
        self.calls.append(([list(p) for p in prompts], dict(params)))
        out = []
        for p in prompts:
            if params.get("max_tokens") == 1 and params.get("logprobs") and params.get("n", 1) == 1 \
                    and params.get("temperature") == 0.0 and p[:len(PROMPT)] == PROMPT and "lora_request" not in params:
                d = self.dist(p)
                best = max(d, key=lambda t: (d[t], -t))
                top = [TopLogprob(t, lp, WORDS.get(t)) for t, lp in sorted(d.items(), key=lambda x: -x[1])]
                out.append([Completion(text=WORDS.get(best, "?"), token_ids=[best], cumulative_logprob=d[best],
                                       finish_reason="length",
                                       logprobs=[TokenLogprob(best, d[best], WORDS.get(best), top)])])
            elif params.get("n", 1) > 1:
                comps = []
                for ids, lp, fin in self.blocks(p, params["max_tokens"], params.get("seed")):
                    comps.append(Completion(text=self.decode(ids), token_ids=list(ids), cumulative_logprob=lp,
                                            finish_reason=fin))
                out.append(comps)
            else:
                ids = list(self.rollout(p, params["max_tokens"]))[:params["max_tokens"]]
                out.append([Completion(text=self.decode(ids), token_ids=ids, finish_reason="length")])
        return out

    def decode(self, ids):
        return " ".join(WORDS[t] for t in ids if t in WORDS and t != EOS)

    def encode(self, text):
        inv = {w: t for t, w in WORDS.items()}
        return [inv[w] for w in text.split()]


def count_score(good=("good", "great", "fine"), bad=("bad", "awful")):
    def f(response: str) -> float:
        ws = response.split()
        return float(sum(w in good for w in ws) - sum(w in bad for w in ws))
    return f


class FakeScorer:
    def __init__(self, fns):
        self.fns = fns
        self.calls: list[tuple[list[str], list[str], list[str]]] = []

    async def score(self, objectives, prompts, responses):
        self.calls.append((list(objectives), list(prompts), list(responses)))
        return {o: [self.fns[o](r) for r in responses] for o in objectives}


def objectives_for(*names):
    return {n: Objective(n, lambda p, r: [0.0] * len(r)) for n in names}


def run(coro):
    return asyncio.run(coro)


def decode(gen, scorer, params, *, weights=None, aligned=("sentiment",), max_tokens=3, temperature=0.0,
           top_p=1.0, seed=None, stop=(EOS,), on_block=None, objs=("sentiment", "safety"), stop_strings=None,
           rollout_params=None):
    weights = weights if weights is not None else params.weights
    mixture = Mixture(weights=dict(weights), transform=params.transform, caps=dict(params.caps or {}))
    target = RolloutTarget(name="positive", baseline=BaselineConfig(aligned_to=list(aligned)),
                           context_ids=list(CONTEXT), params=dict(rollout_params or {}))
    return run(TransferQSearch(gen, scorer, mixture, objectives_for(*objs), params, prompt_ids=list(PROMPT),
                               prompt_text="the prompt", max_tokens=max_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, stop_token_ids=list(stop), stop_strings=stop_strings,
                               target=target, on_block=on_block).run())


# --- selection rule ------------------------------------------------------------------------------

def test_greedy_selection_on_hand_made_numbers():
    base = [-1.0, -2.0, -3.0]
    q = [0.0, 1.0, 3.0]
    assert select_candidate(base, q, alpha=1.0, temperature=0) == 2      # scores -1, -1, 0
    assert select_candidate(base, q, alpha=0.5, temperature=0) == 0      # scores -1, -1.5, -1.5
    assert select_candidate(base, q, alpha=0.0, temperature=0) == 0      # base argmax
    assert select_candidate([-3.0, -1.0, -2.0], [9, 9, 9], alpha=0.0, temperature=0) == 1
    assert select_candidate(base, [0.0, 0.0, 10.0], alpha=100.0, temperature=0) == 2  # large alpha: best Q
    assert select_candidate([-5.0, -0.1, -3.0], [0.2, 0.0, 0.1], alpha=1000.0, temperature=0) == 0


def test_greedy_ties_go_to_base_logprob_then_index():
    # scores tie at 0: the higher base log-prob wins
    assert select_candidate([-2.0, -1.0], [2.0, 1.0], alpha=1.0, temperature=0) == 1
    # full tie: the lower index
    assert select_candidate([-1.0, -1.0, -1.0], [0.5, 0.5, 0.5], alpha=1.0, temperature=0) == 0


def test_seeded_sampling_reproduces_and_seeds_differ():
    base, q = [-1.0, -1.1, -1.2, -1.3], [0.0, 0.0, 0.0, 0.0]
    picks = [select_candidate(base, q, alpha=1.0, temperature=1.0, rng=step_rng(s, 0)) for s in range(40)]
    again = [select_candidate(base, q, alpha=1.0, temperature=1.0, rng=step_rng(s, 0)) for s in range(40)]
    assert picks == again
    assert len(set(picks)) > 1
    # the step index changes the draw too
    per_step = [select_candidate(base, q, alpha=1.0, temperature=1.0, rng=step_rng(3, t)) for t in range(40)]
    assert len(set(per_step)) > 1


def test_sampling_frequencies_follow_softmax_of_scores():
    base, q = [math.log(0.7), math.log(0.2), math.log(0.1)], [0.0, 0.0, 0.0]
    picks = [select_candidate(base, q, alpha=1.0, temperature=1.0, rng=step_rng(s, 1)) for s in range(3000)]
    freq = [picks.count(i) / len(picks) for i in range(3)]
    assert freq == pytest.approx([0.7, 0.2, 0.1], abs=0.03)


def test_top_p_is_honored():
    base, q = [math.log(0.6), math.log(0.3), math.log(0.1)], [0.0, 0.0, 0.0]
    # 0.6 >= 0.5: only the first candidate survives
    assert {select_candidate(base, q, alpha=1.0, temperature=1.0, top_p=0.5, rng=step_rng(s, 0))
            for s in range(200)} == {0}
    # 0.6 + 0.3 >= 0.85: the third never appears
    picks = {select_candidate(base, q, alpha=1.0, temperature=1.0, top_p=0.85, rng=step_rng(s, 0))
             for s in range(300)}
    assert picks == {0, 1}
    # top_p acts on the reward-tilted distribution: with alpha 10, candidate 2 dominates
    assert {select_candidate(base, [0.0, 0.0, 1.0], alpha=10.0, temperature=1.0, top_p=0.5, rng=step_rng(s, 0))
            for s in range(100)} == {2}


# --- importance weighting ------------------------------------------------------------------------

def test_importance_weights_exact_values():
    e = math.exp(0.5)
    w = importance_weights([1.0, 0.0], [0.0, 0.0], 0.5)
    assert w == pytest.approx([2 * e / (e + 1), 2 / (e + 1)])
    assert sum(w) / len(w) == pytest.approx(1.0)
    q, w2 = indirect_q([1.0, 0.0], [0.0, 0.0], 0.5)
    assert w2 == pytest.approx(w)
    assert q == pytest.approx([2 * e / (e + 1), 0.0])
    # reference: w ∝ exp(0.5 * (r_target - r_baseline)), here as a ratio
    qt, qb = [2.0, -1.0, 0.5], [1.0, 1.0, 0.5]
    w = importance_weights(qt, qb, 0.5)
    ref = [math.exp(0.5 * (t - b)) for t, b in zip(qt, qb)]
    assert [x / w[0] for x in w] == pytest.approx([x / ref[0] for x in ref])
    assert sum(w) == pytest.approx(3.0)
    q, _ = indirect_q(qt, qb, 0.5)
    mean_ref = sum(ref) / 3
    # Q = b + w*(Q_target - b), b = min Q_target = -1 (the weight applies to the non-negative shifted reward)
    assert q == pytest.approx([-1.0 + r / mean_ref * (t + 1.0) for r, t in zip(ref, qt)])
    # ... whose step average is the paper's (self-normalized) estimate mean(w * Q_target)
    assert sum(q) / 3 == pytest.approx(sum(r / mean_ref * t for r, t in zip(ref, qt)) / 3)


def test_indirect_q_is_sign_safe_with_negative_rewards():
    # The old per-rollout w*Q_target flips preference when rewards are negative: candidate 0 has the
    # higher target reward AND the higher weight, yet -0.2*w0 < -0.3*w1.
    qt, qb = [-0.2, -0.3], [-2.0, 0.0]
    w = importance_weights(qt, qb, 0.5)
    assert w[0] > w[1] and qt[0] * w[0] < qt[1] * w[1]          # the flip of the uncorrected rule
    q, w2 = indirect_q(qt, qb, 0.5)
    assert w2 == pytest.approx(w) and q[0] > q[1]
    assert q == pytest.approx([-0.3 + w[0] * 0.1, -0.3])
    # shift-equivariant: any constant added to the target reward moves every Q by that constant
    for c in (-5.0, -0.7, 3.0):
        qc, wc = indirect_q([t + c for t in qt], qb, 0.5)
        assert wc == pytest.approx(w) and qc == pytest.approx([x + c for x in q])
    # log_sigmoid-like rewards (all <= 0): preference follows (target reward, weight), never reversed
    qt3, qb3 = [-0.05, -0.7, -2.0], [-1.5, -0.1, -0.1]
    q3, w3 = indirect_q(qt3, qb3, 1.0)
    assert w3[0] > w3[1] > w3[2] and q3[0] > q3[1] > q3[2] and q3[2] == pytest.approx(min(qt3))


def test_indirect_decode_with_negative_rewards_keeps_the_better_candidate():
    # Every text scores below 0 (a log_sigmoid-like reward): good -0.1, fine -0.5, ok -2.
    gen = FakeGen(dist=lambda p: {1: -1.0, 7: -1.0, 3: -1.0}, rollout=lambda p, n: [])
    neg = {"good": -0.1, "fine": -0.5, "ok": -2.0}
    scorer = FakeScorer({"sentiment": lambda r: neg.get(r.split()[-1], -3.0),
                         "safety": lambda r: {"good": -2.0, "fine": -0.1}.get(r.split()[-1], -0.1)})
    params = TQ(weights={"sentiment": 1.0}, top_k=3, rollout_tokens=2, alpha=1.0, indirect_coef=1.0)
    comp, _, extras = decode(gen, scorer, params, aligned=("safety",), max_tokens=1)
    assert extras["transfer"] == "indirect"
    # good: best target reward and the largest weight (its baseline reward is the lowest) -> chosen;
    # w*Q_target would have chosen ok, the WORST target reward (its tiny weight shrinks its -2 towards 0).
    qt, qb = [-0.1, -2.0, -0.5], [-2.0, -0.1, -0.1]          # candidates ranked 1, 3, 7 (ties by id)
    w = importance_weights(qt, qb, 1.0)
    assert max(range(3), key=lambda i: w[i] * qt[i]) == 1     # the flip
    assert comp.token_ids == [1]


def test_importance_weights_are_stable_and_coef_zero_is_direct():
    w = importance_weights([1000.0, 0.0], [0.0, 0.0], 1.0)
    assert all(math.isfinite(x) for x in w) and w == pytest.approx([2.0, 0.0])
    q, w = indirect_q([0.3, -0.2], [5.0, -7.0], 0.0)
    assert w == [1.0, 1.0] and q == pytest.approx([0.3, -0.2])


def test_transfer_resolution():
    assert resolve_transfer("auto", {"sentiment": 1.0}, ["sentiment"]) == "direct"
    assert resolve_transfer("auto", {"sentiment": 1.0, "safety": 0.0}, ["sentiment"]) == "direct"
    assert resolve_transfer("auto", {"sentiment": 1.0, "safety": 1.0}, ["sentiment"]) == "indirect"
    assert resolve_transfer("auto", {"sentiment": 1.0}, ["safety"]) == "indirect"
    assert resolve_transfer("auto", {"sentiment": 1.0}, ["sentiment", "safety"]) == "direct"
    assert resolve_transfer("direct", {"sentiment": 1.0}, ["safety"]) == "direct"
    assert resolve_transfer("indirect", {"sentiment": 1.0}, ["sentiment"]) == "indirect"
    with pytest.raises(ParamError) as ei:
        resolve_transfer("sideways", {}, [])
    assert ei.value.param == "alignment.transfer"


# --- the decoder -----------------------------------------------------------------------------------

def sentiment_scorer():
    return FakeScorer({"sentiment": count_score(), "safety": count_score(good=("fine",), bad=("awful",))})


def test_token_level_decode_rollout_batching_and_choice():
    # candidates (top 3): good -0.5, bad -1.0, ok -2.0; rollouts: after "ok" -> "great", else "meh"
    gen = FakeGen(rollout=lambda p, n: ([5] if p[-1] == 3 else [4]) * n)
    scorer = sentiment_scorer()
    params = TQ(weights={"sentiment": 1.0}, top_k=3, rollout_tokens=4, alpha=1.0)
    comp, stats, extras = decode(gen, scorer, params, max_tokens=12)
    cand_calls = [c for c in gen.calls if c[1].get("logprobs") == 3]
    roll_calls = [c for c in gen.calls if c[1].get("logprobs") is None]
    # one candidate call per step; one rollout call per step except the last (no answer budget left)
    assert len(gen.calls) == 2 * stats.steps - 1 and stats.steps == 12
    assert len(cand_calls) == stats.steps and len(roll_calls) == stats.steps - 1
    # exactly one rollout call per step, k prompts sharing context + prefix, each ending in its candidate
    prefix: list[int] = []
    for (cprompts, cp), (rprompts, rp) in zip(cand_calls, roll_calls):
        assert cprompts == [PROMPT + prefix] and cp["max_tokens"] == 1 and cp["temperature"] == 0.0
        assert len(rprompts) == 3
        assert [p[-1] for p in rprompts] == [1, 2, 3]
        assert all(p[:-1] == CONTEXT + prefix for p in rprompts)
        assert rp["temperature"] == 0.0 and rp["n"] == 1
        prefix = prefix + [comp.token_ids[len(prefix)]]
    # the first step: Q(good)=1, Q(bad)=-1, Q(ok)=#great in rollout (capped by budget 12-0-1 >= 4) = 4
    # score: good -0.5+1=0.5, bad -2, ok -2+4=2 -> ok (3)
    assert comp.token_ids[0] == 3
    assert extras["transfer"] == "direct" and extras["baseline"] == "positive" and extras["method"] == "transfer_q"


def test_alpha_zero_is_base_greedy_and_skips_rollouts():
    gen = FakeGen(dist=lambda p: {2: -0.1, 5: -0.2, 1: -3.0, 0: -9.0})
    scorer = sentiment_scorer()
    comp, stats, extras = decode(gen, scorer, TQ(weights={"sentiment": 1.0}, top_k=3, alpha=0.0),
                                 max_tokens=4)
    assert comp.token_ids == [2, 2, 2, 2] and comp.finish_reason == "length"
    assert len(gen.calls) == 4 and scorer.calls == [] and stats.rollouts == 0
    assert comp.cumulative_logprob == pytest.approx(-0.4)


def test_large_alpha_picks_best_q():
    gen = FakeGen(dist=lambda p: {2: -0.1, 4: -0.2, 5: -6.0, 0: -9.0})
    comp, _, _ = decode(gen, sentiment_scorer(), TQ(weights={"sentiment": 1.0}, top_k=3, alpha=50.0,
                                                               rollout_tokens=0), max_tokens=2)
    assert comp.token_ids == [5, 5]


def test_args_mode_scores_prefix_plus_candidate_without_rollouts():
    gen = FakeGen()   # candidates good -0.5, bad -1.0, ok -2.0
    scorer = sentiment_scorer()
    params = TQ(weights={"sentiment": 1.0}, top_k=3, rollout_tokens=0, alpha=1.0)
    comp, stats, extras = decode(gen, scorer, params, max_tokens=2)
    assert all(c[1]["max_tokens"] == 1 and c[1]["logprobs"] == 3 for c in gen.calls)
    assert len(gen.calls) == 2 and stats.rollouts == 0 and stats.rollout_tokens == 0
    assert comp.token_ids == [1, 1]
    assert scorer.calls[0] == (["sentiment"], ["the prompt"] * 3, ["good", "bad", "ok"])
    assert scorer.calls[1][2] == ["good good", "good bad", "good ok"]
    assert extras["method"] == "args" and extras["transfer"] == "none" and extras["baseline"] is None


def test_rollout_texts_and_budget_cap():
    gen = FakeGen(rollout=lambda p, n: [9, 5, 5, 5, 5][:n])
    scorer = sentiment_scorer()
    params = TQ(weights={"sentiment": 1.0}, top_k=2, rollout_tokens=4, alpha=1.0)
    comp, stats, _ = decode(gen, scorer, params, max_tokens=3)
    roll_calls = [c for c in gen.calls if c[1].get("logprobs") is None]
    # rollouts never run past the answer budget: 3-0-1=2, then 1, then none (scored directly)
    assert [c[1]["max_tokens"] for c in roll_calls] == [2, 1]
    assert len(scorer.calls) == 3
    assert scorer.calls[0][2] == ["good very great", "bad very great"]
    assert stats.rollouts == 4 and stats.rollout_tokens == 2 * 2 + 2 * 1
    assert stats.steps == 3 and stats.candidates == 6 and stats.base_tokens == 6
    assert comp.finish_reason == "length" and len(comp.token_ids) == 3


def test_eos_candidate_stops_and_is_not_rolled_out():
    # EOS is the best by base log-prob and by reward (an empty continuation scores 0 > bad's -1)
    gen = FakeGen(dist=lambda p: {0: -0.1, 2: -0.5, 6: -0.6})
    scorer = sentiment_scorer()
    params = TQ(weights={"sentiment": 1.0}, top_k=3, rollout_tokens=2, alpha=1.0)
    comp, stats, _ = decode(gen, scorer, params, max_tokens=10)
    assert comp.token_ids == [0] and comp.finish_reason == "stop" and comp.text == ""
    roll = [c for c in gen.calls if c[1].get("logprobs") is None]
    assert len(roll) == 1 and [p[-1] for p in roll[0][0]] == [2, 6]   # EOS not rolled out
    assert stats.rollouts == 2 and stats.steps == 1


def test_stop_token_ids_are_honored():
    gen = FakeGen(dist=lambda p: {7: -0.1, 1: -1.0} if len(p) < len(PROMPT) + 2 else {8: -0.1, 1: -1.0})
    comp, stats, _ = decode(gen, sentiment_scorer(), TQ(weights={"sentiment": 1.0}, top_k=2, alpha=0.0),
                            max_tokens=10, stop=(EOS, 8))
    assert comp.token_ids == [7, 7, 8] and comp.finish_reason == "stop" and stats.steps == 3


def block_gen(table):
    """blocks(prompt, max_tokens, seed): the table's blocks, cut to max_tokens."""
    seeds = []

    def blocks(p, n, seed):
        seeds.append(seed)
        return [(ids[:n], lp, fin) for ids, lp, fin in table]
    g = FakeGen(blocks=blocks, rollout=lambda p, n: [4] * n)
    g.seeds = seeds
    return g


def test_block_decode_merges_duplicate_blocks_and_scores_by_count():
    # [5,7] has the best cumulative log-prob, but block candidates are base SAMPLES: their base term in
    # the score is log(count), not their log-prob (which would count pi_base twice).
    table = [([1, 1], -2.0, "length"), ([2, 6], -0.5, "length"), ([1, 1], -2.0, "length"), ([5, 7], -0.1, "length")]
    gen = block_gen(table)
    scorer = sentiment_scorer()
    params = TQ(weights={"sentiment": 1.0}, top_k=4, block=2, rollout_tokens=3, alpha=1.0)
    comp, stats, _ = decode(gen, scorer, params, max_tokens=4, seed=11)
    cand_calls = [c for c in gen.calls if c[1].get("n", 1) > 1]
    roll_calls = [c for c in gen.calls if c[1].get("n", 1) == 1]
    assert len(cand_calls) == 2 and len(roll_calls) == 1   # the last step has no budget left to roll out
    assert cand_calls[0][1]["n"] == 4 and cand_calls[0][1]["max_tokens"] == 2 and cand_calls[0][1]["temperature"] == 1.0
    # three distinct candidates rolled out: [1,1], [2,6], [5,7]
    assert [p[-2:] for p in roll_calls[0][0]] == [[1, 1], [2, 6], [5, 7]]
    # Q: good good meh = 2, bad awful meh = -2, great fine meh = 2;
    # scores log(2)+2, log(1)-2, log(1)+2 -> [1,1] (drawn twice) beats [5,7] at equal Q
    assert comp.token_ids[:2] == [1, 1]
    assert comp.cumulative_logprob == pytest.approx(-2.0 + -2.0)   # the receipt still sums base log-probs
    assert stats.candidates == 6 and stats.base_tokens == 16 and stats.steps == 2
    # per-step engine seeds: fixed by the request seed, different across steps
    assert gen.seeds[0] is not None and gen.seeds[0] != gen.seeds[1]
    gen2 = block_gen(table)
    decode(gen2, sentiment_scorer(), params, max_tokens=4, seed=11)
    assert gen2.seeds == gen.seeds


def test_block_truncated_to_max_tokens_and_cut_at_stop():
    gen = block_gen([([1, 2, 3], -1.0, "length")])
    params = TQ(weights={"sentiment": 1.0}, top_k=2, block=3, rollout_tokens=0, alpha=1.0)
    comp, stats, _ = decode(gen, sentiment_scorer(), params, max_tokens=4)
    assert [c[1]["max_tokens"] for c in gen.calls] == [3, 1]
    assert comp.token_ids == [1, 2, 3, 1] and comp.finish_reason == "length"

    gen = block_gen([([1, 0, 3], -1.0, "stop"), ([2, 2, 2], -5.0, "length")])
    comp, stats, _ = decode(gen, sentiment_scorer(), params, max_tokens=9)
    assert comp.token_ids == [1, 0] and comp.finish_reason == "stop" and stats.steps == 1


def test_indirect_transfer_applies_importance_weights():
    # target: sentiment; baseline aligned to safety -> auto = indirect
    gen = FakeGen(dist=lambda p: {1: -1.0, 7: -1.0, 3: -1.0}, rollout=lambda p, n: [])
    scorer = sentiment_scorer()   # safety: +1 per "fine", -1 per "awful"
    params = TQ(weights={"sentiment": 1.0}, top_k=3, rollout_tokens=2, alpha=1.0, indirect_coef=0.5)
    comp, stats, extras = decode(gen, scorer, params, aligned=("safety",), max_tokens=1)
    assert extras["transfer"] == "indirect" and extras["baseline_objectives"] == ["safety"]
    assert scorer.calls[0][0] == ["sentiment", "safety"]
    # texts good / fine / ok: Q_target = [1, 1, 0], Q_baseline = [0, 1, 0]
    q, w = indirect_q([1.0, 1.0, 0.0], [0.0, 1.0, 0.0], 0.5)
    assert comp.token_ids == [1]      # q[0] > q[1] because w[0] > w[1]; equal base log-probs
    assert q[0] > q[1] > q[2]
    assert extras["mean_q"] == pytest.approx(q[0]) and extras["mean_weight"] == pytest.approx(w[0])
    # direct on the same data would tie good and fine (tie -> lower index)
    gen = FakeGen(dist=lambda p: {1: -1.0, 7: -1.0, 3: -1.0}, rollout=lambda p, n: [])
    _, _, ex = decode(gen, sentiment_scorer(), TQ(weights={"sentiment": 1.0}, top_k=3, transfer="direct"),
                      aligned=("safety",), max_tokens=1)
    assert ex["transfer"] == "direct" and "mean_weight" not in ex


def test_indirect_prefers_candidate_the_baseline_reward_undervalues():
    # fine: target 1, baseline 1 -> w small; good: target 1, baseline 0 -> w large; ok: target 0 (the
    # reference point b). Equal advantage over b, so the larger weight wins although fine has the
    # higher base log-prob.
    gen = FakeGen(dist=lambda p: {7: -0.99, 1: -1.0, 3: -1.0}, rollout=lambda p, n: [])
    comp, _, extras = decode(gen, sentiment_scorer(), TQ(weights={"sentiment": 1.0}, top_k=3, alpha=1.0,
                                                                    transfer="indirect"),
                             aligned=("safety",), max_tokens=1)
    assert comp.token_ids == [1]
    # equal target rewards and nothing to compare against: the weights cannot reorder them (Q = b for all)
    gen = FakeGen(dist=lambda p: {7: -0.99, 1: -1.0}, rollout=lambda p, n: [])
    comp, _, extras = decode(gen, sentiment_scorer(), TQ(weights={"sentiment": 1.0}, top_k=2, alpha=1.0,
                                                                    transfer="indirect"),
                             aligned=("safety",), max_tokens=1)
    assert comp.token_ids == [7] and extras["mean_q"] == pytest.approx(1.0)


def test_seeded_decode_reproduces():
    gen_a, gen_b = FakeGen(), FakeGen()
    params = TQ(weights={"sentiment": 1.0}, top_k=3, rollout_tokens=1, alpha=0.3)
    a, _, _ = decode(gen_a, sentiment_scorer(), params, max_tokens=8, temperature=1.0, seed=5)
    b, _, _ = decode(gen_b, sentiment_scorer(), params, max_tokens=8, temperature=1.0, seed=5)
    assert a.token_ids == b.token_ids
    outs = {tuple(decode(FakeGen(), sentiment_scorer(), params, max_tokens=8, temperature=1.0, seed=s)[0].token_ids)
            for s in range(6)}
    assert len(outs) > 1


def test_on_block_streams_each_block():
    got = []

    async def on_block(delta, ids):
        got.append((delta, ids))
    gen = block_gen([([1, 5], -1.0, "length")])
    params = TQ(weights={"sentiment": 1.0}, top_k=2, block=2, rollout_tokens=0, alpha=1.0)
    comp, _, _ = decode(gen, sentiment_scorer(), params, max_tokens=5, on_block=on_block)
    assert [ids for _, ids in got] == [[1, 5], [1, 5], [1]]
    assert "".join(d for d, _ in got) == comp.text == "good great good great good"
    # a sync callback works too
    seen = []
    decode(block_gen([([1, 5], -1.0, "length")]), sentiment_scorer(), params, max_tokens=2,
           on_block=lambda d, ids: seen.append(ids))
    assert seen == [[1, 5]]


def test_stats_and_extras():
    gen = FakeGen()
    params = TQ(weights={"sentiment": 1.0}, top_k=3, rollout_tokens=2, alpha=1.0)
    comp, stats, extras = decode(gen, sentiment_scorer(), params, max_tokens=5)
    assert stats.steps == 5 and stats.candidates == 15 and stats.base_tokens == 15
    assert stats.rollouts == 3 * 4                      # no rollout at the last step (no budget)
    assert stats.rollout_tokens == 3 * (2 + 2 + 2 + 1)
    assert stats.generation_s >= 0 and stats.scoring_s >= 0
    assert extras["engine_calls"] == 9 and extras["scorer_calls"] == 5
    assert {"method", "transfer", "baseline"} <= set(extras)
    assert json.dumps(extras)


def test_zero_max_tokens():
    comp, stats, _ = decode(FakeGen(), sentiment_scorer(), TQ(weights={"sentiment": 1.0}), max_tokens=0)
    assert comp.token_ids == [] and comp.finish_reason == "length" and stats.steps == 0
    comp, _, _ = decode(FakeGen(), sentiment_scorer(), TQ(weights={"sentiment": 1.0}, top_k=3,
                                                                      rollout_tokens=0), max_tokens=1)
    assert comp.token_ids == [1]


def test_lora_rollout_params_are_passed():
    params = TQ(weights={"sentiment": 1.0}, top_k=2, rollout_tokens=1, alpha=1.0)
    gen = FakeGen()
    lora = {"lora_request": {"lora_name": "x", "lora_path": "/a"}}
    decode(gen, sentiment_scorer(), params, max_tokens=2, rollout_params=lora)
    roll = [c for c in gen.calls if c[1].get("logprobs") is None]
    assert roll and all(c[1]["lora_request"] == lora["lora_request"] for c in roll)
    assert all("lora_request" not in c[1] for c in gen.calls if c[1].get("logprobs"))


def test_params_validation():
    from pydantic import ValidationError

    limits = LimitsConfig()
    TQ(weights={"a": 1.0}).check(limits)
    for field, bad in [("top_k", 51), ("rollout_tokens", 65), ("alpha", -1.0), ("indirect_coef", -0.1)]:
        p = TQ(weights={"a": 1.0}, **{field: bad})
        with pytest.raises(ParamError) as ei:
            p.check(limits)
        assert ei.value.param == f"alignment.{field}"
    for field, bad in [("top_k", 0), ("block", 0), ("rollout_tokens", -1), ("alpha", float("nan")),
                       ("transfer", "both")]:
        with pytest.raises(ValidationError) as ei:
            TQ(weights={"a": 1.0}, **{field: bad})
        assert ei.value.errors()[0]["loc"][0] == field
    assert RECOMMENDED_DEFAULTS["top_k"] * (RECOMMENDED_DEFAULTS["block"] + RECOMMENDED_DEFAULTS["rollout_tokens"]) \
        / RECOMMENDED_DEFAULTS["block"] <= 10


# --- baselines -----------------------------------------------------------------------------------

def test_default_baselines_cover_default_objectives():
    bls = default_baseline_configs()
    for objective in ("sentiment", "safety", "relevance", "brevity"):
        assert any(b.aligned_to == [objective] and b.kind == "prompted" and b.system_prompt for b in bls.values())
    assert bls["positive"].aligned_to == ["sentiment"] and "positive" in bls["positive"].system_prompt
    validate_baselines(bls, ["sentiment", "safety", "relevance", "brevity"])
    with pytest.raises(ValueError):
        validate_baselines(bls, ["sentiment"])


def test_default_baseline_selection():
    bls = default_baseline_configs(embedded=False)  # the prompted ones (the adapters: test_lora_baselines.py)
    assert default_baseline_for({"sentiment": 1.0}, bls) == "positive"
    assert default_baseline_for({"safety": 2.0, "sentiment": 0.0}, bls) == "harmless"
    assert default_baseline_for({"relevance": 2.0, "sentiment": 1.0}, bls) == "on_topic"
    assert default_baseline_for({"brevity": 1.0, "relevance": 0.5}, bls) == "concise"
    assert default_baseline_for({"sentiment": 1.0, "safety": 1.0}, bls) == "warm_harmless"
    custom = {"b": BaselineConfig(aligned_to=["x"], system_prompt="B"),
              "a": BaselineConfig(aligned_to=["x"], system_prompt="A")}
    assert default_baseline_for({"x": 1.0}, custom) == "a"          # ties by name
    assert resolve_baseline(None, {"sentiment": 1.0}, bls)[0] == "positive"


def test_unknown_baseline_error():
    with pytest.raises(ValueError) as ei:
        resolve_baseline("nope", {"sentiment": 1.0}, default_baseline_configs())
    assert ei.value.param == BASELINE_PARAM == "alignment.baseline"
    assert "nope" in str(ei.value) and "positive" in str(ei.value)
    from server.errors import as_api_error

    assert as_api_error(ei.value).body()["error"]["param"] == "alignment.baseline"  # a 400 at the edge
    assert as_api_error(ei.value).status_code == 400 and ei.value.code == "unknown_baseline"
    with pytest.raises(ParamError):
        default_baseline_for({"sentiment": 1.0}, {})


def fake_render(messages):
    """A stand-in chat template: the JSON text, one 'token' per character, + a generation prompt."""
    return [ord(c) for c in json.dumps(messages)] + [-1]


def test_rollout_prompt_for_chat_requests():
    bl = default_baseline_configs()["positive"]
    msgs = [{"role": "user", "content": "hi"}]
    ctx = baseline_messages(bl, msgs)
    assert ctx == [{"role": "system", "content": bl.system_prompt}, {"role": "user", "content": "hi"}]
    with_sys = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "hi"}]
    assert baseline_messages(bl, with_sys)[0]["content"] == bl.system_prompt + "\n\nBe a pirate."
    assert baseline_messages(bl, with_sys, system_mode="replace") == ctx
    assert with_sys[0]["content"] == "Be a pirate."       # the request is not mutated
    prompt = build_rollout_prompt(bl, msgs, [7, 8], [9], render_chat=fake_render)
    assert prompt == fake_render(ctx) + [7, 8, 9]
    parts = [{"role": "system", "content": [{"type": "text", "text": "S"}]}, {"role": "user", "content": "q"}]
    assert baseline_messages(bl, parts)[0]["content"][0] == {"type": "text", "text": bl.system_prompt}
    # no system prompt: the request's own context
    plain = BaselineConfig(kind="lora", aligned_to=["sentiment"], path="/adapters/pos")
    assert build_rollout_context(plain, msgs, render_chat=fake_render) == fake_render(msgs)


def test_rollout_prompt_for_completion_requests():
    bl = default_baseline_configs()["concise"]
    enc = lambda s: [ord(c) for c in s]
    assert build_rollout_context(bl, "Once upon", encode=enc) == enc(bl.system_prompt + "\n\nOnce upon")
    assert build_rollout_prompt(bl, [5, 6], [7], [8], encode=enc) == enc(bl.system_prompt + "\n\n") + [5, 6, 7, 8]
    with pytest.raises(ValueError):
        build_rollout_context(bl, [{"role": "user", "content": "x"}])


def test_lora_and_model_baselines():
    lora = BaselineConfig(kind="lora", aligned_to=["safety"], path="/adapters/safe")
    model = BaselineConfig(kind="model", aligned_to=["safety"], path="org/safe-model")
    prompted = default_baseline_configs()["harmless"]
    assert rollout_extra_params("safe", lora) == {"lora_request": {"lora_name": "safe", "lora_path": "/adapters/safe"}}
    assert rollout_extra_params("harmless", prompted) == {} and rollout_generator_name("harmless", prompted) is None
    assert rollout_generator_name("safe", model) == "org/safe-model" and rollout_extra_params("safe", model) == {}
    target = prepare_rollout("safe", {"safety": 1.0}, {"safe": lora}, [{"role": "user", "content": "q"}],
                             render_chat=fake_render)
    assert target.name == "safe" and target.params["lora_request"]["lora_path"] == "/adapters/safe"
    assert target.context_ids == fake_render([{"role": "user", "content": "q"}]) and target.aligned_to == ["safety"]
    target = prepare_rollout(None, {"sentiment": 1.0}, default_baseline_configs(embedded=False), "Hello",
                             encode=lambda s: [len(s)])
    assert target.name == "positive" and target.generator is None
    target = prepare_rollout(None, {"sentiment": 1.0}, default_baseline_configs(), "Hello", encode=lambda s: [len(s)])
    assert target.name == "sentiment" and target.params["lora_request"]["lora_name"] == "sentiment"
    with pytest.raises(ValueError):
        validate_baselines({"m": BaselineConfig(kind="model", aligned_to=["safety"])}, ["safety"])
    # `kind: model` is refused even with a path: the server has no second engine to roll it out on
    with pytest.raises(ValueError, match="not supported yet"):
        validate_baselines({"m": model}, ["safety"])
    validate_baselines({"safe": lora}, ["safety"])


def test_indirect_needs_calibrated_baseline_objectives_for_transforms():
    from decoders.transfer_q import transfer_plan

    objs = {"sentiment": Objective("sentiment", lambda p, r: [0.0] * len(r), mean=0.0, std=1.0),
            "safety": Objective("safety", lambda p, r: [0.0] * len(r))}
    params = TQ(weights={"sentiment": 1.0}, transform="standardize", top_k=2, rollout_tokens=1)
    mixture = Mixture(weights={"sentiment": 1.0}, transform="standardize")
    target = RolloutTarget(name="harmless", baseline=BaselineConfig(aligned_to=["safety"]), context_ids=CONTEXT)
    with pytest.raises(ParamError) as ei:  # a 400 before the request is admitted, not a failure inside
        transfer_plan(params, mixture, target, objs)
    assert ei.value.param == "alignment.baseline.transform"


# --- audit fixes: selection base term, counts, greedy seeds, stop strings ---------------------------

def test_one_token_step_of_a_block_decode_uses_base_logprobs():
    # block 2, max_tokens 3: step 1 samples a block, step 2 has 1 token of budget -> a top-k step whose
    # candidates are deterministic, so their base log-prob must enter the score (alpha*Q alone would
    # pick "very": Q 1.5 > 1.0, but base log-probs -0.1 vs -5.0 decide).
    gen = FakeGen(dist=lambda p: {1: -0.1, 9: -5.0},
                  blocks=lambda p, n, seed: [([8, 8], -1.0, "length")])
    last = {"good": 1.0, "very": 1.5}
    scorer = FakeScorer({"sentiment": lambda r: last.get(r.split()[-1], 0.0)})
    params = TQ(weights={"sentiment": 1.0}, top_k=2, block=2, rollout_tokens=0, alpha=1.0)
    comp, stats, _ = decode(gen, scorer, params, max_tokens=3)
    assert [c[1]["max_tokens"] for c in gen.calls] == [2, 1]
    assert scorer.calls[-1][2] == ["so so good", "so so very"]
    assert comp.token_ids == [8, 8, 1]


def test_block_candidates_are_sampled_in_proportion_to_their_counts():
    # alpha = 0 inside the decoder: selecting among merged base samples must be base sampling, i.e.
    # a block drawn 3 times out of 4 is chosen ~3/4 of the time (merging without counts gave 1/2).
    table = [([1, 1], -2.0, "length"), ([1, 1], -2.0, "length"), ([5, 7], -0.1, "length"), ([1, 1], -2.0, "length")]
    params = TQ(weights={"sentiment": 1.0}, top_k=4, block=2, rollout_tokens=0, alpha=0.0)
    picks = [decode(block_gen(table), sentiment_scorer(), params, max_tokens=2, temperature=1.0, seed=s)[0].token_ids
             for s in range(600)]
    freq = sum(p == [1, 1] for p in picks) / len(picks)
    assert abs(freq - 0.75) < 0.06
    # greedy with equal Q: the most often drawn block wins
    params = TQ(weights={"sentiment": 1.0}, top_k=4, block=2, rollout_tokens=0, alpha=1.0)
    flat = FakeScorer({"sentiment": lambda r: 0.0})
    assert decode(block_gen(table), flat, params, max_tokens=2)[0].token_ids == [1, 1]


def test_greedy_block_decode_without_seed_is_deterministic():
    table = [([1, 1], -2.0, "length"), ([5, 7], -0.1, "length")]
    params = TQ(weights={"sentiment": 1.0}, top_k=2, block=2, rollout_tokens=0, alpha=1.0)
    a, b = block_gen(table), block_gen(table)
    decode(a, sentiment_scorer(), params, max_tokens=4, temperature=0.0, seed=None)
    decode(b, sentiment_scorer(), params, max_tokens=4, temperature=0.0, seed=None)
    assert all(s is not None for s in a.seeds) and a.seeds == b.seeds and a.seeds[0] != a.seeds[1]
    # sampling without a seed stays unseeded (fresh randomness per request)
    c = block_gen(table)
    decode(c, sentiment_scorer(), params, max_tokens=4, temperature=1.0, seed=None)
    assert c.seeds == [None, None]


def test_stop_string_token_level_cuts_text_and_finishes_with_stop():
    gen = FakeGen(dist=lambda p: {1: -0.1, 5: -1.0} if len(p) == len(PROMPT) else {5: -0.1, 1: -1.0})
    scorer = sentiment_scorer()
    params = TQ(weights={"sentiment": 1.0}, top_k=2, rollout_tokens=0, alpha=0.5)
    comp, stats, _ = decode(gen, scorer, params, max_tokens=6, stop_strings=["great"])
    # "good great" completes "great": vLLM semantics -> token ids up to it, text cut before it
    assert comp.token_ids == [1, 5] and comp.text == "good " and comp.finish_reason == "stop"
    assert comp.stop_reason == "great" and stats.steps == 2
    # the terminal candidate was scored on the answer's text, without the stop string
    assert scorer.calls[1][2] == ["good ", "good good"]


def test_stop_string_spanning_blocks_and_streaming_holds_it_back():
    def blocks(p, n, seed):
        return [([1, 8], -1.0, "length")] if len(p) == len(PROMPT) else [([9, 5], -1.0, "length")]
    gen = FakeGen(blocks=blocks)
    got = []
    params = TQ(weights={"sentiment": 1.0}, top_k=2, block=2, rollout_tokens=0, alpha=1.0)
    comp, stats, _ = decode(gen, sentiment_scorer(), params, max_tokens=8, stop_strings=["so very"],
                            on_block=lambda d, ids: got.append((d, ids)))
    # "good so" + "very great": the stop string spans the blocks; the answer ends at the token completing it
    assert comp.token_ids == [1, 8, 9] and comp.text == "good " and comp.finish_reason == "stop"
    assert comp.stop_reason == "so very"
    # nothing that could become the stop string was streamed early, and the deltas add up to the text
    assert "".join(d for d, _ in got) == comp.text and got[0][0] == "g"
    assert [ids for _, ids in got] == [[1, 8], [9]]
    # the sampled-candidate calls carry the stop strings (the engine stops early; we re-check the text)
    assert all(c[1].get("stop") == ["so very"] for c in gen.calls)


def test_stop_string_inside_a_rollout_cuts_the_scored_text():
    gen = FakeGen(dist=lambda p: {1: -0.1, 2: -0.2}, rollout=lambda p, n: [9, 5, 5][:n])
    scorer = sentiment_scorer()
    params = TQ(weights={"sentiment": 1.0}, top_k=2, rollout_tokens=3, alpha=1.0)
    decode(gen, scorer, params, max_tokens=5, stop_strings=["great"])
    assert scorer.calls[0][2] == ["good very ", "bad very "]
    roll = [c for c in gen.calls if c[1].get("logprobs") is None]
    assert roll and all(c[1]["stop"] == ["great"] for c in roll)


def test_rollout_time_is_reported_separately():
    params = TQ(weights={"sentiment": 1.0}, top_k=2, rollout_tokens=2, alpha=1.0)
    _, stats, _ = decode(FakeGen(), sentiment_scorer(), params, max_tokens=3)
    assert 0.0 <= stats.extra["rollout_s"] <= stats.generation_s
    _, stats, _ = decode(FakeGen(), sentiment_scorer(), TQ(weights={"sentiment": 1.0}, top_k=2,
                                                                       rollout_tokens=0), max_tokens=3)
    assert stats.extra["rollout_s"] == 0.0


# --- config: baselines validated at load, `kind: model` refused, LoRA wiring ----------------------

def test_server_config_validates_baselines_at_load():
    from pydantic import ValidationError
    from server.config import ServerConfig

    ServerConfig.model_validate({"baselines": {"pos": {"aligned_to": ["sentiment"], "system_prompt": "Be nice."}}})
    with pytest.raises(ValidationError, match="unregistered objective"):
        ServerConfig.model_validate({"baselines": {"pos": {"aligned_to": ["helpfulness"], "system_prompt": "x"}}})
    # custom objectives: baselines are checked against them, not against the defaults
    objs = {"helpful": {"kind": "brevity"}}
    ServerConfig.model_validate({"objectives": objs, "baselines": {"h": {"aligned_to": ["helpful"]}}})
    with pytest.raises(ValidationError, match="unregistered objective"):
        ServerConfig.model_validate({"objectives": objs, "baselines": {"h": {"aligned_to": ["sentiment"]}}})
    with pytest.raises(ValidationError, match="not supported yet"):
        ServerConfig.model_validate({"baselines": {"m": {"kind": "model", "aligned_to": ["safety"], "path": "org/m"}}})
    with pytest.raises(ValidationError, match="needs a path"):
        ServerConfig.model_validate({"baselines": {"l": {"kind": "lora", "aligned_to": ["safety"]}}})
    with pytest.raises(ValidationError, match="enable_lora"):
        ServerConfig.model_validate({"engine": {"enable_lora": False},
                                     "baselines": {"l": {"kind": "lora", "aligned_to": ["safety"], "path": "/a"}}})
    ServerConfig.model_validate({"baselines": None})     # the embedded defaults


def test_load_baselines_defaults_fit_the_registered_objectives():
    from decoders.baselines import load_baselines

    assert set(load_baselines(None, ["sentiment", "safety", "relevance", "brevity"])) == set(default_baseline_configs())
    assert set(load_baselines(None, ["sentiment", "safety"])) == {"sentiment", "safety", "positive", "harmless",
                                                                  "warm_harmless"}
    assert set(load_baselines(None, ["sentiment", "safety"], embedded=False)) == {"positive", "harmless",
                                                                                  "warm_harmless"}
    assert load_baselines(None, ["helpful"]) == {}
    assert load_baselines({}, ["sentiment"]) == {}
    with pytest.raises(ValueError):
        load_baselines({"x": BaselineConfig(aligned_to=["nope"])}, ["sentiment"])


def test_engine_lora_requests_resolve_only_configured_adapters():
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from server.config import ServerConfig
    from server.engine import lora_adapters, lora_enabled, split_lora

    cfg = ServerConfig.model_validate({"baselines": {
        "safe": {"kind": "lora", "aligned_to": ["safety"], "path": "/adapters/safe"},
        "pos": {"kind": "lora", "aligned_to": ["sentiment"], "path": "/adapters/pos"},
        "kind": {"aligned_to": ["sentiment"], "system_prompt": "Be kind."}}})
    adapters = lora_adapters(cfg)
    assert adapters == {"pos": "/adapters/pos", "safe": "/adapters/safe"} and lora_enabled(cfg)
    other = ServerConfig(model="/models/other")  # the embedded model has its shipped adapters
    assert not lora_enabled(other) and lora_adapters(other) == {}
    # what the decoder sends for a lora baseline (decoders.baselines.rollout_extra_params)
    sent = {"n": 1, "max_tokens": 4, "temperature": 0.0,
            **rollout_extra_params("safe", cfg.baselines["safe"])}
    params, lora = split_lora(sent, adapters)
    assert "lora_request" not in params and "lora_request" in sent
    SamplingParams(**params)                     # what used to raise TypeError
    assert isinstance(lora, LoRARequest) and lora.lora_name == "safe" and lora.lora_path == "/adapters/safe"
    assert lora.lora_int_id == 2 and split_lora({"lora_request": {"lora_name": "pos"}}, adapters)[1].lora_int_id == 1
    assert split_lora({"n": 1}, adapters) == ({"n": 1}, None)
    # nothing but a configured name loads an adapter, and only from its configured path
    for bad in ({"lora_name": "other", "lora_path": "/etc"}, {"lora_name": "safe", "lora_path": "/tmp/evil"},
                {"lora_path": "/adapters/safe"}, "safe"):
        with pytest.raises(ValueError):
            split_lora({"lora_request": bad}, adapters)


# --- the TransferQ / ARGS methods (decoders/transfer_q.py) on fake handles ---------------------------

def _method(alignment: dict, *, baselines=None, **sampling):
    """The request's method with a context of fakes (the real engine/reward clients are adapters)."""
    from decoders import registry
    from decoders.base import DecodeRequest, MethodContext
    from server.protocol import parse_alignment

    params = parse_alignment(alignment)
    request = DecodeRequest(prompt_ids=list(PROMPT), prompt_text="the prompt",
                            messages=[{"role": "user", "content": "hi"}],
                            sampling={"n": 1, "max_tokens": 4, "temperature": 0.0, "top_p": 1.0,
                                      "frequency_penalty": 0.0, "presence_penalty": 0.0, "seed": None, "stop": None,
                                      **sampling})
    ctx = MethodContext(engine=FakeGen(), scorer=sentiment_scorer(), objectives=objectives_for("sentiment", "safety"),
                        limits=LimitsConfig(), stop_token_ids=[EOS],
                        baselines=default_baseline_configs(embedded=False) if baselines is None else baselines,
                        render_chat=lambda msgs: list(CONTEXT))
    return registry.get(params.method)(params, request, ctx)


def _events(method):
    async def collect():
        await method.prepare()
        return [ev async for ev in method.decode()]
    return run(collect())


def test_methods_args_needs_no_baseline():
    m = _method({"method": "args", "weights": {"sentiment": 1.0}, "top_k": 2, "block": 1}, baselines={})
    evs = _events(m)
    assert [type(e).__name__ for e in evs][-2:] == ["Finish", "TransferQReceipt"]
    r = evs[-1].wire()
    assert r["method"] == "args" and r.get("baseline") is None and r["cost"]["rollouts"] == 0
    assert r["rollout_tokens"] == 0 and r["top_k"] == 2 and r["transfer"] == "none"
    # transfer_q on the same server (no baseline) is the 400 naming alignment.baseline
    m = _method({"method": "transfer_q", "weights": {"sentiment": 1.0}, "top_k": 2}, baselines={})
    with pytest.raises(ParamError) as ei:
        _events(m)
    assert ei.value.param == "alignment.baseline"


def test_methods_transfer_q_refuses_penalties_and_honors_stop():
    for field in ("frequency_penalty", "presence_penalty"):
        m = _method({"method": "transfer_q", "weights": {"sentiment": 1.0}, "top_k": 2, "block": 1}, **{field: 0.5})
        with pytest.raises(ParamError) as ei:
            run(m.prepare())
        assert ei.value.param == field
    # stop strings: default dist picks "good" every step -> "good good" completes the stop string "d g"
    m = _method({"method": "args", "weights": {"sentiment": 1.0}, "top_k": 2, "block": 1}, stop=["d g"])
    evs = _events(m)
    text = "".join(e.text for e in evs if type(e).__name__ == "Delta")
    finish = [e for e in evs if type(e).__name__ == "Finish"]
    assert text == "goo" and finish[0].reason == "stop"


def test_methods_added_latency_counts_scoring_and_rollouts():
    m = _method({"method": "transfer_q", "weights": {"sentiment": 1.0}, "top_k": 2, "block": 1,
                 "rollout_tokens": 2})
    receipt = _events(m)[-1]
    t = receipt.timing
    assert receipt.added_latency_s >= t.scoring_s - 1e-4
    assert receipt.added_latency_s <= t.scoring_s + t.generation_s + 1e-3


def test_methods_budget_counts_rollouts_blocks_and_tokens():
    """Admission counts work: steps x (candidates + rollouts), not just sequences."""
    heavy = _method({"method": "transfer_q", "weights": {"sentiment": 1.0}, "top_k": 50, "block": 1,
                     "rollout_tokens": 64}, max_tokens=512).budget()
    assert heavy.sequences == 50 and heavy.tokens == 512 * (1 + 50 * 64) and heavy.scores == 512 * 50 + 1
    assert heavy.knobs[0] == "alignment.top_k" and "alignment.rollout_tokens" in heavy.knobs
    default = _method({"method": "transfer_q", "weights": {"sentiment": 1.0}}, max_tokens=256).budget()
    assert default.tokens == 16 * 4 * (16 + 16) and default.sequences == 4
    args = _method({"method": "args", "weights": {"sentiment": 1.0}, "block": 8}, max_tokens=64, n=2,
                   temperature=1.0).budget()
    assert args.tokens == 2 * 8 * 4 * 8 and args.knobs[0] == "n"


def test_rollouts_never_pass_the_engine_context():
    """Rollout prompts (baseline context + answer + candidate) can be longer than the base prompt:
    rollouts shrink near the end of the context, and an answer that cannot fit is refused up front."""
    gen = FakeGen()
    params = TQ(weights={"sentiment": 1.0}, top_k=2, rollout_tokens=8, alpha=1.0)
    mixture = Mixture(weights={"sentiment": 1.0})
    target = RolloutTarget(name="positive", baseline=BaselineConfig(aligned_to=["sentiment"]), context_ids=CONTEXT)
    run(TransferQSearch(gen, sentiment_scorer(), mixture, objectives_for("sentiment"), params, prompt_ids=PROMPT,
                        prompt_text="p", max_tokens=6, temperature=0, stop_token_ids=[EOS], target=target,
                        max_model_len=len(CONTEXT) + 7).run())
    for prompts, p in gen.calls:
        if p.get("logprobs") is None:  # a rollout call
            assert all(len(pr) + p["max_tokens"] <= len(CONTEXT) + 7 for pr in prompts), (prompts, p)
    m = _method({"method": "transfer_q", "weights": {"sentiment": 1.0}, "top_k": 2}, max_tokens=4)
    m.ctx.max_model_len = len(CONTEXT) + 3
    with pytest.raises(ParamError) as ei:
        run(m.prepare())
    assert ei.value.param == "max_tokens" and ei.value.code == "context_length_exceeded"


def test_selection_log_ratio_is_the_steps_kl_term():
    from decoders.transfer_q import selection_log_ratio

    base = [math.log(0.5), math.log(0.3), math.log(0.2)]
    z = 0.5 + 0.3 * math.e + 0.2
    # temperature 1: alpha*Q(chosen) - log E_base[exp(alpha*Q)]
    assert selection_log_ratio(base, [0.0, 1.0, 0.0], 1.0, 1.0, 1) == pytest.approx(1.0 - math.log(z))
    assert selection_log_ratio(base, [0.0, 1.0, 0.0], 1.0, 1.0, 0) == pytest.approx(-math.log(z))
    assert selection_log_ratio(base, None, 0.0, 1.0, 2) == pytest.approx(0.0)           # base sampling
    assert selection_log_ratio([0.0, 0.0], [0.0, 0.0], 3.0, 1.0, 0) == pytest.approx(0.0)
    # unnormalized base terms (log counts of sampled blocks) are normalized
    assert selection_log_ratio([math.log(3), math.log(1)], None, 0.0, 1.0, 0) == pytest.approx(0.0)
    # greedy: a point mass at the chosen candidate
    assert selection_log_ratio(base, [0.0, 1.0, 0.0], 1.0, 0.0, 1) == pytest.approx(-math.log(0.3))
    # its expectation under the selection distribution is a KL: >= 0
    p = [0.5 / z, 0.3 * math.e / z, 0.2 / z]
    assert sum(pi * selection_log_ratio(base, [0.0, 1.0, 0.0], 1.0, 1.0, i) for i, pi in enumerate(p)) > 0
