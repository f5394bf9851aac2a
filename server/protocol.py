"""The OpenAI-compatible wire format, plus one namespaced extension: ``alignment``.

Request models mirror OpenAI's schema field by field (fields we do not implement are left out,
and unknown top-level fields are ignored as OpenAI and vLLM do). Their JSON schema (what
``GET /openapi.json`` shows) lists the fields in OpenAI's order: the required ones first
(``messages``, ``model`` for chat; ``model``, ``prompt`` for completions), then the optional ones
alphabetically, as OpenAI's reference does, then our extension ``alignment``.

``alignment`` is one of the registered methods' params (decoders/registry.py), chosen by its
``method`` (default ``none``): a discriminated union, validated strictly by the method's own model
(unknown keys, or a knob the chosen method does not take, are 400s naming the field, e.g.
``alignment.top_k``). A request converts itself into engine parameters (``to_sampling_params``),
each value taken in the order: user value -> server default -> OpenAI default.

Responses are typed too: completion, chunk, usage and logprob shapes, with the method's receipt
(decoders/base.py ``Receipt``) as ``alignment``.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, SerializeAsAny, StringConstraints, Tag,
                      TypeAdapter, ValidationError, field_serializer, field_validator)

from decoders import registry
from decoders.base import Bool, Float, Int, MethodParams, ParamError, Receipt, Text, TokenLogprob, finite, int_in
from decoders.rewards import MAX_CAP
from server.config import LimitsConfig

# ----------------------------------------------------------------------------- alignment


def _method_of(v: Any) -> str:
    if isinstance(v, dict):
        return v.get("method", "none")
    return getattr(v, "method", "none")


def _drop_nulls(v: Any) -> Any:
    """``null`` means "the default", as in OpenAI's API: a knob sent as null is as if not sent."""
    if isinstance(v, dict):
        return {k: x for k, x in v.items() if x is not None}
    return v


def alignment_type(methods: dict[str, type] | None = None) -> Any:
    """The ``alignment`` type: the registered methods' params, discriminated by ``method``."""
    methods = methods if methods is not None else registry.methods()
    variants = tuple(Annotated[cls.Params, Tag(name)] for name, cls in methods.items())
    union = Union[variants] if len(variants) > 1 else variants[0]  # type: ignore[valid-type]
    return Annotated[union, Discriminator(_method_of), BeforeValidator(_drop_nulls)]


AlignmentParams = alignment_type()
_ALIGNMENT = TypeAdapter(AlignmentParams)


def parse_alignment(data: Any) -> MethodParams:
    """Validate an ``alignment`` object on its own (raises pydantic's ValidationError)."""
    return _ALIGNMENT.validate_python(data)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "list[str]", "list[int]"})


def error_param(loc: tuple | list) -> str | None:
    """The request parameter of a pydantic error location, as the API names it: ``body`` and the
    union tags (``str``, ``function-after[...]``, the method name under ``alignment``) dropped."""
    out: list[str] = []
    for i, part in enumerate(loc):
        p = str(part)
        if (i == 0 and p == "body") or "[" in p or p in _UNION_TAGS:
            continue
        if out and out[-1] == "alignment" and p in registry.methods():
            continue
        out.append(p)
    return ".".join(out) or None


def describe_error(err: dict[str, Any]) -> tuple[str | None, str]:
    """(param, message) of one pydantic validation error, as the API reports it."""
    param = error_param(err.get("loc", ()))
    msg = err.get("msg", "invalid request")
    loc = [str(p) for p in err.get("loc", ())]
    if err.get("type") == "union_tag_invalid" and (param or "").endswith("alignment"):
        given = err.get("input", {}).get("method") if isinstance(err.get("input"), dict) else None
        return f"{param}.method", f"unknown method {given!r}; methods: {', '.join(registry.methods())}"
    if err.get("type") == "extra_forbidden" and "alignment" in loc:
        i = loc.index("alignment")
        if i + 2 < len(loc) and loc[i + 1] in registry.methods():
            method, knob = loc[i + 1], loc[i + 2]
            takes = [f for f in registry.methods()[method].Params.model_fields if f != "method"]
            return param, f"`{knob}` is not a parameter of method '{method}' (it takes: {', '.join(takes) or 'nothing'})"
    if err.get("type") == "missing":
        return param, f"missing required parameter: {param}" if param else "request body is missing"
    return param, f"{param}: {msg}" if param else msg


# ----------------------------------------------------------------------------- requests

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Bool | None = False


