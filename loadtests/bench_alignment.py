"""Reward against cost for every method, one run, same prompts and seeds.

    python -m loadtests.bench_alignment [--url http://127.0.0.1:8000] [--prompts 12] [--max-tokens 48]

Without --url it starts the app itself (``python -m server.serve``) and stops it afterwards.
Prompts are held-out Rotten Tomatoes review requests (decoders.prompts.heldout_prompts: never used
to train the value models). Requests run one at a time so latencies compare. Prints two tables:
  1. best-of-N for N in 1, 4, 8, 16, plain and with early pruning, over a mixture of the four
     default objectives (mean mixed and per-objective rewards);
  2. none, VAS (beta sweep), best-of-N, ARGS and Transfer Q* (block 1 and the default block) with
     weights {"sentiment": 1}, latency as a multiple of plain sampling and the tokens each spent;
  3. (``baselines``) Transfer Q* with the DPO LoRA baselines, as the paper measures it, target
     {"sentiment": 1}: base; each adapter decoding alone (``model`` = the adapter); ARGS; Transfer Q*
     direct (the sentiment adapter) and indirect (the safety adapter, importance-weighted) at block
     1, 4 and 16 with equal top_k; mean reward with its standard error, KL to the base, latency.
``--tables`` picks which (default all: bon,methods,baselines); ``--blocks`` and ``--rows`` pick the
baselines table's rows.
"""
from __future__ import annotations

import argparse
import math
import signal
import statistics
import sys
import time

import httpx

from decoders.prompts import heldout_prompts
from loadtests import start_server

WEIGHTS = {"sentiment": 1.0}
MIXTURE = {"sentiment": 1.0, "safety": 1.0, "relevance": 1.0, "brevity": 0.5}


