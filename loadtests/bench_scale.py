"""Aligned-method throughput with 1 vs 2 ingress replicas, in one run.

    python -m loadtests.bench_scale [--concurrency 8] [--requests 16] [--max-tokens 32]

Transfer Q* and best-of-N pruning run their decode loops in the ingress (one Python event loop per
replica), so one ingress replica could be their ceiling. This starts the server twice (one engine
replica each time, so the engine side is the same) with ``ingress.num_replicas`` 1 and 2, sends the
same concurrent best-of-8 and Transfer Q* requests to each, and prints requests/s and output tokens/s
with the ratio 2/1. Prints the machine it ran on: figures from different machines do not compare.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import tempfile
import time

import httpx

from loadtests import machine, start_server

MODEL = "SmolLM2-135M-Instruct"
METHODS = {
    "best_of_n n=8": {"method": "best_of_n", "n": 8, "weights": {"sentiment": 1.0}},
    "transfer_q k=4 block=8": {"method": "transfer_q", "weights": {"sentiment": 1.0}, "top_k": 4, "block": 8,
                               "rollout_tokens": 8},
}
TOPICS = ["a lighthouse", "a robot chef", "a lost cat", "Mars", "a library", "chess", "a caravan", "a village"]


async def drive(url: str, alignment: dict, concurrency: int, total: int, max_tokens: int) -> dict[str, float]:
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    tokens = 0
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker():
            nonlocal tokens
            while not queue.empty():
                i = queue.get_nowait()
                r = await client.post(f"{url}/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % 8]}."}],
                    "max_tokens": max_tokens, "seed": i, "alignment": alignment})
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"req_s": total / wall, "tok_s": tokens / wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8197)
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    results: dict[int, dict[str, dict[str, float]]] = {}
    cold_s: dict[int, float] = {}
    for replicas in (1, 2):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            json.dump({"ingress": {"num_replicas": replicas, "num_cpus": 0.25}, "value_models": {}}, f)
        proc, url, cold = start_server(args.port, f.name)
        cold_s[replicas] = cold
        try:
            for a in METHODS.values():  # warm-up: first calls compile and fill caches on each replica
                asyncio.run(drive(url, a, replicas, replicas, args.max_tokens))
            results[replicas] = {name: asyncio.run(drive(url, a, args.concurrency, args.requests, args.max_tokens))
                                 for name, a in METHODS.items()}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
            os.unlink(f.name)
    print(f"cold start: {cold_s[1]:.0f} s with 1 ingress replica, {cold_s[2]:.0f} s with 2")
    print(f"\n| method (concurrency {args.concurrency}, {args.requests} requests, {args.max_tokens} tokens) "
          f"| 1 ingress req/s | 2 ingress req/s | 1 ingress tok/s | 2 ingress tok/s | tok/s 2/1 |")
    print("|---|---|---|---|---|---|")
    for name in METHODS:
        a, b = results[1][name], results[2][name]
        print(f"| {name} | {a['req_s']:.2f} | {b['req_s']:.2f} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | "
              f"{b['tok_s'] / a['tok_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
