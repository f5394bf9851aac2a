"""The Ray Serve application: ``build_app`` is the one import_path (``server.app:build_app``)
for ``make serve``, ``serve run deploy/serve_config.yaml`` and the KubeRay RayService.

Deployments: ``OpenAIIngress`` (FastAPI, this file) -> ``EngineDeployment`` (vLLM AsyncLLM,
server/engine.py) and ``RewardDeployment`` (objectives, server/reward_service.py).
Each method turns a request into a stream of events (deltas, finishes, a receipt); the HTTP
layer renders those events as one JSON body or as SSE chunks, so every method streams.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import metrics
from server.config import LimitsConfig, ServerConfig
from server.events import Delta, Finish, Outcome
from server.errors import APIError, BadRequest, NotFound, Overloaded, ServerError, Timeout, Unauthorized
from server.handles import TimedRewards
from server.protocol import (BEST_OF_N_DEFAULT, ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelCard,
                             ModelList, new_id, now)

logger = logging.getLogger("ray.serve")

app = FastAPI(title="alignserve", version="0.1.0",
              description="OpenAI-compatible serving of a frozen base model, aligned per request.")


# ----------------------------------------------------------------------------- errors

def _rejected_reason(exc: APIError) -> str | None:
    """The `reason` label of alignserve_requests_rejected_total for an error answered by the
    handlers below; None where it is counted where it is raised (401 auth, 413 too_large,
    429 overload) or is not a refusal (timeouts, failures)."""
    if exc.status_code == 400:
        return "invalid"
    if exc.status_code == 404:
        return "not_found"
    if exc.code == "shutting_down":
        return "draining"
    return None


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    reason = _rejected_reason(exc)
    if reason is not None:
        method = getattr(request.state, "alignserve_method", None) or "unknown"
        metrics.REQUESTS_REJECTED.labels(method, reason).inc()
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # Drop pydantic's union/function tags (e.g. "function-after[...]", "str") from the parameter path.
    loc = [p for p in loc if "[" not in p and p not in _UNION_TAGS]
    msg = err.get("msg", "invalid request")
    metrics.REQUESTS_REJECTED.labels("unknown", "invalid").inc()  # the body did not parse: no method yet
    if err.get("type") == "json_invalid":
        return JSONResponse(BadRequest("request body is not valid JSON", code="invalid_json").body(), status_code=400)
    if err.get("type") == "missing":
        msg = f"missing required parameter: {'.'.join(loc)}" if loc else "request body is missing"
    elif loc:
        msg = f"{'.'.join(loc)}: {msg}"
    return JSONResponse(BadRequest(msg, param=".".join(loc) or None, code=err.get("type")).body(), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404), wrong methods (405) and bodies FastAPI cannot decode (e.g. invalid UTF-8)."""
    codes = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}
    if exc.status_code == 400:
        metrics.REQUESTS_REJECTED.labels("unknown", "invalid").inc()
    err = APIError(str(exc.detail), code=codes.get(exc.status_code), status_code=exc.status_code)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


# ----------------------------------------------------------------------------- gate

class _Gate:
    """What the gate middleware checks before FastAPI reads or parses a body (set per replica)."""
    max_request_bytes: int = LimitsConfig().max_request_bytes
    api_keys: list[bytes] = []
    metrics_require_auth: bool = False

    # Always reachable without a key: liveness and the API's own description.
    OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})

    def needs_auth(self, path: str) -> bool:
        if not self.api_keys or path in self.OPEN_PATHS:
            return False
        return path != "/metrics" or self.metrics_require_auth

    def authorized(self, header: str) -> bool:
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        # Constant time: compare fixed-size digests, and look at every key (no early exit).
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for key in self.api_keys:
            ok |= hmac.compare_digest(digest, key)
        return ok and bool(token)


_GATE = _Gate()


# The deployment class is shipped to its replica by value (cloudpickle), and so would be a global
# object its methods name (a copy of `_GATE`); these module functions reach the replica's real one.
def _configure_gate(api_keys: list[str], metrics_require_auth: bool, max_request_bytes: int) -> None:
    _GATE.api_keys = [hashlib.sha256(k.encode()).digest() for k in api_keys]
    _GATE.metrics_require_auth = metrics_require_auth
    _GATE.max_request_bytes = max_request_bytes


