"""Aligned decoding on the embedded default: best-of-N, Transfer Q* and ARGS raise the reward
they are asked to raise, and say what it cost."""
import statistics

import openai
import pytest

from decoders.prompts import load_prompts

pytestmark = pytest.mark.integration

PROMPTS = load_prompts("rotten_tomatoes", limit=6, seed=1)
MAX_TOKENS = 32


def ask(client, model, prompt, alignment, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          extra_body={"alignment": alignment}, **kw)


def sentiment(r) -> float:
    return r.model_extra["alignment"]["choices"][0]["rewards"]["sentiment"]["raw"]


@pytest.fixture(scope="module")
def base_sentiment(client, model_name):
    return [sentiment(ask(client, model_name, p, {"method": "none", "weights": {"sentiment": 1}}, seed=i))
            for i, p in enumerate(PROMPTS)]


def test_objectives_endpoint(server):
    import httpx

    data = httpx.get(f"{server.base_url}/alignment/objectives").json()["data"]
    by_name = {d["name"]: d for d in data}
    assert {"sentiment", "safety", "relevance", "brevity"} <= set(by_name)
    for d in by_name.values():
        assert d["description"] and len(d["range"]) == 2 and d["mean"] is not None and d["std"] is not None


def test_best_of_8_raises_sentiment_with_receipt(client, model_name, base_sentiment):
    rs = [ask(client, model_name, p, {"method": "best_of_n", "n": 8, "weights": {"sentiment": 1}}, seed=i)
          for i, p in enumerate(PROMPTS)]
    bon = [sentiment(r) for r in rs]
    assert statistics.mean(bon) > statistics.mean(base_sentiment) + 0.1, (bon, base_sentiment)
    receipt = rs[0].model_extra["alignment"]
    assert receipt["method"] == "best_of_n" and receipt["cost"]["candidates"] == 8
    assert receipt["cost"]["base_tokens"] >= rs[0].usage.completion_tokens
    c = receipt["choices"][0]
    assert set(c["rewards"]["sentiment"]) == {"raw", "transformed"} and c["mixed"] == pytest.approx(c["rewards"]["sentiment"]["transformed"])
    assert receipt["timing"]["generation_s"] > 0 and receipt["timing"]["scoring_s"] >= 0


def test_weights_change_the_winner(client, model_name):
    """Same seeded candidates, other weights: a brevity weight picks shorter answers (never a winner
    below the candidates' mean brevity), a sentiment weight more positive ones."""
    from decoders.rewards import brevity_score

    winners, gains = {}, []
    for objective in ("sentiment", "brevity"):
        rs = [ask(client, model_name, p, {"method": "best_of_n", "n": 6, "weights": {objective: 1}}, seed=7)
              for p in PROMPTS[:3]]
        winners[objective] = [r.choices[0].message.content for r in rs]
        if objective == "brevity":
            gains = [r.model_extra["alignment"]["reward_gain"]["brevity"] for r in rs]
    assert winners["sentiment"] != winners["brevity"]
    assert all(g >= 0 for g in gains) and any(g > 0 for g in gains), gains
    brevity = {o: sum(brevity_score(t) for t in ts) / len(ts) for o, ts in winners.items()}
    assert brevity["brevity"] > brevity["sentiment"], brevity


def test_best_of_n_returns_top_n_and_transforms(client, model_name):
    r = ask(client, model_name, PROMPTS[0], {"method": "best_of_n", "n": 4, "weights": {"sentiment": 1, "safety": 1},
                                             "transform": "log_sigmoid"}, n=2, seed=5)
    mixed = [c["mixed"] for c in r.model_extra["alignment"]["choices"]]
    assert len(r.choices) == 2 and mixed[0] >= mixed[1]
    assert all(m <= 0 for m in mixed)  # a sum of log-sigmoids is a log-probability


def test_early_pruning_costs_fewer_base_tokens(client, model_name):
    plain = ask(client, model_name, PROMPTS[1], {"method": "best_of_n", "n": 8, "weights": {"sentiment": 1}}, seed=2)
    pruned = ask(client, model_name, PROMPTS[1], {"method": "best_of_n", "n": 8, "weights": {"sentiment": 1},
                                                  "early_pruning": True, "chunk_tokens": 8}, seed=2)
    p, q = plain.model_extra["alignment"]["cost"], pruned.model_extra["alignment"]["cost"]
    assert q["base_tokens"] < p["base_tokens"]


