"""Reward against cost for every method, one run, same prompts and seeds.

    python -m loadtests.bench_alignment [--url http://127.0.0.1:8000] [--prompts 12] [--max-tokens 48]

Without --url it starts the app itself (``python -m server.serve``) and stops it afterwards.
Prompts are held-out Rotten Tomatoes review requests (decoders.prompts.heldout_prompts: never used
to train the value models). Requests run one at a time so latencies compare. Prints two tables:
  1. best-of-N for N in 1, 4, 8, 16, plain and with early pruning, over a mixture of the four
     default objectives (mean mixed and per-objective rewards);
  2. none, VAS (beta sweep), best-of-N, ARGS and Transfer Q* (block 1 and the default block) with
     weights {"sentiment": 1}, latency as a multiple of plain sampling and the tokens each spent.
"""
from __future__ import annotations

import argparse
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
            "kl": choice.get("kl_estimate")}


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
    ap.add_argument("--skip", default="", help="comma-separated table names to skip: bon,methods")
    args = ap.parse_args(argv)
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
            if "bon" not in args.skip:
                table_best_of_n(client, url, model, prompts, args.max_tokens)
            if "methods" not in args.skip:
                table_methods(client, url, model, prompts, args.max_tokens, none)
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


if __name__ == "__main__":
    sys.exit(main())