def ask(client: httpx.Client, url: str, model: str, prompt: str, alignment: dict, max_tokens: int, seed: int) -> dict:
    t0 = time.perf_counter()
    r = client.post(f"{url}/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "seed": seed, "temperature": 1.0, "alignment": alignment})
    latency = time.perf_counter() - t0
    if r.status_code != 200:
        return {"error": f"{r.status_code} {r.json().get('error', {}).get('message', r.text)[:200]}"}
    body = r.json()
    receipt = body.get("alignment", {})
    choice = receipt["choices"][0]
    cost = receipt.get("cost", {})
    timing = receipt.get("timing", {})
    return {"latency": latency, "mixed": choice["mixed"],
            "rewards": {o: s["raw"] for o, s in choice["rewards"].items()},
            "tokens": body["usage"]["completion_tokens"],
            "base_tokens": cost.get("base_tokens", body["usage"]["completion_tokens"]),
            "rollout_tokens": cost.get("rollout_tokens", 0), "candidates": cost.get("candidates", 0),
            "value_model_s": timing.get("value_model_s", 0.0), "value_model_steps": cost.get("value_model_steps", 0),
            "kl": choice.get("kl_estimate"), "text": body["choices"][0]["message"]["content"]}


def run(client, url, model, prompts, alignment, max_tokens) -> dict:
    rows = [ask(client, url, model, p, alignment, max_tokens, seed=100 + i) for i, p in enumerate(prompts)]
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        return {"error": errors[0]}

    def mean(key):
        return statistics.mean(r[key] for r in rows)

    out = {k: mean(k) for k in ("latency", "mixed", "tokens", "base_tokens", "rollout_tokens", "candidates")}
    for o in rows[0]["rewards"]:
        out[o] = statistics.mean(r["rewards"][o] for r in rows)
        out[f"{o}_sd"] = statistics.pstdev(r["rewards"][o] for r in rows)
    steps = sum(r["value_model_steps"] for r in rows)
    out["vm_ms_per_token"] = 1000 * sum(r["value_model_s"] for r in rows) / steps if steps else None
    kls = [r["kl"] for r in rows if r["kl"] is not None]
    out["kl"] = statistics.mean(kls) if kls else None
    return out



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url")
    ap.add_argument("--port", type=int, default=8198)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--skip", default="", help="comma-separated table names to skip: bon,methods,baselines")
    ap.add_argument("--tables", default="bon,methods,baselines", help="comma-separated tables to run")
    ap.add_argument("--blocks", default="1,4,16", help="block sizes of the baselines table's searches")
    ap.add_argument("--rows", default="", help="comma-separated: run only the baselines table's rows whose "
                                                 "name contains one of these (e.g. 'alpha=4,block=1')")
    args = ap.parse_args(argv)
    tables = [t for t in args.tables.split(",") if t and t not in args.skip.split(",")]
    prompts = heldout_prompts("rotten_tomatoes", limit=args.prompts)
    proc = None
    url = args.url
    if url is None:
        proc, url, _ = start_server(args.port)
    try:
        with httpx.Client(timeout=900) as client:
            model = client.get(f"{url}/v1/models").json()["data"][0]["id"]
            ask(client, url, model, "warm up", {"method": "none", "weights": WEIGHTS}, 8, 1)
            none = run(client, url, model, prompts, {"method": "none", "weights": WEIGHTS}, args.max_tokens)
            print(f"{len(prompts)} held-out rotten_tomatoes prompts, {args.max_tokens} tokens, temperature 1, "
                  f"sequential requests; plain sampling: {none['latency']:.2f}s mean latency\n", flush=True)
            if "bon" in tables:
                table_best_of_n(client, url, model, prompts, args.max_tokens)
            if "methods" in tables:
                table_methods(client, url, model, prompts, args.max_tokens, none)
            if "baselines" in tables:
                table_baselines(client, url, model, prompts, args.max_tokens, none,
                                [int(b) for b in args.blocks.split(",") if b], [r for r in args.rows.split(",") if r])
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    return 0


def table_best_of_n(client, url, model, prompts, max_tokens) -> None:
    names = list(MIXTURE)
    print(f"Best-of-N, weights {MIXTURE}, transform raw:\n")
    print("| N | mode | mean mixed | " + " | ".join(names) + " | latency s | base tokens | candidates scored |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|---|")
    for n in (1, 4, 8, 16):
        for mode, extra in (("plain", {}), ("early pruning", {"early_pruning": True, "chunk_tokens": 8})):
            if n == 1 and extra:
                continue  # nothing to prune
            r = run(client, url, model, prompts, {"method": "best_of_n", "n": n, "weights": MIXTURE, **extra}, max_tokens)
            if "error" in r:
                print(f"| {n} | {mode} | skipped: {r['error']} |", flush=True)
                continue
            per = " | ".join(f"{r[o]:.3f}" for o in names)
            print(f"| {n} | {mode} | {r['mixed']:.3f} | {per} | {r['latency']:.2f} | "
                  f"{r['base_tokens']:.0f} | {r['candidates']:.0f} |", flush=True)
    print()


def table_methods(client, url, model, prompts, max_tokens, none) -> None:
    configs = [("none", {"method": "none"})]
    configs += [(f"vas beta={b:g}", {"method": "vas", "beta": b}) for b in (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)]
    configs += [(f"best_of_n N={n}", {"method": "best_of_n", "n": n}) for n in (4, 8, 16)]
    configs += [("args k=4 block=1", {"method": "args", "top_k": 4, "block": 1}),
                ("transfer_q k=4 block=1 rollout=16", {"method": "transfer_q", "top_k": 4, "block": 1, "rollout_tokens": 16}),
                ("args k=4 block=16", {"method": "args", "top_k": 4, "block": 16}),
                ("transfer_q defaults (k=4 block=16 rollout=16)", {"method": "transfer_q"})]
    print(f"All methods, weights {WEIGHTS}:\n")
    print("| method | mean sentiment (sd) | latency s | x plain | base tokens | rollout tokens | "
          "value-model ms/token | KL est. |")
    print("|---|---|---|---|---|---|---|---|")
    for name, a in configs:
        r = none if name == "none" else run(client, url, model, prompts, {**a, "weights": WEIGHTS}, max_tokens)
        if "error" in r:
            print(f"| {name} | skipped: {r['error']} | | | | | | |", flush=True)
            continue
        vm = f"{r['vm_ms_per_token']:.2f}" if r["vm_ms_per_token"] is not None else "—"
        kl = f"{r['kl']:.2f}" if r["kl"] is not None else "—"
        print(f"| {name} | {r['sentiment']:.3f} ({r['sentiment_sd']:.2f}) | {r['latency']:.2f} | "
              f"{r['latency'] / none['latency']:.2f} | {r['base_tokens']:.0f} | {r['rollout_tokens']:.0f} | {vm} | {kl} |",
              flush=True)
    print()


def answer_logprob(client, url: str, model: str, prompt_text: str, answer: str) -> float:
    """log p_model(answer | chat-rendered prompt): the echoed log-probs of the answer's tokens."""
    r = client.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt_text + answer, "max_tokens": 0,
                                                   "echo": True, "logprobs": 1})
    r.raise_for_status()
    lp = r.json()["choices"][0]["logprobs"]
    return sum(x for off, x in zip(lp["text_offset"], lp["token_logprobs"]) if off >= len(prompt_text) and x is not None)


