"""A small, bounded async load generator for the OpenAI-compatible API (httpx, streaming).

    python -m loadtests.runner --url http://127.0.0.1:8000 --concurrency 16 --requests 64 \
        [--max-tokens 64] [--method none|best_of_n|vas|transfer_q|args] [--alignment JSON] \
        [--chat | --completion] [--json out.json]

`concurrency` streaming clients share `requests` requests in total (each client sends its next
request when its previous one finished). Every request streams (`stream: true` with
`stream_options.include_usage`), so time to first token and output tokens are measured per request.
Prints a table (requests, errors by status, latency and TTFT percentiles, output tokens/s) and
exits non-zero if any request failed (an HTTP error, an error event in the stream, or a stream that
ends without `data: [DONE]`, counted as "truncated"). Only loopback URLs are targeted unless
`--allow-remote`.

Bounds: `requests` in total, a per-request timeout (`--timeout`), and an overall deadline
(`--max-time`) after which unsent requests are not sent and in-flight ones are cancelled
(counted as errors, status "deadline").
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import sys
import time
from typing import Any

import httpx

from decoders import registry
from loadtests import check_target

DEFAULT_WEIGHTS = {"sentiment": 1.0}


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for an empty list."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def build_alignment(method: str | None, alignment: dict | str | None) -> dict | None:
    """`method` plus the `--alignment` JSON; reward methods get weights {sentiment: 1} unless given."""
    extra: dict[str, Any] = {}
    if isinstance(alignment, str) and alignment.strip():
        extra = json.loads(alignment)
    elif isinstance(alignment, dict):
        extra = dict(alignment)
    if not isinstance(extra, dict):
        raise ValueError("--alignment must be a JSON object")
    m = extra.get("method") or method or "none"
    if m == "none" and not extra:
        return None
    out = {"method": m, **{k: v for k, v in extra.items() if k != "method"}}
    if registry.needs_weights(m) and not out.get("weights"):
        out["weights"] = dict(DEFAULT_WEIGHTS)
    return out


def default_prompts() -> list[str]:
    try:
        from decoders.prompts import load_prompts

        return load_prompts("everyday")
    except Exception:  # noqa: BLE001 - the runner also works from a checkout without prompt data
        return ["Give me three tips for getting better sleep.", "Explain why the sky is blue.",
                "Write a haiku about autumn leaves.", "How do I make a simple budget?"]


async def _discover_model(client: httpx.AsyncClient, url: str) -> str:
    r = await client.get(f"{url}/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def _one_request(client: httpx.AsyncClient, url: str, body: dict, chat: bool, timeout: float) -> dict:
    """Send one streaming request; return its measurements."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    rec: dict[str, Any] = {"status": None, "latency_s": None, "ttft_s": None, "output_tokens": 0, "error": None}
    t0 = time.perf_counter()
    chunks_with_text = 0
    usage_tokens = None
    try:
        async with client.stream("POST", f"{url}{path}", json=body, timeout=timeout) as resp:
            rec["status"] = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                try:
                    rec["error"] = json.loads(text)["error"]["message"]
                except Exception:  # noqa: BLE001
                    rec["error"] = text[:300]
                return rec
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    rec["status"], rec["error"] = "bad_sse", data[:300]
                    continue
                if "error" in chunk:
                    err = chunk["error"] or {}
                    rec["status"] = f"stream_{err.get('code') or err.get('type') or 'error'}"
                    rec["error"] = err.get("message", str(err))[:300]
                    continue
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                for c in chunk.get("choices") or []:
                    text = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    if text:
                        chunks_with_text += 1
                        if rec["ttft_s"] is None:
                            rec["ttft_s"] = time.perf_counter() - t0
                if chunk.get("alignment"):
                    rec["alignment"] = chunk["alignment"]
            if not done and rec["status"] == 200:
                # A 200 stream that stops without its terminator is cut short, not a success.
                rec["status"], rec["error"] = "truncated", "stream ended without data: [DONE]"
    except httpx.TimeoutException as e:
        rec["status"], rec["error"] = "timeout", f"{type(e).__name__}: {e}"
    except httpx.HTTPError as e:
        rec["status"], rec["error"] = "connection", f"{type(e).__name__}: {e}"
    rec["latency_s"] = time.perf_counter() - t0
    rec["output_tokens"] = usage_tokens if usage_tokens is not None else chunks_with_text
    return rec


async def run_load_async(url: str, concurrency: int, requests: int, *, max_tokens: int = 64,
                         method: str | None = "none", alignment: dict | str | None = None, chat: bool = True,
                         prompts: list[str] | None = None, model: str | None = None, temperature: float = 1.0,
                         timeout: float = 300.0, max_time: float = 1800.0, allow_remote: bool = False,
                         api_key: str | None = None, seed: int | None = None) -> dict[str, Any]:
    check_target(url, allow_remote)
    if concurrency < 1 or requests < 0:
        raise ValueError("concurrency must be >= 1 and requests >= 0")
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    align = build_alignment(method, alignment)
    prompts = prompts or default_prompts()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    records: list[dict] = []
    counter = itertools.count()
    t_start = time.perf_counter()
    deadline = t_start + max_time

    async with httpx.AsyncClient(headers=headers, limits=limits, trust_env=False) as client:
        model = model or await _discover_model(client, url)

        def body_for(i: int) -> dict:
            prompt = prompts[i % len(prompts)]
            body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
                                    "stream": True, "stream_options": {"include_usage": True}}
            if chat:
                body["messages"] = [{"role": "user", "content": prompt}]
            else:
                body["prompt"] = prompt
            if seed is not None:
                body["seed"] = seed + i
            if align is not None:
                body["alignment"] = align
            return body

        async def worker() -> None:
            while True:
                i = next(counter)
                if i >= requests or time.perf_counter() >= deadline:
                    return
                remaining = max(1.0, deadline - time.perf_counter())
                try:
                    rec = await asyncio.wait_for(_one_request(client, url, body_for(i), chat, timeout),
                                                 timeout=remaining)
                except asyncio.TimeoutError:
                    rec = {"status": "deadline", "latency_s": None, "ttft_s": None, "output_tokens": 0,
                           "error": f"overall --max-time {max_time}s reached"}
                rec["index"] = i
                records.append(rec)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, max(requests, 1)))))
    wall = time.perf_counter() - t_start
    return summarize(records, wall, url=url, concurrency=concurrency, requested=requests, max_tokens=max_tokens,
                     chat=chat, alignment=align, model=model)


