"""Transfer Q* decoding (Chakraborty et al. 2024, arXiv 2405.20495) and ARGS-style reward-guided
search, as orchestration over a ``Generator`` (the vLLM engine) and a ``Scorer`` (the rewards).

Per step, with prefix y (the answer so far) and a block size B (B = 1: token level, as in the paper):

a. candidates z_1..z_k from the BASE model:
   * B == 1: one engine call, ``max_tokens=1, logprobs=k`` (greedy) on prompt+y; the k most likely
     next tokens with their base log-probs (raw logprobs, before temperature);
   * B > 1: one call with ``n=k, max_tokens=B`` sampled from the base at temperature 1, top_p 1
     (seeded per step from the request seed; at temperature 0 without a seed from a fixed seed, so
     greedy decoding is deterministic); identical blocks are merged into one candidate that keeps
     its COUNT c (the empirical base probability of the block is c/k).
   Stop strings (the request's ``stop``): a candidate whose text completes one is cut at the token
   that completes it (as vLLM does), is terminal, and is scored on its text up to the stop string.
b. rollouts (``rollout_tokens`` R > 0): ONE batched engine call, prompts = baseline context + y + z_i
   (they share context + y, so vLLM prefix caching reuses it), greedy (temperature 0, as the reference
   ``LLM.generate`` does), ``max_tokens = min(R, tokens left in the answer budget)``, on the baseline
   (``prompted``: the same engine with the baseline's system prompt). Candidates that already ended
   (stop token) are not rolled out. R == 0: ARGS (Khanov et al. 2024): score y + z_i directly.
c. ONE scorer call on the texts y + z_i (+ rollout_i); the request's ``Mixture`` gives Q_target(z_i).
   * direct transfer (baseline aligned to the target): Q = Q_target;
   * indirect transfer (baseline aligned to another reward r_BL): importance weighting as in the
     paper / reference ``indirect.py`` (``Q* = E_{tau~rho_BL}[w(tau) r(tau)]``,
     ``w = exp(beta*(r_target - r_baseline))``): the rollouts are also scored by the baseline's own
     mixture (equal weights 1/|aligned_to| over its objectives, the request's transform, the request's
     caps on those objectives); ``w = self-normalized exp(indirect_coef * (Q_target - Q_baseline))``
     and ``Q = b + w * (Q_target - b)`` with ``b = min_j Q_target_j`` over the step's candidates
     (a control variate: same step average as ``w * Q_target``, but sign-safe and shift-equivariant);
     see :func:`indirect_q`.
d. select by ``score(z) = base_logprob(z) + alpha * Q(z)`` where ``base_logprob`` is the token's base
   log-prob for a 1-token step (deterministic top-k) and ``log(count)`` for a sampled block (the block
   is already a base sample; its count carries its base mass): argmax at temperature 0 (ties: higher
   base term, then lower index), else sample softmax(score / temperature) with top_p, using a numpy
   RNG seeded by (seed, step) so a fixed seed reproduces.
e. append z to y, stream it (``on_block``; text that could still become a stop string is held back),
   stop at a stop token, a stop string (text cut before it, as vLLM does) or max_tokens.

The request's knobs are ``TransferQParams`` (``ARGSParams`` for ``args``); the search itself is
``TransferQSearch`` (one answer), the methods ``TransferQ`` and ``ARGS`` run ``n`` of them and
stream each chosen block as it is chosen.
"""
from __future__ import annotations

import asyncio
import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field

from decoders.base import (Budget, Completion, Cost, DecodeStats, Delta, Engine, Event, FiniteFloat, Finish, int_in, Method,
                           ParamError, Receipt, Scorer, Text, Timing, need)
from decoders.baselines import RolloutTarget, prepare_rollout, resolve_transfer
from decoders.plain import score_receipt, stream_choices
from decoders.rewards import MixtureParams

# Engine seed of the sampled candidate blocks at temperature 0 when the request gives no seed:
# greedy selection must not depend on an unseeded sample, so greedy transfer_q is deterministic.
GREEDY_CANDIDATE_SEED = 0


# --------------------------------------------------------------------------------------------
# Request knobs
# --------------------------------------------------------------------------------------------

class _SearchParams(MixtureParams):
    """The knobs ``args`` and ``transfer_q`` share. Defaults keep Transfer Q*'s cost within ~10x plain
    sampling (docs/transfer_q.md): tokens per output token = top_k * (block + rollout) / block."""
    alpha: FiniteFloat = Field(default=1.0, description="weight of Q against the base log-prob")
    top_k: int_in(ge=1) = Field(default=4, description="candidates per step")
    block: int_in(ge=1) = Field(default=16, description="tokens per candidate (1: token level, as in the papers)")

    def check(self, limits) -> None:
        super().check(limits)
        need(self.top_k <= limits.max_top_k, "top_k", f"top_k must be <= {limits.max_top_k}")
        need(self.block <= limits.max_block, "block", f"block must be <= {limits.max_block}")
        need(0.0 <= self.alpha <= limits.max_alpha, "alpha", f"alpha must be in [0, {limits.max_alpha:g}]")


