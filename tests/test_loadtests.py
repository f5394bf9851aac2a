"""Load-test runner, locust file and alignment evaluation (loadtests/), at small scale.

The integration tests share the session `server` fixture (tests/conftest.py). Locust runs only as
its own bounded subprocess: gevent's monkey-patching must never reach the test process.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loadtests import check_target, is_loopback_url, machine
from loadtests.eval import build_configs, build_parser, main as eval_main, pareto_front, parse_methods, parse_weights
from loadtests.runner import build_alignment, main as runner_main, percentile, run_load

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- unit

@pytest.mark.parametrize("url,ok", [
    ("http://127.0.0.1:8000", True), ("http://localhost:8000/v1", True), ("http://127.5.0.1", True),
    ("http://[::1]:8000", True), ("127.0.0.1:8000", True),
    ("http://10.0.0.1:8000", False), ("https://api.openai.com/v1", False), ("http://0.0.0.0:8000", False),
    ("http://localhost.evil.com", False),
])
def test_loopback_detection(url, ok):
    assert is_loopback_url(url) is ok


def test_runner_refuses_non_loopback_url():
    with pytest.raises(ValueError, match="non-loopback"):
        run_load("http://10.1.2.3:8000", concurrency=1, requests=1)
    assert runner_main(["--url", "http://example.com:8000", "--requests", "1"]) == 2
    check_target("http://example.com", allow_remote=True)  # explicitly allowed: no error


def test_machine_names_cpu_and_speed_flags():
    """The benchmarks print where they ran: CPU model, CPU count and the flags that set its speed."""
    text = machine()
    assert f"{os.cpu_count()} CPUs" in text and "flags: " in text
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    for flag in ("avx2", "avx512_bf16", "amx_bf16"):
        assert (f" {flag}" in text.split("flags:")[1]) == (flag in flags)


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([1, 2, 3, 4, 5], 100) == 5
    assert percentile([0, 10], 95) == pytest.approx(9.5)


def test_build_alignment():
    assert build_alignment("none", None) is None
    assert build_alignment("best_of_n", '{"n": 4}') == {"method": "best_of_n", "n": 4, "weights": {"sentiment": 1.0}}
    assert build_alignment("none", {"method": "vas", "weights": {"safety": 1}}) == \
        {"method": "vas", "weights": {"safety": 1}}


def test_method_specs():
    got = parse_methods("none,best_of_n:n=1|4|8,transfer_q:block=8:rollout_tokens=4|8,vas:beta=0|2")
    assert got == [("none", {}), ("best_of_n", {"n": 1}), ("best_of_n", {"n": 4}), ("best_of_n", {"n": 8}),
                   ("transfer_q", {"block": 8, "rollout_tokens": 4}), ("transfer_q", {"block": 8, "rollout_tokens": 8}),
                   ("vas", {"beta": 0}), ("vas", {"beta": 2})]
    assert parse_methods("best_of_n:early_pruning=true:keep_fraction=0.5") == \
        [("best_of_n", {"early_pruning": True, "keep_fraction": 0.5})]
    for bad in ("nope", "best_of_n:beta=2", "best_of_n:n", "vas:weights=1", "best_of_n:n=1:n=2", ""):
        with pytest.raises(ValueError):
            parse_methods(bad)
    assert parse_weights("sentiment=1,brevity=0.5") == {"sentiment": 1.0, "brevity": 0.5}
    assert parse_weights('{"safety": 2}') == {"safety": 2.0}
    cfgs = build_configs("none,best_of_n:n=2", {"sentiment": 1.0}, ("sentiment", "brevity"), "best_of_n:n=4")
    pareto = [c for c in cfgs if c.sweep == "pareto"]
    assert [c.weights for c in pareto] == [{"sentiment": w, "brevity": 1 - w} for w in (0, .25, .5, .75, 1)]
    assert cfgs[1].alignment() == {"method": "best_of_n", "n": 2, "weights": {"sentiment": 1.0}}


def test_pareto_front():
    pts = [(0.0, 1.0), (0.5, 0.5), (0.4, 0.4), (1.0, 0.0), (0.5, 0.5)]
    assert pareto_front(pts) == [0, 1, 3, 4]


@pytest.mark.parametrize("args,why", [
    (["--headless", "-u", "1", "-r", "1", "-t", "3s", "--host", "http://example.com:8000"], "non-loopback"),
    (["--headless", "-u", "1", "-r", "1", "--host", "http://127.0.0.1:9"], "run time"),
    (["-u", "1", "-r", "1", "-t", "3s", "--host", "http://127.0.0.1:9"], "--headless"),
], ids=["remote-host", "no-run-time", "web-ui"])
def test_locust_refuses_unbounded_or_remote(args, why):
    env = {k: v for k, v in os.environ.items()
           if k not in ("ALIGNSERVE_LOCUST_ALLOW_REMOTE", "ALIGNSERVE_LOCUST_ALLOW_UNBOUNDED")}
    proc = subprocess.run([sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "refusing" in proc.stderr and why in proc.stderr, proc.stderr[-2000:]


class _FakeOpenAI(BaseHTTPRequestHandler):
    """A minimal streaming chat server for the runner's own parsing: the prompt "truncate" gets a
    stream that stops without `data: [DONE]`; any other prompt a complete one (3 tokens)."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, json.dumps({"data": [{"id": "fake-model"}]}).encode(), "application/json")

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = req["messages"][0]["content"]
        events = [{"choices": [{"index": 0, "delta": {"content": w}}]} for w in ("a", " b", " c")]
        events.append({"choices": [], "usage": {"completion_tokens": 3}})
        lines = [f"data: {json.dumps(e)}\n\n" for e in events]
        if prompt != "truncate":
            lines.append("data: [DONE]\n\n")
        self._send(200, "".join(lines).encode(), "text/event-stream")  # HTTP/1.0: the close ends the stream


