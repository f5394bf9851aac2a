"""Best-of-N: sample N candidates in one batched engine call, score them with the reward
mixture, return the best ``n_return``.

Early pruning (in the spirit of speculative rejection, Sun et al. 2024): start all N, stop
them after ``chunk_tokens``, score the partial outputs, keep the best ``keep_fraction`` and
continue only those (their prompt + partial output hits the prefix cache), repeating until
the survivors finish or only ``n_return`` remain. Cost falls because pruned candidates stop
early; the reward stays close when partial rewards predict final ones.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

from decoders.base import Completion, DecodeStats, Generator, Scorer


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


def _rank(mixed: list[float]) -> list[int]:
    """Indices from best to worst; ties keep candidate order."""
    return sorted(range(len(mixed)), key=lambda i: (-mixed[i], i))


async def best_of_n(gen: Generator, scorer: Scorer, mixture, objectives: Mapping[str, Any], *,
                    prompt_ids: list[int], prompt_text: str, sampling: dict[str, Any],
                    params: BestOfNParams) -> tuple[list[ScoredCandidate], DecodeStats, dict[str, Any]]:
    """Return the ``n_return`` best candidates (best first), the cost, and receipt extras.

    ``sampling`` holds the request's SamplingParams kwargs (max_tokens, temperature, seed, ...);
    its ``n`` is replaced by the candidate count.
    """
    stats = DecodeStats()
    if params.early_pruning and params.n_candidates > params.n_return:  # nothing to prune otherwise
        completions = await _generate_with_pruning(gen, scorer, mixture, objectives, prompt_ids, prompt_text,
                                                   sampling, params, stats)
    else:
        t0 = time.perf_counter()
        [completions] = await gen.generate([prompt_ids], dict(sampling, n=params.n_candidates))
        stats.generation_s += time.perf_counter() - t0
        stats.base_tokens += sum(len(c.token_ids) for c in completions)
    raw, transformed, mixed = await _score(scorer, mixture, objectives, prompt_text,
                                           [c.text for c in completions], stats)
    order = _rank(mixed)
    chosen = [ScoredCandidate(completions[i], {o: raw[o][i] for o in raw},
                              {o: transformed[o][i] for o in transformed}, mixed[i])
              for i in order[:params.n_return]]
    # Candidates are plain base samples, so their mean is the base model's expected reward.
    extras = {"candidate_mean_raw": {o: sum(v) / len(v) for o, v in raw.items()},
              "candidate_mean_mixed": sum(mixed) / len(mixed)}
    return chosen, stats, extras


async def _generate_with_pruning(gen: Generator, scorer: Scorer, mixture, objectives, prompt_ids, prompt_text,
                                 sampling, params: BestOfNParams, stats: DecodeStats) -> list[Completion]:
    max_tokens = sampling["max_tokens"]
    t0 = time.perf_counter()
    first = dict(sampling, n=params.n_candidates, max_tokens=min(params.chunk_tokens, max_tokens))
    [alive] = await gen.generate([prompt_ids], first)
    stats.generation_s += time.perf_counter() - t0
    stats.base_tokens += sum(len(c.token_ids) for c in alive)
    finished: list[Completion] = []
    round_no = 0
    while True:
        finished += [c for c in alive if c.finish_reason == "stop" or len(c.token_ids) >= max_tokens]
        alive = [c for c in alive if not (c.finish_reason == "stop" or len(c.token_ids) >= max_tokens)]
        if not alive:
            break
        # Prune: score partial outputs, keep the best fraction (never fewer than n_return survivors overall).
        keep = max(params.n_return - len(finished), math.ceil(len(alive) * params.keep_fraction), 1)
        if keep < len(alive):
            _, _, mixed = await _score(scorer, mixture, objectives, prompt_text, [c.text for c in alive], stats)
            alive = [alive[i] for i in sorted(_rank(mixed)[:keep])]
        round_no += 1
        chunk = min(params.chunk_tokens * (2 ** round_no), max_tokens - min(len(c.token_ids) for c in alive))
        t0 = time.perf_counter()
        nexts = await gen.generate(
            [prompt_ids + c.token_ids for c in alive],
            dict(sampling, n=1, max_tokens=max(1, chunk),
                 seed=None if sampling.get("seed") is None else sampling["seed"] + 7919 * round_no))
        stats.generation_s += time.perf_counter() - t0
        grown = []
        for c, [nxt] in zip(alive, nexts):
            budget = max_tokens - len(c.token_ids)
            ids = nxt.token_ids[:budget]
            stats.base_tokens += len(ids)
            finish = nxt.finish_reason if len(ids) == len(nxt.token_ids) else "length"
            grown.append(Completion(text=gen.decode(c.token_ids + ids), token_ids=c.token_ids + ids,
                                    finish_reason=finish, stop_reason=nxt.stop_reason))
        alive = grown
    return finished
