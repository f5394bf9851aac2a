"""What every alignment method is written against: the method contract, the handles it gets,
the events it emits and the receipt it ends with.

A **method** (``Method``) is one class in one file under ``decoders/``: its pydantic ``Params``
(the request's ``alignment`` object for that method: defaults, bounds, which knobs it takes), its
``cost`` (what admission control counts) and its ``decode`` (an async stream of ``Delta`` /
``Finish`` events that ends with a ``Receipt``). ``decoders/registry.py`` maps names to classes.

A method reaches the world only through its ``MethodContext``:
  * ``engine`` (``Engine``): the vLLM engine deployment, bound to this request (batched
    ``generate``, token-level ``stream``, the tokenizer's ``decode``/``encode``/``render_chat``);
  * ``scorer`` (``Scorer``): the reward deployment (objectives by name, batched);
  * ``objectives``, ``baselines``, ``value_models`` (what the server registered) and ``limits``.
In the server these are Ray Serve handles behind thin adapters (server/handles.py); in unit tests
they are small hand-written fakes with known outputs.

Errors a method raises are domain errors, never HTTP ones: ``ParamError`` (the request asks for
something this method cannot do; the server answers 400 naming ``param``) and
``AlignmentFailure`` (a reward or value model failed; 502, never an unaligned answer).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import (Annotated, Any, AsyncIterator, ClassVar, Mapping, NamedTuple, Protocol, Sequence, Union)

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, Strict, StrictBool,
                      StrictFloat)

# ----------------------------------------------------------------------------- errors


class ParamError(ValueError):
    """A request parameter a method cannot serve: the server answers 400 naming ``param``."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self):  # picklable across Ray with its fields
        return (_rebuild, (self.__class__, self.message, {"param": self.param, "code": self.code}))


class AlignmentFailure(RuntimeError):
    """A reward or value model failed (or timed out) while aligning an answer: the server answers
    502 with ``code`` and counts it under ``component`` (reward | value_model)."""

    def __init__(self, message: str, *, code: str = "reward_failed", component: str = "reward"):
        super().__init__(message)
        self.message = message
        self.code = code
        self.component = component

    def __reduce__(self):  # picklable across Ray with its fields
        return (_rebuild, (self.__class__, self.message, {"code": self.code, "component": self.component}))


def _rebuild(cls, message, kwargs):
    return cls(message, **kwargs)


# ----------------------------------------------------------------------------- wire-level value types

def valid_unicode(v: str) -> str:
    """JSON may carry lone surrogates (e.g. "\\ud800"), which are not text: the tokenizer and the
    UTF-8 encoder reject them, so reject them at validation, naming the field."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate escape)") from None
    return v


def json_integer(v: Any) -> Any:
    """An integer as JSON Schema has it: 5 or 5.0, never "5", true or 5.5."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be an integer")
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError("must be an integer")
        return int(v)
    return v


# Every request string the server reads (tokenizes, compares or echoes) has this type. Numbers and
# booleans are taken as JSON sends them, like OpenAI's API: no "5" for 5, no true for 1.0.
Text = Annotated[str, AfterValidator(valid_unicode)]
Int = Annotated[int, Strict(), BeforeValidator(json_integer)]


def int_in(ge: int | None = None, le: int | None = None) -> Any:
    """``Int`` within bounds (the bounds sit before the validator, so the JSON schema says
    ``minimum``/``maximum``)."""
    return Annotated[int, Field(ge=ge, le=le), Strict(), BeforeValidator(json_integer)]
Float = StrictFloat  # an int is still a valid float (pydantic's strict mode)
Bool = StrictBool


def finite(v: float | None) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


FiniteFloat = Annotated[Float, AfterValidator(finite)]


# ----------------------------------------------------------------------------- engine values

class TopLogprob(NamedTuple):
    id: int
    logprob: float
    token: str | None


@dataclass
class TokenLogprob:
    """One token's log-prob record, from the engine to the renderer (raw logprobs, before any logits
    processor, as vLLM returns them); ``top`` is the top candidates, most likely first. A prompt's
    first token has none (``logprob`` None)."""
    id: int
    logprob: float | None
    token: str | None
    top: list[TopLogprob]

    def as_map(self) -> dict[int, float]:
        """{token id: logprob} of the top candidates and the chosen token."""
        out = {t.id: t.logprob for t in self.top}
        if self.logprob is not None:
            out[self.id] = self.logprob
        return out


