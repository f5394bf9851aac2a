"""server/cpu_layout.py on a real process tree: a process titled like vLLM's worker with a thread bound
to core 0 (as vLLM's OpenMP binding leaves it), one titled like its engine core, and a floating
serving-layer process with two threads. Afterwards the serving threads run only on the other cores,
the worker and engine core are untouched. The same for an engine core that runs its worker itself
(``engine.cpu_one_process``), and on the real server; and the engine computes the same tokens in
both of its layouts."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import process_tree
from server.cpu_layout import compute_processes, reserve_worker_cores, vllm_processes

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="needs Linux and at least two cores")

CHILD = textwrap.dedent("""
    import os, sys, threading, time
    import setproctitle
    title, bind = sys.argv[1], sys.argv[2]
    setproctitle.setproctitle(title)
    if bind != "-":
        os.sched_setaffinity(0, {int(bind)})  # this thread only, like an OpenMP thread vLLM bound
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    print("up", flush=True)
    time.sleep(60)
""")

ROOT = textwrap.dedent("""
    import subprocess, sys, time
    child, worker_bind, engine_bind = sys.argv[1:4]
    kids = [subprocess.Popen([sys.executable, "-c", child, t, b], stdout=subprocess.PIPE, text=True)
            for t, b in (("VLLM::Worker", worker_bind), ("VLLM::EngineCore", engine_bind), ("serving", "-"))
            if b != "none"]
    for k in kids:
        k.stdout.readline()
    print(" ".join(str(k.pid) for k in kids), flush=True)
    time.sleep(60)
""")


def _affinities(pid: int) -> list[set[int]]:
    return [os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{pid}/task")]


def test_serving_threads_leave_the_workers_cores():
    allowed = os.sched_getaffinity(0)
    core = min(allowed)
    root = subprocess.Popen([sys.executable, "-c", ROOT, CHILD, str(core), "-"], stdout=subprocess.PIPE, text=True)
    try:
        worker, engine_core, serving = (int(x) for x in root.stdout.readline().split())
        before_worker = _affinities(worker)
        done = reserve_worker_cores(root_pid=root.pid)
        assert done is not None
        assert done["worker_cores"] == [core]
        assert done["serving_cores"] == sorted(allowed - {core})
        for pid in (root.pid, serving):
            assert all(a == allowed - {core} for a in _affinities(pid)), pid
        assert _affinities(worker) == before_worker
        assert all(a == allowed for a in _affinities(engine_core))
    finally:
        subprocess.run(["pkill", "-P", str(root.pid)], check=False)
        root.kill()
        root.wait()


def test_an_engine_core_running_its_worker_keeps_its_core():
    """No worker process: the engine core's bound thread marks the cores to keep free of the rest."""
    allowed = os.sched_getaffinity(0)
    core = max(allowed)
    root = subprocess.Popen([sys.executable, "-c", ROOT, CHILD, "none", str(core)], stdout=subprocess.PIPE, text=True)
    try:
        engine_core, serving = (int(x) for x in root.stdout.readline().split())
        before = _affinities(engine_core)
        done = reserve_worker_cores(root_pid=root.pid)
        assert done is not None and done["worker_cores"] == [core]
        for pid in (root.pid, serving):
            assert all(a == allowed - {core} for a in _affinities(pid)), pid
        assert _affinities(engine_core) == before
    finally:
        subprocess.run(["pkill", "-P", str(root.pid)], check=False)
        root.kill()
        root.wait()


def test_nothing_to_do_without_bound_workers_or_when_switched_off(monkeypatch):
    root = subprocess.Popen([sys.executable, "-c", ROOT, CHILD, "-", "-"], stdout=subprocess.PIPE, text=True)
    try:
        root.stdout.readline()
        assert reserve_worker_cores(root_pid=root.pid) is None  # a GPU worker: no thread bound
        monkeypatch.setenv("ALIGNSERVE_PIN_CPUS", "0")
        assert reserve_worker_cores(root_pid=root.pid) is None
    finally:
        subprocess.run(["pkill", "-P", str(root.pid)], check=False)
        root.kill()
        root.wait()
        time.sleep(0.1)


@pytest.mark.integration
def test_served_engine_worker_has_its_core_to_itself(server):
    """The real `server.serve`: once READY, the ingress replica and Ray's daemons run on the cores the
    vLLM worker (here inside its engine core) is not bound to (the log says which); the worker runs at
    the niceness of the server, not at Ray's for its workers (15)."""
    import psutil

    deadline = time.time() + 60
    while True:  # the engine replica's worker (a replica Ray is restarting has none for a while)
        procs = psutil.Process(server.proc.pid).children(recursive=True)
        workers = [p.pid for p in compute_processes(*vllm_processes(procs))]
        if workers or time.time() > deadline:
            break
        time.sleep(1)
    assert workers, process_tree(server.proc.pid)
    assert {psutil.Process(pid).nice() for pid in workers} == {psutil.Process(server.proc.pid).nice()}
    bound = set().union(*(a for pid in workers for a in _affinities(pid) if a != os.sched_getaffinity(0)))
    if not bound:
        pytest.skip("vLLM did not bind its worker's threads on this machine")
    ingress = [p for p in procs if "OpenAIIngress" in " ".join(p.cmdline())]
    assert ingress
    for p in ingress:
        assert all(not (a & bound) for a in _affinities(p.pid))
    assert "CPU layout: vLLM workers compute on cores" in server.log.read_text(errors="replace")


