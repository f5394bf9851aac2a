"""The engine's processes end with the replica that owns them, however it ends.

vLLM runs its engine core (and, on the multiprocessing executor, its workers) in processes of its own.
When the Ray Serve replica that owns them is killed (a replaced replica, a downscale past its grace
period, ``ray stop --force``, an out-of-memory kill) nothing tells them: they were seen living on for
50 minutes with parent pid 1, holding the model's memory (a GPU's, on a GPU). This module is a vLLM
general plugin (entry point ``vllm.general_plugins`` in pyproject.toml, loaded in every vLLM process):
in a process that a replica's engine spawned (``ALIGNSERVE_ENGINE_OWNER`` set, a multiprocessing child),
it asks the kernel to kill it when its parent dies (``PR_SET_PDEATHSIG``), so the engine core dies with
the replica (or with the replica's forkserver, which ends with the replica) and its workers with the
engine core.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

OWNER_ENV = "ALIGNSERVE_ENGINE_OWNER"
_PR_SET_PDEATHSIG = 1


def mark_owner() -> None:
    """Called by the engine replica before it starts vLLM: the processes it spawns are guarded."""
    os.environ[OWNER_ENV] = str(os.getpid())


def install() -> None:
    if not os.environ.get(OWNER_ENV) or not sys.platform.startswith("linux"):
        return
    parent = multiprocessing.parent_process()
    if parent is None:  # the replica itself (vLLM loads plugins there too)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    # The parent died before the guard was set. (The kernel's parent is the replica where vLLM spawned
    # this process, the replica's forkserver where it was forked: server/engine_forkserver.py; that one
    # exits as soon as the replica is gone. `parent` is the replica in both cases.)
    if not parent.is_alive():
        os.kill(os.getpid(), signal.SIGKILL)
