"""Shared fixtures. The integration server is the real thing: `python -m server.serve` (what
`make serve` runs) with the embedded default model, started once per test session."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url = url
        self.proc = proc
        self.log = log

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=300, **kw)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=30).text

    def admin_state(self, headers: dict | None = None) -> dict:
        """GET /admin/state (servers with `enable_test_hooks`): the engines' budget in use and unfinished requests."""
        r = httpx.get(f"{self.url}/admin/state", headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_idle(self, within_s: float, headers: dict | None = None) -> dict:
        """The admin state once the budget is back to 0 and the engines idle, or as it is after `within_s`."""
        deadline = time.time() + within_s
        while True:
            s = self.admin_state(headers)
            if s == {"cost_in_flight": 0, "engine_unfinished": 0} or time.time() > deadline:
                return s
            time.sleep(0.2)


def start_server(tmp_dir: Path, config_path: Path | None = None, env: dict | None = None) -> RunningServer:
    port = _free_port()
    log = tmp_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "server.serve", "--host", "127.0.0.1", "--port", str(port)]
    if config_path:
        cmd += ["--config", str(config_path)]
    full_env = dict(os.environ, **(env or {}))
    # Ray dashboard/metrics ports of concurrent test servers must not collide.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=full_env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + SERVER_START_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early ({proc.returncode}):\n{log.read_text()[-4000:]}")
        # `server.serve` prints READY once every deployment (engine included) is running.
        if "READY http" in log.read_text(errors="replace"):
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return RunningServer(url, proc, log)
            except httpx.HTTPError:
                pass
        time.sleep(1)
    stop_server(RunningServer(url, proc, log))
    raise RuntimeError(f"server not ready in {SERVER_START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


def process_tree(root_pid: int) -> str:
    """``pid <- parent: command line`` of every process under ``root_pid``, for a failure message."""
    import psutil

    lines = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            lines.append(f"{p.pid} <- {p.ppid()}: {' '.join(p.cmdline())[:100] or p.name()}")
        except psutil.Error:
            pass
    return "\n".join(lines)


def alive(pid: int) -> bool:
    """The process runs (a zombie, ended but not yet reaped, does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_server(server: RunningServer) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            return server.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            return server.proc.wait()
    return server.proc.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> RunningServer:
    srv = start_server(tmp_path_factory.mktemp("server"))
    yield srv
    rc = stop_server(srv)
    assert rc == 0, f"server did not shut down cleanly (rc={rc}):\n{srv.log.read_text()[-3000:]}"


@pytest.fixture(scope="session")
def client(server):
    return server.client()


@pytest.fixture(scope="session")
def model_name(client) -> str:
    return client.models.list().data[0].id
