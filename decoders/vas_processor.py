"""The engine side of value-augmented sampling (decoders/vas.py): a vLLM logits processor.

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
  after preemption, default 8). Without the env variable the processor is inert.
* Per request: ``SamplingParams.extra_args = {"alignserve": {"request_id": id, "vas": {"weights":
  {objective: w}, "beta": b, "top_k": k}}}``. Requests without ``"vas"`` are untouched.
* Receipt: after each step a VAS row was processed, ``<stats_dir>/<request_id>.json`` =
  ``{"kl": sum over steps of KL(p_aligned || p_base), "steps": n, "value_model_s": s,
  "objectives": [...]}`` with both distributions at temperature 1 (see docs/vas.md).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from decoders.vas import DEFAULT_BETA, DEFAULT_TOP_K

try:  # the processor base class and batch-update types come from vLLM when it is installed
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except Exception:  # pragma: no cover - vLLM-less installs can still import the helpers
    BatchUpdate = Any  # type: ignore[misc,assignment]

    class LogitsProcessor:  # type: ignore[no-redef]
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
    error: str | None = None  # set once a value model failed on this request: it is no longer steered

    def as_dict(self) -> dict[str, Any]:
        d = {"kl": float(self.kl), "steps": int(self.steps), "value_model_s": float(self.value_model_s),
             "objectives": list(self.objectives)}
        if self.error is not None:
            d["error"] = self.error
        return d


@dataclass
class _Row:
    params: SteerParams
    prompt: list[int]
    output: list[int]  # vLLM's live output list (it appends to it)
    stats: _Stats
    caches: dict[int, Any] = field(default_factory=dict)  # trunk id -> KVCache

    def tokens(self) -> list[int]:
        out = self.output
        n = len(out)
        while n and out[n - 1] < 0:  # async-scheduling placeholders (-1): not known yet
            n -= 1
        return self.prompt + (out[:n] if n != len(out) else list(out))


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
# The processor
# ----------------------------------------------------------------------------------------------

class VASLogitsProcessor(LogitsProcessor):
    """vLLM v1 logits processor for value-augmented sampling (see the module docstring)."""

    def __init__(self, vllm_config: Any = None, device: torch.device | str | None = None,
                 is_pin_memory: bool = False, *, value_models: Mapping[str, Any] | None = None,
                 stats_dir: str | os.PathLike | None = None, parked_requests: int = DEFAULT_PARKED):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.stats_dir: Path | None = Path(stats_dir) if stats_dir is not None else None
        self.parked_capacity = parked_requests
        if value_models is None:
            value_models = self._load_from_env(vllm_config)
        self.value_models: dict[str, Any] = dict(value_models)
        # Value models that share a trunk object share its features (one trunk pass per step).
        self._trunks: dict[int, Any] = {}
        self._trunk_of: dict[str, int] = {}
        for name, vm in self.value_models.items():
            tid = id(vm.trunk)
            self._trunks[tid] = vm.trunk
            self._trunk_of[name] = tid
        if self.stats_dir is not None:
            self.stats_dir.mkdir(parents=True, exist_ok=True)
        self._rows: dict[int, _Row] = {}
        self._stats: dict[str, _Stats] = {}
        self._parked: OrderedDict[str, list[dict[int, Any]]] = OrderedDict()
        self.last_step_s = 0.0  # wall time of the last apply() with VAS rows (benchmarks)

    def _load_from_env(self, vllm_config: Any) -> dict[str, Any]:
        cfg = vas_config_from_env()
        if not cfg:
            return {}
        if cfg.get("stats_dir") and self.stats_dir is None:
            self.stats_dir = Path(cfg["stats_dir"])
        self.parked_capacity = int(cfg.get("parked_requests", self.parked_capacity))
        dirs = dict(cfg.get("value_models") or {})
        if not dirs:
            return {}
        base = cfg.get("base_model")
        if base is None:
            if vllm_config is None:
                raise ValueError(f"{VAS_CONFIG_ENV}: no base_model and no vllm_config to take it from")
            base = vllm_config.model_config.model
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.get("dtype", "float32")]
        from decoders.value_model import load_value_models

        t0 = time.perf_counter()
        vms = load_value_models(dirs, base, dtype=dtype, device=self.device)
        for vm in vms.values():
            vm.candidate_table()  # build now, not during the first steered step
        logger.info("VAS: loaded value models %s (trunk %s layers) in %.1fs", sorted(vms),
                    sorted({vm.trunk.num_layers for vm in vms.values()}), time.perf_counter() - t0)
        return vms

    # -- vLLM interface ----------------------------------------------------------------------------

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        extra = getattr(sampling_params, "extra_args", None)
        if not extra or not isinstance(extra.get("alignserve"), Mapping) or "vas" not in extra["alignserve"]:
            return
        cfg = vas_config_from_env()
        available = set((cfg or {}).get("value_models") or {})
        parse_vas_params(extra, available)

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
                self._rows[index] = self._new_row(vp, prompt_ids, output_ids)
        for a, b, direction in batch_update.moved:
            ra = self._rows.pop(a, None)
            rb = self._rows.pop(b, None)
            if ra is not None:
                self._rows[b] = ra
            if rb is not None:
                if direction == MoveDirectionality.SWAP:
                    self._rows[a] = rb
                else:  # a one-way move overwrote b
                    self._release(rb)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        B = logits.shape[0]
        idxs = sorted(i for i in self._rows if i < B and self._rows[i].stats.error is None)
        if not idxs:
            return logits
        try:
            return self._steer(logits, idxs)
        except Exception as exc:  # noqa: BLE001 - a value-model fault must not kill the engine
            # The rows keep the base logits from here on and their receipts carry the error, so
            # the server answers with an explicit error instead of an answer presented as aligned.
            logger.exception("VAS: value models failed on a step of %d request(s)", len(idxs))
            message = f"{type(exc).__name__}: {exc}"[:300]
            for i in idxs:
                self._rows[i].stats.error = message
            self._write_receipts([self._rows[i] for i in idxs])
            return logits

    def _steer(self, logits: torch.Tensor, idxs: list[int]) -> torch.Tensor:
        t_start = time.perf_counter()
        rows = [self._rows[i] for i in idxs]
        R = len(rows)
        vm_time = [0.0] * R

        # 1. trunk features of every VAS row's current state, one batched pass per trunk
        feats: dict[int, tuple[dict[int, int], torch.Tensor]] = {}
        for tid, trunk in self._trunks.items():
            sel, caches, news = [], [], []
            for r, row in enumerate(rows):
                cache = row.caches.get(tid)
                if cache is None:
                    continue
                toks = row.tokens()
                if not toks:  # no known token (prompt given as embeddings): no value for this row
                    continue
                n = cache.length
                if n > len(toks) or (n and cache.tokens[n - 1] != toks[n - 1]):
                    cache.truncate(cache.common_prefix(toks))
                if cache.length == len(toks):  # nothing new (e.g. a repeated step): redo the last token
                    cache.truncate(len(toks) - 1)
                sel.append(r)
                caches.append(cache)
                news.append(toks[cache.length:])
            if not caches:
                continue
            t0 = time.perf_counter()
            h = trunk.features(caches, news)
            dt = time.perf_counter() - t0
            total = sum(len(x) for x in news)
            for r, x in zip(sel, news):
                vm_time[r] += dt * len(x) / total
            feats[tid] = ({r: j for j, r in enumerate(sel)}, h)

        # 2. base top-k of each row
        dev = logits.device
        contiguous = idxs[-1] == R - 1  # rows 0..R-1 (the common case): work on a view
        idx_t = None if contiguous else torch.tensor(idxs, device=dev, dtype=torch.long)
        base = logits[:R] if contiguous else logits.index_select(0, idx_t)
        if base.dtype != torch.float32:
            base = base.float()
        V = base.shape[1]
        ks = [min(row.params.top_k, V) for row in rows]
        kmax = max(ks)
        topv, topi = base.topk(kmax, dim=-1)
        # log p_base of the candidates (temperature 1) before the rows are overwritten
        logp_base = topv - torch.logsumexp(base, dim=-1, keepdim=True)
        valid = torch.arange(kmax, device=dev)[None, :] < torch.tensor(ks, device=dev)[:, None]
        valid &= torch.isfinite(topv)
        nvalid = valid.sum(-1).clamp(min=1).to(torch.float32)

        # 3. sum_i beta * w_i * (V_i - mean V_i) over the candidates, one head pass per value model
        adj = torch.zeros_like(topv)
        for name, vm in self.value_models.items():
            tid = self._trunk_of[name]
            if tid not in feats:
                continue
            pos, h = feats[tid]
            sel = [r for r in range(R) if r in pos and rows[r].params.beta != 0.0
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

        new_top = torch.where(valid, topv + adj, torch.tensor(float("-inf"), device=dev))

        # 4. KL(p_aligned || p_base) at temperature 1, on the support of p_aligned (the top-k)
        logp_al = torch.log_softmax(new_top, dim=-1)
        p_al = logp_al.exp()
        terms = torch.where(valid & (p_al > 0), p_al * (logp_al - logp_base), torch.zeros_like(p_al))
        kl = terms.sum(-1).clamp(min=0.0).tolist()

        # write the rows: -inf everywhere, then the adjusted top-k
        if contiguous:
            rows_view = logits[:R]
            rows_view.fill_(float("-inf"))
            rows_view.scatter_(1, topi, new_top.to(logits.dtype))
        else:
            new_rows = torch.full_like(base, float("-inf")).scatter_(1, topi, new_top)
            logits.index_copy_(0, idx_t, new_rows.to(logits.dtype))

        # 5. receipts
        for r, row in enumerate(rows):
            st = row.stats
            st.kl += kl[r]
            st.steps += 1
            st.value_model_s += vm_time[r]
        self._write_receipts(rows)
        self.last_step_s = time.perf_counter() - t_start
        return logits

    def _write_receipts(self, rows: list[_Row]) -> None:
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

    # -- state bookkeeping -------------------------------------------------------------------------

    def _new_row(self, vp: SteerParams, prompt_ids: list[int] | None, output_ids: list[int]) -> _Row:
        rid = vp.request_id
        stats = self._stats.get(rid) if rid is not None else None
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
                self._stats[rid] = stats
        stats.active += 1
        row = _Row(params=vp, prompt=list(prompt_ids or []), output=output_ids if output_ids is not None else [],
                   stats=stats)
        parked = self._parked.pop(rid, None) if rid is not None else None
        toks = row.tokens() if parked else None
        for name in (vp.objectives if vp.beta != 0.0 else []):  # beta 0: plain top-k, no value model
            tid = self._trunk_of[name]
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
            row.caches[tid] = cache if cache is not None else self._trunks[tid].new_cache(pool_from=len(row.prompt))
        return row

    def _drop(self, index: int) -> None:
        row = self._rows.pop(index, None)
        if row is not None:
            self._release(row)

    def _release(self, row: _Row) -> None:
        st = row.stats
        st.active -= 1
        rid = row.params.request_id
        if rid is not None and st.active <= 0 and self._stats.get(rid) is st:
            del self._stats[rid]
        if rid is not None and row.caches and self.parked_capacity > 0:
            entries = self._parked.pop(rid, [])
            entries.append(row.caches)
            self._parked[rid] = entries
            while len(self._parked) > self.parked_capacity:
                self._parked.popitem(last=False)

    # -- introspection (tests, benchmarks) ---------------------------------------------------------

    def row_state(self, index: int) -> _Row | None:
        return self._rows.get(index)

    @property
    def num_vas_rows(self) -> int:
        return len(self._rows)