class TextPart(BaseModel):
    """A content part of a message: text only (images, audio and files are refused)."""
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def _openai_order(schema: dict[str, Any], cls: type) -> None:
    """JSON schema properties in OpenAI's order: required first, optional alphabetically, `alignment` last."""
    props = schema.get("properties", {})
    head = [f for f in getattr(cls, "REQUIRED_ORDER", ()) if f in props]
    rest = sorted(f for f in props if f not in head and f != "alignment")
    order = head + rest + (["alignment"] if "alignment" in props else [])
    schema["properties"] = {f: props[f] for f in order}


# Longest stop string (characters): every step checks each against the tail of the text.
MAX_STOP_CHARS = 256
StopString = Annotated[Text, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
TokenId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")]   # logit_bias keys, as OpenAI sends them
Bias = Annotated[Float, Field(ge=-100.0, le=100.0)]


def _refuse_unless(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class _SamplingRequest(BaseModel):
    """Fields shared by chat and completions, with their OpenAI defaults noted.

    What OpenAI clients send is taken, or refused with a 400 naming the field where honoring it is
    not possible (tools, structured output, audio): never silently dropped when it changes the answer.
    Fields that do not (``metadata``, ``store``, ``service_tier``, ``prompt_cache_key``,
    ``safety_identifier``, ``user``) are accepted and ignored; unknown fields are ignored as OpenAI does.
    """
    model_config = ConfigDict(extra="ignore", json_schema_extra=_openai_order)

    model: Text
    frequency_penalty: Float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[TokenId, Bias] | None = Field(default=None, max_length=300,
                                                   description="token id -> bias in [-100, 100]")
    logprobs: Any = None
    max_tokens: int_in(ge=1) | None = None
    metadata: dict[Text, Text] | None = None
    n: int_in(ge=1) | None = None
    presence_penalty: Float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int_in(ge=-(2**63), le=2**63 - 1) | None = None
    service_tier: Text | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    store: Bool | None = None
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Float | None = Field(default=None, gt=0.0, le=1.0)
    user: Text | None = Field(default=None, max_length=256)
    # The one namespaced extension.
    alignment: AlignmentParams | None = None  # type: ignore[valid-type]

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
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("temperature", "top_p", "frequency_penalty", "presence_penalty")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        return finite(v)

    @field_validator("alignment", mode="before")
    @classmethod
    def _default_method(cls, v: Any) -> Any:
        return {} if v is None else v

    # Overridden by each request type.
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        raise NotImplementedError

    @property
    def method(self) -> str:
        return self.params.method

    @property
    def params(self) -> MethodParams:
        """The method's params (a request without ``alignment`` is method ``none`` with its defaults)."""
        return self.alignment if self.alignment is not None else parse_alignment({})

    def check_limits(self, limits: LimitsConfig) -> None:
        """Server-side ranges (configurable, see LimitsConfig). Raises ParamError naming the field."""
        max_tokens = self.requested_max_tokens()
        if max_tokens is not None and max_tokens > limits.max_tokens:
            param = "max_completion_tokens" if getattr(self, "max_completion_tokens", None) else "max_tokens"
            raise ParamError(f"{param} must be <= {limits.max_tokens}, got {max_tokens}", param=param)
        if (self.n or 1) > limits.max_n:
            raise ParamError(f"n must be <= {limits.max_n}", param="n")
        if (self.n or 1) > 1 and self.temperature == 0 and self.method != "best_of_n":
            raise ParamError("n > 1 needs temperature > 0 (greedy decoding gives n identical choices)", param="n")
        self.params.check(limits)

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
        if self.logit_bias:
            params["logit_bias"] = {int(k): float(b) for k, b in self.logit_bias.items()}
        k = self.num_logprobs()
        if k is not None:
            params["logprobs"] = k
        return params


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        _refuse_unless(v == "text", f"response_format of type {v!r} is not supported (structured output would "
                                    f"constrain decoding, which the alignment methods do not); use 'text'")
        return v


class ChatCompletionRequest(_SamplingRequest):
    REQUIRED_ORDER: ClassVar[tuple[str, ...]] = ("messages", "model")  # the schema's order (_openai_order)
    messages: list[ChatMessage] = Field(min_length=1)
    audio: dict[str, Any] | None = None
    function_call: Any = None
    functions: list[dict[str, Any]] | None = None
    logprobs: Bool | None = False
    max_completion_tokens: int_in(ge=1) | None = None
    modalities: list[Text] | None = None
    parallel_tool_calls: Bool | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_key: Text | None = None
    reasoning_effort: Text | None = None
    response_format: ResponseFormat | None = None
    safety_identifier: Text | None = None
    tool_choice: Any = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: int_in(ge=0, le=20) | None = None
    verbosity: Text | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, v: int | None, info) -> int | None:
        # `logprobs` is validated before `top_logprobs` (field order), so it is in `info.data`.
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs: true")
        return v

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: list | None, info) -> list | None:
        _refuse_unless(not v, f"{info.field_name} (function calling) is not supported by this server")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v: Any, info) -> Any:
        _refuse_unless(v in (None, "none", "auto"), f"{info.field_name} {v!r} needs function calling, which this "
                                                     f"server does not support; omit it or use 'none'")
        return v

    @field_validator("modalities")
    @classmethod
    def _text_out(cls, v: list[str] | None) -> list[str] | None:
        _refuse_unless(v is None or set(v) <= {"text"}, "only the 'text' modality is supported")
        return v

    @field_validator("audio")
    @classmethod
    def _no_audio(cls, v: Any) -> Any:
        _refuse_unless(v is None, "audio output is not supported")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (``developer`` is the newer name of ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def check_limits(self, limits: LimitsConfig) -> None:
        if len(self.messages) > limits.max_messages:
            raise ParamError(f"at most {limits.max_messages} messages (limits.max_messages)", param="messages")
        super().check_limits(limits)


class CompletionRequest(_SamplingRequest):
    """OpenAI's (legacy) completions, as lm-evaluation-harness and vLLM's clients use them: one prompt
    or a batch (``string[]``, token ids ``int[]`` or ``int[][]``: choice ``i * n + j`` is prompt i's
    j-th), and ``echo`` (the prompt is part of the answer, with its log-probs when ``logprobs`` is
    set: ``max_tokens: 0`` scores a text without generating, how lm-eval scores choices)."""
    REQUIRED_ORDER: ClassVar[tuple[str, ...]] = ("model", "prompt")  # the schema's order (_openai_order)
    prompt: Text | list[Text] | list[Int] | list[list[Int]] = Field(...)
    best_of: int_in(ge=1) | None = None
    echo: Bool | None = False
    logprobs: int_in(ge=0, le=5) | None = None
    max_tokens: int_in(ge=0) | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("token-id prompts must not be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: Any) -> Any:
        _refuse_unless(not v, "suffix (insertion) is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info) -> int | None:
        _refuse_unless(v is None or v == 1 or v == (info.data.get("n") or 1),
                       "best_of > n is not supported here: use alignment {\"method\": \"best_of_n\", \"n\": ...} "
                       "with a reward mixture")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt as text or as token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def check_limits(self, limits: LimitsConfig) -> None:
        if self.max_tokens == 0 and not self.echo:
            raise ParamError("max_tokens 0 generates nothing: it needs echo (to score the prompt)", param="max_tokens")
        if len(self.prompts()) > limits.max_prompts:
            raise ParamError(f"at most {limits.max_prompts} prompts per request (limits.max_prompts)", param="prompt")
        super().check_limits(limits)


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


def _clamp(lp: float) -> float:
    return max(lp, -9999.0)  # OpenAI's floor for -inf (JSON has no infinity)


class TopLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int]

    @classmethod
    def of(cls, token: str | None, logprob: float) -> "TopLogprobEntry":
        token = token or ""
        return cls(token=token, logprob=_clamp(logprob), bytes=list(token.encode("utf-8")))


class ChatLogprobEntry(TopLogprobEntry):
    top_logprobs: list[TopLogprobEntry]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobEntry]

    @classmethod
    def of(cls, records: list[TokenLogprob], k: int) -> "ChatLogprobs":
        entries = []
        for r in records:
            top = [TopLogprobEntry.of(t.token, t.logprob) for t in r.top[:k]]
            base = TopLogprobEntry.of(r.token, r.logprob)
            entries.append(ChatLogprobEntry(token=base.token, logprob=base.logprob, bytes=base.bytes, top_logprobs=top))
        return cls(content=entries)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    @classmethod
    def of(cls, records: list[TokenLogprob], k: int, start_offset: int = 0) -> "CompletionLogprobs":
        """From token records; a record without a log-prob (the first prompt token under ``echo``) is null."""
        tokens = [r.token or "" for r in records]
        offsets, pos = [], start_offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return cls(tokens=tokens, text_offset=offsets,
                   token_logprobs=[None if r.logprob is None else _clamp(r.logprob) for r in records],
                   top_logprobs=[None if r.logprob is None else {t.token or "": _clamp(t.logprob) for t in r.top[:k]}
                                 for r in records])


class _WithReceipt(BaseModel):
    # The method's receipt (its own subclass: serialized with its fields, None fields left out).
    alignment: SerializeAsAny[Receipt] | None = None

    @field_serializer("alignment")
    def _receipt(self, r: Receipt | None) -> dict[str, Any] | None:
        return None if r is None else r.wire()

    def body(self) -> dict[str, Any]:
        """The JSON body, OpenAI's fields first; ``alignment`` last, where the method produced a receipt."""
        d = self.model_dump()
        receipt = d.pop("alignment", None)
        if receipt is not None:
            d["alignment"] = receipt
        return d


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_WithReceipt):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_WithReceipt):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_WithReceipt):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_WithReceipt):
    """A streamed completion chunk (OpenAI streams ``text_completion`` objects)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "alignserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class MethodCard(BaseModel):
    """A registered method, as GET /v1/alignment/objectives lists it."""
    name: str
    summary: str
    streams: str
    knobs: dict[str, Any]


def method_cards() -> list[MethodCard]:
    cards = []
    for name, cls in registry.methods().items():
        knobs = {f: (None if info.is_required() else info.get_default(call_default_factory=True))
                 for f, info in cls.Params.model_fields.items() if f != "method"}
        cards.append(MethodCard(name=name, summary=cls.summary, streams=cls.streams, knobs=knobs))
    return cards


# ----------------------------------------------------------------------------- the served schema

_REGISTERED: dict[str, Any] = {"objectives": [], "baselines": [], "limits": None}


def register_names(objectives: list[str], baselines: list[str], limits: LimitsConfig | None = None) -> None:
    """What this server registered (set by the ingress): the OpenAPI schema lists them, so clients
    (and the schema fuzzer) see which objectives and baselines a request may name, and its ranges."""
    _REGISTERED["objectives"] = sorted(objectives)
    _REGISTERED["baselines"] = sorted(baselines)
    _REGISTERED["limits"] = limits


def _bound(prop: dict[str, Any], maximum: float) -> None:
    """Set ``maximum`` on a property's number schema (plain or inside anyOf)."""
    for option in prop.get("anyOf", [prop]):
        if option.get("type") in ("integer", "number"):
            option["maximum"] = maximum


