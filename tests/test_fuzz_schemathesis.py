"""Fuzz the HTTP API from its own OpenAPI schema with schemathesis.

The schema is FastAPI's ``/openapi.json``, served through Ray Serve like any route (the ingress
is a FastAPI app; test_hardening.py checks it describes the request bodies). For every operation
schemathesis generates requests that fit the schema (positive) and, for the two POST bodies,
requests that break it (negative); each response must:
  * never be a 5xx (``not_a_server_error``);
  * use a status code and content type the schema documents, with a body that matches the
    documented schema (every error is the OpenAI error body, ``ErrorResponse``).

Bounded: MAX_EXAMPLES per operation and mode, derandomized, no shrinking phase, 60 s per request.
The served schema lists the registered objectives and baselines (the keys of `alignment.weights` /
`caps`, `alignment.baseline`), so generated requests reach every method with real objectives, not
only 400s for unknown names. Changes to generated bodies keep it meaningful and cheap on CPU:
  * three in four bodies with a string `model` get the served model name: a random one is a 404
    before anything else is validated, so the fuzzer would never get past the model check;
  * with the served model, a valid `max_tokens` / `max_completion_tokens` is capped at 8 and a
    missing one set to 8 (the server default, 256 tokens, would take seconds per example), and in
    positive cases valid `alignment` sizes (`n`, `top_k`, `rollout_tokens`) at 4;
  * with the served model, rules across fields that a JSON schema cannot state are repaired so that
    positive cases get past validation (e.g. `stream_options` only with `stream`, `top_logprobs` only
    with `logprobs`, one choice at temperature 0, weights for a method that needs them, token ids
    within the vocabulary, no function calling, no empty prompt).
Negative cases get only the model name and the token cap: capping or repairing more could remove
the violation they were built around. Out-of-range and wrongly typed values are sent as generated.
"""
from __future__ import annotations

import itertools
import re

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"
VOCAB = 49152  # the embedded model's vocabulary
MAX_EXAMPLES = 50
OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("GET", "/v1/alignment/objectives"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
]


@pytest.fixture(scope="module")
def api_schema(server):
    import schemathesis

    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", timeout=30)


_METHODS = None


def _restart_methods() -> None:
    """Each test starts the turn at the first method, so what a test reaches does not depend on the tests before it."""
    global _METHODS
    from decoders import registry

    _METHODS = itertools.cycle(list(registry.methods()))


def _next_method() -> str:
    """Bodies without `alignment` take the registered methods in turn, so every method is reached."""
    return next(_METHODS)


def _bound(case, use_model: bool, positive: bool) -> None:
    body = case.body
    # A non-string `model` may be the schema violation a negative case was built around: keep it.
    if not isinstance(body, dict) or not use_model or not isinstance(body.get("model"), str):
        return
    body["model"] = MODEL
    keys = [k for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]  # null: the default
    for key in keys:
        v = body[key]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1:
            body[key] = min(v, 8)
    if not keys:
        body["max_tokens"] = 8
    if not positive:
        return  # a negative case is sent as generated: capping or repairing could remove its violation
    if body.get("alignment") is None:
        body["alignment"] = {"method": _next_method()}
    alignment = body.get("alignment")
    if isinstance(alignment, dict):
        for key in ("n", "top_k", "rollout_tokens"):
            v = alignment.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1:
                alignment[key] = min(v, 4)
    _repair(body)


