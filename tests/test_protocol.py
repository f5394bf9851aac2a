"""Unit tests of the wire protocol: request -> engine parameters, defaults, validation."""
import math

import pytest
from pydantic import ValidationError

from decoders.base import ParamError
from server.config import LimitsConfig
from server.errors import BadRequest, as_api_error
from server.protocol import ChatCompletionRequest, CompletionRequest, describe_error, error_param, parse_alignment

LIMITS = LimitsConfig()


def chat(**kw):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def test_openai_defaults_when_user_and_server_are_silent():
    p = chat().to_sampling_params(LIMITS, prompt_tokens=10, max_model_len=2048)
    assert p == {"n": 1, "max_tokens": LIMITS.default_max_tokens, "temperature": 1.0, "top_p": 1.0,
                 "frequency_penalty": 0.0, "presence_penalty": 0.0, "seed": None, "stop": None}


def test_user_values_win():
    p = chat(max_tokens=7, temperature=0.3, top_p=0.5, n=2, seed=42, stop="x",
             frequency_penalty=0.1, presence_penalty=-0.2).to_sampling_params(LIMITS, 10, 2048)
    assert p["max_tokens"] == 7 and p["temperature"] == 0.3 and p["top_p"] == 0.5 and p["n"] == 2
    assert p["seed"] == 42 and p["stop"] == ["x"]
    assert p["frequency_penalty"] == 0.1 and p["presence_penalty"] == -0.2


def test_server_default_max_tokens_then_context_cap():
    limits = LimitsConfig(default_max_tokens=33)
    assert chat().to_sampling_params(limits, 10, 2048)["max_tokens"] == 33
    # Never more than the context leaves.
    assert chat(max_tokens=500).to_sampling_params(limits, 2040, 2048)["max_tokens"] == 8


def test_max_completion_tokens_preferred_over_max_tokens():
    r = chat(max_tokens=50, max_completion_tokens=5)
    assert r.to_sampling_params(LIMITS, 1, 2048)["max_tokens"] == 5


def test_logprobs_mapping():
    assert chat(logprobs=True, top_logprobs=3).to_sampling_params(LIMITS, 1, 2048)["logprobs"] == 3
    assert chat(logprobs=True).to_sampling_params(LIMITS, 1, 2048)["logprobs"] == 0
    assert "logprobs" not in chat().to_sampling_params(LIMITS, 1, 2048)
    c = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 2})
    assert c.to_sampling_params(LIMITS, 1, 2048)["logprobs"] == 2


@pytest.mark.parametrize("bad", [
    {"temperature": -1}, {"temperature": 3}, {"top_p": 0}, {"top_p": 1.5}, {"max_tokens": 0}, {"n": 0},
    {"top_logprobs": 3}, {"messages": []}, {"stop": ["a", "b", "c", "d", "e"]}, {"stop": [""]}, {"max_tokens": 0},
    {"messages": [{"role": "wizard", "content": "x"}]}, {"stream_options": {"bogus": 1}},
    {"stream_options": {"include_usage": True}}, {"stream": False, "stream_options": {"include_usage": True}},
])
def test_invalid_fields_rejected(bad):
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**base, **bad})


def test_unknown_top_level_fields_ignored_like_openai():
    assert chat(some_future_field=1).model == "m"


def test_limits_are_enforced_with_param_names():
    with pytest.raises(ParamError) as e:
        chat(max_tokens=LIMITS.max_tokens + 1).check_limits(LIMITS)
    assert e.value.param == "max_tokens"
    with pytest.raises(ParamError) as e:
        chat(n=LIMITS.max_n + 1).check_limits(LIMITS)
    assert e.value.param == "n"
    with pytest.raises(ParamError) as e:
        chat(n=2, temperature=0).check_limits(LIMITS)
    assert e.value.param == "n"


def test_completion_prompt_forms():
    """What OpenAI and vLLM take (lm-evaluation-harness sends batches of token-id prompts)."""
    def prompts(p):
        return CompletionRequest.model_validate({"model": "m", "prompt": p}).prompts()

    assert prompts("one") == ["one"] and prompts(["one"]) == ["one"] and prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2, 3]) == [[1, 2, 3]] and prompts([[1, 2], [3]]) == [[1, 2], [3]]
    for bad in ([], {"x": 1}, [[1], []], [1, "a"], [[1], "a"]):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", "prompt": bad})
    with pytest.raises(ParamError) as e:
        CompletionRequest.model_validate({"model": "m", "prompt": ["x"] * 65}).check_limits(LIMITS)
    assert e.value.param == "prompt"


