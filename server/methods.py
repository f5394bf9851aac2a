"""Each alignment method as an async stream of events (Delta, Finish) that ends with a receipt.

The decoding itself lives in decoders/ (one file per method); this module connects a request
to the engine and reward deployments and writes the receipt: per choice, the raw and
transformed score of every weighted objective and the mixed score, plus what it cost.
"""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

from decoders import vas
from server import metrics
from server.events import Delta, Finish
from server.errors import AlignmentFailed, BadRequest
from server.handles import EngineGenerator, RewardScorer, RewardTimeout


async def run(ctx) -> AsyncIterator[Any]:
    method = ctx.method
    if method in ("none", "vas"):
        stream = _engine_stream(ctx)
    elif method == "best_of_n":
        stream = _best_of_n(ctx)
    else:
        stream = _transfer_q(ctx)
    async for ev in stream:
        yield ev


def _params(ctx) -> dict[str, Any]:
    a = ctx.req.alignment
    if a is None:
        return {}
    return a.model_dump(exclude_none=True, exclude={"weights", "caps", "transform"})


def _receipt(ctx, **extra) -> dict[str, Any]:
    r: dict[str, Any] = {"method": ctx.method, **_params(ctx)}
    r.pop("method", None)
    r = {"method": ctx.method, **r}
    if ctx.mixture is not None:
        r["weights"] = ctx.mixture.weights
        r["transform"] = ctx.mixture.transform
        if ctx.mixture.caps:
            r["caps"] = ctx.mixture.caps
    r.update(extra)
    return r


async def _score(ctx, texts: list[str]) -> tuple[dict, dict, list[float], float]:
    """Raw, transformed and mixed scores of final texts, and the seconds it took."""
    t0 = time.perf_counter()
    raw = await _FailLoudScorer(ctx).score(ctx.mixture.active(), [ctx.prompt_text] * len(texts), texts)
    transformed, mixed = ctx.mixture.combine(raw, ctx.ingress.objectives)
    return raw, transformed, mixed, time.perf_counter() - t0


