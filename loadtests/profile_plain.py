"""Where a plain request's time and CPU go: the bare engine against our HTTP API, process by process.

    python -m loadtests.profile_plain [--requests 12] [--concurrency 1] [--max-tokens 64] [--py-spy] [--vllm-layout]

Runs the same requests (``--concurrency`` at a time, default one) through the bare ``AsyncLLM`` (in
this process) and through ``python -m server.serve`` over HTTP, and prints for each: the latency per
request, and the CPU seconds per request of every process that used any (the engine's core and
worker, Ray's proxy, the ingress replica, the engine replica, Ray's own daemons, ...), summed from
/proc between the first and the last request. On a machine with few cores, CPU that another process
burns is latency the engine loses. ``--py-spy`` also samples the ingress and engine replicas with
py-spy during the HTTP run and prints their hottest functions: samples of the thread holding the GIL
only, so waiting threads do not count, and the sampling itself costs CPU (its latency figures are not
the benchmark's). ``--vllm-layout``: both engines in vLLM's own CPU process layout (a worker process
beside the engine core; ``engine.cpu_one_process: false``).
docs/performance.md has runs of it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import httpx
import psutil

from loadtests import start_server
from loadtests.bench_serving import bare_client, drive, ours_client, requests_for


def _label(p: psutil.Process) -> str:
    """A short stable name for a process: Ray's actor titles, vLLM's process titles, or the command."""
    try:
        name = p.name()
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "?"
    for pat, label in ((r"ServeReplica:\w+:(\w+)", r"replica \1"), (r"ray::(\w+)", r"ray::\1"),
                       (r"(gcs_server)", r"\1"), (r"(raylet)", r"\1"),
                       (r"dashboard/(\w+)\.py", r"dashboard \1"), (r"(runtime_env/agent)", r"\1"),
                       (r"(log_monitor)", r"\1"), (r"(monitor)\.py", r"\1")):
        m = re.search(pat, cmd)
        if m:
            return m.expand(label)
    if name.startswith(("VLLM::", "EngineCore", "Worker")) or "EngineCore" in cmd:
        return name
    return name if p.pid != os.getpid() else "this process (client / bare engine)"


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    out = {}
    for p in psutil.process_iter():
        try:
            t = p.cpu_times()
            out[p.pid] = (_label(p), t.user + t.system)
        except psutil.Error:
            pass
    return out


def cpu_delta(before: dict, after: dict, per: int) -> list[tuple[str, float]]:
    by_label: dict[str, float] = defaultdict(float)
    for pid, (label, t1) in after.items():
        t0 = before.get(pid, (label, 0.0))[1]
        by_label[label] += (t1 - t0) / per
    return sorted(((k, v) for k, v in by_label.items() if v >= 0.005), key=lambda kv: -kv[1])


async def latencies(one, n: int, concurrency: int) -> list[float]:
    """The latency of each of ``n`` requests, ``concurrency`` of them in flight at a time."""
    return (await drive(one, concurrency, requests_for(n)))[0]


async def run_bare(n: int, max_tokens: int, concurrency: int, one_process: bool) -> tuple[list[float], list]:
    one, engine = await bare_client(max_tokens, one_process=one_process)
    try:
        before = cpu_snapshot()
        lat = await latencies(one, n, concurrency)
        return lat, cpu_delta(before, cpu_snapshot(), n)
    finally:
        engine.shutdown()


def py_spy(pids: dict[str, int], seconds: int, out_dir: Path) -> list[subprocess.Popen]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    procs = []
    for label, pid in pids.items():
        out = out_dir / f"{label.replace(' ', '_')}.txt"
        procs.append(subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100", "--gil",
                                       "--format", "raw", "--output", str(out), "--nonblocking"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def hottest(raw: Path, top: int = 12) -> list[tuple[str, float]]:
    """Self time by function from py-spy's raw (collapsed stacks) output, as fractions of the samples."""
    self_time: dict[str, int] = defaultdict(int)
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = stack.split(";")[-1]
        self_time[re.sub(r"\s*\(.*?/(site-packages|main)/", " (", leaf)] += n
    return [(k, v / total) for k, v in sorted(self_time.items(), key=lambda kv: -kv[1])[:top]] if total else []


async def run_ours(url: str, n: int, max_tokens: int, concurrency: int, spy: bool) -> tuple[list[float], list, dict]:
    async with httpx.AsyncClient(timeout=600) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        one = ours_client(client, url, model, max_tokens)
        await one("warm up", 1)
        spies, out_dir = [], Path("out/profile")
        if spy:
            out_dir.mkdir(parents=True, exist_ok=True)
            pids = {label: pid for pid, (label, _) in cpu_snapshot().items()
                    if label in ("replica OpenAIIngress", "replica EngineDeployment", "ray::ProxyActor")}
            spies = py_spy(pids, 10_000, out_dir)
        before = cpu_snapshot()
        lat = await latencies(one, n, concurrency)
        usage = cpu_delta(before, cpu_snapshot(), n)
        hot = {}
        for p in spies:
            p.send_signal(2)  # SIGINT: py-spy writes what it has
            p.wait(timeout=60)
        for f in sorted(out_dir.glob("*.txt")) if spy else []:
            hot[f.stem] = hottest(f)
        return lat, usage, hot


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8198)
    ap.add_argument("--py-spy", action="store_true", help="sample the ingress, engine replica and proxy")
    ap.add_argument("--vllm-layout", action="store_true", help="engines in vLLM's own CPU process layout")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    bare_lat, bare_cpu = asyncio.run(run_bare(args.requests, args.max_tokens, args.concurrency,
                                              one_process=not args.vllm_layout))
    config = None
    if args.vllm_layout:
        config = Path(tempfile.mkdtemp(prefix="profile-plain-")) / "config.yaml"
        config.write_text("engine:\n  cpu_one_process: false\n")
    proc, url, cold = start_server(args.port, config)
    try:
        ours_lat, ours_cpu, hot = asyncio.run(run_ours(url, args.requests, args.max_tokens, args.concurrency,
                                                          args.py_spy))
    finally:
        import signal

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)

    print(f"\n{args.requests} plain requests, {args.concurrency} at a time, {args.max_tokens}-token outputs, "
          f"cores: {os.cpu_count()}, engines in {'vLLM' if args.vllm_layout else 'our one-process'} layout")
    print(f"latency p50: bare {statistics.median(bare_lat):.3f}s, ours {statistics.median(ours_lat):.3f}s "
          f"(+{statistics.median(ours_lat) - statistics.median(bare_lat):.3f}s)\n")
    for title, usage in (("bare engine", bare_cpu), ("ours (HTTP -> proxy -> ingress -> engine replica)", ours_cpu)):
        print(f"CPU seconds per request, {title}: total {sum(v for _, v in usage):.3f}")
        print("| process | CPU s / request |\n|---|---|")
        for label, v in usage:
            print(f"| {label} | {v:.3f} |")
        print()
    for label, rows in hot.items():
        print(f"py-spy, {label}: hottest functions by own time (share of samples)")
        for fn, share in rows:
            print(f"  {share:6.1%}  {fn}")
        print()
    print(f"cold start: {cold:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
