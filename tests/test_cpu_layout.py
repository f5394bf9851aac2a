"""server/cpu_layout.py on a real process tree: a process titled like vLLM's worker with a thread bound
to core 0 (as vLLM's OpenMP binding leaves it), one titled like its engine core, and a floating
serving-layer process with two threads. Afterwards the serving threads run only on the other cores,
the worker and engine core are untouched."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import process_tree
from server.cpu_layout import reserve_worker_cores, vllm_processes

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
    child = sys.argv[1]
    kids = [subprocess.Popen([sys.executable, "-c", child, t, b], stdout=subprocess.PIPE, text=True)
            for t, b in (("VLLM::Worker", sys.argv[2]), ("VLLM::EngineCore", "-"), ("serving", "-"))]
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
    root = subprocess.Popen([sys.executable, "-c", ROOT, CHILD, str(core)], stdout=subprocess.PIPE, text=True)
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


def test_nothing_to_do_without_bound_workers_or_when_switched_off(monkeypatch):
    root = subprocess.Popen([sys.executable, "-c", ROOT, CHILD, "-"], stdout=subprocess.PIPE, text=True)
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
    vLLM worker is not bound to (the log says which), the worker and engine core stay as vLLM put them."""
    import psutil

    deadline = time.time() + 60
    while True:  # the engine replica's worker (a replica Ray is restarting has none for a while)
        procs = psutil.Process(server.proc.pid).children(recursive=True)
        workers = [p.pid for p in vllm_processes(procs)[0]]
        if workers or time.time() > deadline:
            break
        time.sleep(1)
    assert workers, process_tree(server.proc.pid)
    bound = set().union(*(a for pid in workers for a in _affinities(pid) if a != os.sched_getaffinity(0)))
    if not bound:
        pytest.skip("vLLM did not bind its worker's threads on this machine")
    ingress = [p for p in procs if "OpenAIIngress" in " ".join(p.cmdline())]
    assert ingress
    for p in ingress:
        assert all(not (a & bound) for a in _affinities(p.pid))
    assert "CPU layout: vLLM workers compute on cores" in server.log.read_text(errors="replace")