def _short(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[-1][:300] if s else ""


def _choice_scores(index: int, raw, transformed, mixed, i: int) -> dict[str, Any]:
    return {"index": index,
            "rewards": {o: {"raw": raw[o][i], "transformed": transformed[o][i]} for o in raw},
            "mixed": mixed[i]}


def _logprob_records(c: dict[str, Any], k: int | None) -> list[dict] | None:
    if c.get("logprobs") is None or k is None:
        return None
    return [dict(step, k=k) for step in c["logprobs"]]


# ----------------------------------------------------------------------------- none, vas

async def _engine_stream(ctx, sampling: dict[str, Any] | None = None, **receipt_extra) -> AsyncIterator[Any]:
    params = dict(sampling or ctx.sampling)
    a = ctx.req.alignment
    if ctx.method == "vas":
        params["extra_args"] = {"vas": {"weights": {o: ctx.mixture.weights[o] for o in ctx.mixture.active()},
                                        "beta": a.beta if a.beta is not None else vas.DEFAULT_BETA,
                                        "top_k": a.top_k if a.top_k is not None else vas.DEFAULT_TOP_K}}
    k = params.get("logprobs")
    texts: dict[int, str] = {}
    vas_stats: dict[int, Any] = {}
    t_gen = time.perf_counter()
    gen = ctx.ingress.engine.options(stream=True).stream.remote(ctx.prompt_ids, params, ctx.rid, bool(ctx.req.stream))
    async for msg in gen:
        for c in msg["choices"]:
            i = c["index"]
            if c["token_ids"] or c["text"]:
                texts[i] = texts.get(i, "") + c["text"]
                yield Delta(i, c["text"], c["token_ids"], _logprob_records(c, k))
            if c["finish_reason"]:
                yield Finish(i, c["finish_reason"])
        for i, s in (msg.get("vas") or {}).items():
            vas_stats[int(i)] = s
    gen_s = time.perf_counter() - t_gen

    receipt = _receipt(ctx, **receipt_extra)
    if ctx.method == "vas":
        missing = [i for i in texts if vas_stats.get(i) is None]
        if missing:
            metrics.ALIGNMENT_FAILURES.labels("vas", "value_model").inc()
            raise AlignmentFailed("value models did not report for this request; the answer may be unaligned",
                                  code="value_model_failed")
        failed = sorted({s["error"] for s in vas_stats.values() if s.get("error")})
        if failed:
            metrics.ALIGNMENT_FAILURES.labels("vas", "value_model").inc()
            raise AlignmentFailed(f"a value model failed while decoding this request, so the answer is not "
                                  f"aligned: {failed[0]}", code="value_model_failed")
        value_s = sum(s.get("value_model_s", 0.0) for s in vas_stats.values())
        steps = sum(s.get("steps", 0) for s in vas_stats.values())
        receipt["cost"] = {"base_tokens": ctx.outcome.completion_tokens, "value_model_steps": steps, "candidates": 0}
        receipt["timing"] = {"generation_s": round(gen_s, 4), "value_model_s": round(value_s, 4)}
        ctx.outcome.added_latency_s += value_s
    if ctx.mixture is not None and texts:
        order = sorted(texts)
        raw, transformed, mixed, score_s = await _score(ctx, [texts[i] for i in order])
        receipt["choices"] = []
        for j, i in enumerate(order):
            choice = _choice_scores(i, raw, transformed, mixed, j)
            if i in vas_stats:
                choice["kl_estimate"] = vas_stats[i].get("kl")
            receipt["choices"].append(choice)
        receipt.setdefault("timing", {})["scoring_s"] = round(score_s, 4)
        if ctx.method != "none":
            ctx.outcome.added_latency_s += score_s
    ctx.outcome.receipt = receipt


# ----------------------------------------------------------------------------- best-of-N

async def _best_of_n(ctx) -> AsyncIterator[Any]:
    from decoders.best_of_n import BestOfNParams, best_of_n

    a = ctx.req.alignment
    sampling = dict(ctx.sampling)
    n_return = sampling.pop("n", 1)
    params = BestOfNParams(n_candidates=a.n or 4, n_return=n_return, early_pruning=bool(a.early_pruning),
                           chunk_tokens=a.chunk_tokens or 16, keep_fraction=a.keep_fraction or 0.5)
    gen = EngineGenerator(ctx.ingress.engine, ctx.ingress.tokenizer, ctx.rid)
    scorer = _FailLoudScorer(ctx)
    chosen, stats, extras = await best_of_n(gen, scorer, ctx.mixture, ctx.ingress.objectives,
                                            prompt_ids=ctx.prompt_ids, prompt_text=ctx.prompt_text,
                                            sampling=sampling, params=params)
    k = sampling.get("logprobs")
    receipt = _receipt(ctx)
    receipt["choices"] = []
    for rank, sc in enumerate(chosen):
        c = sc.completion
        lp = None if k is None or c.raw_logprobs is None else [dict(s, k=k) for s in c.raw_logprobs]
        yield Delta(rank, c.text, c.token_ids, lp)
        yield Finish(rank, c.finish_reason or "length")
        receipt["choices"].append({"index": rank,
                                   "rewards": {o: {"raw": sc.raw[o], "transformed": sc.transformed[o]} for o in sc.raw},
                                   "mixed": sc.mixed})
    best = chosen[0]
    receipt["reward_gain"] = {o: best.raw[o] - extras["candidate_mean_raw"][o] for o in best.raw}
    receipt["cost"] = {"candidates": stats.candidates, "base_tokens": stats.base_tokens}
    receipt["timing"] = {"generation_s": round(stats.generation_s, 4), "scoring_s": round(stats.scoring_s, 4)}
    receipt["candidate_mean_mixed"] = extras["candidate_mean_mixed"]
    # One scale across objectives (the per-objective reward_gain is observed from the receipt in app.py).
    metrics.MIXED_REWARD_GAIN.labels(ctx.method).observe(best.mixed - extras["candidate_mean_mixed"])
    # Added latency (the reward-per-second trade-off) = scoring time + the share of generation time
    # spent on the candidates beyond the n_return that plain decoding would also have produced:
    # generation_s * (1 - n_return / N). Assumes cost proportional to candidates, an upper bound on
    # batched hardware where extra candidates are nearly free in wall time.
    extra_share = 1.0 - params.n_return / max(params.n_candidates, 1)
    ctx.outcome.added_latency_s += stats.scoring_s + stats.generation_s * max(extra_share, 0.0)
    ctx.outcome.receipt = receipt


class _FailLoudScorer(RewardScorer):
    """The reward deployment as a Scorer whose every failure is an explicit, counted alignment error
    (502): `reward_timeout` past limits.reward_timeout_s (server/handles.py), else `reward_failed`.
    All scoring of a request goes through it (final answers, best-of-N and Transfer Q* candidates)."""

    def __init__(self, ctx):
        super().__init__(ctx.ingress.rewards)
        self.ctx = ctx

    async def score(self, objectives, prompts, responses):
        try:
            return await super().score(objectives, prompts, responses)
        except Exception as e:  # noqa: BLE001 - any failure of the reward service is an explicit error
            metrics.ALIGNMENT_FAILURES.labels(self.ctx.method, "reward").inc()
            if isinstance(e, RewardTimeout):
                raise AlignmentFailed(f"reward scoring timed out: {e}", code="reward_timeout") from e
            raise AlignmentFailed(f"reward scoring failed: {type(e).__name__}: {_short(e)}",
                                  code="reward_failed") from e


# ----------------------------------------------------------------------------- transfer_q, args

async def _transfer_q(ctx) -> AsyncIterator[Any]:
    """Transfer Q* (and ARGS, its no-rollout special case); each chosen block streams at once."""
    import asyncio

    from decoders.baselines import prepare_rollout
    from decoders.transfer_q import RECOMMENDED_DEFAULTS, TransferQParams, transfer_q_decode

    a = ctx.req.alignment
    ing = ctx.ingress
    m = ctx.mixture

    def pick(value, default):
        return default if value is None else value

    params = TransferQParams(
        weights=m.weights, transform=m.transform, caps=m.caps,
        alpha=pick(a.alpha, RECOMMENDED_DEFAULTS["alpha"]), top_k=pick(a.top_k, RECOMMENDED_DEFAULTS["top_k"]),
        block=pick(a.block, RECOMMENDED_DEFAULTS["block"]),
        rollout_tokens=0 if ctx.method == "args" else pick(a.rollout_tokens, RECOMMENDED_DEFAULTS["rollout_tokens"]),
        baseline=a.baseline, transfer=pick(a.transfer, "auto"), indirect_coef=pick(a.indirect_coef, 0.5),
    ).validate(ing.config.limits)
    if params.alpha != 0:
        # The decoder picks candidates from raw base log-probs / temperature-1 samples; repetition
        # penalties have no place in that rule: refuse them rather than drop them silently.
        for field in ("frequency_penalty", "presence_penalty"):
            if ctx.sampling.get(field):
                raise BadRequest(f"`{field}` is not supported by method '{ctx.method}' (alpha > 0); "
                                 f"omit it or set it to 0", param=field, code="unsupported_parameter")
    if params.alpha == 0:
        # pi_base * exp(0 * Q) is the base distribution (restricted to the top-k at token level):
        # decode it directly, with no rollouts or scoring, so alpha = 0 is exactly base decoding.
        sampling = dict(ctx.sampling, top_k=params.top_k) if params.block == 1 else ctx.sampling
        async for ev in _engine_stream(ctx, sampling, note="alpha=0: base decoding, no rollouts",
                                       cost={"steps": 0, "candidates": 0, "rollouts": 0, "rollout_tokens": 0}):
            yield ev
        return
    if params.rollout_tokens == 0:
        # ARGS scores candidates without rollouts: no baseline is used, so none is resolved (a server
        # with `baselines: {}` still serves ARGS).
        from decoders.baselines import RolloutTarget
        from server.config import BaselineConfig

        target = RolloutTarget(name=None, baseline=BaselineConfig(aligned_to=[]), context_ids=[])
    else:
        target = prepare_rollout(params.baseline, {o: m.weights[o] for o in m.active()}, ing.baselines,
                                 ctx.messages if ctx.messages is not None else ctx.prompt_text,
                                 render_chat=ing.render_chat,
                                 encode=lambda t: ing.tokenizer.encode(t, add_special_tokens=False))
        if target.generator is not None:  # `kind: model` is refused at config load; never roll out the base instead
            raise AlignmentFailed(f"baseline {target.name!r} needs a separately served model, which this server "
                                  f"does not run", code="baseline_unavailable")
    n = ctx.sampling.get("n", 1)
    seed = ctx.sampling.get("seed")
    queue: asyncio.Queue = asyncio.Queue()
    results: dict[int, Any] = {}

    async def decode(i: int) -> None:
        def on_block(text: str, token_ids: list[int]) -> None:
            queue.put_nowait(Delta(i, text, list(token_ids)))

        gen = EngineGenerator(ing.engine, ing.tokenizer, f"{ctx.rid}-{i}")
        results[i] = await transfer_q_decode(
            gen, _FailLoudScorer(ctx), m, ing.objectives,
            base_prompt_ids=ctx.prompt_ids, rollout_context_ids=target.context_ids, prompt_text=ctx.prompt_text,
            max_tokens=ctx.sampling["max_tokens"], temperature=ctx.sampling["temperature"],
            top_p=ctx.sampling["top_p"], seed=None if seed is None else seed + i,
            stop_token_ids=ing.stop_token_ids, params=params, baseline_aligned_to=target.aligned_to,
            on_block=on_block, baseline_name=target.name, rollout_params=target.params or None,
            stop_strings=ctx.sampling.get("stop"))

    tasks = [asyncio.create_task(decode(i)) for i in range(n)]
    waiter = asyncio.gather(*tasks)
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
                continue
            getter.cancel()
            waiter.result()  # re-raise a decoder failure
            while not queue.empty():
                yield queue.get_nowait()
            break
    finally:
        for t in tasks:
            t.cancel()

    completions = [results[i][0] for i in range(n)]
    for i, c in enumerate(completions):
        yield Finish(i, c.finish_reason or "length")
    raw, transformed, mixed, score_s = await _score(ctx, [c.text for c in completions])
    stats = [results[i][1] for i in range(n)]
    receipt = _receipt(ctx, **{k: v for k, v in results[0][2].items() if k not in ("method",)})
    receipt["choices"] = [_choice_scores(i, raw, transformed, mixed, i) for i in range(n)]
    receipt["cost"] = {"steps": sum(s.steps for s in stats), "candidates": sum(s.candidates for s in stats),
                       "base_tokens": sum(s.base_tokens for s in stats), "rollouts": sum(s.rollouts for s in stats),
                       "rollout_tokens": sum(s.rollout_tokens for s in stats)}
    gen_s = sum(s.generation_s for s in stats)
    scoring_s = sum(s.scoring_s for s in stats)
    receipt["timing"] = {"generation_s": round(gen_s, 4), "scoring_s": round(scoring_s + score_s, 4)}
    # Added latency (the reward-per-second trade-off) = all scoring (per step and final) + the
    # baseline rollouts' generation time (stats.extra["rollout_s"]). The candidate steps themselves
    # are counted as decoding, so this is a lower bound on what the method adds over plain sampling.
    rollout_s = sum(s.extra.get("rollout_s", 0.0) for s in stats)
    ctx.outcome.added_latency_s += scoring_s + score_s + rollout_s
    ctx.outcome.receipt = receipt
