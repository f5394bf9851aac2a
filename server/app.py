"""The Ray Serve application: ``build_app`` is the one import_path (``server.app:build_app``)
for ``make serve``, ``serve run deploy/serve_config.yaml`` and the KubeRay RayService.

Deployments: ``OpenAIIngress`` (FastAPI, this file) -> ``EngineDeployment`` (vLLM AsyncLLM,
server/engine.py) and ``RewardDeployment`` (objectives, server/reward_service.py).

The ingress is a router: a route turns the body into a prompt, ``_serve`` admits the request
(limits, the method's own checks, its cost against the budget) and runs the method the request
names (decoders/registry.py) with the handles it needs; server/rendering.py turns the method's
events into one JSON body or SSE chunks, server/errors.py any failure into the OpenAI error shape.
The request's path, top-down: docs/architecture.md.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from decoders import registry
from decoders.base import AlignmentFailure, DecodeRequest, Method, MethodContext
from server import gate, metrics
from server.config import ServerConfig
from server.errors import APIError, BadRequest, NotFound, Overloaded, ServerError, Timeout, as_api_error
from server.engine import replica_id
from server.handles import EngineClient, RewardClient, detached
from server.routing import router_config
from server.protocol import (ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelCard, ModelList, describe_error,
                             method_cards, new_id, register_names, with_registered_names)
from server.rendering import (DONE, ClosingStream, Outcome, Renderer, first_event, merge_events, prepend, sse,
                              with_deadline)

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
        metrics.rejected(method, reason)
    await metrics.flush()
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    metrics.rejected("unknown", "invalid")  # the body did not parse: no method yet
    await metrics.flush()
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if err.get("type") == "json_invalid":
        return JSONResponse(BadRequest("request body is not valid JSON", code="invalid_json").body(), status_code=400)
    param, msg = describe_error(err)
    return JSONResponse(BadRequest(msg, param=param, code=err.get("type")).body(), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404), wrong methods (405) and bodies FastAPI cannot decode (e.g. invalid UTF-8)."""
    codes = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}
    if exc.status_code == 400:
        metrics.rejected("unknown", "invalid")
        await metrics.flush()
    err = APIError(str(exc.detail), code=codes.get(exc.status_code), status_code=exc.status_code)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


app.add_middleware(gate.GateMiddleware, on_reject=lambda reason: metrics.rejected("unknown", reason))


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
    400: _error_doc("Invalid request (the error's `param` names the field), or one that costs more than the "
                    "server allows (`request_too_costly`)"),
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
        schema = with_registered_names(_default_openapi())
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


_default_openapi = app.openapi
app.openapi = _openapi


# ----------------------------------------------------------------------------- one request in flight

class Flight:
    """One admitted request: its id, method, outcome, budget share, and whether it was recorded."""

    def __init__(self, ingress: "OpenAIIngress", rid: str, method: str, sequences: int, streamed: bool,
                 prompt_tokens: int, engine: EngineClient):
        # `engine`: the request's client to the engine replica that admitted it (abort, release).
        self.ingress, self.rid, self.method, self.sequences = ingress, rid, method, sequences
        self.streamed = streamed
        self.engine = engine
        self.t0 = time.perf_counter()
        self.outcome = Outcome(prompt_tokens=prompt_tokens, started_t=self.t0)
        self.status: int | None = None
        self._released = False

    def record(self, status: int) -> None:
        if self.status is not None:
            return
        self.status = status
        metrics.record(self.method, self.outcome, status, time.perf_counter() - self.t0, self.streamed)

    def fail(self, e: BaseException) -> APIError:
        """Record a failure (a failed model counted by component) and return its API error."""
        err = as_api_error(e, self.rid)
        failure = next((x for x in (e, getattr(e, "cause", None), e.__cause__) if isinstance(x, AlignmentFailure)),
                       None)
        if failure is not None:
            metrics.failure(self.method, failure.component)
        if err.status_code >= 500:
            logger.error("request %s failed: %r", self.rid, e, exc_info=e)
        self.record(err.status_code)
        return err

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.ingress._release(self)


# ----------------------------------------------------------------------------- the ingress

