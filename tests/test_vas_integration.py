"""Value-augmented sampling inside the real vLLM engine, on the embedded default with the shipped
value models: it raises the steered reward, monotonically in the weight, composes objectives,
streams, and mixes in the same batches as plain requests."""
import concurrent.futures
import math
import statistics

import openai
import pytest

from decoders.prompts import heldout_prompts

pytestmark = pytest.mark.integration

# Prompts the shipped value models never saw in training; two seeded samples each. Every condition
# answers the same (prompt, seed) pairs, so conditions are compared pair by pair.
PROMPTS = heldout_prompts("rotten_tomatoes", limit=32)
SAMPLES = 2
MAX_TOKENS = 40


def run(client, model, alignment, prompts=PROMPTS, samples=SAMPLES, **kw):
    """One request per (prompt, sample), 16 at a time (the engine batches them)."""
    def one(job):
        i, s = job
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompts[i]}],
                                              max_tokens=MAX_TOKENS, seed=1000 + 10 * i + s,
                                              extra_body={"alignment": alignment}, **kw)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, [(i, s) for i in range(len(prompts)) for s in range(samples)]))


def rewards(rs, objective):
    return [r.model_extra["alignment"]["choices"][0]["rewards"][objective]["raw"] for r in rs]


def paired(a, b):
    """Mean of b - a over the same (prompt, seed) pairs and its standard error."""
    d = [y - x for x, y in zip(a, b)]
    return statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d))


@pytest.fixture(scope="module")
def sweep(client, model_name):
    """Sentiment rewards for sentiment weight 0 (beta 0: the same top-k decoder, no value model),
    0.5, 1, 2 and 4 at beta 2."""
    out = {0.0: rewards(run(client, model_name, {"method": "vas", "weights": {"sentiment": 1}, "beta": 0}),
                        "sentiment")}
    for w in (0.5, 1.0, 2.0, 4.0):
        out[w] = rewards(run(client, model_name, {"method": "vas", "weights": {"sentiment": w}, "beta": 2.0}),
                         "sentiment")
    return out


def test_vas_raises_sentiment_over_plain(client, model_name, sweep):
    plain = rewards(run(client, model_name, {"method": "none", "weights": {"sentiment": 1}}), "sentiment")
    gain, se = paired(plain, sweep[1.0])
    assert gain > max(0.1, 2 * se), (gain, se, statistics.mean(plain), statistics.mean(sweep[1.0]))


def test_weight_sweep_is_monotonic(sweep):
    ws = sorted(sweep)
    means = {w: round(statistics.mean(sweep[w]), 3) for w in ws}
    for a, b in zip(ws, ws[1:]):
        # Same prompts and seeds at every point: a step may dip by sampling noise (two paired
        # standard errors), never by a trend reversal.
        step, se = paired(sweep[a], sweep[b])
        assert step > -2 * se, (a, b, step, se, means)
    total, se = paired(sweep[ws[0]], sweep[ws[-1]])
    assert total > max(0.3, 3 * se), means


def test_composing_sentiment_and_safety_moves_both(client, model_name):
    prompts = heldout_prompts("realtoxicity")
    weights = {"sentiment": 2, "safety": 2}
    plain = run(client, model_name, {"method": "none", "weights": weights}, prompts, samples=1)
    control = run(client, model_name, {"method": "vas", "weights": weights, "beta": 0}, prompts, samples=1)
    both = run(client, model_name, {"method": "vas", "weights": weights, "beta": 4.0}, prompts, samples=1)
    report = {name: {o: round(statistics.mean(rewards(rs, o)), 3) for o in weights}
              for name, rs in (("plain", plain), ("top-k control", control), ("vas", both))}
    # Against the same decoder without value models, both objectives rise.
    for objective in weights:
        gain, se = paired(rewards(control, objective), rewards(both, objective))
        assert gain > 2 * se, (objective, gain, se, report)
    # Against plain sampling: sentiment rises, safety does not fall.
    gain, se = paired(rewards(plain, "sentiment"), rewards(both, "sentiment"))
    assert gain > 2 * se, report
    gain, se = paired(rewards(plain, "safety"), rewards(both, "safety"))
    assert gain > -2 * se, report
    receipt = both[0].model_extra["alignment"]
    assert receipt["method"] == "vas" and set(receipt["choices"][0]["rewards"]) == {"sentiment", "safety"}
    assert receipt["choices"][0]["kl_estimate"] > 0
    assert receipt["cost"]["value_model_steps"] >= both[0].usage.completion_tokens - 1


def test_vas_streams_and_shares_batches_with_plain_requests(client, model_name):
    # Greedy and short: batch composition changes bf16 rounding, which can flip a near-tie later on.
    def vas_stream():
        s = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": PROMPTS[0]}],
                                           max_tokens=12, temperature=0, stream=True,
                                           extra_body={"alignment": {"method": "vas", "weights": {"sentiment": 1}}})
        chunks = list(s)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].model_extra["alignment"]

    def plain():
        return client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": PROMPTS[1]}],
                                              max_tokens=8, seed=5, temperature=0).choices[0].message.content

    alone, vas_alone = plain(), vas_stream()[0]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(vas_stream), pool.submit(plain), pool.submit(vas_stream), pool.submit(plain)]
        results = [f.result() for f in futures]
    (text, receipt) = results[0]
    assert text and receipt["method"] == "vas" and receipt["choices"][0]["kl_estimate"] is not None
    # A plain request batched next to VAS requests is untouched by the value models...
    assert results[1] == alone and results[3] == alone
    # ...and each VAS request is steered by its own state, whoever shares the batch.
    assert results[0][0] == vas_alone and results[2][0] == vas_alone


def test_vas_n_choices(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": PROMPTS[2]}],
                                       max_tokens=16, seed=9, n=2,
                                       extra_body={"alignment": {"method": "vas", "weights": {"sentiment": 1}}})
    assert len(r.choices) == 2 and len(r.model_extra["alignment"]["choices"]) == 2


def test_objective_without_value_model_is_400(client, model_name):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       extra_body={"alignment": {"method": "vas", "weights": {"brevity": 1}}})
    assert e.value.body["param"] == "alignment.weights" and "brevity" in e.value.body["message"]
