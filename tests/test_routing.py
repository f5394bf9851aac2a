"""server/routing.py on real Ray Serve (two tiny replicas, no model): calls that name a replica
reach it, concurrently, from one request; unpinned calls spread and honour exclude_replicas; a
replica that is gone fails the call at once with ReplicaGone (503 upstream) instead of hanging."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_affinity_router_on_two_replicas():
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "routing_probe.py")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert len(res["unpinned"]) == 2
    for rid, got in res["pinned"].items():
        assert got == [rid]  # 16 concurrent calls of one request, all on the replica they named
    for rid, got in res["excluded"].items():
        assert rid not in got
    assert res["gone"] == "ReplicaGone"
