"""Serving overhead: plain decoding through our HTTP API vs the bare vLLM engine, in one run.

    python -m loadtests.bench_serving [--concurrency 1,4,16] [--requests-per-level 16] [--max-tokens 64]

Phase 1 runs the bare ``AsyncLLM`` in this process (same model, same engine settings) and
phase 2 starts the real app (``python -m server.serve``, as ``make serve`` does: its cold start
is reported) and sends the same requests (same prompts, seeds, sampling) over HTTP with the
official client's wire format. Same seeds give the same outputs, so both do the same work.
Prints requests/s, output tokens/s, p50/p95 latency per concurrency and the ratios ours/bare.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import httpx

from loadtests import start_server

PROMPT = "Write a long, detailed story about {topic}."
TOPICS = ["a lighthouse keeper", "a robot chef", "a lost cat", "the first city on Mars", "a haunted library",
          "a chess prodigy", "a desert caravan", "an underwater village"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def summarize(latencies: list[float], tokens: int, wall: float) -> dict[str, float]:
    return {"req_s": len(latencies) / wall, "tok_s": tokens / wall,
            "p50": statistics.median(latencies), "p95": pct(latencies, 0.95)}


def requests_for(n: int) -> list[tuple[str, int]]:
    return [(PROMPT.format(topic=TOPICS[i % len(TOPICS)]), 1000 + i) for i in range(n)]


async def drive(one, concurrency: int, total: int) -> dict[str, float]:
    work = requests_for(total)
    queue: asyncio.Queue = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    lat: list[float] = []
    toks = 0

    async def worker():
        nonlocal toks
        while not queue.empty():
            prompt, seed = queue.get_nowait()
            t0 = time.perf_counter()
            n = await one(prompt, seed)
            toks += n
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(lat, toks, time.perf_counter() - t0)


async def bench_bare(levels, per_level, max_tokens) -> dict[int, dict]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from server.config import ServerConfig
    from server.engine import Engine

    engine = Engine(ServerConfig(), enable_vas=False)
    await engine.warm_up()
    tok = engine.tokenizer

    async def one(prompt: str, seed: int) -> int:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = tok.encode(ids, add_special_tokens=False)
        sp = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for out in engine.llm.generate({"prompt_token_ids": ids}, sp, f"bare-{seed}-{time.time_ns()}"):
            final = out
        return len(final.outputs[0].token_ids)

    out = {}
    for c in levels:
        out[c] = await drive(one, c, max(per_level, 3 * c))
        print(f"bare  c={c:<3} {fmt(out[c])}", flush=True)
    engine.shutdown()
    return out


async def bench_ours(url: str, levels, per_level, max_tokens) -> dict[int, dict]:
    async with httpx.AsyncClient(timeout=600) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]

        async def one(prompt: str, seed: int) -> int:
            r = await client.post(f"{url}/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": 1.0, "seed": seed})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        await one("warm up", 1)
        out = {}
        for c in levels:
            out[c] = await drive(one, c, max(per_level, 3 * c))
            print(f"ours  c={c:<3} {fmt(out[c])}", flush=True)
        return out


def fmt(s: dict) -> str:
    return f"req/s {s['req_s']:6.2f}  tok/s {s['tok_s']:7.1f}  p50 {s['p50']:6.2f}s  p95 {s['p95']:6.2f}s"



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests-per-level", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8199)
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    bare = asyncio.run(bench_bare(levels, args.requests_per_level, args.max_tokens))
    proc, _, cold = start_server(args.port)
    try:
        ours = asyncio.run(bench_ours(f"http://127.0.0.1:{args.port}", levels, args.requests_per_level, args.max_tokens))
    finally:
        import signal

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)

    print(f"\nPlain decoding, {args.max_tokens}-token outputs, max({args.requests_per_level}, 3 x concurrency) requests per level "
          f"(one run, same prompts and seeds)\n")
    print("| concurrency | bare req/s | bare tok/s | bare p50 s | bare p95 s | ours req/s | ours tok/s | ours p50 s "
          "| ours p95 s | tok/s ours/bare | p50 ours/bare |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in levels:
        b, o = bare[c], ours[c]
        print(f"| {c} | {b['req_s']:.2f} | {b['tok_s']:.1f} | {b['p50']:.2f} | {b['p95']:.2f} | {o['req_s']:.2f} | "
              f"{o['tok_s']:.1f} | {o['p50']:.2f} | {o['p95']:.2f} | {o['tok_s'] / b['tok_s']:.2f} | "
              f"{o['p50'] / b['p50']:.2f} |")
    lo, hi = min(levels), max(levels)
    print(f"\nthroughput scaling c={hi} vs c={lo}: bare {bare[hi]['tok_s'] / bare[lo]['tok_s']:.2f}x, "
          f"ours {ours[hi]['tok_s'] / ours[lo]['tok_s']:.2f}x")
    print(f"cold start of `python -m server.serve` (model already materialized): {cold:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