def test_echo_and_prompt_logprobs_as_lm_eval_sends_them():
    body = {"model": "m", "prompt": [[1, 2, 3], [4, 5]], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    r = CompletionRequest.model_validate(body)
    r.check_limits(LIMITS)
    assert r.echo and r.to_sampling_params(LIMITS, 3, 2048)["logprobs"] == 1
    r = CompletionRequest.model_validate(dict(body, max_tokens=0))
    r.check_limits(LIMITS)      # score the prompt without generating
    with pytest.raises(ParamError) as e:
        CompletionRequest.model_validate(dict(body, max_tokens=0, echo=False)).check_limits(LIMITS)
    assert e.value.param == "max_tokens"


def test_what_openai_clients_send_is_taken_or_refused_by_name():
    ok = dict(max_completion_tokens=5, stream=True, stream_options={"include_usage": True}, user="u",
              metadata={"team": "a"}, store=False, frequency_penalty=0.5, presence_penalty=-0.5,
              response_format={"type": "text"}, tool_choice="none", tools=[], parallel_tool_calls=False,
              service_tier="auto", logit_bias={"42": -100}, prompt_cache_key="k", modalities=["text"])
    r = chat(messages=[{"role": "developer", "content": "Be brief."},
                       {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "!"}]}],
             **ok)
    assert r.chat_messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi!"}]
    assert r.to_sampling_params(LIMITS, 3, 2048)["logit_bias"] == {42: -100.0}
    for bad, field in [({"response_format": {"type": "json_object"}}, "response_format.type"),
                       ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                       ({"tool_choice": "required"}, "tool_choice"), ({"functions": [{"name": "f"}]}, "functions"),
                       ({"modalities": ["text", "audio"]}, "modalities"), ({"audio": {"voice": "x"}}, "audio"),
                       ({"logit_bias": {"x": 1}}, "logit_bias.x"), ({"logit_bias": {"1": 101}}, "logit_bias.1"),
                       ({"stop": ["x" * 257]}, "stop")]:
        with pytest.raises(ValidationError) as e:
            chat(**bad)
        assert describe_error(e.value.errors()[0])[0] == field, bad
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "best_of": 3})
    assert describe_error(e.value.errors()[0])[0] == "best_of"
    with pytest.raises(ParamError) as e:
        chat(messages=[{"role": "user", "content": "x"}] * 257).check_limits(LIMITS)
    assert e.value.param == "messages"


# ----------------------------------------------------------------------------- alignment

def test_alignment_defaults_to_none():
    assert chat().method == "none"
    assert chat(alignment={}).method == "none"
    assert chat(alignment=None).method == "none"


def test_method_defaults_live_in_the_method_params():
    a = chat(alignment={"method": "transfer_q", "weights": {"a": 1}}).alignment
    assert (a.top_k, a.block, a.rollout_tokens, a.alpha, a.transfer) == (4, 16, 16, 1.0, "auto")
    assert chat(alignment={"method": "best_of_n", "weights": {"a": 1}}).alignment.n == 4
    v = chat(alignment={"method": "vas", "weights": {"a": 1}}).alignment
    assert (v.beta, v.top_k) == (2.0, 20)


@pytest.mark.parametrize("alignment, field", [
    ({"method": "beam"}, "method"),
    ({"method": "none", "bogus": 1}, "bogus"),
    ({"method": "best_of_n", "n": 4, "weights": {"a": 1}, "beta": 1.0}, "beta"),
    ({"method": "vas", "weights": {"a": 1}, "rollout_tokens": 3}, "rollout_tokens"),
    ({"method": "vas", "weights": {"a": float("nan")}}, "weights"),
    ({"method": "vas", "weights": {"a": 1}, "beta": float("inf")}, "beta"),
    ({"method": "best_of_n", "n": 0, "weights": {"a": 1}}, "n"),
    ({"method": "transfer_q", "weights": {"a": 1}, "transfer": "sideways"}, "transfer"),
    ({"method": "best_of_n", "weights": {"a": 1}, "transform": "cube"}, "transform"),
    ({"method": "best_of_n", "weights": "heavy"}, "weights"),
])
def test_alignment_strict_validation(alignment, field):
    with pytest.raises(ValidationError) as e:
        parse_alignment(alignment)
    assert field in str(e.value)


@pytest.mark.parametrize("alignment, param", [
    ({"method": "best_of_n", "n": 4}, "alignment.weights"),
    ({"method": "best_of_n", "n": 4, "weights": {}}, "alignment.weights"),
    ({"method": "best_of_n", "n": 4, "weights": {"a": 0}}, "alignment.weights"),
    ({"method": "best_of_n", "n": 4, "weights": {"a": -1}}, "alignment.weights.a"),
    ({"method": "best_of_n", "n": 4, "weights": {"a": 1e9}}, "alignment.weights.a"),
    ({"method": "best_of_n", "n": 10_000, "weights": {"a": 1}}, "alignment.n"),
    ({"method": "vas", "weights": {"a": 1}, "top_k": 10_000}, "alignment.top_k"),
    ({"method": "vas", "weights": {"a": 1}, "beta": -1}, "alignment.beta"),
    ({"method": "transfer_q", "weights": {"a": 1}, "rollout_tokens": 10_000}, "alignment.rollout_tokens"),
    ({"method": "transfer_q", "weights": {"a": 1}, "block": 10_000}, "alignment.block"),
    ({"method": "transfer_q", "weights": {"a": 1}, "alpha": 1e6}, "alignment.alpha"),
])
def test_alignment_server_limits(alignment, param):
    with pytest.raises(ParamError) as e:
        chat(alignment=alignment).check_limits(LIMITS)
    assert e.value.param == param
    assert as_api_error(e.value).body()["error"]["param"] == param