# (request or params field, the LimitsConfig field bounding it)
_LIMITED = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "top_k": "max_top_k",
            "block": "max_block", "rollout_tokens": "max_rollout_tokens", "beta": "max_beta", "alpha": "max_alpha",
            "indirect_coef": "max_beta", "chunk_tokens": "max_tokens"}


def with_registered_names(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI schema with each method's ``weights`` / ``caps`` keys and ``baseline`` limited to
    the registered names, the server's configured ranges as maxima, caps within the mixture's range and
    ``method`` required where it is not the default (in place; returns it)."""
    objectives, baselines, limits = _REGISTERED["objectives"], _REGISTERED["baselines"], _REGISTERED["limits"]
    for name, comp in schema.get("components", {}).get("schemas", {}).items():
        props = comp.get("properties", {})
        if limits is not None:
            for field, limit in _LIMITED.items():
                if field in props:
                    _bound(props[field], getattr(limits, limit))
            if "n" in props:
                _bound(props["n"], limits.max_best_of_n if "method" in props else limits.max_n)
        if "method" not in props:
            continue
        if props["method"].get("const") != _method_of({}):
            # Without `method` an object is the default method's, so the others' objects must name theirs.
            comp["required"] = ["method", *[r for r in comp.get("required", []) if r != "method"]]
        weight = {"type": "number", "minimum": 0, **({"maximum": limits.max_weight} if limits else {})}
        if "weights" in props and objectives:
            props["weights"]["anyOf"] = [{"type": "object", "propertyNames": {"enum": objectives},
                                          "additionalProperties": weight}, {"type": "null"}]
        if "caps" in props and objectives:
            props["caps"]["anyOf"] = [{"type": "object", "propertyNames": {"enum": objectives},
                                       "additionalProperties": {"type": "number", "minimum": -MAX_CAP,
                                                                "maximum": MAX_CAP}}, {"type": "null"}]
        if "baseline" in props and baselines:
            props["baseline"]["anyOf"] = [{"type": "string", "enum": baselines}, {"type": "null"}]
    return schema


__all__ = ["AlignmentParams", "ChatCompletionRequest", "CompletionRequest", "ValidationError", "parse_alignment"]