@serve.deployment(name="OpenAIIngress")
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, config: dict[str, Any], engine, rewards, metrics_handle=None):
        from decoders.base_model import load_tokenizer, resolve_model
        from decoders.rewards import build_objectives

        self.config = ServerConfig.model_validate(config)
        self.engine = engine
        self.rewards = rewards
        self.model_name = self.config.model_name
        self.tokenizer = load_tokenizer(resolve_model(self.config.model))
        self.max_model_len = self.config.engine.max_model_len
        # Registry metadata only (names, reference stats); scoring runs in the reward deployment.
        self.objectives = build_objectives(self.config.objectives)
        self.baselines = self.config.baseline_registry()
        # Each LoRA baseline is also a model of its own (as vLLM lists LoRA modules): id -> baseline name.
        self.adapter_models = {f"{self.model_name}-{name}": name for name, bl in self.baselines.items()
                               if bl.kind == "lora"}
        # listed in /openapi.json: the names a request may use and the server's ranges
        register_names(list(self.objectives), list(self.baselines), self.config.limits)
        eos = {self.tokenizer.eos_token_id, self.tokenizer.get_vocab().get("<|im_end|>")}
        self.stop_token_ids = sorted(t for t in eos if isinstance(t, int) and t >= 0)
        # The gate middleware runs before routing (no `self` there): configure it for this replica.
        self.api_keys = gate.configure(self.config)
        # This replica's requests in flight (drain waits for them; summed across replicas in /metrics).
        self.in_flight: dict[str, int] = {}
        self.replica = replica_id()
        self.metrics_handle = metrics_handle
        if metrics_handle is not None:
            metrics.sink().connect(metrics_handle, "ingress", self.replica)
            self._heartbeat = asyncio.get_running_loop().create_task(self._report_forever())
        self.draining = False
        self._background: set[asyncio.Task] = set()  # cleanup of ended requests (aborts, budget releases)
        self._engine_info: dict[str, Any] | None = None

    # -------------------------------------------------------------- plumbing

    def _authorize(self, request: Request) -> None:
        """Also checked by the gate middleware before parsing; kept here as a second line."""
        if self.api_keys and not gate.key_ok(request.headers.get("authorization", "")):
            metrics.rejected("unknown", "auth")
            raise gate.unauthorized()

    def _test_hooks(self, request: Request) -> None:
        if not self.config.enable_test_hooks:
            raise APIError("Not Found", code="not_found", status_code=404)
        self._authorize(request)

    async def _abort(self, flight: Flight) -> None:
        """Stop the engine work of a request (cancelling our awaits does not reach the engine replica)."""
        try:
            await asyncio.wait_for(flight.engine.abort(), timeout=3)
        except Exception:  # noqa: BLE001 - best effort; the engine still bounds it by max_tokens
            logger.warning("could not abort engine requests of %s", flight.rid, exc_info=True)

    def _abort_soon(self, flight: Flight) -> None:
        """Abort from a task of its own: for a request whose task is being cancelled (the client
        went away), an `await` there would be cancelled too."""
        self._in_background(self._abort(flight))

    def _in_background(self, coro) -> None:
        """Run cleanup outside the request (server/handles.detached), holding the task until it ends."""
        task = detached(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _value_models(self) -> list[str]:
        if self._engine_info is None:
            self._engine_info = await self.engine.info.remote()
        return self._engine_info["value_models"]

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - the model's template refused these messages
            from jinja2 import TemplateError

            why = f": {e}" if isinstance(e, TemplateError) else ""
            raise BadRequest(f"the model's chat template cannot render these messages{why}", param="messages",
                             code="invalid_messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _check_model(self, model: str) -> str | None:
        """The LoRA baseline that decodes for ``model`` (None: the base model); 404 for an unknown id."""
        if model == self.model_name:
            return None
        if model in self.adapter_models:
            return self.adapter_models[model]
        raise NotFound(f"The model `{model}` does not exist. Available: "
                       f"{', '.join([self.model_name, *self.adapter_models])}", param="model", code="model_not_found")

    def _count(self, method: str, delta: int) -> None:
        self.in_flight[method] = self.in_flight.get(method, 0) + delta
        metrics.sink().set_report({"in_flight": dict(self.in_flight)})

    def _release(self, flight: Flight) -> None:
        """The request ended, however it ended: its budget back on its engine replica, its count down."""
        self._count(flight.method, -1)
        self._in_background(self._give_back(flight))

    async def _give_back(self, flight: Flight) -> None:
        try:
            await asyncio.wait_for(flight.engine.release(), timeout=10)
        except Exception:  # noqa: BLE001 - the lease runs out on the engine replica anyway
            logger.warning("could not release the budget of %s", flight.rid, exc_info=True)

    @property
    def requests_in_flight(self) -> int:
        return sum(self.in_flight.values())

    async def _report_forever(self) -> None:
        """Say this replica is alive (its gauges are forgotten when it stops reporting)."""
        while True:
            await asyncio.sleep(5)
            metrics.sink().set_report({"in_flight": dict(self.in_flight)})
            await metrics.flush()

    # -------------------------------------------------------------- routes

    @app.get("/health", response_class=Response)
    async def health(self) -> Response:
        return Response(status_code=503 if self.draining else 200)

    async def drain(self, timeout_s: float, replica: str | None = None) -> int:
        """Graceful shutdown (server/serve.py calls this on every ingress replica on SIGTERM): refuse
        new requests with 503, wait up to `timeout_s` for those in flight; returns how many are left."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.requests_in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.requests_in_flight

    @app.get("/metrics", responses={200: {"description": "Prometheus text exposition",
                                          "content": {"text/plain": {"schema": {"type": "string"}}}},
                                    401: _ERRORS_GET[401]})
    async def metrics_endpoint(self, request: Request) -> Response:
        """Every replica's series (the MetricsDeployment aggregates them), the same on any replica."""
        if self.config.metrics_require_auth:
            self._authorize(request)
        await metrics.flush()
        body = (await self.metrics_handle.exposition.remote() if self.metrics_handle is not None
                else metrics.exposition())
        return Response(body, media_type=metrics.CONTENT_TYPE_LATEST)

    # Test-only hooks (config `enable_test_hooks`); otherwise they answer 404 like any unknown path.
    @app.post("/admin/faults", include_in_schema=False)
    async def admin_faults(self, request: Request, count: int = 1, kind: str = "fail",
                           sleep_s: float = 0.0) -> dict[str, Any]:
        """Make the next `count` reward-scoring calls fail (`kind=fail`) or stall for `sleep_s`
        seconds (`kind=sleep`) (RewardDeployment.inject_faults)."""
        self._test_hooks(request)
        if not 0 <= count <= 1000:
            raise BadRequest("count must be in [0, 1000]", param="count")
        if kind not in ("fail", "sleep"):
            raise BadRequest("kind must be 'fail' or 'sleep'", param="kind")
        if not 0 <= sleep_s <= 600:
            raise BadRequest("sleep_s must be in [0, 600]", param="sleep_s")
        await self.rewards.inject_faults.remote(count, kind, sleep_s)
        return {"reward_faults": count, "kind": kind}

    @app.get("/admin/state", include_in_schema=False)
    async def admin_state(self, request: Request) -> dict[str, int]:
        """The budget in use and the unfinished requests, summed over the engine replicas (each asked
        directly)."""
        self._test_hooks(request)
        loads = await self._engine_loads()
        return {"cost_in_flight": sum(x["cost_in_flight"] for x in loads),
                "engine_unfinished": sum(x["unfinished"] for x in loads)}

    async def _engine_loads(self) -> list[dict[str, Any]]:
        if self.metrics_handle is None:
            return [await self.engine.load.remote()]
        replicas = await self.metrics_handle.replicas.remote("engine")
        return list(await asyncio.gather(*(self.engine.load.remote(replica=r) for r in replicas)))

    def _model_card(self, model: str | None = None) -> ModelCard:
        # `root` is the served name (vLLM's server puts a path there: where the weights lie stays
        # private); an adapter's `parent` is the base model, as vLLM lists LoRA modules.
        if model is None or model == self.model_name:
            return ModelCard(id=self.model_name, root=self.model_name, max_model_len=self.max_model_len)
        return ModelCard(id=model, root=model, parent=self.model_name, max_model_len=self.max_model_len)

    @app.get("/v1/models", responses=_ERRORS_GET)
    async def models(self, request: Request) -> ModelList:
        """The base model, then each LoRA adapter it serves (a request naming one decodes with it)."""
        self._authorize(request)
        return ModelList(data=[self._model_card(), *(self._model_card(m) for m in self.adapter_models)])

    @app.get("/v1/models/{model:path}", responses=_ERRORS_GET_MODEL)
    async def model(self, model: str, request: Request) -> ModelCard:
        """One model (`client.models.retrieve`); an unknown id is a 404 like a request naming it."""
        self._authorize(request)
        self._check_model(model)
        return self._model_card(model)

    @app.get("/v1/alignment/objectives", responses=_ERRORS_GET)
    async def objectives(self, request: Request) -> dict[str, Any]:
        """The registered objectives (with whether VAS can steer them) and the alignment methods."""
        self._authorize(request)
        from decoders.rewards import describe

        value_models = set(await self._value_models())
        data = describe(self.objectives)
        for item in data:
            item["value_model"] = item["name"] in value_models
        return {"object": "list", "data": data, "methods": [c.model_dump() for c in method_cards()],
                "baselines": sorted(self.baselines)}

    @app.post("/v1/chat/completions", responses=_ERRORS_POST)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._authorize(request)
        return await self._serve(body, request, kind="chat")

    @app.post("/v1/completions", responses=_ERRORS_POST)
    async def completions(self, body: CompletionRequest, request: Request):
        self._authorize(request)
        return await self._serve(body, request, kind="text")

    # -------------------------------------------------------------- request path

    def _prompts(self, body, kind: str) -> list[tuple[list[int], str, list[dict[str, Any]] | None]]:
        """Each prompt of the request: (token ids, text, chat messages). A batched completion has several."""
        if kind == "chat":
            messages = body.chat_messages()
            user_text = next((m["content"] for m in reversed(messages) if m["role"] == "user"),
                             messages[-1]["content"])
            return [(self.render_chat(messages), user_text, messages)]
        out = []
        vocab = len(self.tokenizer)
        for p in body.prompts():
            if isinstance(p, str):
                out.append((self.tokenizer.encode(p, add_special_tokens=False), p, None))
                continue
            if any(t < 0 or t >= vocab for t in p):
                raise BadRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
            out.append((list(p), self.tokenizer.decode(p), None))
        return out

    async def _methods(self, body, kind: str, rid: str, adapter: str | None = None) -> list[Method]:
        """The request's method, one per prompt, prepared (its own checks run): ParamError/APIError on
        bad input. Chat templating and tokenizing run off the event loop, after the cheap checks.
        ``adapter``: the LoRA baseline the request named as its ``model`` (it decodes in place of the
        base model: every engine call of the method carries it, except rollouts of a baseline)."""
        limits = self.config.limits
        body.check_limits(limits)
        param = "messages" if kind == "chat" else "prompt"
        prompts = await asyncio.to_thread(self._prompts, body, kind)
        cls = registry.get(body.method)
        echo = bool(getattr(body, "echo", False))
        if echo and not cls.echoes:
            raise BadRequest(f"echo is not supported by method '{body.method}'", param="echo")
        value_models = frozenset(await self._value_models()) if body.method == "vas" else frozenset()
        max_prompt = min(limits.max_prompt_tokens, self.max_model_len - 1)
        methods = []
        for i, (prompt_ids, prompt_text, messages) in enumerate(prompts):
            if not prompt_ids:
                raise BadRequest("prompt is empty", param=param, code="empty_prompt")
            if len(prompt_ids) > max_prompt:
                raise BadRequest(f"prompt has {len(prompt_ids)} tokens; the limit is {max_prompt}",
                                 param=param, code="context_length_exceeded")
            request = DecodeRequest(prompt_ids=prompt_ids, prompt_text=prompt_text, messages=messages,
                                    sampling=body.to_sampling_params(limits, len(prompt_ids), self.max_model_len),
                                    stream=bool(body.stream), echo=echo)
            # Every engine request of the API request has an id starting with `rid` (one abort stops all).
            sub_id = rid if len(prompts) == 1 else f"{rid}-p{i}"
            ctx = MethodContext(
                engine=EngineClient(self.engine, self.tokenizer, sub_id, delta=request.stream, adapter=adapter),
                scorer=RewardClient(self.rewards, limits.reward_timeout_s, rid),
                objectives=self.objectives, limits=limits, stop_token_ids=self.stop_token_ids,
                baselines=self.baselines, value_models=value_models, render_chat=self.render_chat,
                max_model_len=self.max_model_len)
            method = cls(body.params, request, ctx)
            await method.prepare()
            methods.append(method)
        return methods

    async def _admit(self, methods: list[Method], rid: str) -> tuple[int, str | None]:
        """Admission: (sequences, the engine replica that admitted the request). 400 if the request
        could never fit, 429 if no engine replica has room for it now."""
        limits = self.config.limits
        b = methods[0].budget()
        for m in methods[1:]:
            b = b + m.budget()
        for amount, limit, name, unit in (
                (b.sequences, limits.max_concurrent_cost, "max_concurrent_cost", "concurrent sequences"),
                (b.tokens, limits.max_request_tokens, "max_request_tokens", "generated tokens"),
                (b.scores, limits.max_request_scores, "max_request_scores", "scored texts")):
            if amount > limit:
                # It could never fit, however long the client waits: a 400 naming the knobs, not a 429.
                raise BadRequest(f"this request may cost up to {amount} {unit}, more than the server allows "
                                 f"(limits.{name} = {limit}); lower {', '.join(b.knobs)}",
                                 param=b.knobs[0], code="request_too_costly")
        # Each engine replica owns a budget of limits.max_concurrent_cost sequences: the replica that
        # admits the request runs all of it (server/routing.py). A full replica says so; try the others.
        refused: list[str] = []
        answer: dict[str, Any] = {}
        for _ in range(8):
            answer = await self._admit_once(rid, b.sequences, refused)
            if answer["admitted"]:
                return b.sequences, answer["replica"]
            if answer["replica"] in refused:
                break
            refused.append(answer["replica"])
        metrics.rejected(methods[0].name, "overload")
        raise Overloaded(f"server is at capacity (engine replicas with room: none; this request costs "
                         f"{b.sequences} sequences of limits.max_concurrent_cost = {limits.max_concurrent_cost} "
                         f"per engine replica); retry later", code="overloaded", headers={"Retry-After": "1"})

    async def _admit_once(self, rid: str, sequences: int, refused: list[str]) -> dict[str, Any]:
        """One engine replica's answer. The call runs outside the request (``detached``): a client that
        goes away meanwhile cancels this task, not the admission, so a replica that admits the request
        anyway is asked to release it right away; cancelled midway, the call could leave the budget
        taken without saying so, until the lease runs out (minutes)."""
        async def ask() -> dict[str, Any]:
            return await self.engine.admit.remote(rid, sequences, exclude_replicas=list(refused))

        answer = detached(ask())
        try:
            return await asyncio.shield(answer)
        except asyncio.CancelledError:
            self._in_background(self._release_if_admitted(rid, answer))
            raise

    async def _release_if_admitted(self, rid: str, answer: asyncio.Future) -> None:
        try:
            admitted = await asyncio.wait_for(answer, timeout=10)
            if admitted["admitted"]:
                await asyncio.wait_for(self.engine.release.remote(rid, replica=admitted["replica"]), timeout=10)
        except Exception:  # noqa: BLE001 - the lease runs out on the engine replica anyway
            logger.warning("could not release the budget of %s, cancelled during its admission", rid, exc_info=True)

    async def _serve(self, body, request: Request, *, kind: str):
        request.state.alignserve_method = body.method  # for the rejection counters of the error handlers
        if self.draining:
            raise ServerError("the server is shutting down; retry on another replica", code="shutting_down",
                              status_code=503, headers={"Retry-After": "5"})
        adapter = self._check_model(body.model)
        limits = self.config.limits
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        try:
            methods = await self._methods(body, kind, rid, adapter)
        except Exception as e:  # noqa: BLE001 - refusals before admission: nothing to record or release
            raise as_api_error(e, rid) from e
        try:
            sequences, replica = await self._admit(methods, rid)
        except Exception as e:  # noqa: BLE001 - refused (or no engine to ask): nothing to release
            raise as_api_error(e, rid) from e
        for m in methods:
            m.ctx.engine.replica = replica  # every call of this request goes to the replica that admitted it
        first = methods[0]
        flight = Flight(self, rid, first.name, sequences, bool(body.stream),
                        sum(len(m.request.prompt_ids) for m in methods),
                        EngineClient(self.engine, self.tokenizer, rid, replica=replica))
        self._count(first.name, +1)
        renderer = Renderer(kind, rid, body.model, flight.outcome, logprobs=first.request.sampling.get("logprobs"),
                            include_usage=bool(body.stream_options and body.stream_options.include_usage))
        events = merge_events([m.decode() for m in methods], first.request.n)
        handed_off = False  # once the streaming response owns the flight's release
        try:
            if body.stream:
                head = await asyncio.wait_for(first_event(events), timeout=limits.request_timeout_s)
                stream = self._sse(flight, renderer, prepend(head, events))

                async def on_close() -> None:
                    flight.release()
                    for agen in (stream, events):
                        try:
                            await agen.aclose()
                        except Exception:  # noqa: BLE001 - e.g. still running in a cancelled task
                            pass
                    if flight.status != 200:  # disconnected, timed out or failed
                        if flight.status is None:
                            flight.record(499)
                        await self._abort(flight)

                handed_off = True
                return ClosingStream(stream, on_close, media_type="text/event-stream")
            payload = await asyncio.wait_for(renderer.collect(events), timeout=limits.request_timeout_s)
            response = JSONResponse(payload)  # renders now: a value JSON cannot carry fails here, not after a 200
            flight.record(200)
            await metrics.flush()  # counted before the client has its answer (a scrape after it sees it)
            return response
        except asyncio.TimeoutError:
            flight.record(504)
            await self._abort(flight)
            await metrics.flush()
            raise Timeout(f"request exceeded {limits.request_timeout_s}s", code="timeout") from None
        except asyncio.CancelledError:
            # The client went away: Ray Serve cancels this task, but cancelling our awaits does not
            # reach the engine replica, so abort its requests by id (in a task of their own).
            flight.record(499)
            self._abort_soon(flight)
            raise
        except Exception as e:  # noqa: BLE001 - surfaced in the OpenAI error shape
            err = flight.fail(e)
            self._abort_soon(flight)
            await metrics.flush()
            raise err from e
        finally:
            if not handed_off:
                flight.release()

    def _sse(self, flight: Flight, renderer: Renderer, events) -> Any:
        """The SSE body: the renderer's chunks under the request deadline; an error after the first
        chunk is sent as an error event (the status line is long gone), then [DONE]."""
        async def chunks():
            try:
                async for chunk in renderer.stream(events):
                    yield chunk
                flight.record(200)
                await metrics.flush()
            except asyncio.CancelledError:
                flight.record(499)  # client went away; generation is cancelled with this task
                raise
            except Exception as e:  # noqa: BLE001
                yield sse(flight.fail(e).body())
                await metrics.flush()
            yield DONE

        async def on_timeout() -> bytes:
            flight.record(504)
            await self._abort(flight)
            await metrics.flush()
            return sse(Timeout(f"request exceeded {self.config.limits.request_timeout_s}s", code="timeout").body())

        return with_deadline(chunks(), flight.t0 + self.config.limits.request_timeout_s, on_timeout)


# ----------------------------------------------------------------------------- builder

def engine_options(config: ServerConfig, opts: dict[str, Any]) -> dict[str, Any]:
    """A model larger than one GPU (tensor/pipeline parallel): the replica reserves a placement group of
    one bundle per GPU, the way Ray Serve LLM does; the replica actor shares the first bundle (its CPUs)
    and vLLM's Ray workers take the GPUs."""
    e = config.engine
    world = e.tensor_parallel_size * e.pipeline_parallel_size
    if world == 1:
        return opts
    d = config.engine_deployment
    gpus_per_worker = max(d.num_gpus, 1.0)
    opts = dict(opts, ray_actor_options={**opts["ray_actor_options"], "num_gpus": 0})
    opts["placement_group_bundles"] = ([{"CPU": d.num_cpus, "GPU": gpus_per_worker}]
                                       + [{"GPU": gpus_per_worker} for _ in range(world - 1)])
    opts["placement_group_strategy"] = d.placement_strategy
    return opts


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

    # One MetricsDeployment aggregates every replica's series (server/metrics.py); the engine and the
    # ingress route each request's calls to one replica (server/routing.py).
    metrics_dep = metrics.MetricsDeployment.options(
        ray_actor_options={"num_cpus": 0.1}, graceful_shutdown_timeout_s=config.limits.drain_timeout_s,
        graceful_shutdown_wait_loop_s=1.0).bind()
    engine = EngineDeployment.options(**engine_options(config, options(config.engine_deployment)),
                                      request_router_config=router_config()).bind(cfg, metrics_dep)
    rewards = RewardDeployment.options(**options(config.rewards_deployment)).bind(cfg)
    return OpenAIIngress.options(**options(config.ingress), request_router_config=router_config()).bind(
        cfg, engine, rewards, metrics_dep)


from server.engine import EngineDeployment  # noqa: E402
from server.reward_service import RewardDeployment  # noqa: E402