def test_runner_counts_truncated_streams_as_errors(tmp_path, capsys):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("complete\ntruncate\n")
        out = tmp_path / "summary.json"
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        rc = runner_main(["--url", url, "--concurrency", "2", "--requests", "4", "--max-tokens", "8",
                          "--prompts", str(prompts), "--json", str(out)])
    finally:
        srv.shutdown()
        srv.server_close()
    assert rc == 1  # any failed request fails the run
    s = json.loads(out.read_text())
    assert s["requests"] == 4 and s["ok"] == 2, s
    assert s["errors"] == {"truncated": 2} and s["error_count"] == 2
    assert "[DONE]" in s["error_samples"]["truncated"]
    assert s["output_tokens"] == 6 and s["model"] == "fake-model"
    table = capsys.readouterr().out
    assert "4 (2 ok)" in table and "truncated: 2" in table


def test_eval_seed_and_prompt_file_arguments(tmp_path, capsys):
    assert build_parser().parse_args([]).seed == 0
    assert build_parser().parse_args(["--seed", "none"]).seed is None
    assert build_parser().parse_args(["--seed", "7"]).seed == 7
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--seed", "seven"])
    # A missing prompt file is a usage error before any request (port 9: nothing listens there).
    assert eval_main(["--url", "http://127.0.0.1:9", "--prompts", str(tmp_path / "missing.txt"), "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- integration

@pytest.mark.integration
def test_runner_small_load(server):
    s = run_load(server.url, concurrency=4, requests=8, max_tokens=16, seed=0)
    assert s["requests"] == 8 and s["ok"] == 8, s
    assert s["errors"] == {} and s["error_count"] == 0
    lat, ttft = s["latency_s"], s["ttft_s"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] < 120
    assert 0 < ttft["p50"] <= ttft["p95"] <= lat["p99"]
    assert 8 <= s["output_tokens"] <= 8 * 16
    assert s["output_tokens_per_s"] > 0 and s["per_request_tokens_per_s"]["p50"] > 0
    assert s["wall_s"] > 0


@pytest.mark.integration
def test_runner_counts_errors_and_completion_mode(server):
    # A request the server rejects (knob of another method) is an error by status, not a crash.
    s = run_load(server.url, concurrency=2, requests=2, max_tokens=8, method="none",
                 alignment='{"method": "none", "beta": 2}', chat=False)
    assert s["error_count"] == 2 and s["errors"] == {"400": 2}
    assert "beta" in s["error_samples"]["400"]
    s = run_load(server.url, concurrency=2, requests=2, max_tokens=8, chat=False)
    assert s["ok"] == 2 and s["output_tokens"] > 0


@pytest.mark.integration
def test_eval_writes_results_and_plots(server, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "loadtests.eval", "--url", server.url, "--prompts", "chat_mix", "--limit", "2",
           "--methods", "none,best_of_n:n=2,vas:beta=2", "--weights", "sentiment=1", "--max-tokens", "16",
           "--pareto", "sentiment,brevity", "--pareto-methods", "best_of_n:n=2", "--concurrency", "2",
           "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.json", "results.csv", "answers.jsonl", "frontier.png", "pareto.png"):
        assert (out / name).is_file(), name
    for png in ("frontier.png", "pareto.png"):
        data = (out / png).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), png

    report = json.loads((out / "results.json").read_text())
    rows = {r["label"]: r for r in report["results"]}
    objectives = report["meta"]["objectives"]
    assert {"sentiment", "safety", "relevance", "brevity"} <= set(objectives)
    for label in ("none", "best_of_n(n=2)"):
        r = rows[label]
        assert r["status"] == "ok" and r["n_ok"] == 2, r
        assert r["mixed_mean"] is not None and r["latency_mean_s"] > 0
        for o in objectives:  # every objective, weighted or not
            assert r[f"{o}_mean"] is not None and r[f"{o}_std"] is not None, (label, o)
    assert rows["none"]["candidates_mean"] == 1 and rows["none"]["base_tokens_mean"] > 0
    assert rows["best_of_n(n=2)"]["candidates_mean"] == 2
    assert rows["best_of_n(n=2)"]["base_tokens_mean"] >= rows["none"]["base_tokens_mean"] * 0.5
    vas = rows["vas(beta=2)"]
    if vas["status"] == "skipped":  # no value models on this server: reported, not a crash
        assert vas["error"].startswith("400") and "value model" in vas["error"]
        assert any(s["label"] == "vas(beta=2)" for s in report["skipped"])
    else:
        assert vas["kl_mean"] is not None
    pareto = [r for r in report["results"] if r["sweep"] == "pareto"]
    assert sorted(r["pareto_w"] for r in pareto) == [0, .25, .5, .75, 1]

    with open(out / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(report["results"])
    assert {"label", "sentiment_mean", "brevity_std", "mixed_mean", "kl_mean", "latency_mean_s",
            "base_tokens_mean", "candidates_mean", "rollout_tokens_mean"} <= set(csv_rows[0])
    answered = sum(r["n_ok"] for r in report["results"])
    assert answered >= 2 * (2 + 5)  # none, best_of_n and the 5 Pareto points (+ vas when it has value models)
    assert len((out / "answers.jsonl").read_text().splitlines()) == answered


@pytest.mark.integration
def test_locust_headless_small(server, tmp_path):
    prefix = tmp_path / "locust"
    env = dict(os.environ, ALIGNSERVE_LOCUST_MIX="none:3,best_of_n:1", ALIGNSERVE_LOCUST_MAX_TOKENS="16")
    proc = subprocess.run([sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless",
                           "-u", "2", "-r", "2", "-t", "10s", "--stop-timeout", "30", "--host", server.url,
                           "--csv", str(prefix), "--only-summary"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as f:
        stats = list(csv.DictReader(f))
    generation = [r for r in stats if r["Type"] in ("POST", "SSE")]
    assert generation and sum(int(r["Request Count"]) for r in generation) > 0, stats
    total = next(r for r in stats if r["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
