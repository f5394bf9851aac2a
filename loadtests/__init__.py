"""Load tests and the alignment evaluation (see docs/evaluation.md).

* ``loadtests.runner``: a bounded async streaming load generator (httpx) with latency/TTFT/throughput table.
* ``loadtests.locustfile``: OpenAI-shaped locust tasks (run locust as its own process only).
* ``loadtests.eval``: every method over a prompt set; reward against cost, with PNG plots.

Every tool here refuses non-loopback targets unless explicitly allowed.
"""
from __future__ import annotations

import ipaddress
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback_url(url: str) -> bool:
    """True when `url`'s host is a loopback name or address (127.0.0.0/8, ::1, localhost)."""
    host = urlparse(url if "://" in url else f"http://{url}").hostname
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_target(url: str, allow_remote: bool, flag: str = "--allow-remote") -> None:
    """Raise ValueError unless `url` is loopback or remote targets were explicitly allowed."""
    if not allow_remote and not is_loopback_url(url):
        raise ValueError(f"refusing to load-test non-loopback URL {url!r}: only 127.0.0.1/localhost "
                         f"are targeted unless {flag} is given")


# The CPU flags that decide how fast a CPU runs the engine (bf16/AMX paths, vector width).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "bf16", "asimd", "sve")


def machine() -> str:
    """The machine a benchmark ran on: CPU model, logical CPUs, the flags that matter for speed."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    have = [f for f in SPEED_FLAGS if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(have) or 'none of ' + '/'.join(SPEED_FLAGS)}"


def start_server(port: int, config: str | Path | None = None) -> tuple[subprocess.Popen, str, float]:
    """``python -m server.serve --port PORT [--config CONFIG]`` in its own session (the benchmarks'
    private server): (process, its URL, seconds until it printed READY). Stop it with SIGTERM."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "server.serve", "--port", str(port)] + (["--config", str(config)] if config else [])
    proc = subprocess.Popen(cmd,
                            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("READY"):
            # Keep reading its output: a full pipe would block the server's logging.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, f"http://127.0.0.1:{port}", time.perf_counter() - t0
    raise RuntimeError("server exited before it was ready")
