"""Best-of-N selection and the early-pruning loop (decoders/best_of_n.py) against a fake engine.

The fakes implement the decoders/base.py interfaces with known outputs (a test double of the vLLM
engine and of the reward deployment); the selection, pruning, seeding, text and receipt logic are
the real code.
"""
from __future__ import annotations

import asyncio

import pytest

from decoders.base import Completion, TokenLogprob
from decoders.best_of_n import BestOfNParams, _grow, best_of_n, candidate_seed
from decoders.rewards import Mixture, Objective, select_top

EOS = 0
# Each token decodes to a word plus a space, so a continuation's text appends to its prefix's text.
WORDS = {0: "", 1: "good ", 2: "bad ", 3: "ok ", 4: "meh ", 5: "fine "}
PROMPT = [100, 101]


def words(ids):
    return "".join(WORDS[t] for t in ids)


class SeqGen:
    """Candidate j is the token sequence ``seqs[j]``: a first call (``n`` = N) returns the first
    ``max_tokens`` of seqs[0..N-1]; a continuation (prompt = PROMPT + a prefix of seqs[j]) continues
    seqs[j]. Like vLLM: stops after EOS (finish "stop"), checks stop strings on the NEW text only and
    trims them from ``text`` (the ids keep the token that completed it), reports logprobs on request."""

    def __init__(self, seqs):
        self.seqs = [list(s) for s in seqs]
        self.calls: list[tuple[list[list[int]], dict]] = []

    async def generate(self, prompts, params):
        self.calls.append(([list(p) for p in prompts], dict(params)))
        out = []
        for p in prompts:
            prefix = list(p[len(PROMPT):])
            if not prefix:
                seqs = self.seqs[:params.get("n", 1)]
            else:
                seqs = [s for s in self.seqs if s[:len(prefix)] == prefix][:1]
                assert seqs, f"no sequence continues {prefix}"
            out.append([self._continue(s, len(prefix), params) for s in seqs])
        return out

    def _continue(self, seq, start, params):
        new = seq[start:start + params["max_tokens"]]
        finish, stop_reason = "length", None
        if EOS in new:
            new = new[:new.index(EOS) + 1]
            finish, stop_reason = "stop", EOS
        text = words(new)
        for j in range(1, len(new) + 1):
            t = words(new[:j])
            hits = [(t.find(s), s) for s in (params.get("stop") or []) if s in t]
            if hits:
                pos, s = min(hits)
                new, text, finish, stop_reason = new[:j], t[:pos], "stop", s
                break
        lp = None
        if params.get("logprobs") is not None:
            lp = [TokenLogprob(t, -0.1 * (t + 1), WORDS[t], []) for t in new]
        return Completion(text=text, token_ids=list(new), cumulative_logprob=sum(-0.1 * (t + 1) for t in new),
                          finish_reason=finish, logprobs=lp, stop_reason=stop_reason)

    def decode(self, ids):
        return words(ids)

    def encode(self, text):
        inv = {w.strip(): t for t, w in WORDS.items() if w}
        return [inv[w] for w in text.split()]


class CountScorer:
    """sentiment = #good - #bad (+0.5 per fine)."""

    def __init__(self):
        self.calls: list[list[str]] = []

    async def score(self, objectives, prompts, responses):
        self.calls.append(list(responses))
        return {o: [r.split().count("good") - r.split().count("bad") + 0.5 * r.split().count("fine")
                    for r in responses] for o in objectives}


MIXTURE = Mixture(weights={"sentiment": 1.0})
OBJECTIVES = {"sentiment": Objective("sentiment", lambda p, r: [0.0] * len(r))}


def P(n_candidates: int, n_return: int = 1, **kw):
    """Best-of-N knobs, and how many of the best the request returns (OpenAI `n`)."""
    return BestOfNParams(weights={"sentiment": 1.0}, n=n_candidates, **kw), n_return


