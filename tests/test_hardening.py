"""Hardening: bad input, overload, disconnects and timeouts, faults, shutdown, access control.

Three groups of tests:
  * unit tests of the pieces that need no server (the stream deadline, the request gate, the
    protocol, the config/docs contract);
  * the default config, on the session ``server`` fixture (tests/conftest.py);
  * ``TestHardenedServer``: ONE extra server with small limits, API keys (from a file and from
    ALIGNSERVE_API_KEYS), /metrics behind auth, a short request timeout and the test hooks
    (``enable_test_hooks``: POST /admin/faults, GET /admin/state), stopped by its last test with
    SIGTERM to check the graceful drain.

Opt-in: ALIGNSERVE_TEST_ENGINE_CRASH=1 also kills the vLLM engine process of the hardened server
and waits for Ray Serve to replace the replica (~100 s on a 2-core machine).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml

from conftest import RunningServer, start_server, stop_server

ROOT = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"
FILE_KEY = "sk-from-file-0123456789"
ENV_KEY = "sk-from-env-9876543210"
TIMEOUT_S = 15.0
REWARD_TIMEOUT_S = 4.0
BUDGET = 4
# A prompt the base model continues for hundreds of tokens without an EOS (it keeps counting).
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def _error(r: httpx.Response, status: int, param: str | None = "*", type_: str | None = None) -> dict:
    """Assert an OpenAI-shaped error body; param '*' means any."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param != "*":
        assert err["param"] == param, err
    if type_ is not None:
        assert err["type"] == type_, err
    return err


def _metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def _sse(lines) -> list:
    """Parsed `data:` payloads of an SSE stream ('[DONE]' kept as a string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ============================================================================ unit: no server

def test_stream_deadline_applies_while_the_stream_is_silent():
    """A stream that stops producing items still times out on time: error event, [DONE], closed."""
    from server.rendering import DONE, sse, with_deadline

    timeouts, closed = [], []

    async def silent():
        try:
            yield b"data: first\n\n"
            await asyncio.sleep(3600)
            yield b"never"
        finally:
            closed.append(True)

    async def on_timeout():
        timeouts.append(True)
        return sse({"error": {"type": "timeout_error", "code": "timeout"}})

    async def main():
        t0 = time.perf_counter()
        out = [c async for c in with_deadline(silent(), t0 + 0.3, on_timeout)]
        return out, time.perf_counter() - t0

    out, elapsed = asyncio.run(main())
    assert out[0] == b"data: first\n\n"
    err = json.loads(out[1].decode()[6:])["error"]
    assert err["type"] == "timeout_error" and err["code"] == "timeout"
    assert out[-1] == DONE and len(out) == 3
    assert elapsed < 1.5, elapsed
    assert timeouts == [True] and closed == [True]


def test_stream_that_finishes_ends_without_a_timeout():
    from server.rendering import with_deadline

    timeouts = []

    async def fine():
        for i in range(3):
            yield f"data: {i}\n\n".encode()

    async def on_timeout():
        timeouts.append(True)
        return b""

    async def main():
        return [c async for c in with_deadline(fine(), time.perf_counter() + 5, on_timeout)]

    assert len(asyncio.run(main())) == 3 and timeouts == []


def _gate_app(monkeypatch, limit: int, keys: list[str] = (), metrics_auth: bool = False):
    """The gate middleware in front of an app that records what reached it."""
    import hashlib

    from server import gate

    monkeypatch.setattr(gate.GATE, "max_request_bytes", limit)
    monkeypatch.setattr(gate.GATE, "api_keys", [hashlib.sha256(k.encode()).digest() for k in keys])
    monkeypatch.setattr(gate.GATE, "metrics_require_auth", metrics_auth)
    seen = []

    async def inner(scope, receive, send):
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        seen.append((scope["path"], body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return gate.GateMiddleware(inner), seen


def test_gate_limits_body_size_before_parsing(monkeypatch):
    gate, seen = _gate_app(monkeypatch, limit=100)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://t") as c:
            small = await c.post("/v1/completions", content=b"x" * 100)
            big = await c.post("/v1/completions", content=b"x" * 101)

            async def chunks(n):
                for _ in range(n):
                    yield b"y" * 30

            chunked_small = await c.post("/v1/completions", content=chunks(3))
            chunked_big = await c.post("/v1/completions", content=chunks(4))
            return small, big, chunked_small, chunked_big

    small, big, chunked_small, chunked_big = asyncio.run(main())
    assert small.status_code == 200 and chunked_small.status_code == 200
    assert _error(big, 413, None)["code"] == "request_too_large"
    _error(chunked_big, 413, None)
    # What was under the limit reached the app intact (the chunked body is replayed).
    assert seen == [("/v1/completions", b"x" * 100), ("/v1/completions", b"y" * 90)]


def test_gate_checks_api_keys_before_parsing(monkeypatch):
    gate, seen = _gate_app(monkeypatch, limit=1000, keys=["k1", "k2"])

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://t") as c:
            return {
                "none": await c.post("/v1/completions", content=b"{not json"),
                "wrong": await c.post("/v1/completions", content=b"{}", headers={"Authorization": "Bearer k3"}),
                "prefix": await c.post("/v1/completions", content=b"{}", headers={"Authorization": "Bearer k"}),
                "no-bearer": await c.post("/v1/completions", content=b"{}", headers={"Authorization": "k1"}),
                "huge-unauth": await c.post("/v1/completions", content=b"x" * 5000),
                "k2": await c.post("/v1/completions", content=b"{}", headers={"Authorization": "bearer k2"}),
                "health": await c.get("/health"),
                "openapi": await c.get("/openapi.json"),
                "metrics": await c.get("/metrics"),
            }

    r = asyncio.run(main())
    for name in ("none", "wrong", "prefix", "no-bearer", "huge-unauth"):
        err = _error(r[name], 401, None, "authentication_error")
        assert err["code"] == "invalid_api_key" and r[name].headers["www-authenticate"] == "Bearer"
    for name in ("k2", "health", "openapi", "metrics"):
        assert r[name].status_code == 200, name
    # Only the authorized request and the open paths reached the app.
    assert [p for p, _ in seen] == ["/v1/completions", "/health", "/openapi.json", "/metrics"]


def test_gate_metrics_auth_is_configurable(monkeypatch):
    gate, _ = _gate_app(monkeypatch, limit=1000, keys=["k1"], metrics_auth=True)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://t") as c:
            return await c.get("/metrics"), await c.get("/metrics", headers={"Authorization": "Bearer k1"})

    anon, authed = asyncio.run(main())
    _error(anon, 401, None)
    assert authed.status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"model": "\ud800", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "a\udfffb"}]}, "messages.0.content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages.0.content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["\ud800"]}, "stop"),
])
def test_lone_surrogates_are_rejected_naming_the_field(body, param):
    """JSON can smuggle lone surrogates ("\\ud800"); the tokenizer would crash on them (a 500)."""
    from pydantic import ValidationError

    from server.protocol import ChatCompletionRequest

    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate(body)
    locs = [".".join(str(p) for p in err["loc"] if "[" not in str(p) and str(p) != "str") for err in e.value.errors()]
    assert param in locs


def test_test_hooks_and_auth_are_off_by_default():
    from server.config import ServerConfig

    c = ServerConfig()
    assert c.enable_test_hooks is False and c.api_keys == [] and c.metrics_require_auth is False
    assert c.ingress.max_queued_requests > 0  # the ingress queue is bounded


def test_ingress_queue_is_bounded_with_429():
    """Past max_ongoing_requests + max_queued_requests, Ray Serve's proxy answers 429 + Retry-After."""
    from ray.serve._private.build_app import build_app as build_built_app

    from server.app import build_app

    built = build_built_app(build_app({}), name="alignserve")
    ingress = next(d for d in built.deployments if d.name == "OpenAIIngress")
    dc = ingress._deployment_config  # noqa: SLF001
    assert dc.max_ongoing_requests == 256 and dc.max_queued_requests == 256
    assert dc.backpressure_config.status_code == 429 and dc.backpressure_config.retry_after_s == 1


