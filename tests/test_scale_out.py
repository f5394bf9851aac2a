"""Scale-out: two ingress and two engine replicas (the 135M model fits twice) behave like one server.

One extra server (``python -m server.serve`` with ``ingress`` and ``engine_deployment`` at two replicas
each, a small per-engine budget and the test hooks) shows what one replica of each cannot:
  * affinity: every engine call of a request reaches the engine replica that admitted it (a call that
    reached another replica would be refused, so many-call methods would fail);
  * dropped streams leave no unfinished engine request on any replica (each replica asked directly);
  * metrics are complete on every scrape whichever ingress replica answers it;
  * the budget is the engines' (limits.max_concurrent_cost per engine replica), across both ingress
    replicas;
  * an engine replica killed with SIGKILL leaves no vLLM process behind, and SIGTERM to the server
    drains and leaves nothing running.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
import yaml

from conftest import alive, process_tree, start_server, stop_server
from server.cpu_layout import vllm_processes

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
PER_ENGINE = 4
CONFIG = {
    "ingress": {"num_replicas": 2, "num_cpus": 0.25},
    "engine_deployment": {"num_replicas": 2, "num_cpus": 0.5},
    "rewards_deployment": {"num_replicas": 1, "num_cpus": 0.25},
    "value_models": {},
    "limits": {"max_concurrent_cost": PER_ENGINE, "request_timeout_s": 120, "max_tokens": 256, "drain_timeout_s": 20},
    "enable_test_hooks": True,
}
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def _psutil():
    return pytest.importorskip("psutil")


def engine_processes(root_pid: int) -> dict[int, int]:
    """{vLLM engine-core pid: its engine replica's pid} under the server's tree (the replica is the
    engine core's parent, or its grandparent where the core was forked from the replica's forkserver)."""
    psutil = _psutil()
    out = {}
    for p in vllm_processes(psutil.Process(root_pid).children(recursive=True))[1]:
        try:
            parent = p.parent()
            if "multiprocessing.forkserver" in " ".join(parent.cmdline()):
                parent = parent.parent()
            out[p.pid] = parent.pid
        except psutil.Error:
            pass
    return out


def wait_for_engine_processes(root_pid: int, count: int, timeout_s: float = 60) -> dict[int, int]:
    """``engine_processes`` once it finds ``count`` engine cores; with fewer after ``timeout_s``, fails
    showing the whole process tree (a replica Ray is still starting or restarting, say)."""
    deadline = time.time() + timeout_s
    while len(found := engine_processes(root_pid)) < count and time.time() < deadline:
        time.sleep(1)
    if len(found) < count:
        pytest.fail(f"{len(found)} of {count} vLLM engine cores after {timeout_s:.0f} s:\n{process_tree(root_pid)}")
    return found


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    d = tmp_path_factory.mktemp("scaled")
    (d / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    srv = start_server(d, d / "config.yaml")
    deadline = time.time() + 300
    while True:  # both engine replicas reporting
        m = httpx.get(srv.url + "/metrics", timeout=30).text
        if 'alignserve_replicas{kind="engine"} 2.0' in m and 'alignserve_replicas{kind="ingress"} 2.0' in m:
            break
        assert time.time() < deadline, m[-2000:]
        time.sleep(1)
    srv.engine_cores = wait_for_engine_processes(srv.proc.pid, 2)
    yield srv
    rc = stop_server(srv)
    assert rc == 0, srv.log.read_text()[-3000:]
    # SIGTERM drained and stopped everything: no vLLM engine process of this server is left.
    deadline = time.time() + 20
    while any(alive(pid) for pid in srv.engine_cores) and time.time() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in srv.engine_cores if alive(pid)]


def _post(srv, path, body, **kw):
    return httpx.post(srv.url + path, json=body, timeout=kw.pop("timeout", 300), **kw)


def _counter(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_engine_and_two_ingress_replicas_serve(scaled):
    assert len(scaled.engine_cores) == 2 and len(set(scaled.engine_cores.values())) == 2


def test_every_engine_call_of_a_request_reaches_its_replica(scaled):
    """Transfer Q* (a candidate and a rollout call per step) and best-of-N with early pruning (a call
    per round): with calls routed at random, about half of them would land on the other replica,
    which refuses them (503). All succeed, concurrently, spread over both replicas (each costs 2 of
    the 2 x 4 sequences)."""
    bodies = [{"model": MODEL, "prompt": f"Tell me about {t}.", "max_tokens": 24, "temperature": 1, "seed": i,
               "alignment": a}
              for i, (t, a) in enumerate([
                  ("the sea", {"method": "transfer_q", "weights": {"sentiment": 1}, "top_k": 2, "block": 4,
                               "rollout_tokens": 4}),
                  ("a cat", {"method": "best_of_n", "n": 2, "weights": {"sentiment": 1}, "early_pruning": True,
                             "chunk_tokens": 4}),
                  ("the moon", {"method": "args", "weights": {"brevity": 1}, "top_k": 2, "block": 2}),
                  ("bread", {"method": "transfer_q", "weights": {"safety": 1}, "top_k": 2, "block": 8,
                             "rollout_tokens": 4}),
              ])]
    results: list = [None] * len(bodies)

    def go(i):
        results[i] = _post(scaled, "/v1/completions", bodies[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for r in results:
        assert r is not None and r.status_code == 200, r.text if r is not None else r
        calls = r.json()["alignment"].get("engine_calls")
        assert calls is None or calls >= 4
    # Transfer Q* rolled out the shipped LoRA baselines, on whichever replica admitted the request.
    assert [results[i].json()["alignment"]["baseline"] for i in (0, 3)] == ["sentiment", "safety"]
    assert scaled.wait_idle(10) == {"cost_in_flight": 0, "engine_unfinished": 0}


def test_an_adapter_served_by_name_answers_alike_on_both_replicas(scaled):
    """A LoRA baseline asked for as the model (vLLM's way of serving adapters): eight greedy requests at
    once spread over both engine replicas, each of which loads the adapter for itself; all give the
    same answer, and not the base model's."""
    body = {"model": f"{MODEL}-sentiment", "prompt": "The movie was", "max_tokens": 16, "temperature": 0}
    results: list = [None] * 8

    def go(i):
        results[i] = _post(scaled, "/v1/completions", body)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(r is not None and r.status_code == 200 for r in results), [r.text for r in results if r is not None]
    texts = {r.json()["choices"][0]["text"] for r in results}
    base = _post(scaled, "/v1/completions", dict(body, model=MODEL)).json()["choices"][0]["text"]
    assert len(texts) == 1 and texts != {base}, (texts, base)
    assert scaled.wait_idle(10) == {"cost_in_flight": 0, "engine_unfinished": 0}


def test_dropped_streams_leave_no_engine_work_on_any_replica(scaled):
    with httpx.Client(timeout=120) as c:
        streams = []
        for i in range(4):
            cm = c.stream("POST", scaled.url + "/v1/completions",
                          json={"model": MODEL, "prompt": COUNTING, "max_tokens": 256, "temperature": 0, "stream": True})
            r = cm.__enter__()
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            while got < 2:
                got += next(lines).startswith("data: ")
            streams.append((cm, lines))
        s = scaled.admin_state()
        assert s["cost_in_flight"] == 4 and s["engine_unfinished"] >= 1, s
        for cm, _ in streams:
            cm.__exit__(None, None, None)
    assert scaled.wait_idle(5) == {"cost_in_flight": 0, "engine_unfinished": 0}


def test_twelve_requests_count_twelve_on_every_scrape(scaled):
    before = _counter(httpx.get(scaled.url + "/metrics", timeout=30).text, "alignserve_requests_total",
                      method="none", status="200")
    for i in range(12):
        r = _post(scaled, "/v1/completions", {"model": MODEL, "prompt": f"{i} is a number", "max_tokens": 2})
        assert r.status_code == 200
    for _ in range(6):  # each scrape may be answered by either ingress replica
        text = httpx.get(scaled.url + "/metrics", timeout=30).text
        assert _counter(text, "alignserve_requests_total", method="none", status="200") == before + 12
        assert 'alignserve_replicas{kind="ingress"} 2.0' in text


def test_the_budget_is_the_engines_across_both_ingress_replicas(scaled):
    """limits.max_concurrent_cost is per engine replica: 2 x 3 sequences in all, whichever ingress
    replica admits; past it 429 with Retry-After; a request larger than one engine's budget is a 400."""
    r = _post(scaled, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4,
                                          "alignment": {"method": "best_of_n", "n": PER_ENGINE + 1,
                                                        "weights": {"sentiment": 1}}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_costly"
    with httpx.Client(timeout=120) as c:
        held = []
        for _ in range(2 * PER_ENGINE):
            cm = c.stream("POST", scaled.url + "/v1/completions",
                          json={"model": MODEL, "prompt": COUNTING, "max_tokens": 256, "temperature": 0, "stream": True})
            r = cm.__enter__()
            assert r.status_code == 200, r.read()
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            held.append((cm, lines))
        assert scaled.admin_state()["cost_in_flight"] == 2 * PER_ENGINE
        for _ in range(4):  # whichever ingress replica takes it
            r = _post(scaled, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 429 and r.headers.get("retry-after") == "1", r.text
        for cm, _ in held:
            cm.__exit__(None, None, None)
    assert scaled.wait_idle(5)["cost_in_flight"] == 0
    assert _post(scaled, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_killed_engine_replica_leaves_no_engine_process(scaled):
    """SIGKILL to an engine replica's process (what `ray stop --force`, an OOM kill or a lost node do):
    its vLLM engine core dies with it (server/process_guard.py), not minutes later, and so do the
    forkserver the core was forked from (server/engine_forkserver.py) and a worker process (vLLM's
    layout; by default the engine core runs its worker itself)."""
    psutil = _psutil()
    cores = engine_processes(scaled.proc.pid)
    core, replica_pid = next(iter(cores.items()))
    workers = [p.pid for p in psutil.Process(core).children() if "resource_tracker" not in " ".join(p.cmdline())]
    forkservers = [p.pid for p in psutil.Process(replica_pid).children()
                   if "multiprocessing.forkserver" in " ".join(p.cmdline())]
    os.kill(replica_pid, signal.SIGKILL)
    deadline = time.time() + 10
    while any(alive(pid) for pid in [core, *workers, *forkservers]) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(core), f"engine core {core} outlived its replica {replica_pid}"
    assert not [pid for pid in workers if alive(pid)], "a vLLM worker outlived its engine core"
    assert not [pid for pid in forkservers if alive(pid)], "the replica's forkserver outlived it"
    scaled.engine_cores = {**scaled.engine_cores, **engine_processes(scaled.proc.pid)}