def run_bon(gen, scorer, params, **sampling):
    params, n_return = params
    s = {"max_tokens": 4, "temperature": 1.0, "top_p": 1.0, "seed": None, **sampling}
    return asyncio.run(best_of_n(gen, scorer, MIXTURE, OBJECTIVES, prompt_ids=list(PROMPT), prompt_text="p",
                                 sampling=s, params=params, n_return=n_return))


# --- plain best-of-N -----------------------------------------------------------------------------

def test_plain_returns_top_n_of_N_best_first():
    seqs = [[3, 3, 3, 3], [1, 1, 3, 3], [2, 3, 3, 3], [1, 5, 3, 3], [1, 3, 3, 3]]   # 0, 2, -1, 1.5, 1
    gen, scorer = SeqGen(seqs), CountScorer()
    chosen, stats, extras = run_bon(gen, scorer, P(n_candidates=5, n_return=3), seed=3)
    assert [c.completion.token_ids for c in chosen] == [seqs[1], seqs[3], seqs[4]]
    assert [c.mixed for c in chosen] == [2.0, 1.5, 1.0] and chosen[0].raw == {"sentiment": 2.0}
    # one batched engine call with n = N and the request's params; one scorer call
    assert len(gen.calls) == 1 and gen.calls[0][1]["n"] == 5 and gen.calls[0][1]["seed"] == 3
    assert len(scorer.calls) == 1 and stats.candidates == 5 and stats.base_tokens == 20
    assert extras["candidate_mean_raw"]["sentiment"] == pytest.approx(3.5 / 5)
    assert extras["candidate_mean_mixed"] == pytest.approx(3.5 / 5) and extras["candidate_mean_over"] == "all_candidates"


def test_ties_go_to_the_lower_index_as_in_select_top():
    seqs = [[3, 3], [1, 3], [3, 1], [2, 2]]                     # scores 0, 1, 1, -2
    chosen, _, _ = run_bon(SeqGen(seqs), CountScorer(), P(n_candidates=4, n_return=4), max_tokens=2)
    assert [c.completion.token_ids for c in chosen] == [[1, 3], [3, 1], [3, 3], [2, 2]]
    assert select_top([0.0, 1.0, 1.0, -2.0], 4) == [1, 2, 0, 3]
    assert select_top([float("nan"), 1.0], 2) == [1, 0]        # NaN ranks last


def test_early_pruning_not_used_when_nothing_to_prune():
    gen = SeqGen([[1, 1], [3, 3]])
    run_bon(gen, CountScorer(), P(n_candidates=2, n_return=2, early_pruning=True, chunk_tokens=1),
            max_tokens=2)
    assert len(gen.calls) == 1 and gen.calls[0][1]["max_tokens"] == 2


# --- early pruning -------------------------------------------------------------------------------

# first-chunk (2 tokens) scores: 2, 1, 0, -1, 1, 0, 2, -2; all run to max_tokens (7), no EOS
PRUNE_SEQS = [[1, 1, 3, 3, 3, 3, 3], [1, 3, 2, 2, 3, 3, 3], [3, 3, 1, 1, 1, 3, 3], [2, 3, 3, 3, 3, 3, 3],
              [3, 1, 1, 1, 1, 1, 3], [3, 3, 3, 3, 3, 3, 3], [1, 1, 2, 2, 2, 2, 3], [2, 2, 1, 1, 1, 1, 1]]