class ARGSParams(_SearchParams):
    """``args``: reward-guided search without rollouts."""
    method: Literal["args"] = "args"

    @property
    def rollout_tokens(self) -> int:
        return 0

    def knobs(self) -> dict[str, Any]:
        return {**super().knobs(), "rollout_tokens": 0}


class TransferQParams(_SearchParams):
    """``transfer_q``: Q* of each candidate from rollouts of a baseline aligned model."""
    method: Literal["transfer_q"] = "transfer_q"
    rollout_tokens: int_in(ge=0) = Field(default=16, description="tokens each baseline rollout continues (0: ARGS)")
    baseline: Text | None = Field(default=None, max_length=128, description="a registered baseline (default: "
                                  "the one that fits the weights best)")
    transfer: Literal["auto", "direct", "indirect"] = Field(
        default="auto", description="direct: Q = target reward; indirect: importance-weighted (another reward)")
    indirect_coef: FiniteFloat = Field(default=0.5, description="importance-weight temperature (indirect)")

    def check(self, limits) -> None:
        super().check(limits)
        need(self.rollout_tokens <= limits.max_rollout_tokens, "rollout_tokens",
             f"rollout_tokens must be <= {limits.max_rollout_tokens}")
        need(0.0 <= self.indirect_coef <= limits.max_beta, "indirect_coef",
             f"indirect_coef must be in [0, {limits.max_beta:g}]")


RECOMMENDED_DEFAULTS: dict[str, Any] = {k: TransferQParams.model_fields[k].default
                                        for k in ("top_k", "block", "rollout_tokens", "alpha")}


# --------------------------------------------------------------------------------------------
# Pure pieces (unit-tested on hand-made numbers)
# --------------------------------------------------------------------------------------------

def importance_weights(q_target: Sequence[float], q_baseline: Sequence[float], coef: float) -> list[float]:
    """Self-normalized importance weights for indirect transfer.

    ``e_i = coef * (q_target_i - q_baseline_i)``; ``w_i = m * exp(e_i - max e) / sum_j exp(e_j - max e)``
    over the m candidates of the step, i.e. ``exp(e_i)`` divided by its mean over the candidates.
    Compared with the reference's raw ``exp(0.5 * delta)`` this only rescales all weights of a step
    by one positive constant (the ranking of w is unchanged), but it cannot overflow:
    ``0 < w_i <= m`` and ``mean(w) == 1``, so ``alpha`` keeps the same scale as in direct transfer.
    """
    m = len(q_target)
    if m != len(q_baseline):
        raise ValueError("q_target and q_baseline differ in length")
    if m == 0:
        return []
    e = [coef * (float(t) - float(b)) for t, b in zip(q_target, q_baseline)]
    top = max(e)
    ex = [math.exp(x - top) for x in e]
    s = sum(ex)
    return [m * x / s for x in ex]


def indirect_q(q_target: Sequence[float], q_baseline: Sequence[float], coef: float) -> tuple[list[float], list[float]]:
    """``(Q, w)``: the importance-weighted Q of indirect transfer, w from :func:`importance_weights`.

    The paper (Chakraborty et al. 2024, indirect transfer) estimates
    ``Q*(s, z) = E_{tau ~ rho_BL}[w(tau) * r(tau)]`` with ``w = rho*/rho_BL ∝ exp(beta*(r - r_BL))``;
    the reference applies it per rollout as ``w * r``. Per sample, ``w * r`` is not invariant to a
    constant shift of r: with negative rewards (e.g. ``log_sigmoid`` makes every Q <= 0) a larger
    weight makes Q MORE negative, so the correction flips preference. With a constant b,
    ``E[w * r] = b + E[w * (r - b)]`` whenever ``E[w] = 1`` (a control variate), so here

        ``Q_i = b + w_i * (q_target_i - b)``,  ``b = min_j q_target_j``  (over the step's candidates)

    weights the reward shifted to be non-negative. Properties: the step average of Q equals the
    paper's self-normalized estimate ``mean(w * q_target)`` (``mean(w) == 1``); a constant shift of the
    target reward shifts every Q by the same constant (the choice never depends on the reward's
    offset or sign); a candidate with higher q_target and a higher weight never gets a lower Q;
    ``coef = 0`` (w == 1) is direct transfer.
    """
    w = importance_weights(q_target, q_baseline, coef)
    if not w:
        return [], w
    b = min(float(t) for t in q_target)
    return [b + wi * (float(t) - b) for wi, t in zip(w, q_target)], w


