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
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence

import numpy as np

from decoders.base import Completion, DecodeStats, Generator, Scorer
from decoders.baselines import ParamError, resolve_transfer

TRANSFERS = ("auto", "direct", "indirect")

# Recommended request defaults that keep the cost within ~10x plain sampling (docs/transfer_q.md):
# tokens per output token = top_k * (block + rollout_tokens) / block = 4 * 32 / 16 = 8.
# The server uses these for fields a request leaves out (server/methods.py).
RECOMMENDED_DEFAULTS: dict[str, Any] = {"top_k": 4, "block": 16, "rollout_tokens": 16, "alpha": 1.0}

# Engine seed of the sampled candidate blocks at temperature 0 when the request gives no seed:
# greedy selection must not depend on an unseeded sample, so greedy transfer_q is deterministic.
GREEDY_CANDIDATE_SEED = 0


@dataclass
class TransferQParams:
    """The request's ``alignment`` fields for ``method: transfer_q`` (``args`` = rollout_tokens 0)."""
    weights: dict[str, float]
    transform: str = "raw"
    caps: dict[str, float] = field(default_factory=dict)
    alpha: float = 1.0
    top_k: int = 10
    block: int = 1
    rollout_tokens: int = 16
    baseline: str | None = None
    transfer: str = "auto"            # "auto" | "direct" | "indirect"
    indirect_coef: float = 0.5

    def validate(self, limits: Any = None) -> "TransferQParams":
        """Range checks (``limits``: a ``LimitsConfig``); raises ParamError (a 400) naming the field."""
        max_top_k = getattr(limits, "max_top_k", 50)
        max_block = getattr(limits, "max_block", 64)
        max_roll = getattr(limits, "max_rollout_tokens", 64)
        max_alpha = getattr(limits, "max_alpha", 100.0)
        max_beta = getattr(limits, "max_beta", 50.0)

        def int_in(name: str, v: Any, lo: int, hi: int) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ParamError(f"alignment.{name} must be an integer in [{lo}, {hi}], got {v!r}",
                                 param=f"alignment.{name}")

        def num_in(name: str, v: Any, lo: float, hi: float) -> None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ParamError(f"alignment.{name} must be a number in [{lo:g}, {hi:g}], got {v!r}",
                                 param=f"alignment.{name}")

        int_in("top_k", self.top_k, 1, max_top_k)
        int_in("block", self.block, 1, max_block)
        int_in("rollout_tokens", self.rollout_tokens, 0, max_roll)
        num_in("alpha", self.alpha, 0.0, max_alpha)
        num_in("indirect_coef", self.indirect_coef, 0.0, max_beta)
        if self.transfer not in TRANSFERS:
            raise ParamError(f"alignment.transfer must be one of {', '.join(TRANSFERS)}, got {self.transfer!r}",
                             param="alignment.transfer")
        if self.baseline is not None and not isinstance(self.baseline, str):
            raise ParamError("alignment.baseline must be a string", param="alignment.baseline")
        return self

    @property
    def method(self) -> str:
        return "args" if self.rollout_tokens == 0 else "transfer_q"


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