def test_pruning_keeps_the_best_fraction_each_round_within_the_budget():
    gen, scorer = SeqGen(PRUNE_SEQS), CountScorer()
    params = P(n_candidates=8, n_return=1, early_pruning=True, chunk_tokens=2, keep_fraction=0.5)
    chosen, stats, extras = run_bon(gen, scorer, params, max_tokens=7)
    # round 0: all 8 first chunks scored, the best 4 continue (ties by index): 0 (2), 6 (2), 1 (1), 4 (1)
    assert [len(c) for c in scorer.calls] == [8, 4, 2]
    first_call, round1, round2 = gen.calls
    assert first_call[1]["n"] == 8 and first_call[1]["max_tokens"] == 2
    assert [p[len(PROMPT):] for p in round1[0]] == [PRUNE_SEQS[i][:2] for i in (0, 1, 4, 6)]
    # chunks double (2 -> 4) and are capped by the budget (7 - 6 = 1)
    assert round1[1]["max_tokens"] == 4 and round2[1]["max_tokens"] == 1
    # round 1 (6 tokens): 0 -> 2, 1 -> -1, 4 -> 4, 6 -> -2: keep 4 and 0
    assert [p[len(PROMPT):] for p in round2[0]] == [PRUNE_SEQS[i][:6] for i in (0, 4)]
    assert [c.completion.token_ids for c in chosen] == [PRUNE_SEQS[4]]
    assert chosen[0].completion.finish_reason == "length" and len(chosen[0].completion.token_ids) == 7
    assert stats.candidates == 14 and stats.base_tokens == 16 + 4 * 4 + 2 * 1
    # the base-model reference is the mean over ALL first-round candidates, not over the survivors
    assert extras["candidate_mean_over"] == "first_round"
    assert extras["candidate_mean_raw"]["sentiment"] == pytest.approx((2 + 1 + 0 - 1 + 1 + 0 + 2 - 2) / 8)
    assert extras["candidate_mean_mixed"] == pytest.approx(3 / 8)


def test_finished_candidates_compete_and_are_never_continued():
    seqs = [[1, 5, 0], [1, 3, 3, 3, 3], [3, 3, 3, 3, 3], [2, 3, 3, 3, 3], [3, 2, 3, 3, 3]]
    gen, scorer = SeqGen(seqs), CountScorer()
    params = P(n_candidates=5, n_return=1, early_pruning=True, chunk_tokens=3, keep_fraction=0.5)
    chosen, stats, extras = run_bon(gen, scorer, params, max_tokens=5)
    # candidate 0 ended (EOS) in the first chunk: never in a continuation prompt
    for prompts, _ in gen.calls[1:]:
        assert all(p[len(PROMPT):][:3] != seqs[0][:3] for p in prompts)
    # it is scored once (in the first round, on its final text) and wins (1.5 > 1)
    assert sum(t.count("good fine ") for call in scorer.calls for t in call) == 1
    assert chosen[0].completion.token_ids == [1, 5, 0] and chosen[0].completion.finish_reason == "stop"
    assert chosen[0].mixed == 1.5
    # keep never drops below n_return overall, and at least one survivor continues
    assert len(gen.calls[1][0]) == 2


def test_pruning_keeps_at_least_n_return_candidates():
    gen, scorer = SeqGen(PRUNE_SEQS), CountScorer()
    params = P(n_candidates=8, n_return=3, early_pruning=True, chunk_tokens=2, keep_fraction=0.25)
    chosen, _, _ = run_bon(gen, scorer, params, max_tokens=7)
    assert len(gen.calls[1][0]) == 3 and len(chosen) == 3
    assert [c.mixed for c in chosen] == sorted((c.mixed for c in chosen), reverse=True)


def test_pruning_seeds_differ_per_candidate_and_round_and_reproduce():
    params = P(n_candidates=8, n_return=1, early_pruning=True, chunk_tokens=2, keep_fraction=0.5)
    a, b = SeqGen(PRUNE_SEQS), SeqGen(PRUNE_SEQS)
    run_bon(a, CountScorer(), params, max_tokens=7, seed=11)
    run_bon(b, CountScorer(), params, max_tokens=7, seed=11)
    assert [c[1]["seed"] for c in a.calls] == [c[1]["seed"] for c in b.calls]
    # first round: one call with the request seed; later rounds: one call per survivor, own seed
    assert a.calls[0][1]["seed"] == 11 and all(len(p) == 1 for p, _ in a.calls[1:])
    cont = [c[1]["seed"] for c in a.calls[1:]]
    assert len(cont) == 4 + 2 and len(set(cont)) == len(cont)
    assert cont[:4] == [candidate_seed(11, 1, i) for i in (0, 1, 4, 6)]
    assert cont[4:] == [candidate_seed(11, 2, i) for i in (0, 4)]
    assert all(0 <= s < 2**31 for s in cont) and candidate_seed(-5, 1, 0) >= 0
    # unseeded: each round is one batched call
    c = SeqGen(PRUNE_SEQS)
    run_bon(c, CountScorer(), params, max_tokens=7)
    assert [len(p) for p, _ in c.calls] == [1, 4, 2] and all(x[1]["seed"] is None for x in c.calls)


