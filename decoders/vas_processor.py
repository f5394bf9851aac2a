"""The engine side of value-augmented sampling (decoders/vas.py): vLLM logits processors.

One steering core (``SteeringCore``: value models, per-request caches and statistics, the rule
below, faults isolated per request) behind the two logits-processor interfaces vLLM has:
``VASLogitsProcessor`` for the V1 model runner (CPU, and GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``;
rows are requests, moved by ``BatchUpdate``) and ``VASLogitsProcessorV2`` for Model Runner V2 (the
default wherever Triton is installed; state per recycled request slot, rows are logits rows).
``server/engine.py`` registers the one that matches the runner vLLM will use.

For every VAS row of a decoding step the processor takes the base model's top-k candidates and
re-scores them with trained value models (decoders/value_model.py):

    logits'[z] = logits[z] + sum_i beta * w_i * (V_i(s, z) - mean_{z' in topk} V_i(s, z'))   z in top-k
    logits'[z] = -inf                                                                         otherwise

Configuration (the contract with server/engine.py):

* Engine level: env ``ALIGNSERVE_VAS_CONFIG`` = JSON ``{"value_models": {objective: checkpoint dir},
  "stats_dir": dir}``, read in ``__init__`` (the engine core runs processors in a spawned process
  that inherits the environment). Optional keys: ``"base_model"`` (base dir for the trunk;
  default: the served model), ``"dtype"`` ("float32" | "bfloat16" trunk compute, default float32),
  ``"parked_requests"`` (how many removed requests keep their value-model caches for a re-add
  after preemption, default 8). Without the env variable the processor is inert. Value models
  run on the engine's (first) device.
* Per request: ``SamplingParams.extra_args = {"alignserve": {"request_id": id, "vas": {"weights":
  {objective: w}, "beta": b, "top_k": k}}}``. Requests without ``"vas"`` are untouched.
* Receipt: after each step a VAS row was processed, ``<stats_dir>/<request_id>.json`` =
  ``{"kl": sum over steps of KL(p_aligned || p_base), "steps": n, "value_model_s": s,
  "objectives": [...]}`` with both distributions at temperature 1 (see docs/vas.md), plus
  ``"error"`` once a value model failed on the request (it is then stopped at once: EOS is forced).

The class is usable without vLLM's config for tests: ``VASLogitsProcessor(None, "cpu", False,
value_models={...}, stats_dir=...)`` injects value models.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from decoders.vas import DEFAULT_BETA, DEFAULT_TOP_K

try:  # the processor base classes and batch-update types come from vLLM when it is installed
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as LogitsProcessorV2
except Exception:  # pragma: no cover - vLLM-less installs can still import the helpers
    BatchUpdate = Any  # type: ignore[misc,assignment]

    class LogitsProcessor:  # type: ignore[no-redef]
        pass

    class LogitsProcessorV2:  # type: ignore[no-redef]
        pass

    class MoveDirectionality:  # type: ignore[no-redef]
        UNIDIRECTIONAL = "unidirectional"
        SWAP = "swap"

logger = logging.getLogger("alignserve.vas")

VAS_CONFIG_ENV = "ALIGNSERVE_VAS_CONFIG"
VALUE_MODELS_DIR = Path(__file__).resolve().parent / "value_models"
MAX_TOP_K = 200
DEFAULT_PARKED = 8
_VAS_KEYS = {"weights", "beta", "top_k"}


def default_value_model_dirs() -> dict[str, str]:
    """Shipped checkpoints: {objective: dir} for each decoders/value_models/<objective>/ that exists."""
    out: dict[str, str] = {}
    if VALUE_MODELS_DIR.is_dir():
        for d in sorted(VALUE_MODELS_DIR.iterdir()):
            if (d / "value_model.json").is_file() and (d / "head.safetensors").is_file():
                out[d.name] = str(d)
    return out


def vas_config_json(value_models: Mapping[str, str] | None = None, stats_dir: str | os.PathLike | None = None,
                    **extra: Any) -> str:
    """The value of ``ALIGNSERVE_VAS_CONFIG`` (default: the shipped checkpoints)."""
    vm = dict(value_models) if value_models is not None else default_value_model_dirs()
    cfg: dict[str, Any] = {"value_models": vm, "stats_dir": None if stats_dir is None else str(stats_dir)}
    cfg.update(extra)
    return json.dumps(cfg)


_ENV_CACHE: tuple[str | None, dict[str, Any] | None] = (None, None)


def vas_config_from_env() -> dict[str, Any] | None:
    """The parsed ``ALIGNSERVE_VAS_CONFIG`` (None when unset or empty)."""
    global _ENV_CACHE
    raw = os.environ.get(VAS_CONFIG_ENV)
    if _ENV_CACHE[0] == raw and raw is not None:
        return _ENV_CACHE[1]
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{VAS_CONFIG_ENV} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("value_models", {}), dict):
        raise ValueError(f'{VAS_CONFIG_ENV} must be {{"value_models": {{objective: dir}}, "stats_dir": dir}}')
    cfg.setdefault("value_models", {})
    _ENV_CACHE = (raw, cfg)
    return cfg


# ----------------------------------------------------------------------------------------------
# Per-request parameters
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SteerParams:
    weights: dict[str, float]
    beta: float = DEFAULT_BETA
    top_k: int = DEFAULT_TOP_K
    request_id: str | None = None

    @property
    def objectives(self) -> list[str]:
        return [k for k, w in self.weights.items() if w != 0.0]


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def parse_vas_params(extra_args: Mapping[str, Any] | None, available: set[str] | None = None) -> SteerParams | None:
    """SteerParams from ``SamplingParams.extra_args`` (None: not a VAS request). Raises ValueError.

    ``available``: objectives with a loaded value model (None: don't check names).
    """
    if not extra_args:
        return None
    ours = extra_args.get("alignserve")
    if not isinstance(ours, Mapping) or "vas" not in ours:
        return None
    vas = ours["vas"]
    if not isinstance(vas, Mapping):
        raise ValueError("vas must be an object {weights, beta, top_k}")
    unknown = set(vas) - _VAS_KEYS
    if unknown:
        raise ValueError(f"vas: unknown field(s) {sorted(unknown)}; allowed: {sorted(_VAS_KEYS)}")
    weights = vas.get("weights")
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("vas.weights must be a non-empty object {objective: weight}")
    clean: dict[str, float] = {}
    for name, w in weights.items():
        if not isinstance(name, str):
            raise ValueError(f"vas.weights: objective names must be strings, got {name!r}")
        if not _finite_number(w):
            raise ValueError(f"vas.weights[{name!r}] must be a finite number, got {w!r}")
        clean[name] = float(w)
    if available is not None:
        missing = sorted(n for n in clean if n not in available)
        if missing:
            have = ", ".join(sorted(available)) or "none"
            raise ValueError(f"vas: no value model loaded for objective(s) {', '.join(missing)} "
                             f"(value models: {have})")
    beta = vas.get("beta", DEFAULT_BETA)
    if not _finite_number(beta):
        raise ValueError(f"vas.beta must be a finite number, got {beta!r}")
    top_k = vas.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, int) and not (isinstance(top_k, float) and top_k.is_integer()):
        raise ValueError(f"vas.top_k must be an integer in [1, {MAX_TOP_K}], got {top_k!r}")
    top_k = int(top_k)
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"vas.top_k must be in [1, {MAX_TOP_K}], got {top_k}")
    rid = ours.get("request_id")
    return SteerParams(weights=clean, beta=float(beta), top_k=top_k, request_id=None if rid is None else str(rid))


# ----------------------------------------------------------------------------------------------
# Per-request state
# ----------------------------------------------------------------------------------------------

@dataclass
class _Stats:
    objectives: list[str]
    kl: float = 0.0
    steps: int = 0
    value_model_s: float = 0.0
    active: int = 0  # rows of the batch that currently use this record
    error: str | None = None  # set once a value model failed on this request: it is stopped at once

    def as_dict(self) -> dict[str, Any]:
        d = {"kl": float(self.kl), "steps": int(self.steps), "value_model_s": float(self.value_model_s),
             "objectives": list(self.objectives)}
        if self.error is not None:
            d["error"] = self.error
        return d


@dataclass
class _Row:
    """One steered request in the batch. ``tokens()`` gives its token ids so far (prompt + the
    output the engine has committed), however the runner keeps them."""
    params: SteerParams
    tokens: Callable[[], Sequence[int]]
    prompt_len: int
    stats: _Stats
    caches: dict[int, Any] = field(default_factory=dict)  # trunk id -> KVCache


def _live_tokens(prompt: list[int], output: list[int]) -> Callable[[], list[int]]:
    """V1: the prompt + vLLM's live output list (it appends to it; -1 placeholders are not known yet)."""
    def tokens() -> list[int]:
        n = len(output)
        while n and output[n - 1] < 0:  # async-scheduling placeholders (-1): not known yet
            n -= 1
        return prompt + (output[:n] if n != len(output) else list(output))
    return tokens


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """Write then rename: a reader sees the old or the new receipt, never a partial one. The temp
    name is per target and per process (one writer per request id)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _safe_name(request_id: str) -> str:
    return request_id.replace("/", "_").replace("\\", "_").replace("\0", "_")


# ----------------------------------------------------------------------------------------------
# The steering core (shared by the V1 and V2 processors)
# ----------------------------------------------------------------------------------------------

class SteeringCore:
    """Value models, per-request state and the steering rule, independent of how a model runner
    lays out its batch. ``steer(logits, rows)`` rewrites the given logits rows in place.

    Faults are isolated per request: when a batched step fails, each row is retried alone, so only
    the requests the fault belongs to fail (all of them, if the value model itself is broken). A
    failed request is stopped at once (its next token is forced to EOS) and its receipt carries
    the error, so the server answers with an explicit error instead of an unaligned answer.
    """

    def __init__(self, value_models: Mapping[str, Any], *, stats_dir: Path | None, parked_capacity: int,
                 eos_token_ids: Sequence[int] = ()):
        self.value_models: dict[str, Any] = dict(value_models)
        self.stats_dir = stats_dir
        self.parked_capacity = parked_capacity
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        # Value models that share a trunk object share its features (one trunk pass per step).
        self.trunks: dict[int, Any] = {}
        self.trunk_of: dict[str, int] = {}
        for name, vm in self.value_models.items():
            tid = id(vm.trunk)
            self.trunks[tid] = vm.trunk
            self.trunk_of[name] = tid
        if self.stats_dir is not None:
            self.stats_dir.mkdir(parents=True, exist_ok=True)
        self.stats: dict[str, _Stats] = {}
        self.parked: OrderedDict[str, list[dict[int, Any]]] = OrderedDict()
        self.last_step_s = 0.0  # wall time of the last steered step (benchmarks)

    # -- rows -------------------------------------------------------------------------------------

    def new_row(self, vp: SteerParams, tokens: Callable[[], Sequence[int]], prompt_len: int) -> _Row:
        rid = vp.request_id
        stats = self.stats.get(rid) if rid is not None else None
        if stats is None:
            stats = _Stats(objectives=vp.objectives)
            if rid is not None and self.stats_dir is not None:
                # A re-added (preempted) request resumes its receipt: the engine deletes the file
                # only when the request finishes.
                try:
                    old = json.loads((self.stats_dir / f"{_safe_name(rid)}.json").read_text())
                    stats.kl, stats.steps = float(old["kl"]), int(old["steps"])
                    stats.value_model_s = float(old["value_model_s"])
                    stats.error = old.get("error")
                except (OSError, ValueError, KeyError, TypeError):
                    pass
            if rid is not None:
                self.stats[rid] = stats
        stats.active += 1
        row = _Row(params=vp, tokens=tokens, prompt_len=prompt_len, stats=stats)
        parked = self.parked.pop(rid, None) if rid is not None else None
        toks = list(row.tokens()) if parked else None
        for name in (vp.objectives if vp.beta != 0.0 else []):  # beta 0: plain top-k, no value model
            tid = self.trunk_of[name]
            if tid in row.caches:
                continue
            cache = None
            if parked:
                # reuse the parked cache that shares the longest prefix with this request's tokens
                best, best_len = None, 0
                for entry in parked:
                    c = entry.get(tid)
                    if c is not None:
                        n = c.common_prefix(toks)
                        if n > best_len:
                            best, best_len = entry, n
                if best is not None:
                    cache = best.pop(tid)
                    cache.truncate(best_len)
            row.caches[tid] = cache if cache is not None else self.trunks[tid].new_cache(pool_from=prompt_len)
        return row

    def release(self, row: _Row) -> None:
        """The row left the batch: its stats are dropped when no row uses them, its caches parked
        (a preempted request that comes back resumes from them)."""
        st = row.stats
        st.active -= 1
        rid = row.params.request_id
        if rid is not None and st.active <= 0 and self.stats.get(rid) is st:
            del self.stats[rid]
        if rid is not None and row.caches and self.parked_capacity > 0:
            entries = self.parked.pop(rid, [])
            entries.append(row.caches)
            self.parked[rid] = entries
            while len(self.parked) > self.parked_capacity:
                self.parked.popitem(last=False)

    # -- one step -----------------------------------------------------------------------------------

    def steer(self, logits: torch.Tensor, rows: list[tuple[int, _Row]]) -> torch.Tensor:
        """Steer logits rows ``[(logits row index, row), ...]`` in place; returns ``logits``."""
        live = [(i, r) for i, r in rows if r.stats.error is None]
        failed = [(i, r) for i, r in rows if r.stats.error is not None]
        if live:
            t0 = time.perf_counter()
            try:
                self._steer_rows(logits, live)
            except Exception as exc:  # noqa: BLE001 - a value-model fault must not kill the engine
                logger.warning("VAS: a batched step of %d request(s) failed (%r); retrying them one by one",
                               len(live), exc)
                for i, r in live:
                    try:
                        self._steer_rows(logits, [(i, r)])
                    except Exception as one:  # noqa: BLE001
                        logger.exception("VAS: value models failed on request %s", r.params.request_id)
                        r.stats.error = f"{type(one).__name__}: {one}"[:300]
                        failed.append((i, r))
            self.last_step_s = time.perf_counter() - t0
        if failed:
            self._stop(logits, [i for i, _ in failed])
            self._write_receipts([r for _, r in failed])
        return logits

    def _stop(self, logits: torch.Tensor, idxs: list[int]) -> None:
        """Force EOS on these rows (without a known EOS they keep the base logits unsteered)."""
        if not self.eos_token_ids:
            return
        eos = torch.tensor(self.eos_token_ids, device=logits.device, dtype=torch.long)
        for i in idxs:
            row = logits[i]
            keep = row.index_select(0, eos)
            row.fill_(float("-inf"))
            row.index_copy_(0, eos, torch.where(torch.isfinite(keep), keep, torch.zeros_like(keep)))

    def _steer_rows(self, logits: torch.Tensor, items: list[tuple[int, _Row]]) -> None:
        idxs = [i for i, _ in items]
        rows = [r for _, r in items]
        vm_time = [0.0] * len(rows)
        feats = self._features(rows, vm_time)                                  # 1. trunk features
        dev = logits.device
        idx_t = torch.tensor(idxs, device=dev, dtype=torch.long)
        base = logits.index_select(0, idx_t).float()                           # 2. base top-k
        ks = [min(row.params.top_k, base.shape[1]) for row in rows]
        topv, topi = base.topk(max(ks), dim=-1)
        logp_base = topv - torch.logsumexp(base, dim=-1, keepdim=True)   # temperature 1, before steering
        valid = torch.arange(max(ks), device=dev)[None, :] < torch.tensor(ks, device=dev)[:, None]
        valid &= torch.isfinite(topv)
        adj = self._adjustments(rows, feats, topi, valid, vm_time)            # 3. sum_i beta w_i (V_i - mean)
        new_top = torch.where(valid, topv + adj, torch.tensor(float("-inf"), device=dev))
        kl = _kl(new_top, logp_base, valid)                                    # 4. KL(aligned || base)
        new_rows = torch.full_like(base, float("-inf")).scatter_(1, topi, new_top)
        logits.index_copy_(0, idx_t, new_rows.to(logits.dtype))               # 5. write the rows
        for r, row in enumerate(rows):
            st = row.stats
            st.kl += kl[r]
            st.steps += 1
            st.value_model_s += vm_time[r]
        self._write_receipts(rows)

    def _features(self, rows: list[_Row], vm_time: list[float]) -> dict[int, tuple[dict[int, int], torch.Tensor]]:
        """Trunk features of every row's current state, one batched pass per trunk:
        {trunk id: ({row: feature row}, features)}. Each cache is brought up to the row's tokens."""
        feats: dict[int, tuple[dict[int, int], torch.Tensor]] = {}
        for tid, trunk in self.trunks.items():
            sel, caches, news = [], [], []
            for r, row in enumerate(rows):
                cache = row.caches.get(tid)
                if cache is None:
                    continue
                toks = row.tokens()
                if not len(toks):  # no known token (prompt given as embeddings): no value for this row
                    continue
                n = cache.length
                if n > len(toks) or (n and cache.tokens[n - 1] != toks[n - 1]):
                    cache.truncate(cache.common_prefix(list(toks)))
                if cache.length == len(toks):  # nothing new (e.g. a repeated step): redo the last token
                    cache.truncate(len(toks) - 1)
                sel.append(r)
                caches.append(cache)
                news.append(list(toks[cache.length:]))
            if not caches:
                continue
            t0 = time.perf_counter()
            h = trunk.features(caches, news)
            dt = time.perf_counter() - t0
            total = sum(len(x) for x in news)
            for r, x in zip(sel, news):
                vm_time[r] += dt * len(x) / total
            feats[tid] = ({r: j for j, r in enumerate(sel)}, h)
        return feats

    def _adjustments(self, rows: list[_Row], feats, topi: torch.Tensor, valid: torch.Tensor,
                     vm_time: list[float]) -> torch.Tensor:
        """sum_i beta * w_i * (V_i - mean over the valid candidates), one head pass per value model."""
        dev = topi.device
        adj = torch.zeros(topi.shape, dtype=torch.float32, device=dev)
        nvalid = valid.sum(-1).clamp(min=1).to(torch.float32)
        for name, vm in self.value_models.items():
            tid = self.trunk_of[name]
            if tid not in feats:
                continue
            pos, h = feats[tid]
            sel = [r for r in range(len(rows)) if r in pos and rows[r].params.beta != 0.0
                   and rows[r].params.weights.get(name, 0.0) != 0.0]
            if not sel:
                continue
            t0 = time.perf_counter()
            sel_t = torch.tensor(sel, device=dev, dtype=torch.long)
            hs = h[torch.tensor([pos[r] for r in sel], device=h.device, dtype=torch.long)]
            vals = vm.values(hs, topi.index_select(0, sel_t)).to(dev, torch.float32)
            ok = valid.index_select(0, sel_t)
            mean = torch.where(ok, vals, torch.zeros_like(vals)).sum(-1) / nvalid.index_select(0, sel_t)
            coef = torch.tensor([rows[r].params.beta * rows[r].params.weights[name] for r in sel],
                                device=dev, dtype=torch.float32)
            adj.index_add_(0, sel_t, coef[:, None] * (vals - mean[:, None]))
            dt = (time.perf_counter() - t0) / len(sel)
            for r in sel:
                vm_time[r] += dt
        return adj

    def _write_receipts(self, rows: Sequence[_Row]) -> None:
        seen: set[int] = set()
        for row in rows:
            st = row.stats
            rid = row.params.request_id
            if rid is not None and self.stats_dir is not None and id(st) not in seen:
                seen.add(id(st))
                try:
                    _atomic_write_json(self.stats_dir / f"{_safe_name(rid)}.json", st.as_dict())
                except OSError as exc:  # a receipt must never break decoding
                    logger.warning("VAS: cannot write stats for %s: %s", rid, exc)


def _kl(new_top: torch.Tensor, logp_base: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """KL(p_aligned || p_base) per row at temperature 1, on the support of p_aligned (the top-k)."""
    logp_al = torch.log_softmax(new_top, dim=-1)
    p_al = logp_al.exp()
    terms = torch.where(valid & (p_al > 0), p_al * (logp_al - logp_base), torch.zeros_like(p_al))
    return terms.sum(-1).clamp(min=0.0).tolist()


def _eos_ids(vllm_config: Any) -> list[int]:
    """The model's EOS token ids (where a failed request is stopped)."""
    if vllm_config is None:
        return []
    ids = getattr(vllm_config.model_config.hf_config, "eos_token_id", None)
    gen = getattr(vllm_config.model_config, "try_get_generation_config", None)
    if callable(gen):
        try:
            ids = gen().get("eos_token_id", ids) or ids
        except Exception:  # noqa: BLE001 - the hf config's id is enough
            pass
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return [int(t) for t in ids if isinstance(t, int)]


def load_core(vllm_config: Any, device: torch.device, *, value_models: Mapping[str, Any] | None = None,
              stats_dir: str | os.PathLike | None = None, parked_requests: int = DEFAULT_PARKED,
              eos_token_ids: Sequence[int] | None = None) -> SteeringCore:
    """The core from injected value models (tests), or from ``ALIGNSERVE_VAS_CONFIG`` (the engine);
    value models run on ``device`` (the engine's first device), in the engine's dtype unless the
    config says otherwise."""
    stats = Path(stats_dir) if stats_dir is not None else None
    if value_models is None:
        cfg = vas_config_from_env() or {}
        if cfg.get("stats_dir") and stats is None:
            stats = Path(cfg["stats_dir"])
        parked_requests = int(cfg.get("parked_requests", parked_requests))
        value_models = _load_value_models(cfg, vllm_config, device)
    eos = list(eos_token_ids) if eos_token_ids is not None else _eos_ids(vllm_config)
    return SteeringCore(value_models, stats_dir=stats, parked_capacity=parked_requests, eos_token_ids=eos)


def _load_value_models(cfg: Mapping[str, Any], vllm_config: Any, device: torch.device) -> dict[str, Any]:
    dirs = dict(cfg.get("value_models") or {})
    if not dirs:
        return {}
    base = cfg.get("base_model")
    if base is None:
        if vllm_config is None:
            raise ValueError(f"{VAS_CONFIG_ENV}: no base_model and no vllm_config to take it from")
        base = vllm_config.model_config.model
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        cfg.get("dtype", "float32")]
    from decoders.value_model import load_value_models

    t0 = time.perf_counter()
    vms = load_value_models(dirs, base, dtype=dtype, device=device)
    for vm in vms.values():
        vm.candidate_table()  # build now, not during the first steered step
    logger.info("VAS: loaded value models %s (trunk %s layers, %s on %s) in %.1fs", sorted(vms),
                sorted({vm.trunk.num_layers for vm in vms.values()}), dtype, device, time.perf_counter() - t0)
    return vms


def _validate(sampling_params: Any) -> None:
    extra = getattr(sampling_params, "extra_args", None)
    if not extra or not isinstance(extra.get("alignserve"), Mapping) or "vas" not in extra["alignserve"]:
        return
    cfg = vas_config_from_env()
    parse_vas_params(extra, set((cfg or {}).get("value_models") or {}))


# ----------------------------------------------------------------------------------------------
# Model Runner V1: rows are requests, moved around by BatchUpdate
# ----------------------------------------------------------------------------------------------

class VASLogitsProcessor(LogitsProcessor):
    """vLLM V1-runner logits processor for value-augmented sampling (see the module docstring)."""

    def __init__(self, vllm_config: Any = None, device: torch.device | str | None = None,
                 is_pin_memory: bool = False, *, value_models: Mapping[str, Any] | None = None,
                 stats_dir: str | os.PathLike | None = None, parked_requests: int = DEFAULT_PARKED,
                 eos_token_ids: Sequence[int] | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.core = load_core(vllm_config, self.device, value_models=value_models, stats_dir=stats_dir,
                              parked_requests=parked_requests, eos_token_ids=eos_token_ids)
        self.value_models = self.core.value_models
        self._rows: dict[int, _Row] = {}

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        _validate(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            self._drop(index)  # an added request may replace one at the same index
            try:
                vp = parse_vas_params(getattr(params, "extra_args", None), set(self.value_models))
            except ValueError:  # validate_params rejected it at admission; never steer garbage
                vp = None
            if vp is not None:
                prompt = list(prompt_ids or [])
                output = output_ids if output_ids is not None else []
                self._rows[index] = self.core.new_row(vp, _live_tokens(prompt, output), len(prompt))
        for a, b, direction in batch_update.moved:
            ra = self._rows.pop(a, None)
            rb = self._rows.pop(b, None)
            if ra is not None:
                self._rows[b] = ra
            if rb is not None:
                if direction == MoveDirectionality.SWAP:
                    self._rows[a] = rb
                else:  # a one-way move overwrote b
                    self.core.release(rb)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = sorted((i, r) for i, r in self._rows.items() if i < logits.shape[0])
        if not rows:
            return logits
        return self.core.steer(logits, rows)

    def _drop(self, index: int) -> None:
        row = self._rows.pop(index, None)
        if row is not None:
            self.core.release(row)

    # -- introspection (tests, benchmarks) ---------------------------------------------------------

    def row_state(self, index: int) -> _Row | None:
        return self._rows.get(index)

    @property
    def num_vas_rows(self) -> int:
        return len(self._rows)

    @property
    def last_step_s(self) -> float:
        return self.core.last_step_s


# ----------------------------------------------------------------------------------------------
# Model Runner V2: rows are logits rows, state lives in recycled request slots
# ----------------------------------------------------------------------------------------------

class _SlotTokens(Sequence[int]):
    """The tokens of a V2 request slot as seen at this step: the committed history
    ``all_token_ids[slot, :pos]`` followed by the token fed at ``pos`` (the row's input token),
    read from the device only where the value-model cache needs them."""

    def __init__(self, history: torch.Tensor, pos: int, last: int):
        self.history, self.pos, self.last = history, pos, last

    def __len__(self) -> int:
        return self.pos + 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return list(self)[i]
            out = self.history[start:min(stop, self.pos)].tolist() if start < self.pos else []
            return out + ([self.last] if stop > self.pos >= start else [])
        if i < 0:
            i += len(self)
        if not 0 <= i <= self.pos:
            raise IndexError(i)
        return self.last if i == self.pos else int(self.history[i])


class VASLogitsProcessorV2(LogitsProcessorV2):
    """vLLM Model Runner V2 logits processor for value-augmented sampling, on the same core.

    State is per request slot (recycled through vLLM's free list; ``add_request`` re-initializes a
    slot); ``apply`` sees logits *rows* (``ctx.expanded_idx_mapping``: row -> slot). A request's
    tokens are read from the runner's ``req_states`` (committed history) and ``ctx`` (this step's
    input token and position). A request that leaves the batch keeps its slot's caches until the
    slot is reused or it has been absent for ``idle_steps`` steps; then they are parked (a preempted
    request re-added in another slot resumes from them). Speculative decoding (several rows per
    request) is refused at engine start."""

    def __init__(self, vllm_config: Any, req_states: Any, *, value_models: Mapping[str, Any] | None = None,
                 stats_dir: str | os.PathLike | None = None, parked_requests: int = DEFAULT_PARKED,
                 eos_token_ids: Sequence[int] | None = None, idle_steps: int = 64):
        if vllm_config is not None and getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("value-augmented sampling does not support speculative decoding")
        self.req_states = req_states
        self.device = torch.device(req_states.device)
        self.core = load_core(vllm_config, self.device, value_models=value_models, stats_dir=stats_dir,
                              parked_requests=parked_requests, eos_token_ids=eos_token_ids)
        self.value_models = self.core.value_models
        self.idle_steps = idle_steps
        self._pending: dict[int, SteerParams] = {}     # slot -> params, row built at its first apply
        self._slots: dict[int, _Row] = {}
        self._seen: dict[int, int] = {}               # slot -> the step it was last in the batch
        self._step = 0

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        _validate(sampling_params)

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        self._free(req_idx)
        try:
            vp = parse_vas_params(getattr(sampling_params, "extra_args", None), set(self.value_models))
        except ValueError:  # validate_params rejected it at admission; never steer garbage
            vp = None
        if vp is None:
            return False
        # The slot's tokens are written to req_states after this call: build the row at first use.
        self._pending[req_idx] = vp
        return True

    def apply(self, logits: torch.Tensor, ctx: Any) -> torch.Tensor:
        self._step += 1
        if not self._slots and not self._pending:
            return logits
        slots = ctx.expanded_idx_mapping.tolist()
        mine = [(row, slot) for row, slot in enumerate(slots) if slot in self._slots or slot in self._pending]
        for slot in set(slots):
            self._seen[slot] = self._step
        self._park_idle()
        if not mine:
            return logits
        idx = torch.tensor([r for r, _ in mine], device=ctx.pos.device, dtype=torch.long)
        pos = ctx.pos.index_select(0, idx).tolist()
        last = ctx.input_ids.index_select(0, idx).tolist()
        prompt_len = self.req_states.prompt_len.np
        rows = []
        for (r, slot), p, t in zip(mine, pos, last):
            tokens = _SlotTokens(self.req_states.all_token_ids.gpu[slot], int(p), int(t))
            row = self._slots.get(slot)
            if row is None:
                row = self._resume(self._pending.pop(slot), tokens, int(prompt_len[slot]))
                self._slots[slot] = row
            row.tokens = (lambda tk=tokens: tk)
            rows.append((r, row))
        return self.core.steer(logits, rows)

    def _resume(self, vp: SteerParams, tokens: Sequence[int], prompt_len: int) -> _Row:
        """A new row; a request re-added after preemption takes over the caches of its old slot."""
        for slot, old in list(self._slots.items()):
            if vp.request_id is not None and old.params.request_id == vp.request_id:
                self._free(slot)  # parks its caches under the request id, which new_row picks up
        return self.core.new_row(vp, lambda: tokens, prompt_len)

    def _free(self, slot: int) -> None:
        self._pending.pop(slot, None)
        self._seen.pop(slot, None)
        row = self._slots.pop(slot, None)
        if row is not None:
            self.core.release(row)

    def _park_idle(self) -> None:
        for slot in [s for s in self._slots if self._step - self._seen.get(s, self._step) > self.idle_steps]:
            self._free(slot)

    @property
    def num_vas_rows(self) -> int:
        return len(self._slots) + len(self._pending)


def processor_for_runner(use_v2_model_runner: bool) -> type:
    """The VAS processor class for the model runner vLLM will use."""
    return VASLogitsProcessorV2 if use_v2_model_runner else VASLogitsProcessor
