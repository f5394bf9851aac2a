"""Locust load test for the OpenAI-compatible API with per-request alignment.

Run it as its own process only (locust uses gevent, which monkey-patches the standard library;
never import this module from tests or other tools). Always bounded: users, spawn rate, run time.
It refuses to start without `--headless` and `-t/--run-time` (set ALIGNSERVE_LOCUST_ALLOW_UNBOUNDED=1
for the web UI or an open-ended run), and targets http://127.0.0.1:8000 when no --host is given.

    locust -f loadtests/locustfile.py --headless -u 8 -r 2 -t 60s --host http://127.0.0.1:8000 \
        --csv out/locust/run --only-summary

(`make locust` runs exactly that against `make serve`'s HOST/PORT.)

Tasks (weights in brackets): chat non-streamed [4], chat streamed [3], completion non-streamed [2],
completion streamed [1]. Each request picks an alignment method from a weighted mix and a reward
mixture from a few weight sets. Stats are named "<endpoint> <stream|json> <method>", so locust's
table shows latency per method; streamed requests also report a "TTFT" row (time to first token)
and their full stream duration (not only the time to the response headers).

Environment variables:
  ALIGNSERVE_LOCUST_MIX         method weights, e.g. "none:6,best_of_n:2,transfer_q:1,args:1,vas:1"
                                (default: that; vas is dropped when the server has no value model
                                for a weight set)
  ALIGNSERVE_LOCUST_MAX_TOKENS  max_tokens per request (default 32)
  ALIGNSERVE_LOCUST_TIMEOUT     per-request timeout in seconds (default 300)
  ALIGNSERVE_LOCUST_API_KEY     bearer token, if the server requires one
  ALIGNSERVE_LOCUST_ALLOW_REMOTE=1  allow a non-loopback --host (refused otherwise)
  ALIGNSERVE_LOCUST_ALLOW_UNBOUNDED=1  allow a run without --headless and --run-time (refused otherwise)
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys
import time

import requests
from locust import HttpUser, between, events, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loadtests import is_loopback_url  # noqa: E402  (stdlib-only module)

ALLOW_REMOTE_ENV = "ALIGNSERVE_LOCUST_ALLOW_REMOTE"
ALLOW_UNBOUNDED_ENV = "ALIGNSERVE_LOCUST_ALLOW_UNBOUNDED"
DEFAULT_HOST = "http://127.0.0.1:8000"
MAX_TOKENS = int(os.environ.get("ALIGNSERVE_LOCUST_MAX_TOKENS", "32"))
TIMEOUT = float(os.environ.get("ALIGNSERVE_LOCUST_TIMEOUT", "300"))
API_KEY = os.environ.get("ALIGNSERVE_LOCUST_API_KEY", "")
DEFAULT_MIX = "none:6,best_of_n:2,transfer_q:1,args:1,vas:1"

# Knobs per method: small enough for a CPU server.
METHOD_KNOBS = {
    "none": {},
    "best_of_n": {"n": 4},
    "transfer_q": {"top_k": 4, "block": 8, "rollout_tokens": 8},
    "args": {"top_k": 4, "block": 4},
    "vas": {"beta": 2.0},
}
WEIGHT_SETS = [
    {"sentiment": 1.0},
    {"safety": 1.0},
    {"sentiment": 0.5, "brevity": 0.5},
    {"relevance": 1.0, "brevity": 0.5},
]
FALLBACK_PROMPTS = ["Give me three tips for getting better sleep.", "Explain why the sky is blue.",
                    "Write a haiku about autumn leaves.", "How do I make a simple budget?"]

log = logging.getLogger("alignserve.locust")


def parse_mix(s: str) -> list[tuple[str, float]]:
    out = []
    for part in s.split(","):
        if not part.strip():
            continue
        name, _, w = part.partition(":")
        name = name.strip()
        if name not in METHOD_KNOBS:
            raise ValueError(f"unknown method {name!r} in ALIGNSERVE_LOCUST_MIX; known: {', '.join(METHOD_KNOBS)}")
        out.append((name, float(w or 1)))
    return out


def _prompts() -> list[str]:
    try:
        from decoders.prompts import load_prompts

        return load_prompts("everyday")
    except Exception:  # noqa: BLE001
        return FALLBACK_PROMPTS


def _refuse(msg: str) -> None:
    sys.stderr.write(f"refusing to run: {msg}\n")
    sys.exit(2)


@events.init.add_listener
def _guard(environment, **_kw) -> None:
    """Only bounded runs against this machine, unless explicitly allowed by environment variables."""
    opts = environment.parsed_options
    host = environment.host or getattr(opts, "host", None) or DEFAULT_HOST
    if not is_loopback_url(host) and os.environ.get(ALLOW_REMOTE_ENV) != "1":
        _refuse(f"non-loopback host {host!r}; set {ALLOW_REMOTE_ENV}=1 to allow it")
    if opts is None or getattr(opts, "worker", False) or os.environ.get(ALLOW_UNBOUNDED_ENV) == "1":
        return  # a library run, or a worker (its master enforces the bounds)
    if not getattr(opts, "headless", False):
        _refuse(f"give --headless (no web UI), or set {ALLOW_UNBOUNDED_ENV}=1 to allow the web UI")
    if not getattr(opts, "run_time", None):
        _refuse(f"give a run time (-t/--run-time, e.g. -t 60s), or set {ALLOW_UNBOUNDED_ENV}=1 to run until stopped")


class AlignServeUser(HttpUser):
    host = DEFAULT_HOST  # --host overrides
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        if not is_loopback_url(self.host or "") and os.environ.get(ALLOW_REMOTE_ENV) != "1":
            raise RuntimeError(f"non-loopback host {self.host!r}")  # belt and braces; init already refused
        self.headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
        self.sse = requests.Session()
        self.sse.trust_env = False
        self.prompts = _prompts()
        r = self.client.get("/v1/models", headers=self.headers, name="GET /v1/models")
        self.model = r.json()["data"][0]["id"]
        r = self.client.get("/v1/alignment/objectives", headers=self.headers, name="GET /v1/alignment/objectives")
        self.value_models = {o["name"] for o in r.json()["data"] if o.get("value_model")}
        self.mix = parse_mix(os.environ.get("ALIGNSERVE_LOCUST_MIX", DEFAULT_MIX))

    # ------------------------------------------------------------------ request bodies

    def _alignment(self) -> tuple[str, dict | None]:
        methods, weights = zip(*self.mix)
        method = random.choices(methods, weights=weights)[0]
        if method == "none":
            return "none", None
        wsets = WEIGHT_SETS
        if method == "vas":
            wsets = [w for w in WEIGHT_SETS if set(w) <= self.value_models]
            if not wsets:  # no value models on this server: VAS would 400; send an unaligned request
                return "none", None
        return method, {"method": method, **METHOD_KNOBS[method], "weights": dict(random.choice(wsets))}

    def _body(self, chat: bool, stream: bool) -> tuple[str, dict]:
        method, alignment = self._alignment()
        prompt = random.choice(self.prompts)
        body: dict = {"model": self.model, "max_tokens": MAX_TOKENS, "temperature": 0.8, "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if stream:
            body["stream_options"] = {"include_usage": True}
        if alignment:
            body["alignment"] = alignment
        return method, body

    # ------------------------------------------------------------------ request kinds

    def _json(self, chat: bool) -> None:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        method, body = self._body(chat, stream=False)
        name = f"{'chat' if chat else 'completion'} json {method}"
        with self.client.post(path, json=body, headers=self.headers, name=name, timeout=TIMEOUT,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            try:
                data = resp.json()
            except ValueError:
                resp.failure("response is not JSON")
                return
            if not data.get("choices"):
                resp.failure("no choices")
            elif method != "none" and not data.get("alignment"):
                resp.failure(f"{method} response without an alignment receipt")
            else:
                resp.success()

    def _stream(self, chat: bool) -> None:
        """One SSE request, timed to its last chunk; reports TTFT as its own row."""
        path = "/v1/chat/completions" if chat else "/v1/completions"
        method, body = self._body(chat, stream=True)
        name = f"{'chat' if chat else 'completion'} stream {method}"
        t0 = time.perf_counter()
        ttft = None
        length = 0
        exc: Exception | None = None
        receipt = None
        try:
            # A plain session, so locust does not also log the time to the response headers.
            with self.sse.post(self.host.rstrip("/") + path, json=body, headers=self.headers, timeout=TIMEOUT,
                               stream=True) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"{resp.status_code}: {resp.text[:200]}")
                done = False
                for raw in resp.iter_lines():
                    line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    length += len(data)
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RuntimeError(f"stream error: {chunk['error'].get('message', chunk['error'])}"[:300])
                    receipt = chunk.get("alignment") or receipt
                    for c in chunk.get("choices") or []:
                        text = (c.get("delta") or {}).get("content") if chat else c.get("text")
                        if text and ttft is None:
                            ttft = time.perf_counter() - t0
                if not done:
                    raise RuntimeError("stream ended without [DONE]")
                if method != "none" and receipt is None:
                    raise RuntimeError(f"{method} stream without an alignment receipt")
        except Exception as e:  # noqa: BLE001 - reported to locust as a failure
            exc = e
        total_ms = (time.perf_counter() - t0) * 1000
        fire = self.environment.events.request.fire
        fire(request_type="SSE", name=name, response_time=total_ms, response_length=length, exception=exc,
             context={})
        if ttft is not None:
            fire(request_type="TTFT", name=name, response_time=ttft * 1000, response_length=0, exception=None,
                 context={})

    def on_stop(self) -> None:
        self.sse.close()

    @task(4)
    def chat_json(self) -> None:
        self._json(chat=True)

    @task(3)
    def chat_stream(self) -> None:
        self._stream(chat=True)

    @task(2)
    def completion_json(self) -> None:
        self._json(chat=False)

    @task(1)
    def completion_stream(self) -> None:
        self._stream(chat=False)
