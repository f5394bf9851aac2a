"""Serving overhead: plain decoding through our HTTP API vs the bare vLLM engine, in one run.

    python -m loadtests.bench_serving [--concurrency 1,16] [--requests-per-level 16] [--max-tokens 64] [--rounds 4]

Starts the real app (``python -m server.serve``, as ``make serve`` does: its cold start is reported),
then the bare ``AsyncLLM`` in this process (same model, same engine settings, same dtype), and sends
both the same requests (same prompts, seeds, sampling; ours over HTTP in the official client's wire
format). On CPU a third side is the bare engine in vLLM's own process layout (a worker process;
the server runs the worker inside the engine core, engine.cpu_one_process). All stay up and take
turns, ``--rounds`` rounds per concurrency level, each side first in turn, so that drift of a shared
machine falls on all alike. Same seeds give the same outputs, so both do
the same work. Prints the machine (CPU model, flags), the dtype, requests/s, output tokens/s,
p50/p95 latency per concurrency and the ratios ours/bare. Then, everything else stopped, the cold
start of the engine alone without Ray, in vLLM's own layout and in the server's (loadtests/cold_start.py),
beside the server's: what of ``make serve``'s start is vLLM's own.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import httpx

from loadtests import machine, start_server

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


async def drive(one, concurrency: int, work: list[tuple[str, int]]) -> tuple[list[float], int, float]:
    """``work`` at ``concurrency``: (latencies, output tokens, wall seconds)."""
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
    return lat, toks, time.perf_counter() - t0


async def bare_client(max_tokens: int, one_process: bool = True, features: bool = False):
    """The bare engine in this process: (one(prompt, seed) -> output tokens, the engine).
    ``one_process=False``: in vLLM's own process layout on CPU (engine.cpu_one_process).
    ``features=True``: with the features the server's engine adds (LoRA, the VAS logits processor)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from server.config import ServerConfig
    from server.engine import Engine

    # Bare vLLM: the model alone, without the features the server adds (VAS logits processor, LoRA
    # for the Transfer Q* baselines), so their cost shows in the ratio.
    engine = Engine(ServerConfig.model_validate({"engine": {"enable_lora": features, "cpu_one_process": one_process}}),
                    enable_vas=features)
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

    return one, engine


def ours_client(client: httpx.AsyncClient, url: str, model: str, max_tokens: int):
    async def one(prompt: str, seed: int) -> int:
        r = await client.post(f"{url}/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": seed})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    return one