def _prepared(req):
    """The request's method, prepared against a registry with one objective `a`."""
    import asyncio

    from decoders import registry
    from decoders.base import DecodeRequest, MethodContext
    from decoders.rewards import Objective

    dreq = DecodeRequest(prompt_ids=[1], prompt_text="hi", sampling=req.to_sampling_params(LIMITS, 1, 2048))
    ctx = MethodContext(engine=None, scorer=None, objectives={"a": Objective("a", lambda p, r: [0.0] * len(r))},
                        limits=LIMITS)
    method = registry.get(req.method)(req.alignment, dreq, ctx)
    asyncio.run(method.prepare())
    return method


def test_best_of_n_returns_at_most_its_candidates():
    with pytest.raises(ParamError) as e:
        _prepared(chat(n=3, temperature=1, alignment={"method": "best_of_n", "n": 2, "weights": {"a": 1}}))
    assert e.value.param == "alignment.n"
    _prepared(chat(n=2, alignment={"method": "best_of_n", "n": 4, "weights": {"a": 1}}))


def test_best_of_n_needs_sampling():
    """Greedy candidates would all be the same answer (and vLLM refuses n > 1 at temperature 0)."""
    with pytest.raises(ParamError) as e:
        _prepared(chat(temperature=0, alignment={"method": "best_of_n", "n": 4, "weights": {"a": 1}}))
    assert e.value.param == "temperature"
    _prepared(chat(temperature=0, alignment={"method": "best_of_n", "n": 1, "weights": {"a": 1}}))


def test_error_body_is_openai_shaped():
    body = BadRequest("nope", param="x", code="c").body()
    assert body == {"error": {"message": "nope", "type": "invalid_request_error", "param": "x", "code": "c"}}
    assert math.isfinite(LIMITS.max_weight)


# ----------------------------------------------------------------------------- exact parameters, field order

def _locs(cls, body) -> list[str]:
    """The parameters the API names for a body's validation errors."""
    with pytest.raises(ValidationError) as e:
        cls.model_validate(body)
    return [describe_error(err)[0] for err in e.value.errors()]


@pytest.mark.parametrize("cls, extra, loc", [
    (ChatCompletionRequest, {"top_logprobs": 2}, "top_logprobs"),
    (ChatCompletionRequest, {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    (ChatCompletionRequest, {"stream_options": {"include_usage": True}}, "stream_options"),
    (ChatCompletionRequest, {"alignment": {"method": "best_of_n", "weights": {"a": 1}, "rollout_tokens": 4}},
     "alignment.rollout_tokens"),
    (ChatCompletionRequest, {"alignment": {"method": "vas", "weights": {"a": 1}, "transform": "raw"}},
     "alignment.transform"),
    (ChatCompletionRequest, {"alignment": {"method": "args", "weights": {"a": 1}, "top_k": 2, "n": 3}},
     "alignment.n"),
    (CompletionRequest, {"suffix": "tail"}, "suffix"),
])
def test_errors_name_the_exact_parameter(cls, extra, loc):
    base = ({"model": "m", "messages": [{"role": "user", "content": "hi"}]} if cls is ChatCompletionRequest
            else {"model": "m", "prompt": "hi"})
    assert _locs(cls, {**base, **extra}) == [loc]


def test_valid_combinations_still_pass():
    chat(logprobs=True, top_logprobs=2)
    chat(stream=True, stream_options={"include_usage": True})
    chat(stream_options=None)
    chat(alignment={"method": "best_of_n", "weights": {"a": 1}, "n": 2, "rollout_tokens": None})
    CompletionRequest.model_validate({"model": "m", "prompt": "x", "echo": True, "suffix": None})


def test_an_invalid_method_is_the_error_not_its_knobs():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "alignment": {"method": "beam", "top_k": 3}}
    assert _locs(ChatCompletionRequest, body) == ["alignment.method"]
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate(body)
    assert "unknown method 'beam'" in describe_error(e.value.errors()[0])[1]


def test_a_knob_of_another_method_names_what_the_method_takes():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "alignment": {"method": "vas", "weights": {"a": 1}, "block": 3}}
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate(body)
    param, message = describe_error(e.value.errors()[0])
    assert param == "alignment.block" and "weights, beta, top_k" in message
    assert error_param(("body", "alignment", "vas", "weights", "a")) == "alignment.weights.a"


def test_json_schema_lists_fields_in_openai_order():
    chat_props = list(ChatCompletionRequest.model_json_schema()["properties"])
    assert chat_props[:2] == ["messages", "model"] and chat_props[-1] == "alignment"
    assert chat_props[2:-1] == sorted(chat_props[2:-1])
    text_props = list(CompletionRequest.model_json_schema()["properties"])
    assert text_props[:2] == ["model", "prompt"] and text_props[-1] == "alignment"
    assert text_props[2:-1] == sorted(text_props[2:-1])