def test_best_of_n_streams_the_winner(client, model_name):
    stream = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=16, stream=True, seed=1,
                                            extra_body={"alignment": {"method": "best_of_n", "n": 4, "weights": {"sentiment": 1}}})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].model_extra["alignment"]["method"] == "best_of_n"


def test_unknown_objective_and_missing_weights_are_400(client, model_name):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, model_name, "hi", {"method": "best_of_n", "n": 2, "weights": {"charisma": 1}})
    assert e.value.body["param"] == "alignment.weights.charisma"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, model_name, "hi", {"method": "best_of_n", "n": 2})
    assert e.value.body["param"] == "alignment.weights"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, model_name, "hi", {"method": "transfer_q", "weights": {"sentiment": 1}, "baseline": "../../etc"})
    assert e.value.body["param"] == "alignment.baseline"


def test_transfer_q_raises_sentiment_with_receipt(client, model_name, base_sentiment):
    rs = [ask(client, model_name, p, {"method": "transfer_q", "weights": {"sentiment": 1}, "alpha": 4.0}, seed=i)
          for i, p in enumerate(PROMPTS)]
    tq = [sentiment(r) for r in rs]
    assert statistics.mean(tq) > statistics.mean(base_sentiment), (tq, base_sentiment)
    receipt = rs[0].model_extra["alignment"]
    assert receipt["method"] == "transfer_q" and receipt["transfer"] == "direct" and receipt["baseline"] == "sentiment"
    cost = receipt["cost"]
    assert cost["steps"] >= 1 and cost["rollouts"] >= 1 and cost["rollout_tokens"] >= 1 and cost["candidates"] >= 2


def test_transfer_q_alpha_zero_is_base_decoding(client, model_name):
    # Short answers: Transfer Q* re-prefills prompt+prefix each step while plain decoding extends its
    # KV cache, so bf16 logits differ in the last bits and a near-tie can flip after many tokens.
    for i, prompt in enumerate(PROMPTS[:3]):
        base = ask(client, model_name, prompt, {"method": "none"}, temperature=0, seed=3, max_tokens=10)
        tq = ask(client, model_name, prompt, {"method": "transfer_q", "weights": {"sentiment": 1}, "alpha": 0,
                                              "block": 1, "top_k": 4}, temperature=0, seed=3, max_tokens=10)
        assert tq.choices[0].message.content == base.choices[0].message.content


def test_transfer_q_streams_blocks_and_args_mode(client, model_name):
    stream = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=24, stream=True, seed=4,
        extra_body={"alignment": {"method": "transfer_q", "weights": {"sentiment": 1}, "block": 4, "top_k": 3,
                                  "rollout_tokens": 8}})
    deltas = [ch.choices[0].delta.content for ch in stream if ch.choices and ch.choices[0].delta.content]
    assert len(deltas) >= 3
    r = ask(client, model_name, PROMPTS[3], {"method": "args", "weights": {"sentiment": 1}, "top_k": 3, "block": 8}, seed=4)
    receipt = r.model_extra["alignment"]
    assert receipt["method"] == "args" and receipt["cost"]["rollouts"] == 0 and receipt["cost"]["rollout_tokens"] == 0


def test_metrics_show_latency_and_reward_per_method(server, client, model_name):
    for a in ({"method": "best_of_n", "n": 2, "weights": {"sentiment": 1}},
              {"method": "args", "weights": {"sentiment": 1}, "top_k": 2, "block": 8}):
        ask(client, model_name, PROMPTS[0], a, max_tokens=8, seed=1)
    text = server.metrics()
    for method in ("best_of_n", "args"):
        assert f'alignserve_request_latency_seconds_count{{method="{method}"}}' in text
        assert f'alignserve_reward_count{{method="{method}",objective="sentiment"}}' in text
        assert f'alignserve_mixed_reward_count{{method="{method}"}}' in text
    assert 'alignserve_candidates_total{method="best_of_n"}' in text
    assert 'alignserve_reward_gain_count{method="best_of_n",objective="sentiment"}' in text