def test_pruning_keeps_vllm_text_without_the_trimmed_stop_string():
    seqs = [[1, 1, 3, 2, 3, 3], [3, 3, 3, 3, 3, 3], [2, 2, 3, 3, 3, 3]]
    gen = SeqGen(seqs)
    params = P(n_candidates=3, n_return=1, early_pruning=True, chunk_tokens=2, keep_fraction=0.5)
    chosen, _, _ = run_bon(gen, CountScorer(), params, max_tokens=6, stop=["bad"])
    c = chosen[0].completion
    # the engine stopped at "bad" and trimmed it; re-decoding all ids would bring "bad " back
    assert c.token_ids == [1, 1, 3, 2] and c.text == "good good ok " and c.finish_reason == "stop"
    assert c.stop_reason == "bad" and "bad" in words(c.token_ids)


def test_pruning_cuts_a_stop_string_spanning_the_chunk_boundary():
    seqs = [[1, 1, 3, 3, 3, 3], [3, 3, 3, 3, 3, 3], [2, 2, 3, 3, 3, 3]]
    gen = SeqGen(seqs)
    params = P(n_candidates=3, n_return=1, early_pruning=True, chunk_tokens=2, keep_fraction=0.5)
    chosen, _, _ = run_bon(gen, CountScorer(), params, max_tokens=6, stop=["good ok"])
    c = chosen[0].completion
    # "good good " | "ok ok ..." : the engine only saw "ok ok ...", the decoder cuts like vLLM would
    assert c.token_ids == [1, 1, 3] and c.text == "good " and c.finish_reason == "stop" and c.stop_reason == "good ok"


def test_pruning_keeps_requested_logprobs():
    gen = SeqGen(PRUNE_SEQS)
    params = P(n_candidates=8, n_return=2, early_pruning=True, chunk_tokens=2, keep_fraction=0.5)
    chosen, _, _ = run_bon(gen, CountScorer(), params, max_tokens=7, logprobs=0)
    for sc in chosen:
        c = sc.completion
        assert c.logprobs is not None and [r.id for r in c.logprobs] == c.token_ids
        assert c.cumulative_logprob == pytest.approx(sum(-0.1 * (t + 1) for t in c.token_ids))


def test_grow_truncates_to_the_budget():
    gen = SeqGen([])
    c = Completion(text="good ", token_ids=[1], finish_reason="length", cumulative_logprob=-0.2,
                   logprobs=[TokenLogprob(1, -0.2, "good ", [])])
    nxt = Completion(text="bad ok meh ", token_ids=[2, 3, 4], finish_reason="stop", cumulative_logprob=-1.2,
                     logprobs=[TokenLogprob(t, lp, WORDS[t], []) for t, lp in ((2, -0.3), (3, -0.4), (4, -0.5))])
    g = _grow(gen, c, nxt, 2, [])
    assert g.token_ids == [1, 2, 3] and g.text == "good bad ok " and g.finish_reason == "length"
    assert g.cumulative_logprob == pytest.approx(-0.9) and [r.id for r in g.logprobs] == [1, 2, 3]
    g = _grow(gen, c, nxt, 5, [])
    assert g.text == "good bad ok meh " and g.finish_reason == "stop" and g.cumulative_logprob == pytest.approx(-1.4)
