"""The engine's two CPU process layouts, served, in one run: two ``python -m server.serve`` at once.

    python -m loadtests.bench_layouts [--concurrency 1,16] [--rounds 6] [--max-tokens 64]

One server runs the engine in one process (``engine.cpu_one_process``, the default), the other in
vLLM's own layout (a worker process beside the engine core). Both get the same plain requests over
HTTP (same prompts, seeds, sampling) and take turns, ``--rounds`` rounds per concurrency level in
alternating order. Prints each layout's cold start, tokens/s and p50 per level, and the ratios
one process / vLLM's layout. docs/performance.md has runs of it.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
from pathlib import Path

import httpx

from loadtests import machine, start_server
from loadtests.bench_serving import ours_client, take_turns

LAYOUTS = {"one process": "engine:\n  cpu_one_process: true\n", "vLLM layout": "engine:\n  cpu_one_process: false\n"}


async def bench(urls: dict[str, str], levels: list[int], rounds: int, max_tokens: int) -> dict[str, dict[int, dict]]:
    async with httpx.AsyncClient(timeout=600) as client:
        sides = {}
        for name, url in urls.items():
            model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
            sides[name] = ours_client(client, url, model, max_tokens)
            await sides[name]("warm up", 1)
        return await take_turns(sides, levels, 16, rounds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8301, help="the first server's; the second takes the next")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    print(f"machine: {machine()}", flush=True)
    d = Path(tempfile.mkdtemp(prefix="bench-layouts-"))
    procs, urls, colds = [], {}, {}
    try:
        for i, (name, config) in enumerate(LAYOUTS.items()):
            (d / f"{i}.yaml").write_text(config)
            proc, urls[name], colds[name] = start_server(args.port + i, d / f"{i}.yaml")
            procs.append(proc)
            print(f"{name}: ready in {colds[name]:.1f}s", flush=True)
        res = asyncio.run(bench(urls, levels, max(1, args.rounds), args.max_tokens))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=120)
    one, vllm = res["one process"], res["vLLM layout"]
    print(f"\nServed plain decoding, {args.max_tokens}-token outputs, {args.rounds} alternating rounds, both servers up "
          f"(cold start: one process {colds['one process']:.1f}s, vLLM layout {colds['vLLM layout']:.1f}s; the second "
          f"started while the first was idle)\n")
    print("| concurrency | one process tok/s | vLLM layout tok/s | one process p50 s | vLLM layout p50 s "
          "| tok/s one/vLLM | p50 one/vLLM |")
    print("|---|---|---|---|---|---|---|")
    for c in levels:
        o, v = one[c], vllm[c]
        print(f"| {c} | {o['tok_s']:.1f} | {v['tok_s']:.1f} | {o['p50']:.2f} | {v['p50']:.2f} | "
              f"{o['tok_s'] / v['tok_s']:.2f} | {o['p50'] / v['p50']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