def _key_ok(authorization_header: str) -> bool:
    return _GATE.authorized(authorization_header)


def _unauthorized() -> Unauthorized:
    return Unauthorized("invalid or missing API key (send `Authorization: Bearer <key>`)", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})


class _GateMiddleware:
    """Pure ASGI: API keys, then `limits.max_request_bytes` (413), before any body is parsed."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers") or []}
        if _GATE.needs_auth(scope.get("path", "")):
            if not _GATE.authorized(headers.get(b"authorization", b"").decode("latin-1")):
                metrics.REQUESTS_REJECTED.labels("unknown", "auth").inc()
                return await self._reject(_unauthorized(), scope, receive, send)
        limit = _GATE.max_request_bytes
        too_large = BadRequest(f"request body is larger than {limit} bytes", code="request_too_large",
                               status_code=413)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await self._reject(BadRequest("invalid Content-Length header", code="invalid_body"),
                                          scope, receive, send)
            if n > limit:
                metrics.REQUESTS_REJECTED.labels("unknown", "too_large").inc()
                return await self._reject(too_large, scope, receive, send)
            return await self.app(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): read at most `limit` bytes, then replay them to the app.
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                metrics.REQUESTS_REJECTED.labels("unknown", "too_large").inc()
                return await self._reject(too_large, scope, receive, send)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    async def _reject(err: APIError, scope, receive, send) -> None:
        await JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)(scope, receive, send)


app.add_middleware(_GateMiddleware)


# ----------------------------------------------------------------------------- helpers

class _Context:
    """Everything a method needs about one request."""

    def __init__(self, ingress: OpenAIIngress, req, rid, kind, prompt_ids, prompt_text, messages, sampling, mixture):
        self.ingress = ingress
        self.req = req
        self.rid = rid
        self.kind = kind
        self.prompt_ids = prompt_ids
        self.prompt_text = prompt_text
        self.messages = messages
        self.sampling = sampling
        self.mixture = mixture
        self.method = req.method
        self.outcome = Outcome(prompt_tokens=len(prompt_ids))
        self.t0 = time.perf_counter()


class _Once:
    def __init__(self, fn):
        self.fn = fn
        self.done = False

    def __call__(self):
        if not self.done:
            self.done = True
            self.fn()


async def _first_event(events: AsyncIterator[Any], timeout: float):
    """Run a stream up to its first event so that request errors become HTTP errors, not SSE."""
    try:
        return await asyncio.wait_for(events.__anext__(), timeout=timeout)
    except StopAsyncIteration:
        return None


async def _with_release(gen: AsyncIterator[bytes], release: _Once, ctx: _Context, t0: float) -> AsyncIterator[bytes]:
    """Stream `gen` until it ends or the request deadline passes, even while it produces nothing."""
    timeout = ctx.ingress.config.limits.request_timeout_s
    deadline = t0 + timeout
    pending: asyncio.Future | None = None
    try:
        while True:
            pending = asyncio.ensure_future(gen.__anext__())
            await asyncio.wait({pending}, timeout=max(0.0, deadline - time.perf_counter()))
            if not pending.done():
                _record(ctx, t0, 504)
                await _cancel(pending)
                await ctx.ingress._abort(ctx.rid)
                err = Timeout(f"request exceeded {timeout}s", code="timeout")
                yield f"data: {json.dumps(err.body())}\n\n".encode()
                yield b"data: [DONE]\n\n"
                return
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None and not pending.done():
            await _cancel(pending)
        await gen.aclose()
        release()


async def _cancel(fut: asyncio.Future) -> None:
    fut.cancel()
    try:
        await fut
    except BaseException:  # noqa: BLE001 - the stream was abandoned; its error no longer matters
        pass


class _Stream(StreamingResponse):
    """A StreamingResponse that runs `on_close` however it ends, even if its body was never iterated
    (a client that disconnects before the first chunk), so budgets and engine requests are freed."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def _track(ctx: _Context, ev) -> None:
    out = ctx.outcome
    if isinstance(ev, Delta):
        c = out.choices.setdefault(ev.index, {"text": "", "logprobs": None, "finish_reason": None})
        c["text"] += ev.text
        if ev.logprobs is not None:
            c["logprobs"] = (c["logprobs"] or []) + ev.logprobs
        if ev.token_ids:
            t = time.perf_counter()
            out.first_token_t = out.first_token_t or t
            out.last_token_t = t
            out.completion_tokens += len(ev.token_ids)
    elif isinstance(ev, Finish):
        c = out.choices.setdefault(ev.index, {"text": "", "logprobs": None, "finish_reason": None})
        c["finish_reason"] = ev.reason