def step_rng(seed: int | None, step: int, stream: int = 0) -> np.random.Generator:
    """The RNG of one decode step: a function of (seed, step, stream) when seeded."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(step), int(stream)])


def step_seed(seed: int | None, step: int, stream: int = 1) -> int | None:
    """A per-step engine seed (for the sampled candidate blocks)."""
    if seed is None:
        return None
    return int(step_rng(seed, step, stream).integers(0, 2**31 - 1))


def selection_scores(base_logprobs: Sequence[float], q: Sequence[float] | None, alpha: float) -> list[float]:
    """``base_logprob + alpha * Q`` (just the base log-probs when Q is None or alpha == 0)."""
    if q is None or alpha == 0:
        return [float(b) for b in base_logprobs]
    return [float(b) + alpha * float(v) for b, v in zip(base_logprobs, q)]


def selection_log_ratio(base_terms: Sequence[float], q: Sequence[float] | None, alpha: float,
                        temperature: float, chosen: int) -> float:
    """``log p_select(chosen) - log p_base(chosen)`` for one step: the step's contribution to the
    answer's KL estimate (receipt ``kl_estimate``; summed over steps, it is a one-sample estimate of
    KL(decoded || base), the base restricted to each step's candidates).

    ``p_base = softmax(base_terms)`` (the base's distribution over the candidates: top-k token
    log-probs, or log counts of sampled blocks); ``p_select`` is what :func:`select_candidate` draws
    from, ``softmax((base_terms + alpha*Q) / temperature)`` (top_p ignored), a point mass at
    temperature 0. At temperature 1 this is ``alpha*Q(chosen) - log E_base[exp(alpha*Q)]``."""
    base = np.asarray(base_terms, dtype=float)
    log_base = base - np.logaddexp.reduce(base)
    if temperature <= 0:
        return float(-log_base[chosen])
    scores = np.asarray(selection_scores(base_terms, q, alpha), dtype=float) / temperature
    log_sel = scores - np.logaddexp.reduce(scores)
    return float(log_sel[chosen] - log_base[chosen])


def select_candidate(base_logprobs: Sequence[float], q: Sequence[float] | None, *, alpha: float,
                     temperature: float, top_p: float = 1.0,
                     rng: np.random.Generator | None = None) -> int:
    """Index of the chosen candidate.

    temperature == 0: argmax of ``base_logprob + alpha*Q``; ties go to the higher base log-prob, then
    the lower index. Otherwise: sample from softmax(score / temperature) restricted to the smallest
    set of candidates (most probable first, ties by index) whose probability reaches ``top_p``.
    At alpha == 0 this samples the base distribution (at that temperature) restricted to the
    candidates.
    """
    n = len(base_logprobs)
    if n == 0:
        raise ValueError("no candidates")
    scores = selection_scores(base_logprobs, q, alpha)
    scores = [s if not math.isnan(s) else -math.inf for s in scores]
    if temperature <= 0:
        return max(range(n), key=lambda i: (scores[i], float(base_logprobs[i]), -i))
    finite = [s for s in scores if s != -math.inf]
    if not finite:  # nothing has any mass: fall back to the greedy tie-break
        return max(range(n), key=lambda i: (float(base_logprobs[i]), -i))
    top = max(finite)
    p = [math.exp((s - top) / temperature) if s != -math.inf else 0.0 for s in scores]
    total = sum(p)
    p = [x / total for x in p]
    order = sorted(range(n), key=lambda i: (-p[i], i))
    kept: list[int] = []
    cum = 0.0
    for i in order:
        if p[i] <= 0.0 and kept:
            break
        kept.append(i)
        cum += p[i]
        if cum >= top_p - 1e-12:
            break
    kept.sort()
    mass = sum(p[i] for i in kept)
    if rng is None:
        rng = np.random.default_rng()
    u = float(rng.random()) * mass
    acc = 0.0
    for i in kept:
        acc += p[i]
        if u < acc:
            return i
    return kept[-1]


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------

@dataclass
class _Cand:
    ids: list[int]
    logprob: float                 # cumulative base log-prob of ids (receipt / completion)
    terminal: bool                 # ends the answer (stop token or stop string)
    count: int = 1                 # how many of the step's k samples drew this block (block > 1)
    stop_cut: int | None = None    # a stop string starts here in decode(y + ids): the answer's text ends here
    stop_str: str | None = None


def _cut_at_stop(ids: Sequence[int], stop: set[int]) -> tuple[list[int], bool]:
    for j, t in enumerate(ids):
        if t in stop:
            return list(ids[:j + 1]), True
    return list(ids), False


def first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(position, string) of the stop string occurring first in ``text`` (None: none occurs)."""
    best: tuple[int, str] | None = None
    for s in stops:
        p = text.find(s)
        if p >= 0 and (best is None or p < best[0]):
            best = (p, s)
    return best