def test_every_limit_is_documented():
    from server.config import LimitsConfig

    doc = (ROOT / "docs" / "limits_and_security.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    for name, field in LimitsConfig.model_fields.items():
        row = next((r for r in rows if r.startswith(f"| `{name}`")), None)
        assert row is not None, f"limits.{name} has no row in the limits table"
        assert f"| {field.default} |" in row, f"limits.{name}: the table does not give its default {field.default}"
    for word in ("ALIGNSERVE_API_KEYS", "api_keys_file", "metrics_require_auth", "enable_test_hooks", "413", "429",
                 "Retry-After", "504", "502", "499"):
        assert word in doc, word


# ---------------------------------------------------------------------------- unit: audit fixes

DEPLOY_YAMLS = [ROOT / "deploy" / "serve_config.yaml", ROOT / "deploy" / "k8s" / "base" / "serve-config.yaml",
                ROOT / "deploy" / "k8s" / "overlays" / "gpu" / "serve-config.yaml"]


def _yaml_args(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text())
    app = next(a for a in cfg["applications"] if a["import_path"] == "server.app:build_app")
    return app["args"]


@pytest.mark.parametrize("path", DEPLOY_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.parametrize("partial", [False, True], ids=["as-shipped", "without-max_queued_requests"])
def test_deployed_configs_bound_the_ingress_queue(path, partial):
    """Each YAML's args, through build_app, give the ingress a bounded queue (429 past it), even
    when its `ingress:` block does not name max_queued_requests (it merges with the defaults)."""
    from ray.serve._private.build_app import build_app as build_built_app

    from server.app import build_app
    from server.config import ServerConfig

    args = _yaml_args(path)
    if partial:
        args["ingress"].pop("max_queued_requests", None)
    else:
        assert args["ingress"]["max_queued_requests"] > 0  # also explicit in the file
    assert ServerConfig.model_validate(args).ingress.max_queued_requests > 0
    built = build_built_app(build_app(args), name="alignserve")
    dc = next(d for d in built.deployments if d.name == "OpenAIIngress")._deployment_config  # noqa: SLF001
    assert dc.max_queued_requests > 0
    assert dc.backpressure_config.status_code == 429


def test_partial_deployment_blocks_merge_with_defaults():
    from server.config import ServerConfig

    c = ServerConfig.model_validate({"ingress": {"num_replicas": 2}, "engine_deployment": {"num_gpus": 1}})
    d = ServerConfig()
    assert c.ingress.num_replicas == 2 and c.ingress.max_queued_requests == d.ingress.max_queued_requests == 256
    assert c.ingress.max_ongoing_requests == d.ingress.max_ongoing_requests and c.ingress.num_cpus == 0.5
    assert c.engine_deployment.num_gpus == 1 and c.engine_deployment.max_ongoing_requests == 512
    # An explicit -1 still means unbounded, and a round trip (what replicas get) changes nothing.
    assert ServerConfig.model_validate({"ingress": {"max_queued_requests": -1}}).ingress.max_queued_requests == -1
    assert ServerConfig.model_validate(c.model_dump()) == c


def test_every_deployment_drains_on_graceful_shutdown():
    """serve run / serve deploy / KubeRay stop replicas through Ray Serve: they drain too."""
    from ray.serve._private.build_app import build_app as build_built_app

    from server.app import build_app

    built = build_built_app(build_app({"limits": {"drain_timeout_s": 12}}), name="alignserve")
    assert len(built.deployments) == 4
    for d in built.deployments:
        dc = d._deployment_config  # noqa: SLF001
        assert dc.graceful_shutdown_timeout_s == 12 and dc.graceful_shutdown_wait_loop_s == 1.0, d.name


def test_api_key_file_missing_or_empty_fails_closed(tmp_path, monkeypatch):
    from server.config import ServerConfig
    from server.gate import configure
    from server.gate import load_api_keys as _load_api_keys

    monkeypatch.delenv("ALIGNSERVE_API_KEYS", raising=False)
    monkeypatch.delenv("ALIGNSERVE_API_KEYS_FILE", raising=False)
    missing = tmp_path / "nope.txt"
    with pytest.raises(RuntimeError, match="does not exist"):
        _load_api_keys(ServerConfig(api_keys_file=str(missing)))
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n   \n")
    with pytest.raises(RuntimeError, match="holds no key"):
        _load_api_keys(ServerConfig(api_keys_file=str(empty)))
    monkeypatch.setenv("ALIGNSERVE_API_KEYS_FILE", str(missing))
    with pytest.raises(RuntimeError, match=str(missing)):
        _load_api_keys(ServerConfig())
    monkeypatch.delenv("ALIGNSERVE_API_KEYS_FILE")
    good = tmp_path / "keys.txt"
    good.write_text("# keys\nk1\n  k2  \n")
    assert _load_api_keys(ServerConfig(api_keys_file=str(good))) == ["k1", "k2"]
    assert _load_api_keys(ServerConfig()) == []  # nothing configured: open, as documented
    # /metrics behind auth with no key to check would be open after all: refuse to start instead.
    with pytest.raises(RuntimeError, match="metrics_require_auth"):
        configure(ServerConfig(metrics_require_auth=True))


class _SlowMethod:
    """A fake `handle.method` whose `.remote()` answers after `delay` seconds (cancellable)."""

    def __init__(self, delay: float, result=None):
        self.delay, self.result, self.cancelled = delay, result, False

    def remote(self, *args):
        outer = self

        class Response:
            def __await__(self):
                return outer._run().__await__()

            def cancel(self):
                outer.cancelled = True

        return Response()

    async def _run(self):
        await asyncio.sleep(self.delay)
        return self.result


def test_reward_calls_time_out_as_an_explicit_alignment_error():
    from decoders.base import AlignmentFailure
    from server.errors import as_api_error
    from server.handles import RewardClient, RewardTimeout, with_deadline

    # The deadline itself: the call is cancelled on the replica.
    slow = _SlowMethod(5, {"sentiment": [0.5]})
    t = time.perf_counter()
    with pytest.raises(RewardTimeout):
        asyncio.run(with_deadline(slow.remote(), 0.2))
    assert time.perf_counter() - t < 2 and slow.cancelled
    fast = SimpleNamespace(score=_SlowMethod(0, {"sentiment": [0.5]}))
    assert asyncio.run(RewardClient(fast, 5).score(["sentiment"], ["p"], ["t"])) == {"sentiment": [0.5]}

    # Every scoring path goes through RewardClient: a timeout is a 502 reward_timeout.
    hung = SimpleNamespace(score=_SlowMethod(5, {"sentiment": [0.5]}))
    with pytest.raises(AlignmentFailure) as e:
        asyncio.run(RewardClient(hung, 0.2, "cmpl-x").score(["sentiment"], ["p"], ["t"]))
    assert e.value.code == "reward_timeout" and e.value.component == "reward"
    err = as_api_error(e.value, "cmpl-x")
    assert err.code == "reward_timeout" and err.status_code == 502 and err.type == "alignment_error"
    assert "cmpl-x" in err.message

    # Anything else the reward service raises: 502 reward_failed, without the library's message.
    class Broken:
        def remote(self, *args):
            async def boom():
                raise RuntimeError("/home/me/.cache/model.bin: CUDA error 719")
            return boom()

    with pytest.raises(AlignmentFailure) as e:
        asyncio.run(RewardClient(SimpleNamespace(score=Broken()), 5, "cmpl-y").score(["sentiment"], ["p"], ["t"]))
    err = as_api_error(e.value, "cmpl-y")
    assert err.code == "reward_failed" and err.status_code == 502
    assert "/home" not in err.message and "RuntimeError" not in err.message and "cmpl-y" in err.message


def test_reward_deployment_sleep_fault():
    from server.reward_service import RewardDeployment

    dep = object.__new__(RewardDeployment.func_or_class)
    dep._fail_next, dep._fault_kind, dep._fault_sleep_s = 0, "fail", 0.0

    async def score_item(item):
        return 1.0

    dep._score_item = score_item

    async def main():
        await dep.inject_faults(1, "sleep", 0.3)
        t = time.perf_counter()
        slow = await dep.score(["sentiment"], ["p"], ["r"])
        slow_s = time.perf_counter() - t
        t = time.perf_counter()
        fast = await dep.score(["sentiment"], ["p"], ["r"])
        return slow, slow_s, fast, time.perf_counter() - t

    slow, slow_s, fast, fast_s = asyncio.run(main())
    assert slow == fast == {"sentiment": [1.0]} and slow_s >= 0.3 and fast_s < 0.2
    with pytest.raises(ValueError):
        asyncio.run(dep.inject_faults(1, "explode"))


class _Remote:
    """A deployment handle method: ``.remote(...)`` returns an awaitable (tests need no Ray)."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        async def call():
            return self.fn(*args, **kwargs)
        return call()


class _SilentEngine:
    """A stand-in for the engine deployment's handle: a streamed request yields one token, then
    nothing (as a long generation would); ``abort`` records the request ids it is asked to stop."""

    def __init__(self):
        self.aborted: list[str] = []
        self.released: list[str] = []
        self.info = _Remote(lambda: {"value_models": []})
        self.abort = _Remote(lambda rid, replica=None: self.aborted.append(rid) or 1)
        self.admit = _Remote(lambda rid, n, exclude_replicas=(): {"admitted": True, "replica": "r0"})
        self.release = _Remote(lambda rid, replica=None: self.released.append(rid))
        self.stream = SimpleNamespace(remote=self._stream)

    def options(self, **kw):
        return self

    async def _stream(self, prompt_ids, params, rid, delta=True, replica=None):
        from decoders.base import Completion, StreamChunk

        yield StreamChunk(outputs=[Completion(text="x", token_ids=[1])])
        await asyncio.sleep(3600)


def _ingress(**limits):
    """The real ingress (its admission, methods, rendering), in-process on stand-in deployment handles."""
    from server.app import OpenAIIngress

    engine = _SilentEngine()
    wrapper = OpenAIIngress.func_or_class  # Ray Serve's ASGI wrapper around our class (async __init__)
    ing = object.__new__(wrapper)
    wrapper.__mro__[1].__init__(ing, {"limits": limits}, engine, SimpleNamespace())
    ing.aborted = engine.aborted
    return ing


def _request():
    return SimpleNamespace(state=SimpleNamespace(), headers={})


def _completion(**kw):
    from server.protocol import CompletionRequest

    return CompletionRequest.model_validate({"model": MODEL, "prompt": "hi", **kw})


@pytest.mark.parametrize("kw, param", [
    ({"alignment": {"method": "best_of_n", "n": 8, "weights": {"sentiment": 1}}}, "alignment.n"),
    ({"alignment": {"method": "transfer_q", "top_k": 8, "weights": {"sentiment": 1}}}, "alignment.top_k"),
    ({"alignment": {"method": "args", "weights": {"sentiment": 1}}, "n": 2, "temperature": 1}, "n"),
    ({"n": 8, "temperature": 1}, "n"),
])
def test_a_request_costlier_than_the_whole_budget_is_a_400_naming_the_knob(kw, param):
    from server.errors import BadRequest

    ing = _ingress(max_concurrent_cost=4)
    with pytest.raises(BadRequest) as e:
        asyncio.run(ing._serve(_completion(**kw), _request(), kind="text"))
    assert e.value.status_code == 400 and e.value.code == "request_too_costly" and e.value.param == param
    assert "Retry-After" not in e.value.headers and ing.requests_in_flight == 0


@pytest.mark.parametrize("kw, param, limit", [
    ({"max_tokens": 512, "alignment": {"method": "transfer_q", "weights": {"sentiment": 1}, "top_k": 50, "block": 1,
                                       "rollout_tokens": 64}}, "alignment.top_k", "max_request_tokens"),
    ({"max_tokens": 512, "alignment": {"method": "args", "weights": {"sentiment": 1}, "top_k": 10, "block": 1}},
     "alignment.top_k", "max_request_scores"),
])
def test_work_past_the_per_request_limit_is_refused_up_front(kw, param, limit):
    """Cost is work: tokens across candidates and rollouts, and texts scored, not just sequences."""
    from server.errors import BadRequest

    ing = _ingress()
    with pytest.raises(BadRequest) as e:
        asyncio.run(ing._serve(_completion(**kw), _request(), kind="text"))
    assert e.value.code == "request_too_costly" and e.value.param == param and limit in e.value.message
    assert "alignment.rollout_tokens" in e.value.message or "rollout" not in json.dumps(kw)
    assert ing.requests_in_flight == 0


def test_a_cancelled_non_streamed_request_aborts_its_engine_work():
    """A client that goes away mid-request: Ray Serve cancels the task; the engine work is aborted
    by id (cancelling our await does not reach the engine replica) and the budget comes back."""
    ing = _ingress()

    async def main():
        task = asyncio.ensure_future(ing._serve(_completion(), _request(), kind="text"))
        await asyncio.sleep(0.5)
        assert ing.requests_in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(5):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert len(ing.aborted) == 1 and ing.aborted[0].startswith("cmpl-")
    assert ing.requests_in_flight == 0 and not ing._background and ing.engine.released == ing.aborted


def test_a_request_cancelled_during_its_admission_gives_the_budget_back():
    """A client that goes away while an engine replica is admitting its request: the replica admits it
    anyway (the cancellation stops our await, not its call), so the ingress releases it there."""
    ing = _ingress()
    engine = ing.engine
    admitted: list[str] = []

    async def slow_admit(rid, n, exclude_replicas=()):
        admitted.append(rid)  # taken on the replica, whose answer is still on its way
        await asyncio.sleep(0.3)
        return {"admitted": True, "replica": "r1"}

    released: list[tuple[str, str]] = []

    async def release(rid, replica=None):
        released.append((rid, replica))

    engine.admit = SimpleNamespace(remote=slow_admit)
    engine.release = SimpleNamespace(remote=release)

    async def main():
        task = asyncio.ensure_future(ing._serve(_completion(), _request(), kind="text"))
        while not admitted:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not ing._background:
                break
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert released == [(admitted[0], "r1")] and not ing._background
    assert ing.requests_in_flight == 0 and ing.aborted == []


def test_a_dead_engine_is_a_503_and_a_failing_chat_template_a_400():
    """Work that used to run before the error handling (the value-model lookup, the chat template)."""
    from server.errors import APIError

    class ActorDiedError(Exception):
        pass

    def dead():
        raise ActorDiedError("the actor died unexpectedly before finishing this task")

    ing = _ingress()
    ing.engine.info = _Remote(dead)
    vas = _completion(alignment={"method": "vas", "weights": {"sentiment": 1}})
    with pytest.raises(APIError) as e:
        asyncio.run(ing._serve(vas, _request(), kind="text"))
    assert e.value.status_code == 503 and e.value.code == "engine_unavailable" and "Retry-After" in e.value.headers
    assert "actor died" not in e.value.message

    from jinja2 import TemplateError
    from server.protocol import ChatCompletionRequest

    def refuse(*a, **kw):
        raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    ing = _ingress()
    ing.tokenizer.apply_chat_template = refuse
    chat = ChatCompletionRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(APIError) as e:
        asyncio.run(ing._serve(chat, _request(), kind="chat"))
    assert e.value.status_code == 400 and e.value.param == "messages" and "alternate" in e.value.message


def test_vllm_input_validation_is_a_400():
    from vllm.exceptions import VLLMValidationError

    from decoders.base import ParamError
    from server.engine import refusals_as_param_errors
    from server.errors import as_api_error

    async def refused():
        raise VLLMValidationError("logit_bias token id 99999999 is out of vocabulary", parameter="logit_bias")
        yield  # pragma: no cover

    async def drain():
        return [x async for x in refusals_as_param_errors(refused())]

    with pytest.raises(ParamError) as e:
        asyncio.run(drain())
    err = as_api_error(e.value)
    assert err.status_code == 400 and err.param == "logit_bias" and "vocabulary" in err.message
    # Across Ray the error is pickled: its fields survive.
    import pickle

    again = pickle.loads(pickle.dumps(e.value))
    assert isinstance(again, ParamError) and again.param == "logit_bias"


def test_a_failed_non_streamed_request_aborts_its_engine_work():
    """A method that fails after starting engine work: its requests are aborted, its budget returned."""
    ing = _ingress()

    async def failing(prompt_ids, params, rid, delta=True, replica=None):
        from decoders.base import Completion, StreamChunk

        yield StreamChunk(outputs=[Completion(text="x", token_ids=[1])])
        raise RuntimeError("the engine replica lost its connection")

    ing.engine.stream = SimpleNamespace(remote=failing)

    async def main():
        with pytest.raises(Exception) as e:
            await ing._serve(_completion(), _request(), kind="text")
        for _ in range(5):
            await asyncio.sleep(0)
        return e.value

    err = asyncio.run(main())
    assert err.status_code == 500 and "lost its connection" not in err.message
    assert len(ing.aborted) == 1 and ing.requests_in_flight == 0


def test_refusals_are_counted_by_reason():
    from fastapi.exceptions import RequestValidationError

    from server import metrics
    from server.app import _api_error, _validation_error
    from server.errors import APIError, BadRequest, Overloaded, ServerError

    def rejected(method: str, reason: str) -> float:
        v = metrics.REGISTRY.get_sample_value("alignserve_requests_rejected_total",
                                              {"method": method, "reason": reason})
        return v or 0.0

    ing = _ingress()

    async def refuse(req, request) -> APIError:
        try:
            await ing._serve(req, request, kind="text")
        except APIError as e:
            await _api_error(request, e)
            return e
        raise AssertionError("not refused")

    before = {r: rejected("none", r) for r in ("invalid", "not_found", "draining")}
    asyncio.run(refuse(_completion(max_tokens=10**6), _request()))
    asyncio.run(refuse(_completion(model="gpt-4"), _request()))
    ing.draining = True
    e = asyncio.run(refuse(_completion(), _request()))
    assert e.status_code == 503 and e.code == "shutting_down"
    assert {r: rejected("none", r) - before[r] for r in before} == {"invalid": 1, "not_found": 1, "draining": 1}
    # Bodies that do not parse: no method yet.
    unknown = rejected("unknown", "invalid")
    asyncio.run(_validation_error(_request(), RequestValidationError([{"loc": ("body", "n"), "msg": "bad",
                                                                       "type": "int_type"}])))
    assert rejected("unknown", "invalid") == unknown + 1
    # Counted where raised (no double count): overload, auth.
    overload = rejected("none", "overload")
    asyncio.run(_api_error(_request(), Overloaded("full", code="overloaded")))
    assert rejected("none", "overload") == overload
    asyncio.run(_api_error(_request(), BadRequest("x", status_code=413)))
    asyncio.run(_api_error(_request(), ServerError("boom")))
    assert rejected("unknown", "invalid") == unknown + 1


def test_time_to_first_token_is_observed_for_streamed_requests_only():
    from server import metrics
    from server.rendering import Outcome

    def ttft_count() -> float:
        return metrics.REGISTRY.get_sample_value("alignserve_time_to_first_token_seconds_count",
                                                 {"method": "none"}) or 0.0

    before = ttft_count()
    for stream in (False, True):
        t0 = time.perf_counter()
        out = Outcome(prompt_tokens=1, started_t=t0, first_token_t=t0 + 0.01, last_token_t=t0 + 0.01,
                      completion_tokens=1)
        metrics.record("none", out, 200, 0.02, streamed=stream)
        assert ttft_count() == before + (1 if stream else 0), stream


def test_500s_are_generic_and_only_deliberate_errors_are_400s():
    from server.errors import BadRequest
    from server.errors import as_api_error as _as_api_error

    for exc in (ValueError("/home/me/.cache/alignserve/model: bad shape"), RuntimeError("secret detail")):
        err = _as_api_error(exc, "cmpl-abc")
        assert err.status_code == 500 and err.type == "server_error" and err.code == "internal_error"
        assert "cmpl-abc" in err.message and "secret" not in err.message and "/home" not in err.message
    bad = BadRequest("n must be <= 8", param="n")
    assert _as_api_error(bad) is bad
    cause = SimpleNamespace(cause=BadRequest("x", param="y"))  # a Ray error wrapping ours
    assert _as_api_error(cause).param == "y"


def test_models_hide_the_local_path_and_can_be_retrieved_one_by_one():
    from server.app import app
    from server.errors import NotFound

    ing = _ingress()
    listed = asyncio.run(ing.models(_request())).data
    # the base model, then its LoRA adapters (ids, never paths, as root)
    assert [(m.id, m.root, m.parent) for m in listed] == [(MODEL, MODEL, None)] + [
        (f"{MODEL}-{a}", f"{MODEL}-{a}", MODEL) for a in ("safety", "sentiment")]
    card = asyncio.run(ing.model(MODEL, _request()))
    assert card.id == MODEL and card.root == MODEL and card.object == "model"
    with pytest.raises(NotFound) as e:
        asyncio.run(ing.model("gpt-4", _request()))
    assert e.value.param == "model" and e.value.code == "model_not_found"
    assert "/v1/models/{model:path}" in [r.path for r in app.routes]


@pytest.mark.parametrize("cls_name, body, param", [
    ("ChatCompletionRequest", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("ChatCompletionRequest", {"messages": [{"role": "user", "content": "hi"}], "stream_options": {}},
     "stream_options"),
    ("ChatCompletionRequest", {"messages": [{"role": "user", "content": "hi"}],
                               "alignment": {"method": "vas", "weights": {"s": 1}, "rollout_tokens": 2}},
     "alignment.rollout_tokens"),
    ("CompletionRequest", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("CompletionRequest", {"prompt": "x", "best_of": 4}, "best_of"),
    ("ChatCompletionRequest", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     "tools"),
])
def test_validation_400s_name_the_exact_parameter(cls_name, body, param):
    """What the HTTP layer answers for each (the RequestValidationError handler of the app)."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    from server import protocol
    from server.app import _validation_error

    with pytest.raises(ValidationError) as e:
        getattr(protocol, cls_name).model_validate({"model": MODEL, **body})
    errors = [dict(err, loc=("body", *err["loc"])) for err in e.value.errors()]
    r = asyncio.run(_validation_error(_request(), RequestValidationError(errors)))
    assert r.status_code == 400
    assert json.loads(r.body)["error"]["param"] == param


@pytest.mark.parametrize("env, expect", [({}, None), ({"RAY_METRICS_EXPORT_PORT": "18080"}, 18080)])
def test_make_serve_can_fix_rays_metrics_port(monkeypatch, env, expect):
    import ray

    from decoders import base_model as model_cache
    from server import serve as serve_cli

    class Stop(Exception):
        pass

    seen = {}

    def fake_init(**kw):
        seen.update(kw)
        raise Stop

    monkeypatch.delenv("RAY_METRICS_EXPORT_PORT", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(model_cache, "resolve_model", lambda model: "/unused")
    monkeypatch.setattr(ray, "init", fake_init)
    with pytest.raises(Stop):
        serve_cli.main(["--port", "1"])
    assert seen.get("_metrics_export_port") == expect


def test_console_script_points_at_a_real_main():
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["alignserve"].split(":")
    assert callable(getattr(importlib.import_module(module), func))


# ============================================================================ the default config

def _chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, **kw}


def _bon(**kw) -> dict:
    return _chat(alignment={"method": "best_of_n", "n": 2, "weights": {"sentiment": 1.0}, **kw})


# (name, path, JSON body, status, param)
BAD_REQUESTS = [
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("missing model", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("body is a list", "/v1/chat/completions", [], 400, None),
    ("max_tokens type", "/v1/chat/completions", _chat(max_tokens="many"), 400, "max_tokens"),
    ("messages type", "/v1/chat/completions", _chat(messages="hi"), 400, "messages"),
    ("prompt type", "/v1/completions", {"model": MODEL, "prompt": 12}, 400, "prompt"),
    ("stream type", "/v1/chat/completions", _chat(stream="yes"), 400, "stream"),
    ("max_tokens as string", "/v1/chat/completions", _chat(max_tokens="5"), 400, "max_tokens"),
    ("temperature as bool", "/v1/chat/completions", _chat(temperature=True), 400, "temperature"),
    ("empty messages", "/v1/chat/completions", _chat(messages=[]), 400, "messages"),
    ("bad role", "/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "x"}]), 400,
     "messages.0.role"),
    ("image part", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
     400, "messages.0.content"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("empty token list", "/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("token id out of vocab", "/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
    ("prompt over context", "/v1/completions", {"model": MODEL, "prompt": "hello " * 1800, "max_tokens": 4}, 400,
     "prompt"),
    ("chat over context", "/v1/chat/completions",
     _chat(messages=[{"role": "user", "content": "hello " * 1800}]), 400, "messages"),
    ("max_tokens 0", "/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", "/v1/chat/completions", _chat(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens huge", "/v1/chat/completions", _chat(max_tokens=10**12), 400, "max_tokens"),
    ("max_completion_tokens huge", "/v1/chat/completions", _chat(max_completion_tokens=100_000), 400,
     "max_completion_tokens"),
    ("n 0", "/v1/chat/completions", _chat(n=0), 400, "n"),
    ("n huge", "/v1/chat/completions", _chat(n=1000), 400, "n"),
    ("temperature huge", "/v1/chat/completions", _chat(temperature=1e9), 400, "temperature"),
    ("top_logprobs huge", "/v1/chat/completions", _chat(logprobs=True, top_logprobs=99), 400, "top_logprobs"),
    ("unknown model", "/v1/chat/completions", _chat(model="gpt-4"), 404, "model"),
    ("unknown method", "/v1/chat/completions", _chat(alignment={"method": "rlhf"}), 400, "alignment.method"),
    ("unknown alignment field", "/v1/chat/completions", _chat(alignment={"method": "none", "temperature": 1}), 400,
     "alignment.temperature"),
    ("knob of another method", "/v1/chat/completions", _bon(rollout_tokens=4), 400, "alignment.rollout_tokens"),
    ("top_logprobs without logprobs", "/v1/chat/completions", _chat(top_logprobs=2), 400, "top_logprobs"),
    ("stream_options without stream", "/v1/chat/completions", _chat(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("suffix", "/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("unknown objective", "/v1/chat/completions", _chat(alignment={"method": "best_of_n", "weights": {"iq": 1}}),
     400, "alignment.weights.iq"),
    ("negative weight", "/v1/chat/completions", _chat(alignment={"method": "best_of_n", "weights": {"sentiment": -1}}),
     400, "alignment.weights.sentiment"),
    ("huge weight", "/v1/chat/completions", _chat(alignment={"method": "best_of_n", "weights": {"sentiment": 1e300}}),
     400, "alignment.weights.sentiment"),
    ("weight type", "/v1/chat/completions", _chat(alignment={"method": "best_of_n", "weights": {"sentiment": "1"}}),
     400, "alignment.weights.sentiment"),
    ("all-zero weights", "/v1/chat/completions", _chat(alignment={"method": "best_of_n", "weights": {"sentiment": 0}}),
     400, "alignment.weights"),
    ("no weights", "/v1/chat/completions", _chat(alignment={"method": "best_of_n"}), 400, "alignment.weights"),
    ("bon n 0", "/v1/chat/completions", _bon(n=0), 400, "alignment.n"),
    ("bon n huge", "/v1/chat/completions", _bon(n=10**6), 400, "alignment.n"),
    ("top_k 0", "/v1/chat/completions",
     _chat(alignment={"method": "transfer_q", "weights": {"sentiment": 1}, "top_k": 0}), 400, "alignment.top_k"),
    ("top_k huge", "/v1/chat/completions",
     _chat(alignment={"method": "transfer_q", "weights": {"sentiment": 1}, "top_k": 10**6}), 400, "alignment.top_k"),
    ("rollout_tokens negative", "/v1/chat/completions",
     _chat(alignment={"method": "transfer_q", "weights": {"sentiment": 1}, "rollout_tokens": -1}), 400,
     "alignment.rollout_tokens"),
    ("rollout_tokens huge", "/v1/chat/completions",
     _chat(alignment={"method": "transfer_q", "weights": {"sentiment": 1}, "rollout_tokens": 10**6}), 400,
     "alignment.rollout_tokens"),
    ("alpha negative", "/v1/chat/completions",
     _chat(alignment={"method": "transfer_q", "weights": {"sentiment": 1}, "alpha": -1}), 400, "alignment.alpha"),
    ("unknown transform", "/v1/chat/completions", _bon(transform="exp"), 400, "alignment.transform"),
    # Second round: requests that used to pass validation and fail inside (500s, non-JSON bodies).
    ("best-of-N, greedy", "/v1/chat/completions",
     _chat(temperature=0, alignment={"method": "best_of_n", "n": 2, "weights": {"sentiment": 1.0}}), 400,
     "temperature"),
    ("cap far outside any reward", "/v1/chat/completions",
     _chat(alignment={"method": "best_of_n", "n": 2, "weights": {"sentiment": 100}, "caps": {"sentiment": -1e307}}),
     400, "alignment.caps.sentiment"),
    ("Transfer Q* work past the limit", "/v1/completions",
     {"model": MODEL, "prompt": "x", "max_tokens": 512,
      "alignment": {"method": "transfer_q", "weights": {"sentiment": 1}, "top_k": 50, "block": 1, "rollout_tokens": 64}},
     400, "alignment.top_k"),
    ("logit_bias outside the vocabulary", "/v1/chat/completions", _chat(logit_bias={"99999999": 5}), 400,
     "logit_bias"),
    ("echo with an aligned method", "/v1/completions",
     {"model": MODEL, "prompt": "x", "echo": True, "alignment": {"method": "best_of_n", "weights": {"sentiment": 1}}},
     400, "echo"),
    ("too many messages", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "x"}] * 257), 400,
     "messages"),
    ("function calling", "/v1/chat/completions",
     _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400, "tools"),
    ("structured output", "/v1/chat/completions", _chat(response_format={"type": "json_object"}), 400,
     "response_format.type"),
    ("max_tokens 0 without echo", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400,
     "max_tokens"),
    ("unknown baseline", "/v1/chat/completions",
     _chat(alignment={"method": "transfer_q", "weights": {"sentiment": 1}, "baseline": "gpt4-rlhf"}), 400,
     "alignment.baseline"),
    # Nothing in a request names a file, a model or code to load.
    ("model as absolute path", "/v1/chat/completions", _chat(model="/etc/passwd"), 404, "model"),
    ("model as relative path", "/v1/completions", {"model": "../../models/evil", "prompt": "x"}, 404, "model"),
    ("model as hub id", "/v1/chat/completions", _chat(model="HuggingFaceTB/SmolLM2-1.7B-Instruct"), 404, "model"),
    ("model as embedded id", "/v1/chat/completions", _chat(model="embedded:SmolLM2-135M-Instruct"), 404, "model"),
    ("baseline as path", "/v1/chat/completions",
     _chat(alignment={"method": "transfer_q", "weights": {"sentiment": 1}, "baseline": "../../etc/passwd"}), 400,
     "alignment.baseline"),
    ("objective as path", "/v1/chat/completions",
     _chat(alignment={"method": "best_of_n", "weights": {"/tmp/reward_model": 1}}), 400,
     "alignment.weights./tmp/reward_model"),
    ("value model as path", "/v1/chat/completions",
     _chat(alignment={"method": "vas", "weights": {"./value_models/x.pt": 1}}), 400,
     "alignment.weights../value_models/x.pt"),
]


@pytest.mark.integration
@pytest.mark.parametrize("name, path, body, status, param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_is_a_4xx_naming_the_parameter(server, name, path, body, status, param):
    r = httpx.post(server.url + path, json=body, timeout=60)
    _error(r, status, param)


# Bodies json.dumps would refuse or fix: sent as raw bytes. (name, raw body, param)
RAW_BAD = [
    ("malformed JSON", b'{"model": "x", "messages": [', None),
    ("trailing garbage", b'{"model": "x"} xyz', None),
    ("invalid UTF-8", b'{"model": "\xff\xfe", "messages": [{"role": "user", "content": "\xc3\x28"}]}', None),
    ("lone surrogate", b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % MODEL.encode(),
     "messages.0.content"),
    ("lone surrogate prompt", b'{"model": "%s", "prompt": "a\\udc00"}' % MODEL.encode(), "prompt"),
    ("NaN weight", json.dumps(_bon() | {"alignment": {"method": "best_of_n", "weights": {"sentiment": math.nan}}})
     .encode(), "alignment.weights.sentiment"),
    ("Infinity weight", json.dumps(_bon() | {"alignment": {"method": "best_of_n", "weights": {"sentiment": math.inf}}})
     .encode(), "alignment.weights.sentiment"),
    ("-Infinity temperature", json.dumps(_chat(temperature=-math.inf)).encode(), "temperature"),
    ("NaN max_tokens", json.dumps(_chat(max_tokens=math.nan)).encode(), "max_tokens"),
    ("deep nesting", b"[" * 50_000 + b"]" * 50_000, None),
    ("null body", b"null", None),
    ("empty body", b"", None),
]


@pytest.mark.integration
def test_engine_refusals_are_400s_not_failed_calls_in_the_log(server):
    """vLLM refusing a request's parameters is the client's error: a 400 naming the parameter, streamed
    or not, sent back by the engine replica as an answer; a raised exception would be logged by Ray
    Serve as a failed call, at ERROR with its traceback, once per bad request."""
    start = server.log.stat().st_size
    body = _chat(logit_bias={"99999999": 5})
    _error(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60), 400, "logit_bias")
    _error(httpx.post(server.url + "/v1/chat/completions", json=dict(body, stream=True), timeout=60), 400, "logit_bias")
    time.sleep(3)  # Ray forwards the replicas' logs to the driver about once a second
    with server.log.open(errors="replace") as f:
        f.seek(start)
        logged = f.read()
    assert "ParamError" not in logged and "Request failed" not in logged, logged[-3000:]


def test_engine_refusals_come_back_as_param_errors():
    """What the engine replica answers for a refused request (``EngineDeployment.stream`` yields it,
    ``generate`` returns it) is raised again on the ingress side, for the 400."""
    from decoders.base import ParamError
    from server.handles import EngineClient

    refusal = ParamError("the engine refused the request: out of vocabulary", param="logit_bias")

    async def generate(*a, **kw):
        return refusal

    async def stream(*a, **kw):
        yield refusal

    handle = SimpleNamespace(generate=SimpleNamespace(remote=generate), stream=SimpleNamespace(remote=stream))
    handle.options = lambda **kw: handle
    client = EngineClient(handle, None, "cmpl-x", replica="r0")

    async def main():
        with pytest.raises(ParamError) as e:
            await client.generate([[1]], {})
        assert e.value.param == "logit_bias"
        with pytest.raises(ParamError):
            async for _ in client.stream([1], {}):
                pass

    asyncio.run(main())


@pytest.mark.integration
@pytest.mark.parametrize("name, raw, param", RAW_BAD, ids=[c[0] for c in RAW_BAD])
def test_undecodable_bodies_are_400(server, name, raw, param):
    path = "/v1/completions" if b'"prompt"' in raw else "/v1/chat/completions"
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
    _error(r, 400, param)


@pytest.mark.integration
def test_body_over_max_request_bytes_is_413_before_parsing(server):
    from server.config import LimitsConfig

    limit = LimitsConfig().max_request_bytes
    huge = json.dumps({"model": MODEL, "prompt": "x" * limit}).encode()
    r = httpx.post(server.url + "/v1/completions", content=huge, headers={"content-type": "application/json"},
                   timeout=60)
    assert _error(r, 413, None)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the gate counts what it reads
        for i in range(0, len(huge), 65536):
            yield huge[i:i + 65536]

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    _error(r, 413, None)
    # Invalid JSON over the limit is still 413: the body is never parsed.
    r = httpx.post(server.url + "/v1/completions", content=b"{" * (limit + 1), timeout=60)
    _error(r, 413, None)


@pytest.mark.integration
def test_unknown_routes_and_methods_are_openai_shaped(server):
    _error(httpx.get(server.url + "/v1/nothing-here", timeout=30), 404, None)
    _error(httpx.get(server.url + "/v1/chat/completions", timeout=30), 405, None)


@pytest.mark.integration
def test_default_config_has_open_metrics_and_no_test_hooks(server):
    assert httpx.get(server.url + "/metrics", timeout=30).status_code == 200
    _error(httpx.get(server.url + "/admin/state", timeout=30), 404, None)
    _error(httpx.post(server.url + "/admin/faults", params={"count": 5}, timeout=30), 404, None)


@pytest.mark.integration
def test_openapi_schema_is_served_and_describes_the_bodies(server):
    r = httpx.get(server.url + "/openapi.json", timeout=30)
    assert r.status_code == 200
    spec = r.json()
    schemas = spec["components"]["schemas"]
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        op = spec["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(model)
        assert {"400", "401", "404", "413", "429", "502", "504"} <= set(op["responses"])
        assert "422" not in op["responses"]  # validation errors are 400s here
    assert {"messages", "model", "max_tokens", "n", "alignment"} <= set(schemas["ChatCompletionRequest"]["properties"])
    # `alignment` is one of the registered methods' params, told apart by `method`; each is strict.
    from decoders import registry

    alignment = schemas["ChatCompletionRequest"]["properties"]["alignment"]
    variants = next(v for v in alignment["anyOf"] if "oneOf" in v)["oneOf"]
    consts = set()
    for ref in variants:
        params = schemas[ref["$ref"].split("/")[-1]]
        assert params.get("additionalProperties") is False
        const = params["properties"]["method"]["const"]
        consts.add(const)
        # An object without `method` is the plain method's: every other method's object must name it.
        assert ("method" in params.get("required", [])) == (const != "none"), const
    assert consts == set(registry.methods())
    caps = next(v for v in schemas["BestOfNParams"]["properties"]["caps"]["anyOf"] if v.get("type") == "object")
    assert caps["additionalProperties"]["maximum"] == 1e6  # the mixture refuses larger caps
    assert set(schemas["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    assert not any(p.startswith("/admin") for p in spec["paths"])


@pytest.mark.integration
def test_server_is_healthy_after_the_battery(server):
    """Runs after the bad-input tests above (file order): the server still serves."""
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    r = httpx.post(server.url + "/v1/chat/completions", json=_chat(max_tokens=8), timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert _metric(metrics, "alignserve_requests_total", status="500") == 0
    assert _metric(metrics, "alignserve_requests_in_flight") == 0


# ============================================================================ the hardened server

HARDENED_CONFIG = {
    "limits": {
        "max_tokens": 256, "default_max_tokens": 16, "max_n": 2, "max_best_of_n": 8, "max_top_k": 4,
        "max_rollout_tokens": 16, "max_block": 16, "max_request_bytes": 20_000,
        "max_concurrent_cost": BUDGET, "request_timeout_s": TIMEOUT_S, "drain_timeout_s": 20,
        "reward_timeout_s": REWARD_TIMEOUT_S,
    },
    "metrics_require_auth": True,
    "enable_test_hooks": True,
}


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    d = tmp_path_factory.mktemp("hardened")
    (d / "keys.txt").write_text(f"# one key per line\n{FILE_KEY}\n")
    cfg = dict(HARDENED_CONFIG, api_keys_file=str(d / "keys.txt"))
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    # A toy method from outside the package, as a plug-in (tests/toy_method.py).
    plugin = {"ALIGNSERVE_METHODS": "toy_method:Shout",
              "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    srv = start_server(d, d / "config.yaml", env={"ALIGNSERVE_API_KEYS": ENV_KEY, **plugin})
    try:
        # /health and /v1/models answer before the engine has loaded: wait for a real completion.
        deadline = time.time() + 300
        while True:
            try:
                r = httpx.post(srv.url + "/v1/completions", headers=AUTH, timeout=30,
                               json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"hardened server never served a completion:\n{srv.log.read_text()[-3000:]}")
            time.sleep(2)
        yield srv
    finally:
        stop_server(srv)


AUTH = {"Authorization": f"Bearer {FILE_KEY}"}


def _state(srv: RunningServer) -> dict:
    return srv.admin_state(AUTH)


def _wait_idle(srv: RunningServer, within_s: float = 5.0) -> dict:
    """Budget back to 0 and the engine idle, within `within_s`."""
    return srv.wait_idle(within_s, AUTH)


def _metrics(srv: RunningServer) -> str:
    return httpx.get(srv.url + "/metrics", headers=AUTH, timeout=30).text


def _post(srv: RunningServer, path: str, body, **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers=kw.pop("headers", AUTH), timeout=kw.pop("timeout", 120), **kw)


def _counting(max_tokens: int, **kw) -> dict:
    return {"model": MODEL, "prompt": COUNTING, "max_tokens": max_tokens, "temperature": 0, **kw}


_TQ_SLOW = {"method": "transfer_q", "weights": {"sentiment": 1.0}, "top_k": 4, "block": 16, "rollout_tokens": 16}


@pytest.mark.integration
class TestHardenedServer:
    # ---------------------------------------------------------------- access control

    def test_api_keys_from_file_and_env(self, hardened):
        for key in (FILE_KEY, ENV_KEY):
            r = httpx.get(hardened.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert r.status_code == 200, (key, r.text)
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {FILE_KEY[:-1]}"},
                        {"Authorization": FILE_KEY}, {"Authorization": f"Basic {FILE_KEY}"}):
            r = httpx.get(hardened.url + "/v1/models", headers=headers, timeout=30)
            assert _error(r, 401, None, "authentication_error")["code"] == "invalid_api_key"
        r = httpx.post(hardened.url + "/v1/chat/completions", json=_chat(), timeout=30)
        _error(r, 401, None, "authentication_error")
        # The key is checked before the body is parsed or its size matters.
        _error(httpx.post(hardened.url + "/v1/chat/completions", content=b"{broken", timeout=30), 401, None)
        _error(httpx.post(hardened.url + "/v1/completions", content=b"x" * 50_000, timeout=30), 401, None)
        _error(httpx.get(hardened.url + "/admin/state", timeout=30), 401, None)

    def test_health_and_openapi_open_metrics_behind_auth(self, hardened):
        assert httpx.get(hardened.url + "/health", timeout=30).status_code == 200
        assert httpx.get(hardened.url + "/openapi.json", timeout=30).status_code == 200
        _error(httpx.get(hardened.url + "/metrics", timeout=30), 401, None)
        r = httpx.get(hardened.url + "/metrics", headers=AUTH, timeout=30)
        assert r.status_code == 200 and "alignserve_requests_total" in r.text
        assert _metric(r.text, "alignserve_requests_rejected_total", reason="auth") >= 1

    def test_configured_limits_apply(self, hardened):
        _error(_post(hardened, "/v1/completions", _counting(257)), 400, "max_tokens")
        _error(_post(hardened, "/v1/completions", _counting(4, n=3, temperature=1)), 400, "n")
        _error(_post(hardened, "/v1/completions", _counting(4, alignment=dict(_TQ_SLOW, top_k=5))), 400,
               "alignment.top_k")
        # max_request_bytes: 20000 here.
        r = _post(hardened, "/v1/completions", {"model": MODEL, "prompt": "x" * 20_001})
        _error(r, 413, None)

    # ---------------------------------------------------------------- a method plug-in

    def test_a_toy_method_registered_as_a_plugin_is_served_end_to_end(self, hardened):
        """One file (tests/toy_method.py) and one registry entry: the schema, the objectives endpoint,
        validation, admission and the receipt all know the method; it decodes with the real engine."""
        spec = httpx.get(hardened.url + "/openapi.json", timeout=30).json()
        assert "ShoutParams" in spec["components"]["schemas"]
        listed = httpx.get(hardened.url + "/v1/alignment/objectives", headers=AUTH, timeout=30).json()["methods"]
        shout = next(m for m in listed if m["name"] == "shout")
        assert shout["knobs"]["exclamations"] == 1 and shout["streams"] == "whole"
        r = _post(hardened, "/v1/completions", _counting(6, alignment={"method": "shout", "exclamations": 3,
                                                                      "weights": {"brevity": 1.0}}))
        assert r.status_code == 200, r.text
        body = r.json()
        text = body["choices"][0]["text"]
        assert text.endswith("!!!") and text == text.upper() and any(ch.isdigit() for ch in text)
        receipt = body["alignment"]
        assert receipt["method"] == "shout" and receipt["exclamations"] == 3 and receipt["cost"]["base_tokens"] == 6
        assert receipt["choices"][0]["rewards"]["brevity"]["raw"] > 0
        _error(_post(hardened, "/v1/completions", _counting(4, alignment={"method": "shout", "exclamations": 9})),
               400, "alignment.exclamations")
        _error(_post(hardened, "/v1/completions", _counting(4, alignment={"method": "shout", "top_k": 2})),
               400, "alignment.top_k")
        # The budget counts it like any method: n = 2 costs 2 of the 4 sequences.
        r = _post(hardened, "/v1/completions", _counting(4, n=2, temperature=1,
                                                         alignment={"method": "shout", "exclamations": 0}))
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        m = _metrics(hardened)
        assert _metric(m, "alignserve_requests_total", method="shout", status="200") == 2

    # ---------------------------------------------------------------- overload

    def test_cost_budget_counts_candidates_and_answers_429(self, hardened):
        # More candidates than the whole budget: it can never fit, so a 400 naming the knob (no retry).
        t = time.time()
        r = _post(hardened, "/v1/chat/completions", _bon(n=8))
        assert _error(r, 400, "alignment.n", "invalid_request_error")["code"] == "request_too_costly"
        assert "retry-after" not in r.headers and time.time() - t < 5
        # Hold one streaming request (cost 1) open: best-of-4 (cost 4) no longer fits, a plain one does.
        with httpx.Client(timeout=60) as c, c.stream("POST", hardened.url + "/v1/completions", headers=AUTH,
                                                     json=_counting(256, stream=True)) as held:
            assert held.status_code == 200
            lines = held.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            assert _state(hardened)["cost_in_flight"] == 1
            r = _post(hardened, "/v1/chat/completions", _bon(n=4))
            _error(r, 429, None, "rate_limit_error")
            assert "retry-after" in r.headers
            r = _post(hardened, "/v1/chat/completions", _chat())
            assert r.status_code == 200, r.text
        # Closing the held stream (a disconnect) gives its budget back; best-of-4 now fits.
        assert _wait_idle(hardened) == {"cost_in_flight": 0, "engine_unfinished": 0}
        r = _post(hardened, "/v1/chat/completions", _bon(n=4))
        assert r.status_code == 200, r.text
        assert r.json()["alignment"]["cost"]["candidates"] == 4

    def test_burst_past_capacity(self, hardened):
        """A burst of concurrent requests (some streaming) on a budget of 4: 200s and 429s, no 5xx."""
        n = 10
        barrier = threading.Barrier(n + 1)
        results: list = [None] * (n + 1)

        def one(i: int) -> None:
            stream = i % 2 == 1
            body = _bon(n=8) if i == n else _counting(32, stream=stream)
            path = "/v1/chat/completions" if i == n else "/v1/completions"
            with httpx.Client(timeout=120) as c:
                c.get(hardened.url + "/health")  # connect before the barrier
                barrier.wait()
                with c.stream("POST", hardened.url + path, headers=AUTH, json=body) as r:
                    text = r.read().decode()
                    results[i] = (r.status_code, dict(r.headers), text, stream)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert all(r is not None for r in results), results
        statuses = [r[0] for r in results]
        assert statuses[n] == 400  # best-of-8 > the whole budget: request_too_costly
        assert json.loads(results[n][2])["error"]["code"] == "request_too_costly"
        statuses = statuses[:n]
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
        for status, headers, text, stream in results[:n]:
            if status == 429:
                assert headers.get("retry-after") == "1"
                assert json.loads(text)["error"]["type"] == "rate_limit_error"
            elif stream:
                events = _sse(text.splitlines())
                assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events)
            else:
                assert json.loads(text)["usage"]["completion_tokens"] == 32
        # The budget comes back, streaming requests included; a later request succeeds.
        assert _wait_idle(hardened) == {"cost_in_flight": 0, "engine_unfinished": 0}
        assert _post(hardened, "/v1/completions", _counting(8)).status_code == 200
        m = _metrics(hardened)
        assert _metric(m, "alignserve_requests_rejected_total", reason="overload") >= statuses.count(429)
        assert _metric(m, "alignserve_requests_in_flight") == 0

    def test_streams_that_fail_early_release_their_budget(self, hardened):
        """Regression: a streaming request that failed before its first event kept its cost forever."""
        bad = _counting(4, stream=True, alignment=dict(_TQ_SLOW, baseline="no-such-baseline"))
        for _ in range(3):  # each costs the whole budget (top_k 4)
            _error(_post(hardened, "/v1/completions", bad), 400, "alignment.baseline")
        assert _state(hardened)["cost_in_flight"] == 0
        assert _post(hardened, "/v1/chat/completions", _bon(n=4)).status_code == 200

    # ---------------------------------------------------------------- disconnects and timeouts

    def test_client_disconnect_stops_generation(self, hardened):
        before = _metric(_metrics(hardened), "alignserve_requests_total", status="499")
        with httpx.Client(timeout=60) as c, c.stream("POST", hardened.url + "/v1/completions", headers=AUTH,
                                                     json=_counting(256, stream=True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept referenced: dropping a half-read iterator closes the connection
            got = 0
            while got < 3:
                got += next(lines).startswith("data: ")
            assert _state(hardened) == {"cost_in_flight": 1, "engine_unfinished": 1}
        t = time.time()
        # 256 tokens take ~11 s here: the engine must be idle well before that.
        assert _wait_idle(hardened, within_s=3) == {"cost_in_flight": 0, "engine_unfinished": 0}
        assert time.time() - t < 3
        m = _metrics(hardened)
        assert _metric(m, "alignserve_requests_total", status="499") == before + 1
        assert _metric(m, "alignserve_requests_in_flight") == 0

    def test_clients_that_give_up_at_once_leave_no_budget_taken(self, hardened):
        """A wave of clients with short timeouts (each cut off at another point: in the proxy, during
        admission, while generating): every budget share comes back within seconds, not when its
        lease runs out (minutes)."""
        async def wave():
            async with httpx.AsyncClient(headers=AUTH) as c:
                async def one(i: int):
                    try:
                        await c.post(hardened.url + "/v1/completions", json=_counting(64),
                                     timeout=0.02 + 0.02 * i)
                    except httpx.TimeoutException:
                        pass
                await asyncio.gather(*(one(i) for i in range(24)))

        asyncio.run(wave())
        assert _wait_idle(hardened, within_s=10) == {"cost_in_flight": 0, "engine_unfinished": 0}
        assert _post(hardened, "/v1/completions", _counting(4)).status_code == 200

    @staticmethod
    def _slow_rewards(hardened, seconds: float = 2.0):
        """Every reward call stalls `seconds` (under limits.reward_timeout_s): a Transfer Q* step then
        takes at least that long on any machine, so the request deadline is what ends it."""
        r = httpx.post(hardened.url + "/admin/faults", params={"count": 100, "kind": "sleep", "sleep_s": seconds},
                       headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text

    @staticmethod
    def _no_faults(hardened):
        httpx.post(hardened.url + "/admin/faults", params={"count": 0}, headers=AUTH, timeout=30)

    def test_non_streamed_disconnect_stops_generation(self, hardened):
        """A client that gives up on a non-streamed request: the engine is idle again within seconds
        (observed on the engine itself), the budget comes back, and the request counts as 499."""
        before = _metric(_metrics(hardened), "alignserve_requests_total", status="499")
        self._slow_rewards(hardened)  # Transfer Q*: >= 2 s a step on any machine, 16 steps
        try:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(hardened.url + "/v1/completions", headers=AUTH, timeout=3.0,
                           json=_counting(256, alignment=_TQ_SLOW))
            assert _wait_idle(hardened, within_s=5) == {"cost_in_flight": 0, "engine_unfinished": 0}
            time.sleep(2.5)  # a step later: the decoder loop issued no new engine call
            assert _state(hardened) == {"cost_in_flight": 0, "engine_unfinished": 0}
        finally:
            self._no_faults(hardened)
        deadline = time.time() + 5
        while _metric(_metrics(hardened), "alignserve_requests_total", status="499") < before + 1:
            assert time.time() < deadline, "the dropped request was not counted as 499"
            time.sleep(0.2)

    def test_timeout_non_streaming(self, hardened):
        """Transfer Q* (16 steps, each scored, each scoring >= 2 s here) takes longer than the 15 s limit
        whatever the CPU: 504, and its decoder loop and engine calls stop."""
        before = _metric(_metrics(hardened), "alignserve_requests_total", method="transfer_q", status="504")
        self._slow_rewards(hardened)
        try:
            t = time.time()
            r = _post(hardened, "/v1/completions", _counting(256, alignment=_TQ_SLOW))
            elapsed = time.time() - t
        finally:
            self._no_faults(hardened)
        assert _error(r, 504, None, "timeout_error")["code"] == "timeout"
        assert TIMEOUT_S - 0.5 < elapsed < TIMEOUT_S * 1.5 + 5, elapsed
        assert _wait_idle(hardened, within_s=5) == {"cost_in_flight": 0, "engine_unfinished": 0}
        # Still idle a moment later: nothing keeps issuing engine calls for the abandoned request.
        time.sleep(1.5)
        assert _state(hardened) == {"cost_in_flight": 0, "engine_unfinished": 0}
        m = _metrics(hardened)
        assert _metric(m, "alignserve_requests_total", method="transfer_q", status="504") == before + 1

    def test_timeout_streaming_between_slow_items(self, hardened):
        """Transfer Q* streams one block per step (seconds apart); the deadline still cuts it on time."""
        before = _metric(_metrics(hardened), "alignserve_requests_total", method="transfer_q", status="504")
        self._slow_rewards(hardened)
        try:
            t = time.time()
            with httpx.Client(timeout=60) as c, c.stream("POST", hardened.url + "/v1/completions", headers=AUTH,
                                                         json=_counting(256, stream=True,
                                                                        alignment=_TQ_SLOW)) as r:
                assert r.status_code == 200
                events = _sse(r.iter_lines())
            elapsed = time.time() - t
        finally:
            self._no_faults(hardened)
        assert events[-1] == "[DONE]"
        err = events[-2]["error"]
        assert err["type"] == "timeout_error" and err["code"] == "timeout"
        assert elapsed < TIMEOUT_S * 1.5 + 4, elapsed
        assert _wait_idle(hardened, within_s=5) == {"cost_in_flight": 0, "engine_unfinished": 0}
        m = _metrics(hardened)
        assert _metric(m, "alignserve_requests_total", method="transfer_q", status="504") == before + 1
        assert _post(hardened, "/v1/completions", _counting(8)).status_code == 200

    # ---------------------------------------------------------------- faults

    def test_reward_failure_is_an_explicit_502(self, hardened):
        m0 = _metrics(hardened)
        for stream in (False, True):
            r = httpx.post(hardened.url + "/admin/faults", params={"count": 1}, headers=AUTH, timeout=30)
            assert r.status_code == 200, r.text
            r = _post(hardened, "/v1/chat/completions", _bon(n=2, early_pruning=False) | {"stream": stream})
            err = _error(r, 502, None, "alignment_error")
            # What failed and the request id; not the exception (it is in the server log under that id).
            assert err["code"] == "reward_failed" and "injected" not in err["message"]
            assert "chatcmpl-" in err["message"] and "RuntimeError" not in err["message"]
        m1 = _metrics(hardened)
        failures = "alignserve_alignment_failures_total"
        assert _metric(m1, failures, method="best_of_n", component="reward") == \
            _metric(m0, failures, method="best_of_n", component="reward") + 2
        # A stream that already sent text when scoring fails ends with an error event, never a
        # receipt (method none with a mixture scores the answer after generating it).
        httpx.post(hardened.url + "/admin/faults", params={"count": 1}, headers=AUTH, timeout=30)
        with httpx.Client(timeout=60) as c, c.stream(
                "POST", hardened.url + "/v1/completions", headers=AUTH,
                json=_counting(8, stream=True, alignment={"method": "none", "weights": {"sentiment": 1}})) as r:
            events = _sse(r.iter_lines())
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "alignment_error"
        assert not any("alignment" in e for e in events if isinstance(e, dict))
        # The fault is spent: the next aligned request is served and scored.
        r = _post(hardened, "/v1/chat/completions", _bon(n=2))
        assert r.status_code == 200, r.text
        assert r.json()["alignment"]["choices"][0]["rewards"]["sentiment"]["raw"] is not None
        assert _wait_idle(hardened)["cost_in_flight"] == 0

    def test_reward_timeout_is_an_explicit_502(self, hardened):
        """A reward model that hangs: cut after limits.reward_timeout_s, never an unscored answer."""
        failures = "alignserve_alignment_failures_total"
        before = _metric(_metrics(hardened), failures, method="best_of_n", component="reward")
        r = httpx.post(hardened.url + "/admin/faults", params={"count": 1, "kind": "sleep", "sleep_s": 30},
                       headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        t = time.time()
        r = _post(hardened, "/v1/chat/completions", _bon(n=2, early_pruning=False))
        elapsed = time.time() - t
        assert _error(r, 502, None, "alignment_error")["code"] == "reward_timeout"
        assert REWARD_TIMEOUT_S <= elapsed < TIMEOUT_S, elapsed
        after = _metric(_metrics(hardened), failures, method="best_of_n", component="reward")
        assert after == before + 1
        assert _wait_idle(hardened)["cost_in_flight"] == 0
        assert _post(hardened, "/v1/chat/completions", _bon(n=2)).status_code == 200

    @pytest.mark.skipif(os.environ.get("ALIGNSERVE_TEST_ENGINE_CRASH") != "1",
                        reason="slow (~100 s): set ALIGNSERVE_TEST_ENGINE_CRASH=1")
    def test_engine_crash_is_recovered_by_ray_serve(self, hardened):
        """Kill the vLLM engine core process: requests fail with a retryable 503 (never a hang or a
        silent answer) until Ray Serve's health check (EngineDeployment.check_health -> vLLM's
        check_health) replaces the replica; then requests succeed again."""
        import psutil

        engine = [p for p in psutil.Process(hardened.proc.pid).children(recursive=True)
                  if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
        assert len(engine) == 1, engine  # strictly a descendant of OUR server
        engine[0].kill()
        seen, deadline = set(), time.time() + 240
        while time.time() < deadline:
            try:
                r = _post(hardened, "/v1/completions", _counting(4), timeout=30)
                seen.add(r.status_code)
                if r.status_code == 200:
                    break
                assert r.status_code in (503, 504), r.text
                r.json()["error"]
            except httpx.TransportError:
                seen.add("transport")
            time.sleep(2)
        assert 200 in seen, seen
        assert 503 in seen, seen
        assert 500 not in seen

    # ---------------------------------------------------------------- shutdown (last: stops the server)

    def test_graceful_shutdown_drains_in_flight_requests(self, hardened):
        result = {}

        def go():
            try:
                result["r"] = _post(hardened, "/v1/completions", _counting(24))
            except httpx.HTTPError as e:
                result["r"] = e

        th = threading.Thread(target=go)
        th.start()
        deadline = time.time() + 10
        while _state(hardened)["cost_in_flight"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        hardened.proc.send_signal(signal.SIGTERM)
        th.join(60)
        r = result["r"]
        assert isinstance(r, httpx.Response), f"in-flight request cut: {r!r}"
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 24
        assert hardened.proc.wait(timeout=90) == 0