def _usage(out: Outcome) -> dict[str, int]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def _record(ctx: _Context, t0: float, status: int) -> None:
    if getattr(ctx, "_recorded", False):
        return
    ctx._recorded = True
    ctx._status = status
    m, out = ctx.method, ctx.outcome
    elapsed = time.perf_counter() - t0
    metrics.REQUESTS.labels(m, str(status)).inc()
    metrics.REQUEST_LATENCY.labels(m).observe(elapsed)
    metrics.PROMPT_TOKENS.labels(m).inc(out.prompt_tokens)
    if status != 200:
        return
    metrics.OUTPUT_TOKENS.labels(m).inc(out.completion_tokens)
    # Time to first token only where the client gets tokens as they come (stream: true); a
    # non-streamed answer arrives whole, and its latency is request_latency_seconds.
    if out.first_token_t is not None and getattr(ctx.req, "stream", False):
        metrics.TIME_TO_FIRST_TOKEN.labels(m).observe(out.first_token_t - t0)
        if out.completion_tokens > 1 and out.last_token_t > out.first_token_t:
            metrics.INTER_TOKEN_LATENCY.labels(m).observe((out.last_token_t - out.first_token_t) / (out.completion_tokens - 1))
    if elapsed > 0 and out.completion_tokens:
        metrics.OUTPUT_TOKENS_PER_SECOND.labels(m).observe(out.completion_tokens / elapsed)
    r = out.receipt or {}
    for choice in r.get("choices", []):
        for obj, s in choice.get("rewards", {}).items():
            metrics.REWARD.labels(m, obj).observe(s["raw"])
        if choice.get("mixed") is not None:
            metrics.MIXED_REWARD.labels(m).observe(choice["mixed"])
        if choice.get("kl_estimate") is not None:
            metrics.KL_ESTIMATE.labels(m).observe(choice["kl_estimate"])
    for obj, gain in (r.get("reward_gain") or {}).items():
        metrics.REWARD_GAIN.labels(m, obj).observe(gain)
    cost = r.get("cost") or {}
    for counter, key in ((metrics.BASE_TOKENS, "base_tokens"), (metrics.CANDIDATES, "candidates"),
                         (metrics.ROLLOUTS, "rollouts"), (metrics.ROLLOUT_TOKENS, "rollout_tokens"),
                         (metrics.VALUE_MODEL_STEPS, "value_model_steps")):
        if cost.get(key):
            counter.labels(m).inc(cost[key])
    if r:
        metrics.ADDED_LATENCY.labels(m).observe(out.added_latency_s)


def _chat_logprobs(steps: list[dict]) -> dict[str, Any]:
    def entry(tok: str | None, lp: float) -> dict[str, Any]:
        tok = tok or ""
        return {"token": tok, "logprob": max(lp, -9999.0), "bytes": list(tok.encode("utf-8"))}

    content = []
    for s in steps:
        e = entry(s["token"], s["logprob"])
        e["top_logprobs"] = [entry(t, lp) for _, lp, t in s["top"][: s.get("k", len(s["top"]))]]
        content.append(e)
    return {"content": content}


def _text_logprobs(steps: list[dict]) -> dict[str, Any]:
    tokens = [s["token"] or "" for s in steps]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [max(s["logprob"], -9999.0) for s in steps],
            "top_logprobs": [{t or "": max(lp, -9999.0) for _, lp, t in s["top"][: s.get("k", len(s["top"]))]}
                             for s in steps],
            "text_offset": offsets}


_UNAVAILABLE = frozenset({"EngineDeadError", "ActorDiedError", "ActorUnavailableError", "RayActorError"})


