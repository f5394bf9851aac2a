"""The OpenAI-compatible wire format, plus one namespaced extension: ``alignment``.

Request models mirror OpenAI's schema field by field (fields we do not implement are left out,
and unknown top-level fields are ignored as OpenAI and vLLM do). Their JSON schema (what
``GET /openapi.json`` shows) lists the fields in OpenAI's order: the required ones first
(``messages``, ``model`` for chat; ``model``, ``prompt`` for completions), then the optional ones
alphabetically, as OpenAI's reference does, then our extension ``alignment``.
``alignment`` is validated strictly: unknown keys, unknown methods, or a knob that the chosen
method does not use are 400s naming the field (e.g. ``alignment.top_k``).

A request converts itself into engine parameters (``to_sampling_params``), each value taken
in the order: user value -> server default -> OpenAI default.
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator,
                      model_validator)

from server.config import LimitsConfig

# ----------------------------------------------------------------------------- text

def _valid_unicode(v: str) -> str:
    """JSON may carry lone surrogates (e.g. "\\ud800"), which are not text: the tokenizer and the
    UTF-8 encoder reject them, so reject them here, naming the field."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate escape)") from None
    return v


# Every request string the server reads (tokenizes, compares or echoes) has this type.
Text = Annotated[str, AfterValidator(_valid_unicode)]
# Numbers and booleans are taken as JSON sends them, like OpenAI's API does: no "5" for 5, no
# true for 1.0 (an int is still a valid float).
Int = StrictInt
Float = StrictFloat
Bool = StrictBool


# ----------------------------------------------------------------------------- alignment

METHODS = ("none", "best_of_n", "vas", "transfer_q", "args")
TRANSFORMS = ("raw", "standardize", "log_sigmoid")

# Which knobs each method reads. Anything else in `alignment` is a 400 naming the field.
_MIXTURE = {"weights", "transform", "caps"}
METHOD_FIELDS: dict[str, set[str]] = {
    # `none` may name a mixture: the answer is then scored and the receipt shows its rewards.
    "none": set(_MIXTURE),
    "best_of_n": _MIXTURE | {"n", "early_pruning", "chunk_tokens", "keep_fraction"},
    "vas": {"weights", "beta", "top_k"},
    "transfer_q": _MIXTURE | {"alpha", "top_k", "block", "rollout_tokens", "baseline", "transfer", "indirect_coef"},
    "args": _MIXTURE | {"alpha", "top_k", "block"},
}
# Methods that need a non-empty reward mixture.
REWARD_METHODS = {"best_of_n", "vas", "transfer_q", "args"}
# Best-of-N candidates when `alignment.n` is not given (server/methods.py generates `a.n or 4`).
BEST_OF_N_DEFAULT = 4


