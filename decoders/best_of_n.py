"""Best-of-N: sample N candidates in one batched engine call, score them with the reward
mixture, return the best ``n_return``.

Early pruning (in the spirit of speculative rejection, Sun et al. 2024): start all N, stop
them after ``chunk_tokens``, score the partial outputs, keep the best ``keep_fraction`` and
continue only those (their prompt + partial output hits the prefix cache), repeating until
the survivors finish or only ``n_return`` remain. Cost falls because pruned candidates stop
early; the reward stays close when partial rewards predict final ones.

Details of the pruning loop:
* Finished candidates (stop token / stop string / max_tokens) are never pruned; they compete in
  the final ranking. Never fewer than ``n_return`` candidates survive overall.
* Each continuation round doubles the chunk, capped by the answer budget; a continuation cut by
  the budget ends with ``finish_reason: "length"``.
* Seeds: with a request seed, every continuation of candidate i in round r gets its own seed,
  derived from (seed, r, i) (:func:`candidate_seed`), so survivors do not share a random stream and
  a fixed seed reproduces; without one, a round is one batched call (vLLM draws fresh seeds).
* Text: vLLM's own text is kept (prefix text + continuation text), so a stop string that vLLM
  trimmed is not re-introduced; a stop string spanning a chunk boundary (which vLLM cannot see:
  the continuation's prompt holds its first part) is detected here and cut the same way.
  Per-token ``logprobs``/``raw_logprobs`` are concatenated across rounds.
* ``candidate_mean_raw`` / ``candidate_mean_mixed`` (the receipt's base-model reference for
  ``reward_gain``): without pruning, the mean over the N candidates (plain base samples). With
  pruning, the final set is selection-biased (survivors of the partial-score ranking), so the
  mean is taken over ALL N first-round candidates as scored at the first pruning round: finished
  ones on their full text, the others on their first chunk (an unbiased sample of the base model,
  of partly partial answers). Pruning can only start in the first round (a round that keeps
  everyone is followed by rounds that do too), so that round always exists when pruning happens.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from decoders.base import Completion, DecodeStats, Generator, Scorer
from decoders.rewards import select_top
from decoders.transfer_q import first_stop, stop_string_cut


@dataclass
class BestOfNParams:
    n_candidates: int
    n_return: int = 1
    early_pruning: bool = False
    chunk_tokens: int = 16
    keep_fraction: float = 0.5


@dataclass
class ScoredCandidate:
    completion: Completion
    raw: dict[str, float]
    transformed: dict[str, float]
    mixed: float


async def _score(scorer: Scorer, mixture, objectives: Mapping[str, Any], prompt_text: str,
                 texts: list[str], stats: DecodeStats) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float]]:
    t0 = time.perf_counter()
    raw = await scorer.score(mixture.active(), [prompt_text] * len(texts), texts)
    stats.scoring_s += time.perf_counter() - t0
    stats.candidates += len(texts)
    transformed, mixed = mixture.combine(raw, objectives)
    return raw, transformed, mixed


def candidate_seed(seed: int, round_no: int, index: int) -> int:
    """Engine seed of candidate ``index``'s continuation in pruning round ``round_no`` (a hash of the
    three, in [0, 2**31)): distinct per candidate and round, fixed by the request seed."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(round_no), int(index)]).generate_state(1)
    return int(state[0]) & 0x7FFFFFFF


def _means(raw: Mapping[str, list[float]], mixed: list[float]) -> tuple[dict[str, float], float]:
    return {o: sum(v) / len(v) for o, v in raw.items()}, sum(mixed) / len(mixed)