def _as_api_error(e: BaseException, rid: str | None = None) -> APIError:
    """The OpenAI-shaped error for an exception of the request path.

    400s are only the BadRequests the server raises deliberately (request validation); anything
    else that escapes (an engine ValueError included) is our fault: a 500 whose message names the
    request id but not the exception, which is logged server-side with that id."""
    if isinstance(e, APIError):
        return e
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, APIError):
        return cause
    if type(cause).__name__ in _UNAVAILABLE:
        # The engine process died (or its replica is gone): Ray Serve's health check replaces the
        # replica; until then this is a retryable 503, not an internal error.
        return ServerError(f"the engine is unavailable ({type(cause).__name__}); retry later",
                           code="engine_unavailable", status_code=503, headers={"Retry-After": "10"})
    return ServerError(f"internal server error (request {rid or 'unknown'}); the details are in the server log",
                       code="internal_error")



def _load_api_keys(config: ServerConfig) -> list[str]:
    keys = list(config.api_keys)
    env = os.environ.get("ALIGNSERVE_API_KEYS", "")
    keys += [k.strip() for k in env.split(",") if k.strip()]
    path = config.api_keys_file or os.environ.get("ALIGNSERVE_API_KEYS_FILE")
    if path:
        # Fail closed: a key file that was configured but is missing or holds no key must not
        # leave the API open (the replica does not start, and says why).
        if not os.path.isfile(path):
            raise RuntimeError(f"API key file {path!r} (api_keys_file / ALIGNSERVE_API_KEYS_FILE) does not exist; "
                               "refusing to start with authentication off")
        with open(path) as f:
            from_file = [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]
        if not from_file:
            raise RuntimeError(f"API key file {path!r} (api_keys_file / ALIGNSERVE_API_KEYS_FILE) holds no key; "
                               "refusing to start with authentication off")
        keys += from_file
    return keys


# ----------------------------------------------------------------------------- ingress