@dataclass
class Completion:
    """One sequence from the engine: finished (``generate``) or a delta of a running one (``stream``)."""
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    finish_reason: str | None = None          # "stop" | "length" | None (still running)
    logprobs: list[TokenLogprob] | None = None  # per generated token, when params["logprobs"] was set
    stop_reason: Any = None
    index: int = 0                             # the choice index (n > 1)

    def logprob_maps(self) -> list[dict[int, float]] | None:
        return None if self.logprobs is None else [lp.as_map() for lp in self.logprobs]


@dataclass
class StreamChunk:
    """One engine step of a streamed request: the deltas of its choices; on the first chunk the
    prompt's log-probs when ``prompt_logprobs`` was asked for; once a VAS choice finishes, its
    value-model statistics (``{index: VASStats dict}``)."""
    outputs: list[Completion]
    vas: dict[int, dict[str, Any]] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


class Engine(Protocol):
    """The base model, bound to one request (server: the engine deployment; tests: a fake)."""

    async def generate(self, prompts: list[list[int]], params: dict[str, Any]) -> list[list[Completion]]:
        """Run every prompt (token ids) with the same vllm.SamplingParams kwargs as one batch;
        per prompt, its ``n`` completions in index order."""
        ...

    def stream(self, prompt_ids: list[int], params: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        """Decode one prompt, one chunk per engine step."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def encode(self, text: str) -> list[int]: ...


class Scorer(Protocol):
    async def score(self, objectives: list[str], prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
        """Raw scores of each (prompt, response) pair for each named objective."""
        ...


# ----------------------------------------------------------------------------- events and receipts

@dataclass
class Delta:
    """New text of one choice (streamed as it comes)."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Finish:
    index: int
    reason: str | None


class _ReceiptPart(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RewardScore(_ReceiptPart):
    raw: float
    transformed: float


class ChoiceScores(_ReceiptPart):
    index: int
    rewards: dict[str, RewardScore] = {}
    mixed: float | None = None
    kl_estimate: float | None = None


class Cost(_ReceiptPart):
    """What an answer cost (receipt) or may cost at most (admission)."""
    candidates: int | None = None
    base_tokens: int | None = None
    steps: int | None = None
    rollouts: int | None = None
    rollout_tokens: int | None = None
    value_model_steps: int | None = None


class Timing(_ReceiptPart):
    generation_s: float | None = None
    scoring_s: float | None = None
    value_model_s: float | None = None


class Receipt(BaseModel):
    """The ``alignment`` object of a response: the method, the knobs it used (its params, at the top
    level), the mixture, per choice the raw/transformed score of each weighted objective and the
    mixed score, what it cost and where the time went. Methods subclass it for their own fields."""
    model_config = ConfigDict(extra="allow")

    method: str
    # The mixture, for methods that take one (the other knobs come as extra fields, from the params).
    weights: dict[str, float] | None = None
    transform: str | None = None
    caps: dict[str, float] | None = None
    choices: list[ChoiceScores] | None = None
    cost: Cost | None = None
    timing: Timing | None = None
    # best-of-N: returned answer minus the mean over the request's base candidates.
    reward_gain: dict[str, float] | None = None
    candidate_mean_mixed: float | None = None
    note: str | None = None
    # Seconds of alignment work (scoring, rollouts, value models): a metric, not part of the body.
    _added_latency_s: float = PrivateAttr(default=0.0)

    @property
    def added_latency_s(self) -> float:
        return self._added_latency_s

    def add_latency(self, seconds: float) -> None:
        self._added_latency_s += max(0.0, float(seconds))

    def wire(self) -> dict[str, Any]:
        """The JSON object: the method and its knobs first, then what happened (None fields left out)."""
        d = self.model_dump(exclude_none=True)
        tail = [k for k in ("choices", "cost", "timing", "reward_gain", "candidate_mean_mixed", "note") if k in d]
        return {**{k: v for k, v in d.items() if k not in tail}, **{k: d[k] for k in tail}}


Event = Union[Delta, Finish, Receipt]


# ----------------------------------------------------------------------------- a request, as a method sees it

@dataclass
class DecodeRequest:
    """One prompt of one API request, with its decoding parameters resolved."""
    prompt_ids: list[int]
    prompt_text: str
    # vllm.SamplingParams kwargs: n, max_tokens, temperature, top_p, seed, stop, penalties, logprobs
    sampling: dict[str, Any]
    messages: list[dict[str, Any]] | None = None   # chat requests: the messages (rollout contexts)
    stream: bool = False
    # Completions: the answer starts with the prompt (with its log-probs when `logprobs` is set).
    echo: bool = False

    @property
    def n(self) -> int:
        return int(self.sampling.get("n", 1))

    @property
    def max_tokens(self) -> int:
        return int(self.sampling["max_tokens"])


class Limits(Protocol):
    """The server's configured ranges a method checks its params against (server/config.py LimitsConfig)."""
    max_tokens: int
    max_best_of_n: int
    max_top_k: int
    max_rollout_tokens: int
    max_block: int
    max_weight: float
    max_beta: float
    max_alpha: float


@dataclass
class MethodContext:
    """The handles a method needs for one request."""
    engine: Engine
    scorer: Scorer
    objectives: Mapping[str, Any]                 # name -> decoders.rewards.Objective
    limits: Limits
    stop_token_ids: list[int] = field(default_factory=list)
    baselines: Mapping[str, Any] = field(default_factory=dict)   # name -> decoders.baselines.BaselineConfig
    value_models: frozenset[str] = frozenset()   # objectives the engine's VAS processor can steer
    render_chat: Any = None                       # messages -> prompt token ids (chat template)
    max_model_len: int = 2048                     # the engine's context (prompt + everything generated)


@dataclass
class DecodeStats:
    """What a search cost (the receipt's cost and timing)."""
    candidates: int = 0
    base_tokens: int = 0
    rollouts: int = 0
    rollout_tokens: int = 0
    steps: int = 0
    generation_s: float = 0.0
    scoring_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Budget:
    """What admission control counts for a request before it runs (upper bounds).

    ``sequences``: sequences in the engine at once (the concurrent budget, 429 past it);
    ``tokens``: tokens generated across candidates and rollouts, and ``scores``: texts scored by
    the reward models (the per-request work limits, 400 ``request_too_costly`` past them).
    ``knobs``: the request fields that set the cost, named in the 400.
    """
    sequences: int
    tokens: int
    scores: int = 0
    knobs: tuple[str, ...] = ("max_tokens",)

    def __add__(self, other: "Budget") -> "Budget":
        return Budget(self.sequences + other.sequences, self.tokens + other.tokens, self.scores + other.scores,
                      tuple(dict.fromkeys(self.knobs + other.knobs)))


# ----------------------------------------------------------------------------- the method contract

class MethodParams(BaseModel):
    """A method's ``alignment`` object. Subclasses declare ``method: Literal["<name>"]`` first, then
    their knobs with defaults and static bounds; ``check`` applies the server's configured ranges."""
    model_config = ConfigDict(extra="forbid")
    # Whether the method refuses a request without `weights` (a reward mixture).
    needs_weights: ClassVar[bool] = False

    method: str

    def check(self, limits: Limits) -> None:
        """Server-configured ranges (LimitsConfig); raise ParamError naming ``alignment.<field>``."""

    def knobs(self) -> dict[str, Any]:
        """What the receipt echoes: every knob, defaults included."""
        return self.model_dump(exclude={"method"}, exclude_none=True)


def need(ok: bool, field_name: str, message: str) -> None:
    """ParamError on ``alignment.<field_name>`` unless ``ok``."""
    if not ok:
        raise ParamError(message, param=f"alignment.{field_name}")


class Method(ABC):
    """One alignment method for one request. Subclasses set ``name``, ``Params``, ``summary`` and
    ``streams`` and implement ``budget`` and ``decode``; ``prepare`` may refuse the request (400)
    before it is admitted."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    summary: ClassVar[str] = ""
    # How the answer streams: "tokens" | "blocks" | "whole" (documentation and the objectives endpoint).
    streams: ClassVar[str] = "tokens"
    # Whether the method honors `echo` (completions); the server refuses echo for the others.
    echoes: ClassVar[bool] = False

    def __init__(self, params: MethodParams, request: DecodeRequest, ctx: MethodContext):
        self.params = params
        self.request = request
        self.ctx = ctx

    async def prepare(self) -> None:
        """Checks that need the request and the server's registries (raise ParamError), and work
        the method does once before it is admitted (its mixture, a rollout context)."""

    @abstractmethod
    def budget(self) -> Budget:
        """Upper bounds of what decoding this request may cost (admission control)."""

    @abstractmethod
    def decode(self) -> AsyncIterator[Event]:
        """Delta and Finish events per choice, then exactly one Receipt."""

    # -- helpers shared by methods -----------------------------------------------------------

    def receipt(self, cls: type[Receipt] = Receipt, **fields: Any) -> Receipt:
        """A receipt echoing the method's knobs (and its mixture, for reward methods)."""
        data: dict[str, Any] = {"method": self.name, **self.params.knobs()}
        data.update(fields)
        return cls(**data)