async def best_of_n(gen: Generator, scorer: Scorer, mixture, objectives: Mapping[str, Any], *,
                    prompt_ids: list[int], prompt_text: str, sampling: dict[str, Any],
                    params: BestOfNParams) -> tuple[list[ScoredCandidate], DecodeStats, dict[str, Any]]:
    """Return the ``n_return`` best candidates (best first), the cost, and receipt extras.

    ``sampling`` holds the request's SamplingParams kwargs (max_tokens, temperature, seed, stop, ...);
    its ``n`` is replaced by the candidate count. Ranking: ``decoders.rewards.select_top`` (best
    mixed score first, ties to the lower candidate index, NaN last).
    """
    stats = DecodeStats()
    prescored: dict[int, tuple[dict[str, float], dict[str, float], float]] = {}
    first_means: tuple[dict[str, float], float] | None = None
    if params.early_pruning and params.n_candidates > params.n_return:  # nothing to prune otherwise
        completions, prescored, first_means = await _generate_with_pruning(
            gen, scorer, mixture, objectives, prompt_ids, prompt_text, sampling, params, stats)
    else:
        t0 = time.perf_counter()
        [completions] = await gen.generate([prompt_ids], dict(sampling, n=params.n_candidates))
        stats.generation_s += time.perf_counter() - t0
        stats.base_tokens += sum(len(c.token_ids) for c in completions)

    # Score what the pruning rounds have not already scored with its final text.
    todo = [i for i, c in enumerate(completions) if id(c) not in prescored]
    fresh: dict[int, tuple[dict[str, float], dict[str, float], float]] = {}
    if todo:
        raw_t, tr_t, mixed_t = await _score(scorer, mixture, objectives, prompt_text,
                                            [completions[i].text for i in todo], stats)
        for j, i in enumerate(todo):
            fresh[i] = ({o: raw_t[o][j] for o in raw_t}, {o: tr_t[o][j] for o in tr_t}, mixed_t[j])
    scores = [prescored[id(c)] if id(c) in prescored else fresh[i] for i, c in enumerate(completions)]
    mixed = [s[2] for s in scores]
    chosen = [ScoredCandidate(completions[i], dict(scores[i][0]), dict(scores[i][1]), mixed[i])
              for i in select_top(mixed, params.n_return)]
    if first_means is not None:
        mean_raw, mean_mixed = first_means
        basis = "first_round"
    else:
        # Candidates are plain base samples, so their mean is the base model's expected reward.
        mean_raw, mean_mixed = _means({o: [s[0][o] for s in scores] for o in scores[0][0]}, mixed)
        basis = "all_candidates"
    extras = {"candidate_mean_raw": mean_raw, "candidate_mean_mixed": mean_mixed, "candidate_mean_over": basis}
    return chosen, stats, extras


def _done(c: Completion, max_tokens: int) -> bool:
    return c.finish_reason == "stop" or len(c.token_ids) >= max_tokens


def _grow(gen: Generator, c: Completion, nxt: Completion, budget: int, stops: list[str]) -> Completion:
    """``c`` continued by ``nxt`` (at most ``budget`` tokens), keeping vLLM's text and logprobs."""
    ids = list(nxt.token_ids[:budget])
    cut = len(ids) < len(nxt.token_ids)
    if cut:  # the budget cut vLLM's continuation: its text no longer matches, decode the kept tokens
        text = gen.decode(list(c.token_ids) + ids)
        finish, stop_reason = "length", None
    else:
        text = c.text + nxt.text
        finish, stop_reason = nxt.finish_reason, nxt.stop_reason
    if stops and finish != "stop":
        # A stop string that began in c's text and ends in the continuation: vLLM only checks the
        # continuation's own text, so cut it here the way vLLM would have.
        start = max(0, len(c.text) - max(len(s) for s in stops) + 1)
        hit = first_stop(text[start:], stops)
        if hit is not None:
            cut = stop_string_cut(gen, c.token_ids, ids, stops, start)
            if cut is not None:
                ids = cut[0]
            text, finish, stop_reason = text[:start + hit[0]], "stop", hit[1]
    n = len(ids)

    def cat(a, b):
        return None if a is None or b is None else list(a) + list(b)[:n]

    logprobs = cat(c.logprobs, nxt.logprobs)
    cum = None
    if c.cumulative_logprob is not None:
        if n == len(nxt.token_ids) and nxt.cumulative_logprob is not None:
            cum = c.cumulative_logprob + nxt.cumulative_logprob
        elif nxt.logprobs is not None:
            cum = c.cumulative_logprob + sum(float(lp.get(t, 0.0)) for t, lp in zip(ids, nxt.logprobs))
    return Completion(text=text, token_ids=list(c.token_ids) + ids, cumulative_logprob=cum, finish_reason=finish,
                      logprobs=logprobs, stop_reason=stop_reason,
                      raw_logprobs=cat(c.raw_logprobs, nxt.raw_logprobs))