def _error_doc(what: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": what}


_ERRORS_GET: dict[int | str, dict[str, Any]] = {401: _error_doc("Missing or invalid API key")}
_ERRORS_GET_MODEL: dict[int | str, dict[str, Any]] = {**_ERRORS_GET, 404: _error_doc("Unknown model")}
_ERRORS_POST: dict[int | str, dict[str, Any]] = {
    200: {"description": "The completion; server-sent events (`data: {chunk}` ... `data: [DONE]`) when `stream` is true",
          # OpenAPI 3.1: for an event stream, `schema` describes each event.
          "content": {"text/event-stream": {"schema": {
              "type": "object", "required": ["data"],
              "properties": {"data": {"type": "string",
                                      "description": "a JSON chunk, a JSON error body, or [DONE]"}}}}}},
    400: _error_doc("Invalid request (the error's `param` names the field), or one that costs more than "
                    "limits.max_concurrent_cost (`request_too_costly`)"),
    401: _error_doc("Missing or invalid API key"),
    404: _error_doc("Unknown model"),
    413: _error_doc("Request body larger than limits.max_request_bytes"),
    429: _error_doc("Over limits.max_concurrent_cost (or the ingress queue); see Retry-After"),
    502: _error_doc("A reward or value model failed or timed out; no unaligned answer is returned"),
    503: _error_doc("The engine is down (being replaced) or the server is shutting down; see Retry-After"),
    504: _error_doc("Request exceeded limits.request_timeout_s"),
}


def _openapi() -> dict[str, Any]:
    """FastAPI's schema, minus the 422 it documents for every body: validation errors here are 400s."""
    if app.openapi_schema is None:
        schema = _default_openapi()
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


_default_openapi = app.openapi
app.openapi = _openapi


@serve.deployment(name="OpenAIIngress")
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, config: dict[str, Any], engine, rewards):
        from transformers import AutoTokenizer

        from decoders.rewards import build_objectives
        from server.model_cache import resolve_model

        self.config = ServerConfig.model_validate(config)
        self.engine = engine
        # Every scoring call is bounded by limits.reward_timeout_s (server/handles.py).
        self.rewards = TimedRewards(rewards, self.config.limits.reward_timeout_s)
        self.model_name = self.config.model_name
        self.model_path = resolve_model(self.config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.max_model_len = self.config.engine.max_model_len
        # Registry metadata only (names, reference stats); scoring runs in the reward deployment.
        self.objectives = build_objectives(self.config.objectives)
        from decoders.baselines import load_baselines

        self.baselines = load_baselines(self.config.baselines, self.objectives)
        eos = {self.tokenizer.eos_token_id, self.tokenizer.get_vocab().get("<|im_end|>")}
        self.stop_token_ids = sorted(t for t in eos if isinstance(t, int) and t >= 0)
        self.api_keys = _load_api_keys(self.config)
        # The gate middleware runs before routing (no `self` there): configure it for this replica.
        _configure_gate(self.api_keys, self.config.metrics_require_auth, self.config.limits.max_request_bytes)
        self.cost_in_flight = 0
        metrics.bind_cost_gauges(lambda: self.cost_in_flight, self.config.limits.max_concurrent_cost)
        self.draining = False
        self._background: set[asyncio.Task] = set()  # engine aborts of requests whose task was cancelled
        self._engine_info: dict[str, Any] | None = None

    # -------------------------------------------------------------- plumbing

    def _authorize(self, request: Request) -> None:
        """Also checked by the gate middleware before parsing; kept here as a second line."""
        if not self.api_keys:
            return
        if not _key_ok(request.headers.get("authorization", "")):
            metrics.REQUESTS_REJECTED.labels("unknown", "auth").inc()
            raise _unauthorized()

    def _test_hooks(self, request: Request) -> None:
        if not self.config.enable_test_hooks:
            raise APIError("Not Found", code="not_found", status_code=404)
        self._authorize(request)

    async def _abort(self, rid: str) -> None:
        """Stop the engine work of a request that timed out (cancelling our awaits does not reach it)."""
        try:
            await asyncio.wait_for(self.engine.abort.remote(rid), timeout=3)
        except Exception:  # noqa: BLE001 - best effort; the engine still bounds it by max_tokens
            logger.warning("could not abort engine requests of %s", rid, exc_info=True)

    def _abort_soon(self, rid: str) -> None:
        """Abort from a task of its own: for a request whose task is being cancelled (the client
        went away), an `await` there would be cancelled too."""
        task = asyncio.ensure_future(self._abort(rid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _value_models(self) -> list[str]:
        if self._engine_info is None:
            self._engine_info = await self.engine.info.remote()
        return self._engine_info["value_models"]

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise NotFound(f"The model `{model}` does not exist. Available: {self.model_name}",
                           param="model", code="model_not_found")

    def _cost(self, req) -> int:
        a = req.alignment
        n = req.n or 1
        if a is None or a.method in ("none", "vas"):
            return n
        if a.method == "best_of_n":
            return a.n or BEST_OF_N_DEFAULT
        return n * (a.top_k or 4)

    # -------------------------------------------------------------- routes

    @app.get("/health", response_class=Response)
    async def health(self) -> Response:
        return Response(status_code=503 if self.draining else 200)

    async def drain(self, timeout_s: float) -> int:
        """Graceful shutdown (server/serve.py calls this through a handle on SIGTERM): refuse new
        requests with 503, wait up to `timeout_s` for those in flight; returns the cost still in flight."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.cost_in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.cost_in_flight

    @app.get("/metrics", responses={200: {"description": "Prometheus text exposition",
                                          "content": {"text/plain": {"schema": {"type": "string"}}}},
                                    401: _ERRORS_GET[401]})
    async def metrics_endpoint(self, request: Request) -> Response:
        if self.config.metrics_require_auth:
            self._authorize(request)
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE_LATEST)

    # Test-only hooks (config `enable_test_hooks`); otherwise they answer 404 like any unknown path.
    @app.post("/admin/faults", include_in_schema=False)
    async def admin_faults(self, request: Request, count: int = 1, kind: str = "fail",
                           sleep_s: float = 0.0) -> dict[str, Any]:
        """Make the next `count` reward-scoring calls fail (`kind=fail`) or stall for `sleep_s`
        seconds (`kind=sleep`) (RewardDeployment.inject_faults)."""
        self._test_hooks(request)
        if not 0 <= count <= 100:
            raise BadRequest("count must be in [0, 100]", param="count")
        if kind not in ("fail", "sleep"):
            raise BadRequest("kind must be 'fail' or 'sleep'", param="kind")
        if not 0 <= sleep_s <= 600:
            raise BadRequest("sleep_s must be in [0, 600]", param="sleep_s")
        await self.rewards.inject_faults.remote(count, kind, sleep_s)
        return {"reward_faults": count, "kind": kind}

    @app.get("/admin/state", include_in_schema=False)
    async def admin_state(self, request: Request) -> dict[str, int]:
        """The cost budget in use and the engine's unfinished requests."""
        self._test_hooks(request)
        load = await self.engine.load.remote()
        return {"cost_in_flight": self.cost_in_flight, "engine_unfinished": load["unfinished"]}

    def _model_card(self) -> ModelCard:
        # `root` is the served name, as in vLLM's server: where the weights lie stays private.
        return ModelCard(id=self.model_name, root=self.model_name, max_model_len=self.max_model_len)

    @app.get("/v1/models", responses=_ERRORS_GET)
    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        return ModelList(data=[self._model_card()])

    @app.get("/v1/models/{model:path}", responses=_ERRORS_GET_MODEL)
    async def model(self, model: str, request: Request) -> ModelCard:
        """One model (`client.models.retrieve`); an unknown id is a 404 like a request naming it."""
        self._authorize(request)
        self._check_model(model)
        return self._model_card()

    @app.get("/v1/alignment/objectives", responses=_ERRORS_GET)
    async def objectives(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        from decoders.rewards import describe

        value_models = set(await self._value_models())
        data = describe(self.objectives)
        for item in data:
            item["value_model"] = item["name"] in value_models
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", responses=_ERRORS_POST)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._authorize(request)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        prompt_ids = self.render_chat(messages)
        user_text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        return await self._serve(body, request, prompt_ids, user_text, messages, kind="chat", param="messages")

    @app.post("/v1/completions", responses=_ERRORS_POST)
    async def completions(self, body: CompletionRequest, request: Request):
        self._authorize(request)
        if isinstance(body.prompt, str):
            prompt_ids = self.tokenizer.encode(body.prompt, add_special_tokens=False)
            prompt_text = body.prompt
        else:
            vocab = len(self.tokenizer)
            if any(not isinstance(t, int) or t < 0 or t >= vocab for t in body.prompt):
                raise BadRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompt_ids = list(body.prompt)
            prompt_text = self.tokenizer.decode(prompt_ids)
        return await self._serve(body, request, prompt_ids, prompt_text, None, kind="text", param="prompt")

    # -------------------------------------------------------------- request path

    async def _serve(self, req, request: Request, prompt_ids, prompt_text, messages, *, kind: str, param: str):
        method = req.method
        request.state.alignserve_method = method  # for the rejection counters of the error handlers
        if self.draining:
            raise ServerError("the server is shutting down; retry on another replica", code="shutting_down",
                              status_code=503, headers={"Retry-After": "5"})
        self._check_model(req.model)
        limits = self.config.limits
        req.check_limits(limits)
        if not prompt_ids:
            raise BadRequest("prompt is empty", param=param, code="empty_prompt")
        max_prompt = min(limits.max_prompt_tokens, self.max_model_len - 1)
        if len(prompt_ids) > max_prompt:
            raise BadRequest(f"prompt has {len(prompt_ids)} tokens; the limit is {max_prompt}",
                             param=param, code="context_length_exceeded")
        mixture = await self._mixture(req)
        sampling = req.to_sampling_params(limits, len(prompt_ids), self.max_model_len)

        cost = self._cost(req)
        if cost > limits.max_concurrent_cost:
            # It could never fit, however long the client waits: a 400 naming the knob, not a 429.
            knob = self._cost_param(req)
            raise BadRequest(f"this request costs {cost} sequences, more than the server's whole budget "
                             f"(limits.max_concurrent_cost = {limits.max_concurrent_cost}); lower {knob}",
                             param=knob, code="request_too_costly")
        if self.cost_in_flight + cost > limits.max_concurrent_cost:
            metrics.REQUESTS_REJECTED.labels(method, "overload").inc()
            raise Overloaded(f"server is at capacity ({self.cost_in_flight}/{limits.max_concurrent_cost} "
                             f"sequences in flight; this request costs {cost}); retry later",
                             code="overloaded", headers={"Retry-After": "1"})
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        ctx = _Context(self, req, rid, kind, prompt_ids, prompt_text, messages, sampling, mixture)
        self.cost_in_flight += cost
        metrics.REQUESTS_IN_FLIGHT.labels(method).inc()
        t0 = time.perf_counter()
        release = _Once(lambda: self._release(method, cost))
        handed_off = False  # once the streaming response owns `release`
        events = self._events(ctx)
        try:
            if req.stream:
                first = await _first_event(events, limits.request_timeout_s)
                stream = _with_release(self._sse(ctx, first, events, t0), release, ctx, t0)

                async def on_close() -> None:
                    release()
                    for agen in (stream, events):
                        try:
                            await agen.aclose()
                        except Exception:  # noqa: BLE001 - e.g. still running in a cancelled task
                            pass
                    if getattr(ctx, "_status", None) != 200:  # disconnected, timed out or failed
                        await self._abort(rid)

                handed_off = True
                return _Stream(stream, on_close, media_type="text/event-stream")
            body = await asyncio.wait_for(self._collect(ctx, events), timeout=limits.request_timeout_s)
            _record(ctx, t0, 200)
            return JSONResponse(body)
        except asyncio.TimeoutError:
            _record(ctx, t0, 504)
            await self._abort(rid)
            raise Timeout(f"request exceeded {limits.request_timeout_s}s", code="timeout") from None
        except asyncio.CancelledError:
            # The client went away: Ray Serve cancels this task, but cancelling our awaits does not
            # reach the engine replica, so abort its requests by id (in a task of their own).
            _record(ctx, t0, 499)
            self._abort_soon(rid)
            raise
        except APIError as e:
            _record(ctx, t0, e.status_code)
            raise
        except Exception as e:  # noqa: BLE001 - surfaced in the OpenAI error shape
            err = _as_api_error(e, rid)
            if err.status_code >= 500:
                logger.exception("request %s failed", rid)
            _record(ctx, t0, err.status_code)
            raise err from e
        finally:
            if not handed_off:
                release()

    @staticmethod
    def _cost_param(req) -> str:
        """The request field that sets its cost (see `_cost`)."""
        a = req.alignment
        if a is None or a.method in ("none", "vas"):
            return "n"
        if a.method == "best_of_n":
            return "alignment.n"
        return "n" if a.top_k is None and (req.n or 1) > 1 else "alignment.top_k"

    def _release(self, method: str, cost: int) -> None:
        self.cost_in_flight -= cost
        metrics.REQUESTS_IN_FLIGHT.labels(method).dec()

    async def _mixture(self, req):
        a = req.alignment
        if a is None or not a.weights:
            return None
        from decoders.rewards import Mixture, MixtureError

        mixture = Mixture(weights={k: v for k, v in a.weights.items()}, transform=a.transform or "raw",
                          caps=a.caps or {})
        try:
            mixture.validate(self.objectives, max_weight=self.config.limits.max_weight,
                             require_nonzero=a.method != "none")
        except MixtureError as e:
            raise BadRequest(str(e), param=e.param, code="invalid_value") from None
        if a.method == "vas":
            have = set(await self._value_models())
            missing = [o for o in mixture.active() if o not in have]
            if missing:
                raise BadRequest(f"no value model for objective(s) {missing}; VAS can steer: {sorted(have)}",
                                 param="alignment.weights", code="no_value_model")
        return mixture

    def _events(self, ctx: "_Context") -> AsyncIterator[Any]:
        from server import methods

        return methods.run(ctx)

    # -------------------------------------------------------------- rendering

    async def _collect(self, ctx: "_Context", events: AsyncIterator[Any]) -> dict[str, Any]:
        out = ctx.outcome
        async for ev in events:
            _track(ctx, ev)
        choices = []
        for i in sorted(out.choices):
            c = out.choices[i]
            if ctx.kind == "chat":
                choice = {"index": i, "message": {"role": "assistant", "content": c["text"]},
                          "logprobs": _chat_logprobs(c["logprobs"]) if c["logprobs"] is not None else None,
                          "finish_reason": c["finish_reason"]}
            else:
                choice = {"index": i, "text": c["text"],
                          "logprobs": _text_logprobs(c["logprobs"]) if c["logprobs"] is not None else None,
                          "finish_reason": c["finish_reason"]}
            choices.append(choice)
        body = {"id": ctx.rid, "object": "chat.completion" if ctx.kind == "chat" else "text_completion",
                "created": now(), "model": self.model_name, "choices": choices, "usage": _usage(out)}
        if out.receipt is not None:
            body["alignment"] = out.receipt
        return body

    async def _sse(self, ctx: "_Context", first, events: AsyncIterator[Any], t0: float) -> AsyncIterator[bytes]:
        chat = ctx.kind == "chat"
        created = now()
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(ctx.req.stream_options and ctx.req.stream_options.include_usage)

        def chunk(choices: list[dict], **extra) -> bytes:
            body = {"id": ctx.rid, "object": obj, "created": created, "model": self.model_name, "choices": choices}
            if include_usage:
                body["usage"] = None
            body.update(extra)
            return f"data: {json.dumps(body)}\n\n".encode()

        started: set[int] = set()
        finishes: list[Finish] = []

        async def all_events():
            if first is not None:
                yield first
            async for ev in events:
                yield ev

        try:
            async for ev in all_events():
                _track(ctx, ev)
                if isinstance(ev, Delta):
                    if chat:
                        delta = {"content": ev.text}
                        if ev.index not in started:
                            delta = {"role": "assistant", "content": ev.text}
                            started.add(ev.index)
                        c = {"index": ev.index, "delta": delta, "logprobs": None, "finish_reason": None}
                        if ev.logprobs is not None:
                            c["logprobs"] = _chat_logprobs(ev.logprobs)
                    else:
                        c = {"index": ev.index, "text": ev.text, "logprobs": None, "finish_reason": None}
                        if ev.logprobs is not None:
                            c["logprobs"] = _text_logprobs(ev.logprobs)
                    yield chunk([c])
                elif isinstance(ev, Finish):
                    finishes.append(ev)  # sent last, so the final chunk can carry the receipt
            for j, ev in enumerate(finishes):
                if chat:
                    c = {"index": ev.index, "delta": {} if ev.index in started else {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": ev.reason}
                else:
                    c = {"index": ev.index, "text": "", "logprobs": None, "finish_reason": ev.reason}
                last = j == len(finishes) - 1
                yield chunk([c], **({"alignment": ctx.outcome.receipt} if last and ctx.outcome.receipt else {}))
            if include_usage:
                body = {"id": ctx.rid, "object": obj, "created": created, "model": self.model_name,
                        "choices": [], "usage": _usage(ctx.outcome)}
                yield f"data: {json.dumps(body)}\n\n".encode()
            _record(ctx, t0, 200)
        except APIError as e:
            _record(ctx, t0, e.status_code)
            yield f"data: {json.dumps(e.body())}\n\n".encode()
        except asyncio.CancelledError:
            _record(ctx, t0, 499)  # client went away; generation is cancelled with this task
            raise
        except Exception as e:  # noqa: BLE001
            err = _as_api_error(e, ctx.rid)
            if err.status_code >= 500:
                logger.exception("stream %s failed", ctx.rid)
            _record(ctx, t0, err.status_code)
            yield f"data: {json.dumps(err.body())}\n\n".encode()
        yield b"data: [DONE]\n\n"


# ----------------------------------------------------------------------------- builder

def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Build the application from a ServerConfig dict (the `args` of a Serve config)."""
    config = ServerConfig.model_validate(args or {})
    cfg = config.model_dump()

    def options(d) -> dict[str, Any]:
        opts: dict[str, Any] = {"max_ongoing_requests": d.max_ongoing_requests,
                                "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
                                # Graceful drain wherever Ray Serve stops a replica (serve run, serve
                                # deploy, KubeRay upgrades, downscaling), not only under `make serve`:
                                # the replica takes no new requests and waits for those in flight.
                                "graceful_shutdown_timeout_s": config.limits.drain_timeout_s,
                                "graceful_shutdown_wait_loop_s": 1.0}
        if d.max_queued_requests != -1:
            # Past the queue bound Ray Serve's proxy answers 429 + Retry-After instead of queueing.
            opts["max_queued_requests"] = d.max_queued_requests
            opts["backpressure_config"] = {"status_code": 429, "retry_after_s": 1}
        if d.autoscaling:
            opts["autoscaling_config"] = d.autoscaling
        else:
            opts["num_replicas"] = d.num_replicas
        return opts

    engine = EngineDeployment.options(**options(config.engine_deployment)).bind(cfg)
    rewards = RewardDeployment.options(**options(config.rewards_deployment)).bind(cfg)
    return OpenAIIngress.options(**options(config.ingress)).bind(cfg, engine, rewards)


from server.engine import EngineDeployment  # noqa: E402
from server.reward_service import RewardDeployment  # noqa: E402