def table_baselines(client, url, model, prompts, max_tokens, none, blocks=(1, 4, 16), only=()) -> None:
    """Transfer Q* with trained (DPO LoRA) baselines against ARGS and the baselines alone."""
    from transformers import AutoTokenizer

    from decoders.base_model import materialize_embedded

    tok = AutoTokenizer.from_pretrained(str(materialize_embedded()))
    rendered = {p: tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts}
    served = [m["id"] for m in client.get(f"{url}/v1/models").json()["data"]]
    adapters = [m for m in served[1:] if m.startswith(f"{model}-")]
    search = {"top_k": 4, "rollout_tokens": 16}
    configs: list[tuple[str, str, dict]] = [("base (plain sampling)", model, {"method": "none"})]
    configs += [(f"adapter `{a.removeprefix(model + '-')}` alone", a, {"method": "none"}) for a in adapters]
    for block in blocks:
        configs += [(f"ARGS k=4 block={block}", model, {"method": "args", "top_k": 4, "block": block}),
                    (f"Transfer Q* direct (sentiment adapter) block={block}", model,
                     {"method": "transfer_q", "block": block, "baseline": "sentiment", **search}),
                    (f"Transfer Q* indirect (safety adapter) block={block}", model,
                     {"method": "transfer_q", "block": block, "baseline": "safety", "transfer": "indirect", **search})]
    # Where block-level Transfer Q* stands against its causes: a prompted baseline instead of the
    # trained one, and a stronger tilt (alpha 4) for both searches.
    configs += [("Transfer Q* direct (prompted `positive` baseline) block=4", model,
                 {"method": "transfer_q", "block": 4, "baseline": "positive", **search}),
                ("ARGS k=4 block=4 alpha=4", model, {"method": "args", "top_k": 4, "block": 4, "alpha": 4.0}),
                ("Transfer Q* direct (sentiment adapter) block=4 alpha=4", model,
                 {"method": "transfer_q", "block": 4, "baseline": "sentiment", "alpha": 4.0, **search})]
    if only:
        configs = [c for c in configs if any(o in c[0] for o in only)]
    print(f"Transfer Q* with DPO LoRA baselines, weights {WEIGHTS}, alpha 1, rollout 16 tokens, "
          f"{len(prompts)} held-out prompts (mean ± standard error):\n")
    print("| row | sentiment | KL to base (nats) | latency s | × plain | rollout tokens |")
    print("|---|---|---|---|---|---|")
    for name, m, a in configs:
        rows = [ask(client, url, m, p, {**a, "weights": WEIGHTS}, max_tokens, seed=100 + i)
                for i, p in enumerate(prompts)]
        errors = [r["error"] for r in rows if "error" in r]
        if errors:
            print(f"| {name} | skipped: {errors[0]} | | | | |", flush=True)
            continue
        if m != model:  # an adapter decoding alone: log p_adapter - log p_base of its own samples
            kls = [answer_logprob(client, url, m, rendered[p], r["text"]) -
                   answer_logprob(client, url, model, rendered[p], r["text"]) for p, r in zip(prompts, rows)]
        elif a["method"] == "none":
            kls = [0.0] * len(rows)
        else:
            kls = [r["kl"] for r in rows if r["kl"] is not None]
        sent = [r["rewards"]["sentiment"] for r in rows]
        latency = statistics.mean(r["latency"] for r in rows)
        kl = f"{statistics.mean(kls):.1f} ± {se(kls):.1f}" if kls else "—"
        print(f"| {name} | {statistics.mean(sent):.3f} ± {se(sent):.3f} | {kl} | {latency:.2f} | "
              f"{latency / none['latency']:.2f} | {statistics.mean(r['rollout_tokens'] for r in rows):.0f} |", flush=True)
    print()


def se(xs) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0


if __name__ == "__main__":
    sys.exit(main())
