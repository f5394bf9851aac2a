"""server/engine_forkserver.py: the engine core forked from a forkserver ends with the process that owns
the engine, however that process ends (here killed, outside Ray: a benchmark, a CLI, a test)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import alive

OWNER = textwrap.dedent("""
    import os, signal, psutil
    from server.config import ServerConfig
    from server.engine import Engine

    if __name__ == "__main__":
        engine = Engine(ServerConfig.model_validate({"engine": {"enable_lora": False}}), enable_vas=False)
        kids = [p.pid for p in psutil.Process().children(recursive=True)
                if "resource_tracker" not in " ".join(p.cmdline())]
        print("PIDS", engine.one_process, *kids, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.integration
def test_engine_processes_end_with_a_killed_owner(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Output to a file: a pipe would stay open as long as any process of the engine lives.
    log = tmp_path / "owner.log"
    with log.open("w") as out:
        subprocess.run([sys.executable, str(script)], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                       timeout=600)
    line = [x for x in log.read_text(errors="replace").splitlines() if x.startswith("PIDS ")]
    assert line, log.read_text(errors="replace")[-3000:]
    one_process, *pids = line[0].split()[1:]
    pids = [int(p) for p in pids]
    if one_process == "True":
        assert len(pids) == 2, pids  # the forkserver and the engine core it forked
    deadline = time.time() + 20
    while (running := [p for p in pids if alive(p)]) and time.time() < deadline:
        time.sleep(0.2)
    for p in running:  # leave nothing behind for the next test
        psutil.Process(p).kill()
    assert not running, f"the engine's processes {running} outlived the process that owned them"