async def take_turns(sides: dict, levels: list[int], per_level: int, rounds: int) -> dict[str, dict[int, dict]]:
    """{side: {concurrency: summary}}: at each level, the same requests split over ``rounds`` rounds; in
    every round each side drives its share, each side first in turn."""
    names = list(sides)
    out: dict[str, dict[int, dict]] = {side: {} for side in names}
    for c in levels:
        # Whole waves of c requests in every round: a half-full last wave would measure the tail.
        wave = c * rounds
        work = requests_for(-(-max(per_level, 3 * c) // wave) * wave)
        acc = {side: ([], 0, 0.0) for side in names}
        for r in range(rounds):
            part = work[r::rounds]
            for side in names[r % len(names):] + names[:r % len(names)]:
                lat, toks, wall = await drive(sides[side], c, part)
                a = acc[side]
                acc[side] = (a[0] + lat, a[1] + toks, a[2] + wall)
        for side, (lat, toks, wall) in acc.items():
            out[side][c] = summarize(lat, toks, wall)
            print(f"{side:5} c={c:<3} {fmt(out[side][c])}", flush=True)
    return out


async def bench(url: str, levels: list[int], per_level: int, max_tokens: int, rounds: int, features: bool = False):
    """{side: {concurrency: summary}} with the sides taking turns, and the engine's dtype. Sides: "bare"
    (the engine as the server runs it), "ours" (the server), and where the server's engine runs its
    worker in its engine core (CPU), "vllm" (the bare engine in vLLM's own process layout)."""
    bare, engine = await bare_client(max_tokens)
    engines = [engine]
    try:
        sides = {"bare": bare}
        if engine.one_process:
            sides["vllm"], other = await bare_client(max_tokens, one_process=False)
            engines.append(other)
        if features:
            sides["feat"], other = await bare_client(max_tokens, features=True)
            engines.append(other)
        async with httpx.AsyncClient(timeout=600) as client:
            model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
            sides["ours"] = ours_client(client, url, model, max_tokens)
            await sides["ours"]("warm up", 1)
            return await take_turns(sides, levels, per_level, rounds), engine.dtype
    finally:
        for e in engines:
            e.shutdown()


def fmt(s: dict) -> str:
    return f"req/s {s['req_s']:6.2f}  tok/s {s['tok_s']:7.1f}  p50 {s['p50']:6.2f}s  p95 {s['p95']:6.2f}s"


def side_table(intro: str, label: str, side: dict, levels: list[int], ratios: list[tuple]) -> None:
    """A further side's table: its tok/s and p50 per concurrency, then each (header, numerator side,
    denominator side, "tok_s" | "p50") ratio."""
    print(f"\n{intro}\n")
    print(f"| concurrency | {label} tok/s | {label} p50 s | " + " | ".join(r[0] for r in ratios) + " |")
    print("|---" * (3 + len(ratios)) + "|")
    for c in levels:
        cells = [f"{side[c]['tok_s']:.1f}", f"{side[c]['p50']:.2f}"] + [f"{num[c][k] / den[c][k]:.2f}"
                                                                        for _, num, den, k in ratios]
        print(f"| {c} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--requests-per-level", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="turns per side and level (alternating order)")
    ap.add_argument("--port", type=int, default=8199)
    ap.add_argument("--features", action="store_true",
                    help="a fourth side: the bare engine with the features the server's engine adds (LoRA, the "
                         "VAS logits processor), to tell their cost from the serving layer's")
    ap.add_argument("--engine-cold-starts", action=argparse.BooleanOptionalAction, default=True,
                    help="after the rest, time the engine's cold start without Ray in fresh processes, in vLLM's "
                         "own layout and in the server's (loadtests/cold_start.py; ~1 min on 2 cores)")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    print(f"machine: {machine()}", flush=True)

    proc, url, cold = start_server(args.port)
    try:
        res, dtype = asyncio.run(bench(url, levels, args.requests_per_level, args.max_tokens, max(1, args.rounds),
                                      args.features))
    finally:
        import signal

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    bare, ours = res["bare"], res["ours"]

    print(f"\nmachine: {machine()}; engine dtype: {dtype} (both)")
    print(f"Plain decoding, {args.max_tokens}-token outputs, max({args.requests_per_level}, 3 x concurrency) requests "
          f"per level and side (rounded up to whole waves), in {args.rounds} alternating rounds (one run, same "
          f"prompts and seeds)\n")
    print("| concurrency | bare req/s | bare tok/s | bare p50 s | bare p95 s | ours req/s | ours tok/s | ours p50 s "
          "| ours p95 s | tok/s ours/bare | p50 ours/bare |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in levels:
        b, o = bare[c], ours[c]
        print(f"| {c} | {b['req_s']:.2f} | {b['tok_s']:.1f} | {b['p50']:.2f} | {b['p95']:.2f} | {o['req_s']:.2f} | "
              f"{o['tok_s']:.1f} | {o['p50']:.2f} | {o['p95']:.2f} | {o['tok_s'] / b['tok_s']:.2f} | "
              f"{o['p50'] / b['p50']:.2f} |")
    vllm, feat = res.get("vllm"), res.get("feat")
    if vllm:
        side_table("The bare engine in vLLM's own process layout on CPU (a worker process beside the engine core; "
                   "the server and the bare engine above run the worker inside the engine core, "
                   "engine.cpu_one_process):", "vLLM layout", vllm, levels,
                   [("tok/s ours/vLLM layout", ours, vllm, "tok_s"), ("p50 ours/vLLM layout", ours, vllm, "p50"),
                    ("tok/s bare/vLLM layout", bare, vllm, "tok_s")])
    if feat:
        side_table("The bare engine with the server engine's features (LoRA for the Transfer Q* baselines, the VAS "
                   "logits processor), no request using them:", "features", feat, levels,
                   [("tok/s features/bare", feat, bare, "tok_s"), ("tok/s ours/features", ours, feat, "tok_s"),
                    ("p50 ours/features", ours, feat, "p50")])
    lo, hi = min(levels), max(levels)
    print(f"\nthroughput scaling c={hi} vs c={lo}: bare {bare[hi]['tok_s'] / bare[lo]['tok_s']:.2f}x, "
          f"ours {ours[hi]['tok_s'] / ours[lo]['tok_s']:.2f}x")
    print(f"cold start of `python -m server.serve` (model already materialized): {cold:.1f}s")
    if args.engine_cold_starts:
        from loadtests import cold_start

        # After the served side is down, one at a time: each has the machine to itself.
        alone = {layout: cold_start.measure(layout) for layout in cold_start.LAYOUTS}
        print("\nCold start, a fresh process until its first token (model already materialized):\n")
        print("| what starts | s |\n|---|---|")
        print(f"| `python -m server.serve` (Ray, every deployment; until READY, warm-up included) | {cold:.1f} |")
        for layout, label in (("ours", "the server's engine alone, no Ray (loadtests/cold_start.py ours)"),
                              ("vllm", "bare vLLM AsyncLLM in its own process layout, no Ray (cold_start.py vllm)")):
            seconds = alone[layout]
            print(f"| {label} | {'failed' if seconds is None else f'{seconds:.1f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