def stop_string_cut(gen: Engine, prefix: Sequence[int], ids: Sequence[int],
                    stops: Sequence[str], start: int = 0) -> tuple[list[int], int, str] | None:
    """vLLM's stop-string rule on ``prefix + ids`` (the prefix holds no stop string): the ids up to
    the token that completes the first stop string, where that string starts in the text, and the
    string; None when no stop string occurs. Only the decoded text from ``start`` on is searched
    (positions stay those of the whole text)."""
    if not stops or first_stop(gen.decode(list(prefix) + list(ids))[start:], stops) is None:
        return None
    for j in range(1, len(ids) + 1):
        hit = first_stop(gen.decode(list(prefix) + list(ids[:j]))[start:], stops)
        if hit is not None:
            return list(ids[:j]), start + hit[0], hit[1]
    return None


def _block_logprob(c: Completion, n: int | None = None) -> float:
    """Base log-prob of the first ``n`` tokens of ``c`` (all: its cumulative log-prob)."""
    if n is not None and n < len(c.token_ids) and c.logprobs:
        return sum(float(r.logprob) for r in c.logprobs[:n])
    if c.cumulative_logprob is not None:
        return float(c.cumulative_logprob)
    if c.logprobs:
        return sum(float(r.logprob) for r in c.logprobs)
    return 0.0


def _baseline_mixture(mixture: Any, aligned_to: Sequence[str], transform: str, caps: Mapping[str, float]):
    """Equal weights (1/n) over the baseline's objectives, the request's transform and caps."""
    cls = type(mixture)
    names = list(dict.fromkeys(aligned_to))
    w = 1.0 / len(names)
    return cls(weights={o: w for o in names}, transform=transform,
               caps={o: float(c) for o, c in (caps or {}).items() if o in names})



def transfer_plan(params: Any, mixture: Any, target: RolloutTarget | None,
                  objectives: Mapping[str, Any]) -> tuple[str, Any]:
    """(transfer, baseline mixture): ``"none"`` without rollouts, else direct or indirect
    (``resolve_transfer``); indirect transfer also scores the rollouts with the baseline's own
    mixture, which must be usable with the request's transform (ParamError otherwise)."""
    if params.rollout_tokens <= 0 or target is None:
        return "none", None
    transfer = resolve_transfer(params.transfer, mixture.weights, target.aligned_to)
    if transfer != "indirect":
        return transfer, None
    from decoders.rewards import MixtureError

    bl = _baseline_mixture(mixture, list(dict.fromkeys(target.aligned_to)), mixture.transform, mixture.caps)
    if params.alpha != 0:
        try:  # e.g. 'standardize' needs calibrated stats for the baseline's objectives too
            bl.validate(objectives, max_weight=math.inf, require_nonzero=False, param_prefix="alignment.baseline")
        except MixtureError as e:
            raise ParamError(str(e), param=e.param) from None
    return transfer, bl


async def _maybe_await(x: Any) -> None:
    if inspect.isawaitable(x):
        await x