def summarize(records: list[dict], wall: float, **meta) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == 200]
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}
    for r in records:
        if r["status"] != 200:
            key = str(r["status"])
            errors[key] = errors.get(key, 0) + 1
            samples.setdefault(key, r.get("error") or "")
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["output_tokens"] for r in ok)
    per_req = [r["output_tokens"] / r["latency_s"] for r in ok if r["latency_s"] and r["output_tokens"]]

    def rnd(x, nd=4):
        return None if x is None else round(x, nd)

    return {
        **meta,
        "requests": len(records),
        "ok": len(ok),
        "errors": errors,
        "error_count": sum(errors.values()),
        "error_samples": samples,
        "latency_s": {f"p{q}": rnd(percentile(lat, q)) for q in (50, 95, 99)} | {"mean": rnd(sum(lat) / len(lat)) if lat else None},
        "ttft_s": {f"p{q}": rnd(percentile(ttft, q)) for q in (50, 95)},
        "output_tokens": tokens,
        "output_tokens_per_s": rnd(tokens / wall if wall > 0 else None, 2),
        "per_request_tokens_per_s": {"p50": rnd(percentile(per_req, 50), 2), "mean": rnd(sum(per_req) / len(per_req), 2) if per_req else None},
        "wall_s": rnd(wall, 3),
    }


def run_load(url: str, concurrency: int, requests: int, **kw) -> dict[str, Any]:
    """Synchronous wrapper of `run_load_async` (used by tests and the CLI)."""
    return asyncio.run(run_load_async(url, concurrency, requests, **kw))


def format_table(s: dict[str, Any]) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1000:.0f} ms"

    align = s.get("alignment")
    rows = [
        ("target", f"{s.get('url')} ({'chat' if s.get('chat') else 'completion'}, model {s.get('model')})"),
        ("method", json.dumps(align) if align else "none"),
        ("concurrency", s.get("concurrency")),
        ("max_tokens", s.get("max_tokens")),
        ("requests", f"{s['requests']} ({s['ok']} ok)"),
        ("errors", ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "0"),
        ("latency p50 / p95 / p99", " / ".join(ms(s["latency_s"][k]) for k in ("p50", "p95", "p99"))),
        ("TTFT p50 / p95", " / ".join(ms(s["ttft_s"][k]) for k in ("p50", "p95"))),
        ("output tokens", s["output_tokens"]),
        ("output tokens/s (aggregate)", s["output_tokens_per_s"]),
        ("tokens/s per request (p50)", s["per_request_tokens_per_s"]["p50"] or "-"),
        ("wall time", f"{s['wall_s']:.2f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    for k, msg in s.get("error_samples", {}).items():
        lines.append(f"{('error ' + k).ljust(width)}  {msg[:200]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server root (http://host:port)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--method", default="none", choices=list(registry.methods()))
    p.add_argument("--alignment", default=None,
                   help='JSON merged into the alignment object, e.g. \'{"n": 4, "weights": {"brevity": 1}}\'')
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=True, help="/v1/chat/completions (default)")
    mode.add_argument("--completion", dest="chat", action="store_false", help="/v1/completions")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="request i gets seed+i")
    p.add_argument("--prompts", default="everyday",
                   help="packaged prompt set (decoders/prompts.py), or a file: one prompt a line, or JSONL with "
                        "a \"prompt\" field")
    p.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    p.add_argument("--max-time", type=float, default=1800.0, help="overall deadline, seconds")
    p.add_argument("--api-key", default=None)
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    p.add_argument("--json", default=None, help="also write the summary as JSON to this file")
    args = p.parse_args(argv)

    try:
        check_target(args.url, args.allow_remote)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        from decoders.prompts import load_prompts

        prompts = load_prompts(args.prompts)
    except Exception as e:  # noqa: BLE001
        print(f"warning: prompt set {args.prompts!r} unavailable ({e}); using built-in prompts", file=sys.stderr)
        prompts = None
    try:
        summary = run_load(args.url, args.concurrency, args.requests, max_tokens=args.max_tokens, method=args.method,
                           alignment=args.alignment, chat=args.chat, prompts=prompts, model=args.model,
                           temperature=args.temperature, timeout=args.timeout, max_time=args.max_time,
                           allow_remote=args.allow_remote, api_key=args.api_key, seed=args.seed)
    except (httpx.HTTPError, ValueError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(format_table(summary))
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 1 if summary["error_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
