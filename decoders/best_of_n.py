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
  Per-token ``logprobs`` are concatenated across rounds.
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
from typing import Any, AsyncIterator, Literal, Mapping

import numpy as np
from pydantic import Field

from decoders.base import (Bool, Budget, ChoiceScores, Completion, Cost, DecodeStats, Delta, Engine, Event, Finish, Float, int_in,
                           Method, ParamError, RewardScore, Scorer, Timing, need)
from decoders.rewards import MixtureParams, select_top
from decoders.transfer_q import first_stop, stop_string_cut


class BestOfNParams(MixtureParams):
    method: Literal["best_of_n"] = "best_of_n"
    n: int_in(ge=1) = Field(default=4, description="candidates sampled (OpenAI `n`: how many of the best to return)")
    early_pruning: Bool = Field(default=False, description="score partial outputs, continue only the best")
    chunk_tokens: int_in(ge=1) = Field(default=16, description="tokens before the first pruning (doubling after)")
    keep_fraction: Float = Field(default=0.5, gt=0.0, le=1.0, description="fraction kept at each pruning")

    def check(self, limits) -> None:
        super().check(limits)
        need(self.n <= limits.max_best_of_n, "n", f"n must be <= {limits.max_best_of_n}")
        need(self.chunk_tokens <= limits.max_tokens, "chunk_tokens", f"chunk_tokens must be <= {limits.max_tokens}")


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


async def best_of_n(gen: Engine, scorer: Scorer, mixture, objectives: Mapping[str, Any], *,
                    prompt_ids: list[int], prompt_text: str, sampling: dict[str, Any],
                    params: BestOfNParams, n_return: int = 1) -> tuple[list[ScoredCandidate], DecodeStats, dict[str, Any]]:
    """Return the ``n_return`` best candidates (best first), the cost, and receipt extras.

    ``sampling`` holds the request's SamplingParams kwargs (max_tokens, temperature, seed, stop, ...);
    its ``n`` is replaced by the candidate count ``params.n``. Ranking: ``decoders.rewards.select_top``
    (best mixed score first, ties to the lower candidate index, NaN last).
    """
    stats = DecodeStats()
    prescored: dict[int, tuple[dict[str, float], dict[str, float], float]] = {}
    first_means: tuple[dict[str, float], float] | None = None
    if params.early_pruning and params.n > n_return:  # nothing to prune otherwise
        completions, prescored, first_means = await _generate_with_pruning(
            gen, scorer, mixture, objectives, prompt_ids, prompt_text, sampling, params, n_return, stats)
    else:
        t0 = time.perf_counter()
        [completions] = await gen.generate([prompt_ids], dict(sampling, n=params.n))
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
              for i in select_top(mixed, n_return)]
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


def _grow(gen: Engine, c: Completion, nxt: Completion, budget: int, stops: list[str]) -> Completion:
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

    cum = None
    if c.cumulative_logprob is not None:
        if n == len(nxt.token_ids) and nxt.cumulative_logprob is not None:
            cum = c.cumulative_logprob + nxt.cumulative_logprob
        elif nxt.logprobs is not None:
            cum = c.cumulative_logprob + sum(float(r.logprob) for r in nxt.logprobs[:n])
    return Completion(text=text, token_ids=list(c.token_ids) + ids, cumulative_logprob=cum, finish_reason=finish,
                      logprobs=cat(c.logprobs, nxt.logprobs), stop_reason=stop_reason, index=c.index)