class TransferQSearch:
    """One answer decoded with Transfer Q* (``params.rollout_tokens > 0``) or ARGS (== 0): the
    steps a.-e. of the module docstring, one method each.

    ``target``: the baseline's rollout context (``decoders.baselines.prepare_rollout``; None for
    ARGS). ``stop_token_ids`` must include EOS; the request's ``stop`` strings follow vLLM's
    semantics (the answer ends at the token completing one, its text is cut before it,
    ``finish_reason`` "stop", ``stop_reason`` the string). ``on_block(text_delta, token_ids)``
    (sync or async) is called once per chosen block. Tokens are decoded to text in a worker thread,
    one batch per step, so a long answer never stalls the event loop.
    """

    def __init__(self, engine: Engine, scorer: Scorer, mixture: Any, objectives: Mapping[str, Any],
                 params: _SearchParams, *, prompt_ids: list[int], prompt_text: str, max_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] | None = None,
                 target: RolloutTarget | None = None,
                 on_block: Callable[[str, list[int]], Awaitable[None] | None] | None = None,
                 max_model_len: int | None = None):
        self.engine, self.scorer, self.mixture, self.objectives = engine, scorer, mixture, objectives
        self.params = params
        self.prompt_ids, self.prompt_text, self.max_tokens = list(prompt_ids), prompt_text, max_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.stop = set(int(t) for t in stop_token_ids)
        self.stops = [s for s in (stop_strings or ()) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1   # chars held back while streaming
        self.target = target
        self.on_block = on_block
        self.max_model_len = max_model_len
        self.k, self.block = int(params.top_k), int(params.block)
        self.args_mode = params.rollout_tokens <= 0
        self.scoring = params.alpha != 0
        self.transfer, self.bl_mixture = transfer_plan(params, mixture, target, objectives)
        self.indirect = self.transfer == "indirect"
        self.bl_objs = self.bl_mixture.active() if self.bl_mixture is not None else []
        self.needed = list(dict.fromkeys(list(mixture.active()) + self.bl_objs))
        # Sampled candidate blocks: per-step engine seeds from the request seed; greedy without a
        # seed uses a fixed one (an unseeded sample would make temperature-0 decoding nondeterministic).
        self.cand_seed = seed if seed is not None else (GREEDY_CANDIDATE_SEED if temperature <= 0 else None)
        self.stats = DecodeStats()
        self.out: list[int] = []
        self.cum_lp = 0.0
        self.finish: str | None = None
        self.final_text: str | None = None     # set when a stop string cut the answer's text
        self.stop_reason: str | None = None
        self.emitted = 0
        self.engine_calls = self.scorer_calls = 0
        self.rollout_s = 0.0
        self.q_chosen: list[float] = []
        self.w_chosen: list[float] = []
        self.kl = 0.0                          # the answer's KL estimate (selection_log_ratio per step)

    # -- the loop ---------------------------------------------------------------------------------

    async def run(self) -> tuple[Completion, DecodeStats, dict[str, Any]]:
        """Returns the completion, its cost (``stats.extra["rollout_s"]``: the part of
        ``generation_s`` spent in rollouts) and receipt extras."""
        step = 0
        if self.max_tokens <= 0:
            self.finish = "length"
        while self.finish is None:
            remaining = self.max_tokens - len(self.out)
            if remaining <= 0:
                self.finish = "length"
                break
            step_len = min(self.block, remaining)
            cands = await self._candidates(step, step_len)
            self.stats.candidates += len(cands)
            q, w = await self._q_values(cands, step_len) if self.scoring else (None, None)
            choice = self._select(cands, q, step, step_len)
            self.kl += selection_log_ratio(self._base_terms(cands, step_len), q, self.params.alpha, self.temperature,
                                           choice)
            if q is not None:
                self.q_chosen.append(q[choice])
            if w is not None:
                self.w_chosen.append(w[choice])
            await self._append(cands[choice], remaining)
            step += 1
        text = self.final_text if self.final_text is not None else await self._decode(self.out)
        completion = Completion(text=text, token_ids=self.out, cumulative_logprob=self.cum_lp,
                                finish_reason=self.finish, stop_reason=self.stop_reason)
        return completion, self.stats, self._extras()

    async def _engine(self, prompts: list[list[int]], p: dict[str, Any]) -> list[list[Completion]]:
        t0 = time.perf_counter()
        res = await self.engine.generate(prompts, p)
        self.stats.generation_s += time.perf_counter() - t0
        self.engine_calls += 1
        if len(res) != len(prompts):
            raise RuntimeError(f"engine returned {len(res)} results for {len(prompts)} prompts")
        return res

    async def _decode(self, ids: list[int]) -> str:
        return (await self._decode_many([ids]))[0]

    async def _decode_many(self, seqs: list[list[int]]) -> list[str]:
        decode = self.engine.decode
        return await asyncio.to_thread(lambda: [decode(s) for s in seqs])

    # -- a. candidates ----------------------------------------------------------------------------

    async def _candidates(self, step: int, step_len: int) -> list[_Cand]:
        prompt = self.prompt_ids + self.out
        if step_len == 1:
            res = await self._engine([prompt], {"n": 1, "max_tokens": 1, "temperature": 0.0, "logprobs": self.k,
                                                "stop_token_ids": sorted(self.stop)})
            comp = res[0][0]
            if not comp.logprobs:
                raise RuntimeError("engine returned no logprobs for the candidate step (set `logprobs`, and "
                                   "engine max_logprobs >= top_k)")
            dist = comp.logprobs[0].as_map()
            ranked = sorted(((int(t), float(lp)) for t, lp in dist.items()), key=lambda x: (-x[1], x[0]))
            ranked = [x for x in ranked if math.isfinite(x[1])] or ranked
            cands = [_Cand([t], lp, t in self.stop) for t, lp in ranked[:self.k]]
            self.stats.base_tokens += len(cands)
            await self._cut_stop_strings(cands, [None] * len(cands))
            return cands
        cp: dict[str, Any] = {"n": self.k, "max_tokens": step_len, "temperature": 1.0, "top_p": 1.0,
                              "seed": step_seed(self.cand_seed, step), "logprobs": 0,
                              "stop_token_ids": sorted(self.stop)}
        if self.stops:
            cp["stop"] = list(self.stops)   # saves tokens; the cut itself is re-checked on the decoded text
        res = await self._engine([prompt], cp)
        cands, comps = [], []
        for comp in res[0]:
            self.stats.base_tokens += len(comp.token_ids)
            ids, hit = _cut_at_stop(comp.token_ids[:step_len], self.stop)
            if ids:
                cands.append(_Cand(ids, _block_logprob(comp, len(ids)), hit or comp.finish_reason == "stop"))
                comps.append(comp)
        await self._cut_stop_strings(cands, comps)
        merged: list[_Cand] = []
        index: dict[tuple[int, ...], int] = {}
        for c in cands:
            key = tuple(c.ids)
            if key in index:
                # The same block drawn again: one candidate, its count is its base mass (c/k).
                merged[index[key]].count += 1
                continue
            index[key] = len(merged)
            merged.append(c)
        if not merged:
            raise RuntimeError("engine returned no candidate tokens")
        return merged

    async def _cut_stop_strings(self, cands: list[_Cand], comps: list[Completion | None]) -> None:
        """Apply vLLM's stop-string rule to each candidate (a hit ends the answer there)."""
        if not self.stops:
            return
        out = list(self.out)

        def cuts():
            return [stop_string_cut(self.engine, out, c.ids, self.stops) for c in cands]

        for c, comp, cut in zip(cands, comps, await asyncio.to_thread(cuts)):
            if cut is not None:
                n_before = len(c.ids)
                c.ids, c.stop_cut, c.stop_str, c.terminal = cut[0], cut[1], cut[2], True
                if comp is not None and len(c.ids) < n_before:
                    c.logprob = _block_logprob(comp, len(c.ids))

    # -- b. + c. rollouts and Q --------------------------------------------------------------------

    async def _q_values(self, cands: list[_Cand], step_len: int) -> tuple[list[float], list[float] | None]:
        m = len(cands)
        live = [i for i, c in enumerate(cands) if not c.terminal]
        roll_n = 0 if self.args_mode else min(int(self.params.rollout_tokens),
                                              self.max_tokens - len(self.out) - step_len)
        if roll_n > 0 and self.max_model_len is not None:
            # Near the end of a long answer the rollouts get shorter, never past the engine's context.
            longest = len(self.target.context_ids) + len(self.out) + max(len(c.ids) for c in cands)
            roll_n = min(roll_n, self.max_model_len - longest)
        rolled: dict[int, Completion] = {}
        if roll_n > 0 and live:
            rp = {"stop_token_ids": sorted(self.stop), "n": 1, "max_tokens": roll_n, "temperature": 0.0}
            if self.stops:
                rp["stop"] = list(self.stops)
            rp.update(dict(self.target.params or {}))
            prompts = [list(self.target.context_ids) + self.out + cands[i].ids for i in live]
            t_roll = time.perf_counter()
            rres = await self._engine(prompts, rp)
            self.rollout_s += time.perf_counter() - t_roll
            for i, comps in zip(live, rres):
                rolled[i] = comps[0]
                self.stats.rollouts += 1
                self.stats.rollout_tokens += len(comps[0].token_ids)
        seqs = [self.out + c.ids + (list(rolled[i].token_ids) if i in rolled else []) for i, c in enumerate(cands)]
        texts = await self._decode_many(seqs)
        for i, c in enumerate(cands):
            if i in rolled:
                # The answer would end at a stop string inside the rollout: score it up to there.
                hit = first_stop(texts[i], self.stops) if self.stops else None
                texts[i] = texts[i][:hit[0]] if hit is not None else texts[i]
            elif c.stop_cut is not None:
                texts[i] = texts[i][:c.stop_cut]
        t0 = time.perf_counter()
        raw = await self.scorer.score(self.needed, [self.prompt_text] * m, texts)
        self.stats.scoring_s += time.perf_counter() - t0
        self.scorer_calls += 1
        _, q_t = self.mixture.combine(raw, self.objectives)
        if self.indirect:
            _, q_b = self.bl_mixture.combine(raw, self.objectives)
            q, w = indirect_q(q_t, q_b, self.params.indirect_coef)
        else:
            q, w = list(q_t), None
        if not all(math.isfinite(x) for x in q):
            raise RuntimeError("non-finite Q value")
        return q, w

    # -- d. select --------------------------------------------------------------------------------

    def _select(self, cands: list[_Cand], q: list[float] | None, step: int, step_len: int) -> int:
        # A 1-token step's candidates are the deterministic top-k: their base log-prob belongs in the
        # score. A sampled block's candidates are already draws from pi_base: resampling them by
        # exp(alpha*Q) targets pi_base*exp(alpha*Q); their base mass is how often the block was drawn
        # (count/k), so the base term is log(count) (adding the block's log-prob would count pi_base
        # twice). At alpha == 0 this is sampling the base model's draws. Decided by the step's length,
        # not params.block: with block > 1, a final step with 1 token of budget is a top-k step.
        return select_candidate(self._base_terms(cands, step_len), q, alpha=self.params.alpha, temperature=self.temperature,
                                top_p=self.top_p, rng=step_rng(self.seed, step) if self.temperature > 0 else None)

    @staticmethod
    def _base_terms(cands: list[_Cand], step_len: int) -> list[float]:
        return [c.logprob for c in cands] if step_len == 1 else [math.log(c.count) for c in cands]

    # -- e. append, stream, stop --------------------------------------------------------------------

    async def _append(self, chosen: _Cand, remaining: int) -> None:
        ids = chosen.ids[:remaining]
        self.out.extend(ids)
        self.cum_lp += chosen.logprob
        self.stats.steps += 1
        text = None
        if chosen.terminal and len(ids) == len(chosen.ids):
            self.finish = "stop"
            if chosen.stop_cut is not None:
                self.final_text = text = (await self._decode(self.out))[:chosen.stop_cut]
                self.stop_reason = chosen.stop_str
        elif len(self.out) >= self.max_tokens:
            self.finish = "length"
        if self.on_block is None:
            return
        if text is None:
            text = await self._decode(self.out)
        if self.finish is not None:
            upto = len(text)
        else:
            # Hold back what could still become a stop string, and an incomplete multi-byte
            # character (decoded as U+FFFD) at the end: they are emitted with a later block.
            upto = len(text) - self.hold
            while upto > self.emitted and text[upto - 1] == "\ufffd":
                upto -= 1
        delta = text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        await _maybe_await(self.on_block(delta, list(ids)))

    def _extras(self) -> dict[str, Any]:
        extras: dict[str, Any] = {
            "method": "args" if self.args_mode else "transfer_q",
            "transfer": self.transfer,
            "baseline": None if self.args_mode or self.target is None else self.target.name,
            "engine_calls": self.engine_calls, "scorer_calls": self.scorer_calls,
        }
        if self.indirect:
            extras["indirect_coef"] = self.params.indirect_coef
            extras["baseline_objectives"] = self.bl_objs
        if self.q_chosen:
            extras["mean_q"] = sum(self.q_chosen) / len(self.q_chosen)
        if self.w_chosen:
            extras["mean_weight"] = sum(self.w_chosen) / len(self.w_chosen)
        self.stats.extra.update({"engine_calls": self.engine_calls, "scorer_calls": self.scorer_calls,
                                 "rollout_s": self.rollout_s, "kl_estimate": self.kl})
        return extras


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------

class TransferQReceipt(Receipt):
    transfer: str | None = None
    baseline: str | None = None
    engine_calls: int | None = None
    scorer_calls: int | None = None
    baseline_objectives: list[str] | None = None
    mean_q: float | None = None
    mean_weight: float | None = None


class ARGS(Method):
    """Reward-guided search without rollouts (Khanov et al. 2024): ``transfer_q`` with ``rollout_tokens: 0``."""
    name = "args"
    Params = ARGSParams
    summary = "Reward-guided search without rollouts (Transfer Q* with rollout_tokens 0)."
    streams = "blocks"

    async def prepare(self) -> None:
        self.mixture = self.params.mixture(self.ctx.objectives, self.ctx.limits)
        self.target: RolloutTarget | None = None
        if self.params.alpha != 0:
            # The search picks candidates from raw base log-probs / temperature-1 samples; repetition
            # penalties have no place in that rule: refuse them rather than drop them silently.
            for name in ("frequency_penalty", "presence_penalty"):
                if self.request.sampling.get(name):
                    raise ParamError(f"`{name}` is not supported by method '{self.name}' (alpha > 0); "
                                     f"omit it or set it to 0", param=name, code="unsupported_parameter")

    def budget(self) -> Budget:
        p, n, max_tokens = self.params, self.request.n, self.request.max_tokens
        if p.alpha == 0:  # base decoding (see decode)
            return Budget(sequences=n, tokens=n * max_tokens, scores=n, knobs=("n", "max_tokens"))
        steps = -(-max_tokens // p.block)
        per_step = (1 if p.block == 1 else p.top_k * p.block) + p.top_k * p.rollout_tokens
        knobs = ("alignment.top_k", "alignment.rollout_tokens", "max_tokens", "alignment.block") \
            if p.rollout_tokens else ("alignment.top_k", "max_tokens", "alignment.block")
        if n > 1 and "top_k" not in p.model_fields_set:  # the request's own knob is `n`
            knobs = ("n",) + knobs
        return Budget(sequences=n * p.top_k, tokens=n * steps * per_step, scores=n * (steps * p.top_k + 1),
                      knobs=knobs)

    async def decode(self) -> AsyncIterator[Event]:
        if self.params.alpha == 0:
            async for ev in self._base_decoding():
                yield ev
            return
        req, n = self.request, self.request.n
        queue: asyncio.Queue = asyncio.Queue()
        results: dict[int, Any] = {}

        async def search(i: int) -> None:
            def on_block(text: str, token_ids: list[int]) -> None:
                queue.put_nowait(Delta(i, text, list(token_ids)))

            seed = req.sampling.get("seed")
            results[i] = await TransferQSearch(
                self.ctx.engine, self.ctx.scorer, self.mixture, self.ctx.objectives, self.params,
                prompt_ids=req.prompt_ids, prompt_text=req.prompt_text, max_tokens=req.max_tokens,
                temperature=req.sampling["temperature"], top_p=req.sampling["top_p"],
                seed=None if seed is None else seed + i, stop_token_ids=self.ctx.stop_token_ids,
                stop_strings=req.sampling.get("stop"), target=self.target, on_block=on_block,
                max_model_len=self.ctx.max_model_len).run()

        tasks = [asyncio.create_task(search(i)) for i in range(n)]
        waiter = asyncio.gather(*tasks)
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                waiter.result()  # re-raise a search failure
                while not queue.empty():
                    yield queue.get_nowait()
                break
        finally:
            for t in tasks:
                t.cancel()
        completions = [results[i][0] for i in range(n)]
        for i, c in enumerate(completions):
            yield Finish(i, c.finish_reason or "length")
        stats = [results[i][1] for i in range(n)]
        extras = {k: v for k, v in results[0][2].items() if k != "method"}
        receipt = self.receipt(TransferQReceipt, **extras)
        receipt.cost = Cost(steps=sum(s.steps for s in stats), candidates=sum(s.candidates for s in stats),
                            base_tokens=sum(s.base_tokens for s in stats), rollouts=sum(s.rollouts for s in stats),
                            rollout_tokens=sum(s.rollout_tokens for s in stats))
        scoring_s = sum(s.scoring_s for s in stats)
        receipt.timing = Timing(generation_s=round(sum(s.generation_s for s in stats), 4))
        await score_receipt(self, receipt, {i: c.text for i, c in enumerate(completions)}, aligning=True)
        for choice in receipt.choices or []:
            choice.kl_estimate = stats[choice.index].extra.get("kl_estimate")
        receipt.timing.scoring_s = round(scoring_s + (receipt.timing.scoring_s or 0.0), 4)
        # Added latency (the reward-per-second trade-off) = all scoring (per step and final) + the
        # baseline rollouts' generation time. The candidate steps themselves are counted as
        # decoding, so this is a lower bound on what the method adds over plain sampling.
        receipt.add_latency(scoring_s + sum(s.extra.get("rollout_s", 0.0) for s in stats))
        yield receipt

    async def _base_decoding(self) -> AsyncIterator[Event]:
        """alpha = 0: pi_base * exp(0 * Q) is the base distribution (restricted to the top-k at token
        level): decoded directly, with no rollouts or scoring, so alpha = 0 is exactly base decoding."""
        sampling = self.request.sampling
        if self.params.block == 1:
            sampling = dict(sampling, top_k=self.params.top_k)
        receipt = self.receipt(TransferQReceipt, note="alpha=0: base decoding, no rollouts",
                               cost=Cost(steps=0, candidates=0, rollouts=0, rollout_tokens=0))
        texts: dict[int, str] = {}
        async for ev in stream_choices(self, sampling, texts):
            yield ev
        await score_receipt(self, receipt, texts, aligning=True)
        yield receipt


class TransferQ(ARGS):
    """Transfer Q* (Chakraborty et al. 2024): Q* from rollouts of a baseline aligned model."""
    name = "transfer_q"
    Params = TransferQParams
    summary = ("Q* of each candidate block estimated by rolling out a baseline aligned model and scoring the "
               "rollout; direct or indirect (importance-weighted) transfer.")

    async def prepare(self) -> None:
        await super().prepare()
        if self.params.alpha == 0 or self.params.rollout_tokens == 0:
            return  # nothing is rolled out: no baseline is resolved (a server without baselines serves it)
        req = self.request
        engine = self.ctx.engine
        source = req.messages if req.messages is not None else req.prompt_text

        def target() -> RolloutTarget:
            return prepare_rollout(self.params.baseline, {o: self.mixture.weights[o] for o in self.mixture.active()},
                                   self.ctx.baselines, source, render_chat=self.ctx.render_chat, encode=engine.encode)

        self.target = await asyncio.to_thread(target)
        if self.target.generator is not None:  # `kind: model` is refused at config load
            raise ParamError(f"baseline {self.target.name!r} needs a separately served model, which this server "
                             f"does not run", param="alignment.baseline", code="baseline_unavailable")
        transfer_plan(self.params, self.mixture, self.target, self.ctx.objectives)  # refuses an unusable one now
        room = self.ctx.max_model_len - len(self.target.context_ids) - 1
        if req.max_tokens > room:
            # The rollouts continue the baseline's context (the prompt with its system prompt) + the answer.
            raise ParamError(f"the baseline's rollout context has {len(self.target.context_ids)} tokens: an answer "
                             f"of max_tokens {req.max_tokens} would not fit the engine's context of "
                             f"{self.ctx.max_model_len}; use max_tokens <= {max(room, 0)}", param="max_tokens",
                             code="context_length_exceeded")