def _repair(body: dict) -> None:
    """Cross-field rules the schema cannot state, made to hold (values keep their generated types)."""
    if body.get("stream_options") is not None and body.get("stream") is not True:
        body.pop("stream_options")
    if body.get("top_logprobs") is not None and body.get("logprobs") is not True:
        body["logprobs"] = True
    if body.get("temperature") == 0 and isinstance(body.get("n"), int) and body["n"] > 1:
        body["n"] = 1
    # An empty prompt (or an empty one in a batch) is a 400 before any method runs; with a few examples
    # per method, such examples can leave a method unreached (seen in CI for transfer_q).
    if body.get("prompt") in ("", []):
        body["prompt"] = "Hello"
    elif isinstance(body.get("prompt"), list):
        body["prompt"] = [p if p not in ("", []) else ("Hello" if isinstance(p, str) else [1]) for p in body["prompt"]]
    for key in ("tools", "functions", "tool_choice", "function_call", "audio", "modalities", "best_of", "suffix"):
        body.pop(key, None)
    if isinstance(body.get("response_format"), dict):
        body["response_format"] = {"type": "text"}
    if isinstance(body.get("logit_bias"), dict):
        body["logit_bias"] = {k: v for k, v in body["logit_bias"].items() if re.fullmatch(r"[0-9]{1,9}", k) and int(k) < VOCAB}
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        def token(t):  # keep whatever is not a token id (a negative case's violation)
            return t % VOCAB if isinstance(t, int) and not isinstance(t, bool) else t

        body["prompt"] = [[token(t) for t in p] if isinstance(p, list) else token(p) for p in prompt]
    if body.get("max_tokens") == 0 and not body.get("echo"):
        body["max_tokens"] = 8
    alignment = body.get("alignment")
    if isinstance(alignment, dict):
        method = alignment.get("method", "none")
        if method != "none":
            body.pop("echo", None)
        weights = alignment.get("weights")
        if method != "none" and not (isinstance(weights, dict) and any(
                isinstance(w, (int, float)) and w > 0 for w in weights.values())):
            alignment["weights"] = {"sentiment": 1.0}
        if isinstance(alignment.get("caps"), dict):
            alignment["caps"] = {k: v for k, v in alignment["caps"].items() if k in (alignment.get("weights") or {})}
        if method in ("transfer_q", "args"):  # the searches refuse repetition penalties
            body.pop("frequency_penalty", None)
            body.pop("presence_penalty", None)
        if method == "best_of_n" and body.get("temperature") == 0:
            body["temperature"] = 1.0
        if method == "best_of_n" and isinstance(body.get("n"), int) and isinstance(alignment.get("n"), int):
            body["n"] = min(body["n"], alignment["n"])  # choices come from the candidates
        if method == "vas":
            alignment["weights"] = {k: v for k, v in alignment["weights"].items() if k in ("sentiment", "safety")} \
                or {"sentiment": 1.0}


@pytest.mark.integration
def test_schema_lists_every_public_operation(api_schema):
    ops = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert ops == set(OPERATIONS)


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("method, path, mode", [(m, p, "positive") for m, p in OPERATIONS]
                         + [(m, p, "negative") for m, p in OPERATIONS if m == "POST"])
def test_fuzz(server, api_schema, method, path, mode):
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    op = api_schema[path][method]
    strategy = op.as_strategy(generation_mode=GenerationMode(mode))
    # GET operations have no inputs: a few calls say all there is to say.
    examples = MAX_EXAMPLES if method == "POST" else 3
    seen: dict[int, int] = {}
    served: set[str] = set()  # methods that answered 200
    _restart_methods()

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    # Three in four bodies name the served model: the rest show that an unknown model is a 404.
    @given(case=strategy, use_model=st.sampled_from([True, True, True, False]))
    def run(case, use_model):
        _bound(case, use_model, mode == "positive")
        response = case.call(base_url=server.url, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        if response.status_code == 200 and method == "POST" and "json" in str(response.headers.get("content-type")):
            served.add(response.json().get("alignment", {}).get("method", "none"))
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                 content_type_conformance, response_schema_conformance])

    run()
    print(f"{method} {path} ({mode}): status codes {dict(sorted(seen.items()))}; methods served: {sorted(served)}")
    if method == "POST" and mode == "positive":
        from decoders import registry

        assert served == set(registry.methods()), served  # generated requests reach every method
    if method == "POST" and mode == "negative":
        assert set(seen) <= {400, 404}, seen  # schema violations are refused, never served
    # The fuzzing left the server healthy and idle.
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