async def _generate_with_pruning(gen: Engine, scorer: Scorer, mixture, objectives, prompt_ids, prompt_text,
                                 sampling, params: BestOfNParams, n_return: int, stats: DecodeStats):
    """Returns (finished completions, {id(completion): its final scores} for those already scored,
    (mean raw, mean mixed) over the first-round candidates or None when nothing was pruned)."""
    max_tokens = sampling["max_tokens"]
    seed = sampling.get("seed")
    stops = [s for s in (sampling.get("stop") or []) if s]
    t0 = time.perf_counter()
    first = dict(sampling, n=params.n, max_tokens=min(params.chunk_tokens, max_tokens))
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
        keep = max(n_return - len(finished), math.ceil(len(alive) * params.keep_fraction), 1)
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
            # One call per survivor, each with its own derived seed (the engine batches them anyway);
            # a failing call cancels the others (the task group), so no survivor runs on unattended.
            async with asyncio.TaskGroup() as group:
                calls = [group.create_task(gen.generate([list(prompt_ids) + list(c.token_ids)],
                                                        dict(base, seed=candidate_seed(seed, round_no, i))))
                         for i, c in alive]
            nexts = [call.result()[0] for call in calls]
        stats.generation_s += time.perf_counter() - t0
        grown = []
        for (i, c), [nxt] in zip(alive, nexts):
            g = _grow(gen, c, nxt, max_tokens - len(c.token_ids), stops)
            stats.base_tokens += len(g.token_ids) - len(c.token_ids)
            grown.append((i, g))
        alive = grown
    return [c for _, c in finished], prescored, first_means


class BestOfN(Method):
    name = "best_of_n"
    Params = BestOfNParams
    summary = ("N samples sharing the prompt prefix, scored by the reward mixture, the best returned; "
               "`early_pruning` scores partial outputs and continues only the best fraction.")
    streams = "whole"  # all candidates must finish before the winner is known

    async def prepare(self) -> None:
        self.mixture = self.params.mixture(self.ctx.objectives, self.ctx.limits)
        n_return = self.request.n
        if n_return > self.params.n:
            raise ParamError(f"n ({n_return}) must not exceed alignment.n, the number of candidates ({self.params.n})",
                             param="alignment.n")
        if self.params.n > 1 and self.request.sampling.get("temperature", 1.0) == 0:
            raise ParamError("best_of_n samples its candidates: temperature 0 would make them identical; "
                             "use temperature > 0 (or alignment.n = 1)", param="temperature")

    def budget(self) -> Budget:
        n, max_tokens = self.params.n, self.request.max_tokens
        # Pruning rounds score the survivors again: at most twice the candidates in all.
        scores = 2 * n if self.params.early_pruning else n
        return Budget(sequences=n, tokens=n * max_tokens, scores=scores, knobs=("alignment.n", "max_tokens"))

    async def decode(self) -> AsyncIterator[Event]:
        sampling = dict(self.request.sampling)
        n_return = sampling.pop("n", 1)
        chosen, stats, extras = await best_of_n(self.ctx.engine, self.ctx.scorer, self.mixture, self.ctx.objectives,
                                                prompt_ids=self.request.prompt_ids,
                                                prompt_text=self.request.prompt_text, sampling=sampling,
                                                params=self.params, n_return=n_return)
        receipt = self.receipt()
        receipt.choices = []
        for rank, sc in enumerate(chosen):
            c = sc.completion
            yield Delta(rank, c.text, list(c.token_ids), c.logprobs if "logprobs" in sampling else None)
            yield Finish(rank, c.finish_reason or "length")
            receipt.choices.append(ChoiceScores(index=rank, mixed=sc.mixed, rewards={
                o: RewardScore(raw=sc.raw[o], transformed=sc.transformed[o]) for o in sc.raw}))
        best = chosen[0]
        receipt.reward_gain = {o: best.raw[o] - extras["candidate_mean_raw"][o] for o in best.raw}
        receipt.candidate_mean_mixed = extras["candidate_mean_mixed"]
        receipt.cost = Cost(candidates=stats.candidates, base_tokens=stats.base_tokens)
        receipt.timing = Timing(generation_s=round(stats.generation_s, 4), scoring_s=round(stats.scoring_s, 4))
        # Added latency (the reward-per-second trade-off) = scoring time + the share of generation time
        # spent on the candidates beyond the n_return that plain decoding would also have produced:
        # generation_s * (1 - n_return / N). Assumes cost proportional to candidates, an upper bound on
        # batched hardware where extra candidates are nearly free in wall time.
        receipt.add_latency(stats.scoring_s + stats.generation_s * max(1.0 - n_return / max(self.params.n, 1), 0.0))
        yield receipt