LAYOUTS = textwrap.dedent("""
    import asyncio, json, os, time, psutil
    from server.config import ServerConfig
    from server.engine import Engine

    def spawned():  # this process's vLLM processes (not multiprocessing's resource tracker)
        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:  # exited meanwhile
                pass
        return out

    def left(pids, timeout_s=20):
        deadline = time.time() + timeout_s
        while (alive := [p.pid for p in spawned() if p.pid in pids]) and time.time() < deadline:
            time.sleep(0.2)
        return alive

    def openmp(pid):  # what the process's OpenMP runtime (GNU, preloaded) read when it was started
        with open(f"/proc/{pid}/environ", "rb") as f:
            pairs = [x.decode().split("=", 1) for x in f.read().split(b"\\0") if b"=" in x]
        return {k: v for k, v in pairs if k.startswith(("OMP_", "GOMP_")) or k == "LD_PRELOAD"}

    def bound(pid):
        allowed = os.sched_getaffinity(0)
        return sorted(set().union(*(a for t in os.listdir(f"/proc/{pid}/task")
                                    if (a := os.sched_getaffinity(int(t))) != allowed)))

    async def run(one_process):
        config = ServerConfig.model_validate({"engine": {"cpu_one_process": one_process, "enable_lora": False}})
        engine = Engine(config, enable_vas=False)
        try:
            procs = spawned()
            # the engine's forkserver (server/engine_forkserver.py) is this process's child; what it forks is not
            forkservers = [p for p in procs if p.ppid() == os.getpid() and "multiprocessing.forkserver" in " ".join(p.cmdline())]
            procs = [p for p in procs if p not in forkservers]
            ids = engine.tokenizer.encode("The capital of France is")
            out = await engine.generate([ids], {"max_tokens": 16, "temperature": 0.0}, f"layout-{one_process}")
            return {"tokens": out[0][0].token_ids, "processes": [p.pid for p in procs],
                    "bound": {p.pid: bound(p.pid) for p in procs}, "children": {p.pid: p.ppid() for p in procs},
                    "forkservers": {p.pid: openmp(p.pid) for p in forkservers},
                    "openmp": {p.pid: openmp(p.pid) for p in procs}}
        finally:
            engine.shutdown()

    if __name__ == "__main__":
        results = {}
        for flag in (True, False):
            results[str(flag)] = asyncio.run(run(flag))
            results[str(flag)]["left"] = left(results[str(flag)]["processes"])
        print("RESULT " + json.dumps(results), flush=True)
""")


@pytest.mark.integration
def test_both_engine_layouts_compute_the_same_tokens(tmp_path):
    """``engine.cpu_one_process`` (the default) against vLLM's own layout, each a real engine of the
    embedded model: one process instead of two, forked from a forkserver started with the OpenMP settings
    of vLLM's worker process, its compute thread bound to the cores vLLM binds that worker to, the same
    greedy tokens, and nothing of the engine left running after shutdown (the idle forkserver ends with
    the process that started it)."""
    import json

    script = tmp_path / "layouts.py"
    script.write_text(LAYOUTS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert done.returncode == 0 and line, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads(line[0].removeprefix("RESULT "))
    one, vllm = res["True"], res["False"]
    assert one["tokens"] == vllm["tokens"] and len(one["tokens"]) == 16
    assert len(one["processes"]) == 1, one  # the engine core, running its worker
    assert len(vllm["processes"]) == 2, vllm  # the engine core and its worker process
    (core,) = one["processes"]
    worker = next(p for p in vllm["processes"] if vllm["children"][str(p)] in map(int, vllm["processes"]))
    engine_core = next(p for p in vllm["processes"] if p != worker)
    assert one["bound"][str(core)] == vllm["bound"][str(worker)]  # same cores, [] where vLLM binds none
    assert vllm["bound"][str(engine_core)] == []
    # Forked from the forkserver (vLLM imported before the config was made), whose OpenMP runtime started
    # with the settings vLLM starts its worker process with.
    (forkserver,) = one["forkservers"]
    assert one["children"][str(core)] == int(forkserver)
    assert one["forkservers"][forkserver] == vllm["openmp"][str(worker)]
    assert one["left"] == [] and vllm["left"] == []