async def _generate_with_pruning(gen: Generator, scorer: Scorer, mixture, objectives, prompt_ids, prompt_text,
                                 sampling, params: BestOfNParams, stats: DecodeStats):
    """Returns (finished completions, {id(completion): its final scores} for those already scored,
    (mean raw, mean mixed) over the first-round candidates or None when nothing was pruned)."""
    max_tokens = sampling["max_tokens"]
    seed = sampling.get("seed")
    stops = [s for s in (sampling.get("stop") or []) if s]
    t0 = time.perf_counter()
    first = dict(sampling, n=params.n_candidates, max_tokens=min(params.chunk_tokens, max_tokens))
    [firsts] = await gen.generate([prompt_ids], first)
    stats.generation_s += time.perf_counter() - t0
    stats.base_tokens += sum(len(c.token_ids) for c in firsts)
    alive: list[tuple[int, Completion]] = list(enumerate(firsts))   # (first-round index, candidate)
    finished: list[tuple[int, Completion]] = []
    prescored: dict[int, tuple[dict[str, float], dict[str, float], float]] = {}
    first_means: tuple[dict[str, float], float] | None = None
    round_no = 0
    while True:
        finished += [(i, c) for i, c in alive if _done(c, max_tokens)]
        alive = [(i, c) for i, c in alive if not _done(c, max_tokens)]
        if not alive:
            break
        # Prune: score partial outputs, keep the best fraction (never fewer than n_return survivors overall).
        keep = max(params.n_return - len(finished), math.ceil(len(alive) * params.keep_fraction), 1)
        if keep < len(alive):
            if round_no == 0:
                # Every first-round candidate in one call: the finished ones are scored on their final
                # text (reused in the final ranking), and all N give the unbiased base-model mean.
                group = finished + alive
                raw, transformed, mixed = await _score(scorer, mixture, objectives, prompt_text,
                                                       [c.text for _, c in group], stats)
                first_means = _means(raw, mixed)
                for j, (_, c) in enumerate(finished):
                    prescored[id(c)] = ({o: raw[o][j] for o in raw}, {o: transformed[o][j] for o in transformed},
                                        mixed[j])
                alive_mixed = mixed[len(finished):]
            else:
                _, _, alive_mixed = await _score(scorer, mixture, objectives, prompt_text,
                                                 [c.text for _, c in alive], stats)
            alive = [alive[j] for j in sorted(select_top(alive_mixed, keep))]
        round_no += 1
        chunk = min(params.chunk_tokens * (2 ** round_no), max_tokens - min(len(c.token_ids) for _, c in alive))
        base = dict(sampling, n=1, max_tokens=max(1, chunk))
        t0 = time.perf_counter()
        if seed is None:
            nexts = await gen.generate([list(prompt_ids) + list(c.token_ids) for _, c in alive], dict(base, seed=None))
        else:
            # One call per survivor, each with its own derived seed (the engine batches them anyway).
            outs = await asyncio.gather(*(
                gen.generate([list(prompt_ids) + list(c.token_ids)], dict(base, seed=candidate_seed(seed, round_no, i)))
                for i, c in alive))
            nexts = [o[0] for o in outs]
        stats.generation_s += time.perf_counter() - t0
        grown = []
        for (i, c), [nxt] in zip(alive, nexts):
            g = _grow(gen, c, nxt, max_tokens - len(c.token_ids), stops)
            stats.base_tokens += len(g.token_ids) - len(c.token_ids)
            grown.append((i, g))
        alive = grown
    return [c for _, c in finished], prescored, first_means