def stop_string_cut(gen: Generator, prefix: Sequence[int], ids: Sequence[int],
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
        return sum(float(lp[t]) for t, lp in zip(c.token_ids[:n], c.logprobs[:n]) if t in lp)
    if c.cumulative_logprob is not None:
        return float(c.cumulative_logprob)
    if c.logprobs:
        total = 0.0
        for t, lp in zip(c.token_ids, c.logprobs):
            if t in lp:
                total += float(lp[t])
        return total
    return 0.0


def _baseline_mixture(mixture: Any, aligned_to: Sequence[str], transform: str, caps: Mapping[str, float]):
    """Equal weights (1/n) over the baseline's objectives, the request's transform and caps."""
    cls = type(mixture)
    names = list(dict.fromkeys(aligned_to))
    w = 1.0 / len(names)
    return cls(weights={o: w for o in names}, transform=transform,
               caps={o: float(c) for o, c in (caps or {}).items() if o in names})


async def _maybe_await(x: Any) -> None:
    if inspect.isawaitable(x):
        await x


async def transfer_q_decode(gen: Generator, scorer: Scorer, mixture: Any, objectives: Mapping[str, Any], *,
                            base_prompt_ids: list[int], rollout_context_ids: list[int], prompt_text: str,
                            max_tokens: int, temperature: float, top_p: float, seed: int | None,
                            stop_token_ids: Sequence[int] | None, params: TransferQParams,
                            baseline_aligned_to: Sequence[str],
                            on_block: Callable[[str, list[int]], Awaitable[None] | None] | None = None,
                            baseline_name: str | None = None,
                            rollout_gen: Generator | None = None,
                            rollout_params: Mapping[str, Any] | None = None,
                            stop_strings: Sequence[str] | None = None,
                            ) -> tuple[Completion, DecodeStats, dict[str, Any]]:
    """Decode one answer with Transfer Q* (``params.rollout_tokens > 0``) or ARGS (== 0).

    ``mixture``: the request's ``decoders.rewards.Mixture`` (None: built from ``params``);
    ``objectives``: the registered objectives (``build_objectives()``), passed to ``Mixture.combine``.
    ``stop_token_ids`` must include EOS. ``stop_strings``: the request's ``stop`` (vLLM semantics: the
    answer ends at the token completing one, its text is cut before it, ``finish_reason`` "stop",
    ``stop_reason`` the string). ``rollout_context_ids``: the baseline's context
    (``decoders.baselines.build_rollout_context``). ``rollout_gen``: the generator of a ``model``
    baseline (None: ``gen``); its prompts are re-tokenized through text with ``rollout_gen.encode``
    (which must not add special tokens). ``rollout_params``: extra rollout params (a ``lora`` baseline's
    ``lora_request``). ``on_block(text_delta, token_ids)`` (sync or async) is called once per chosen
    block. Returns the completion, its cost (``stats.extra["rollout_s"]``: the part of
    ``generation_s`` spent in rollouts), and receipt extras.
    """
    if mixture is None:
        from decoders.rewards import Mixture
        mixture = Mixture(weights=dict(params.weights), transform=params.transform, caps=dict(params.caps))

    stats = DecodeStats()
    stop = set(int(t) for t in (stop_token_ids or ()))
    stops = [s for s in (stop_strings or ()) if s]
    hold = max((len(s) for s in stops), default=1) - 1   # chars held back while streaming
    k = int(params.top_k)
    block = int(params.block)
    args_mode = params.rollout_tokens <= 0
    scoring = params.alpha != 0
    weights = dict(getattr(mixture, "weights", None) or params.weights)
    transfer = "none" if args_mode else resolve_transfer(params.transfer, weights, baseline_aligned_to)
    indirect = transfer == "indirect"
    target_objs = list(mixture.active())
    bl_objs = list(dict.fromkeys(baseline_aligned_to)) if indirect else []
    bl_mixture = (_baseline_mixture(mixture, bl_objs, getattr(mixture, "transform", params.transform),
                                    getattr(mixture, "caps", None) or params.caps) if bl_objs else None)
    if bl_mixture is not None and scoring and hasattr(bl_mixture, "validate"):
        # e.g. 'standardize' needs calibrated stats for the baseline's objectives too
        bl_mixture.validate(objectives, max_weight=math.inf, require_nonzero=False,
                            param_prefix="alignment.baseline")
    needed = list(dict.fromkeys(target_objs + bl_objs))
    r_gen = rollout_gen if rollout_gen is not None else gen
    retokenize = rollout_gen is not None and rollout_gen is not gen
    # Sampled candidate blocks: per-step engine seeds from the request seed; greedy without a seed
    # uses a fixed one (an unseeded sample would make temperature-0 decoding nondeterministic).
    cand_seed = seed if seed is not None else (GREEDY_CANDIDATE_SEED if temperature <= 0 else None)

    out: list[int] = []
    cum_lp = 0.0
    finish: str | None = None
    final_text: str | None = None     # set when a stop string cut the answer's text
    stop_reason: str | None = None
    emitted = 0
    engine_calls = scorer_calls = 0
    rollout_s = 0.0
    q_chosen: list[float] = []
    w_chosen: list[float] = []

    async def engine(g: Generator, prompts: list[list[int]], p: dict[str, Any]) -> list[list[Completion]]:
        nonlocal engine_calls
        t0 = time.perf_counter()
        res = await g.generate(prompts, p)
        stats.generation_s += time.perf_counter() - t0
        engine_calls += 1
        if len(res) != len(prompts):
            raise RuntimeError(f"engine returned {len(res)} results for {len(prompts)} prompts")
        return res

    def candidate(ids: list[int], logprob: float, terminal: bool) -> _Cand:
        c = _Cand(ids, logprob, terminal)
        cut = stop_string_cut(gen, out, ids, stops) if stops else None
        if cut is not None:
            c.ids, c.stop_cut, c.stop_str = cut[0], cut[1], cut[2]
            c.terminal = True
        return c

    def answer_text(c: _Cand) -> str:
        """The answer's text if ``c`` were appended (cut before a stop string)."""
        text = gen.decode(out + c.ids)
        return text[:c.stop_cut] if c.stop_cut is not None else text

    if max_tokens <= 0:
        finish = "length"

    step = 0
    while finish is None:
        remaining = max_tokens - len(out)
        if remaining <= 0:
            finish = "length"
            break
        step_len = min(block, remaining)
        prompt = list(base_prompt_ids) + out

        # a. candidates from the base model
        cands: list[_Cand] = []
        if step_len == 1:
            res = await engine(gen, [prompt], {"n": 1, "max_tokens": 1, "temperature": 0.0, "logprobs": k,
                                               "stop_token_ids": sorted(stop)})
            comp = res[0][0]
            if not comp.logprobs:
                raise RuntimeError("engine returned no logprobs for the candidate step (set `logprobs`, and "
                                   "engine max_logprobs >= top_k)")
            dist = comp.logprobs[0]
            ranked = sorted(((int(t), float(lp)) for t, lp in dist.items()), key=lambda x: (-x[1], x[0]))
            ranked = [x for x in ranked if math.isfinite(x[1])] or ranked
            cands = [candidate([t], lp, t in stop) for t, lp in ranked[:k]]
            stats.base_tokens += len(cands)
        else:
            cp: dict[str, Any] = {"n": k, "max_tokens": step_len, "temperature": 1.0, "top_p": 1.0,
                                  "seed": step_seed(cand_seed, step), "logprobs": 0,
                                  "stop_token_ids": sorted(stop)}
            if stops:
                cp["stop"] = list(stops)   # saves tokens; the cut itself is re-checked on the decoded text
            res = await engine(gen, [prompt], cp)
            index: dict[tuple[int, ...], int] = {}
            for comp in res[0]:
                stats.base_tokens += len(comp.token_ids)
                ids, hit = _cut_at_stop(comp.token_ids[:step_len], stop)
                if not ids:
                    continue
                c = candidate(ids, _block_logprob(comp, len(ids)), hit or comp.finish_reason == "stop")
                if len(c.ids) < len(ids):   # cut at a stop string
                    c.logprob = _block_logprob(comp, len(c.ids))
                key = tuple(c.ids)
                if key in index:
                    # The same block drawn again: one candidate, its count is its base mass (c/k).
                    cands[index[key]].count += 1
                    continue
                index[key] = len(cands)
                cands.append(c)
            if not cands:
                raise RuntimeError("engine returned no candidate tokens")
        m = len(cands)
        stats.candidates += m

        # b. + c. rollouts and scores
        q: list[float] | None = None
        w: list[float] | None = None
        if scoring:
            texts: list[str] = [""] * m
            live = [i for i, c in enumerate(cands) if not c.terminal]
            roll_n = min(int(params.rollout_tokens), max_tokens - len(out) - step_len) if not args_mode else 0
            rolled: dict[int, Completion] = {}
            if roll_n > 0 and live:
                if retokenize:
                    r_prompts = [list(rollout_context_ids) + list(r_gen.encode(gen.decode(out + cands[i].ids)))
                                 for i in live]
                    rp: dict[str, Any] = {}
                else:
                    r_prompts = [list(rollout_context_ids) + out + cands[i].ids for i in live]
                    rp = {"stop_token_ids": sorted(stop)}
                rp.update({"n": 1, "max_tokens": roll_n, "temperature": 0.0})
                if stops:
                    rp["stop"] = list(stops)
                rp.update(dict(rollout_params or {}))
                t_roll = time.perf_counter()
                rres = await engine(r_gen, r_prompts, rp)
                rollout_s += time.perf_counter() - t_roll
                for i, comps in zip(live, rres):
                    rolled[i] = comps[0]
                    stats.rollouts += 1
                    stats.rollout_tokens += len(comps[0].token_ids)
            for i, c in enumerate(cands):
                r = rolled.get(i)
                if r is None:
                    texts[i] = answer_text(c)
                else:
                    if retokenize:
                        full = gen.decode(out + c.ids) + r.text
                    else:
                        full = gen.decode(out + c.ids + list(r.token_ids))
                    # The answer would end at a stop string inside the rollout: score it up to there.
                    hit = first_stop(full, stops) if stops else None
                    texts[i] = full[:hit[0]] if hit is not None else full
            t0 = time.perf_counter()
            raw = await scorer.score(needed, [prompt_text] * m, texts)
            stats.scoring_s += time.perf_counter() - t0
            scorer_calls += 1
            _, q_t = mixture.combine(raw, objectives)
            if indirect:
                _, q_b = bl_mixture.combine(raw, objectives) if bl_mixture is not None else (None, [0.0] * m)
                q, w = indirect_q(q_t, q_b, params.indirect_coef)
            else:
                q = list(q_t)
            if not all(math.isfinite(x) for x in q):
                raise RuntimeError("non-finite Q value")

        # d. select
        # A 1-token step's candidates are the deterministic top-k: their base log-prob belongs in the
        # score. A sampled block's candidates are already draws from pi_base: resampling them by
        # exp(alpha*Q) targets pi_base*exp(alpha*Q); their base mass is how often the block was drawn
        # (count/k), so the base term is log(count) (adding the block's log-prob would count pi_base
        # twice). At alpha == 0 this is sampling the base model's draws. Decided by the step's length,
        # not params.block: with block > 1, a final step with 1 token of budget is a top-k step.
        sel_lp = [c.logprob for c in cands] if step_len == 1 else [math.log(c.count) for c in cands]
        choice = select_candidate(sel_lp, q, alpha=params.alpha, temperature=temperature,
                                  top_p=top_p, rng=step_rng(seed, step) if temperature > 0 else None)
        chosen = cands[choice]
        if q is not None:
            q_chosen.append(q[choice])
        if w is not None:
            w_chosen.append(w[choice])

        # e. append, stream, stop
        ids = chosen.ids[:remaining]
        out.extend(ids)
        cum_lp += chosen.logprob
        stats.steps += 1
        step += 1
        if chosen.terminal and len(ids) == len(chosen.ids):
            finish = "stop"
            if chosen.stop_cut is not None:
                final_text = gen.decode(out)[:chosen.stop_cut]
                stop_reason = chosen.stop_str
        elif len(out) >= max_tokens:
            finish = "length"
        if on_block is not None:
            text = final_text if final_text is not None else gen.decode(out)
            if finish is not None:
                upto = len(text)
            else:
                # Hold back what could still become a stop string, and an incomplete multi-byte
                # character (decoded as U+FFFD) at the end: they are emitted with a later block.
                upto = len(text) - hold
                while upto > emitted and text[upto - 1] == "\ufffd":
                    upto -= 1
            delta = text[emitted:upto] if upto > emitted else ""
            emitted = max(emitted, upto)
            await _maybe_await(on_block(delta, list(ids)))

    completion = Completion(text=final_text if final_text is not None else gen.decode(out), token_ids=out,
                            cumulative_logprob=cum_lp, finish_reason=finish, stop_reason=stop_reason)
    extras: dict[str, Any] = {
        "method": params.method,
        "transfer": transfer,
        "baseline": None if args_mode else baseline_name,
        "top_k": k, "block": block, "rollout_tokens": 0 if args_mode else int(params.rollout_tokens),
        "alpha": params.alpha,
        "engine_calls": engine_calls, "scorer_calls": scorer_calls,
    }
    if indirect:
        extras["indirect_coef"] = params.indirect_coef
        extras["baseline_objectives"] = bl_objs
    if q_chosen:
        extras["mean_q"] = sum(q_chosen) / len(q_chosen)
    if w_chosen:
        extras["mean_weight"] = sum(w_chosen) / len(w_chosen)
    stats.extra.update({"engine_calls": engine_calls, "scorer_calls": scorer_calls, "rollout_s": rollout_s})
    return completion, stats, extras