class AlignmentParams(BaseModel):
    """The `alignment` request extension (sent through the openai client's `extra_body`)."""
    model_config = ConfigDict(extra="forbid")

    method: Literal["none", "best_of_n", "vas", "transfer_q", "args"] = "none"
    # The reward mixture (shared by every method).
    weights: dict[Text, Float] | None = None
    transform: Literal["raw", "standardize", "log_sigmoid"] | None = None
    caps: dict[Text, Float] | None = None
    # best_of_n
    n: Int | None = Field(default=None, ge=1)
    early_pruning: Bool | None = None
    chunk_tokens: Int | None = Field(default=None, ge=1)
    keep_fraction: Float | None = Field(default=None, gt=0.0, le=1.0)
    # vas
    beta: Float | None = None
    # vas, transfer_q, args
    top_k: Int | None = Field(default=None, ge=1)
    # transfer_q, args
    alpha: Float | None = None
    block: Int | None = Field(default=None, ge=1)
    rollout_tokens: Int | None = Field(default=None, ge=0)
    baseline: Text | None = Field(default=None, max_length=128)
    transfer: Literal["auto", "direct", "indirect"] | None = None
    indirect_coef: Float | None = None

    @field_validator("weights", "caps")
    @classmethod
    def _finite_values(cls, v: dict[str, float] | None, info) -> dict[str, float] | None:
        if v is None:
            return v
        for key, value in v.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{info.field_name}.{key} must be a finite number")
        return v

    @field_validator("beta", "alpha", "indirect_coef")
    @classmethod
    def _finite(cls, v: float | None, info) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{info.field_name} must be a finite number")
        return v

    @field_validator("weights", "transform", "caps", "n", "early_pruning", "chunk_tokens", "keep_fraction", "beta",
                     "top_k", "alpha", "block", "rollout_tokens", "baseline", "transfer", "indirect_coef")
    @classmethod
    def _knob_belongs_to_method(cls, v: Any, info) -> Any:
        """A field validator (not a model validator) so that the error's `param` is the knob itself,
        e.g. `alignment.rollout_tokens`. `method` is declared first, so it is validated already
        (if it is invalid, that is the error reported)."""
        method = info.data.get("method")
        if v is not None and method is not None and info.field_name not in METHOD_FIELDS[method]:
            allowed = METHOD_FIELDS[method]
            raise ValueError(f"`{info.field_name}` is not a parameter of method '{method}' "
                             f"(it takes: {', '.join(sorted(allowed)) or 'nothing'})")
        return v

    def check_limits(self, limits: LimitsConfig) -> None:
        """Server-side ranges (configurable, see LimitsConfig). Raises BadRequest."""
        from server.errors import BadRequest

        def need(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise BadRequest(msg, param=f"alignment.{field}", code="invalid_value")

        for key, w in (self.weights or {}).items():
            need(0.0 <= w <= limits.max_weight, f"weights.{key}",
                 f"weight of '{key}' must be in [0, {limits.max_weight}], got {w}")
        if self.method in REWARD_METHODS:
            need(bool(self.weights) and any(w > 0 for w in self.weights.values()), "weights",
                 f"method '{self.method}' needs `weights` with at least one positive weight")
        if self.n is not None:
            need(self.n <= limits.max_best_of_n, "n", f"n must be <= {limits.max_best_of_n}")
        if self.top_k is not None:
            need(self.top_k <= limits.max_top_k, "top_k", f"top_k must be <= {limits.max_top_k}")
        if self.block is not None:
            need(self.block <= limits.max_block, "block", f"block must be <= {limits.max_block}")
        if self.rollout_tokens is not None:
            need(self.rollout_tokens <= limits.max_rollout_tokens, "rollout_tokens",
                 f"rollout_tokens must be <= {limits.max_rollout_tokens}")
        if self.beta is not None:
            need(0.0 <= self.beta <= limits.max_beta, "beta", f"beta must be in [0, {limits.max_beta}]")
        if self.alpha is not None:
            need(0.0 <= self.alpha <= limits.max_alpha, "alpha", f"alpha must be in [0, {limits.max_alpha}]")
        if self.chunk_tokens is not None:
            need(self.chunk_tokens <= limits.max_tokens, "chunk_tokens", f"chunk_tokens must be <= {limits.max_tokens}")


# ----------------------------------------------------------------------------- requests

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Bool | None = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[dict[str, Any]] | None = None
    name: Text | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                _valid_unicode(part["text"])
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


def _openai_order(schema: dict[str, Any], cls: type) -> None:
    """JSON schema properties in OpenAI's order: required first, optional alphabetically, `alignment` last."""
    props = schema.get("properties", {})
    head = [f for f in getattr(cls, "REQUIRED_ORDER", ()) if f in props]
    rest = sorted(f for f in props if f not in head and f != "alignment")
    order = head + rest + (["alignment"] if "alignment" in props else [])
    schema["properties"] = {f: props[f] for f in order}


class _SamplingRequest(BaseModel):
    """Fields shared by chat and completions, with their OpenAI defaults noted."""
    model_config = ConfigDict(extra="ignore", json_schema_extra=_openai_order)

    model: Text
    frequency_penalty: Float | None = Field(default=None, ge=-2.0, le=2.0)
    logprobs: Any = None
    max_tokens: Int | None = Field(default=None, ge=1)
    n: Int | None = Field(default=None, ge=1)
    presence_penalty: Float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: Int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: Text | list[Text] | None = None
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Float | None = Field(default=None, gt=0.0, le=1.0)
    user: Text | None = Field(default=None, max_length=256)
    # The one namespaced extension.
    alignment: AlignmentParams | None = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v: StreamOptions | None, info) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("temperature", "top_p", "frequency_penalty", "presence_penalty")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    # Overridden by each request type.
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        raise NotImplementedError

    @property
    def method(self) -> str:
        return self.alignment.method if self.alignment else "none"

    def check_limits(self, limits: LimitsConfig) -> None:
        from server.errors import BadRequest

        max_tokens = self.requested_max_tokens()
        if max_tokens is not None and max_tokens > limits.max_tokens:
            param = "max_completion_tokens" if getattr(self, "max_completion_tokens", None) else "max_tokens"
            raise BadRequest(f"{param} must be <= {limits.max_tokens}, got {max_tokens}", param=param,
                             code="invalid_value")
        if (self.n or 1) > limits.max_n:
            raise BadRequest(f"n must be <= {limits.max_n}", param="n", code="invalid_value")
        if (self.n or 1) > 1 and self.temperature == 0 and self.method != "best_of_n":
            raise BadRequest("n > 1 needs temperature > 0 (greedy decoding gives n identical choices)",
                             param="n", code="invalid_value")
        if self.alignment:
            self.alignment.check_limits(limits)
            candidates = self.alignment.n or BEST_OF_N_DEFAULT
            if self.alignment.method == "best_of_n" and (self.n or 1) > candidates:
                raise BadRequest(f"n ({self.n or 1}) must not exceed alignment.n, the number of candidates "
                                 f"({candidates})", param="alignment.n", code="invalid_value")

    def to_sampling_params(self, limits: LimitsConfig, prompt_tokens: int, max_model_len: int) -> dict[str, Any]:
        """vllm.SamplingParams kwargs: user value -> server default -> OpenAI default."""
        max_tokens = self.requested_max_tokens()
        if max_tokens is None:
            max_tokens = limits.default_max_tokens
        max_tokens = min(max_tokens, max(1, max_model_len - prompt_tokens))
        params: dict[str, Any] = {
            "n": self.n if self.n is not None else 1,
            "max_tokens": max_tokens,
            "temperature": self.temperature if self.temperature is not None else 1.0,
            "top_p": self.top_p if self.top_p is not None else 1.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "presence_penalty": self.presence_penalty or 0.0,
            "seed": self.seed,
            "stop": self.stop,
        }
        k = self.num_logprobs()
        if k is not None:
            params["logprobs"] = k
        return params


class ChatCompletionRequest(_SamplingRequest):
    REQUIRED_ORDER: ClassVar[tuple[str, ...]] = ("messages", "model")  # the schema's order (_openai_order)
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Bool | None = False
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    top_logprobs: Int | None = Field(default=None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, v: int | None, info) -> int | None:
        # `logprobs` is validated before `top_logprobs` (field order), so it is in `info.data`.
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs: true")
        return v

    @model_validator(mode="after")
    def _text_messages(self) -> "ChatCompletionRequest":
        for m in self.messages:
            m.text()
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class CompletionRequest(_SamplingRequest):
    REQUIRED_ORDER: ClassVar[tuple[str, ...]] = ("model", "prompt")  # the schema's order (_openai_order)
    prompt: Text | list[Text] | list[Int] = Field(...)
    echo: Bool | None = False
    logprobs: Int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
            if len(v) != 1:
                raise ValueError("batched prompts are not supported: send one prompt per request")
            return v[0]
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, v: Any, info) -> Any:
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v

    def num_logprobs(self) -> int | None:
        return self.logprobs


# ----------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: every 4xx/5xx this server produces has this shape."""
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "alignserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
