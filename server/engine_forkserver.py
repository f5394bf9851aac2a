"""The one-process engine core (``engine.cpu_one_process``), forked with vLLM already imported.

vLLM spawns its engine core: a fresh interpreter that imports vLLM again after the replica's own
import, ~9 s of a cold start on 2 cores with one core idle. Python's ``forkserver`` start method takes
that import off the path: the replica starts a forkserver as early as it can, which imports vLLM's
engine-core modules while the replica imports vLLM and builds its config, and the engine core is then
forked from it with its imports done.

A spawned engine core got two things a forked one must get too:
- its OpenMP settings: OpenMP reads them when torch loads, which now happens in the forkserver, so the
  forkserver starts with the settings vLLM gives a lone CPU worker (rank 0, as ``server/engine.py``
  gives its engine core). When the engine's config is known its real settings are computed again;
  where they differ, the engine core is spawned as before;
- the replica's environment as of the spawn (vLLM and the engine set variables after the forkserver
  started): the process carries a copy of it and installs it before it runs.
"""
from __future__ import annotations

import contextlib
import gc
import glob
import logging
import multiprocessing.context
import multiprocessing.forkserver
import os
from types import SimpleNamespace

logger = logging.getLogger("ray.serve")

# What the engine core imports before its first step (the model's own module comes later, by name).
PRELOAD = ["vllm.v1.engine.core", "vllm.v1.executor.uniproc_executor", "vllm.v1.worker.cpu_worker"]

# The parts of a VllmConfig that vLLM's OpenMP settings depend on, for one worker without KV transfer.
LONE_WORKER = SimpleNamespace(
    parallel_config=SimpleNamespace(local_world_size=1, data_parallel_rank_local=None, _api_process_count=1),
    kv_transfer_config=None)


def worker_omp_env(vllm_config) -> contextlib.AbstractContextManager:
    """``os.environ`` with the OpenMP settings vLLM gives its rank-0 CPU worker process under
    ``vllm_config`` (threads, cores; which variables depends on the OpenMP runtime in ``LD_PRELOAD``)."""
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    return OMPProcessManager(vllm_config).configure_omp_envs(rank=0, local_rank=0)


def openmp_environ() -> dict[str, str]:
    """What of this process's environment a new process's OpenMP runtime would read at its start: the
    preloaded libraries, and the variables of GNU OpenMP (OMP_*, GOMP_*), or of Intel's and LLVM's
    (OMP_*, KMP_*) where one of those is preloaded."""
    preload = os.environ.get("LD_PRELOAD", "")
    prefixes = ("OMP_", "KMP_") if "libiomp" in preload or "libomp" in preload else ("OMP_", "GOMP_")
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes) or k == "LD_PRELOAD"}


def vllm_ld_preload() -> str:
    """``LD_PRELOAD`` as vLLM's CPU platform will set it when the engine's config is made (torch's
    libgomp, vLLM's bundled tcmalloc), before that; the real one is compared with it before forking."""
    import torch
    import vllm

    preload = os.environ.get("LD_PRELOAD", "")
    if not any(lib in preload for lib in ("libomp", "libgomp", "libiomp")):
        torch_dir = os.path.dirname(torch.__file__)
        found = [*glob.glob(os.path.join(os.path.dirname(torch_dir), "torch.libs", "libgomp*.so*")),
                 *glob.glob(os.path.join(torch_dir, "lib", "libgomp*.so*"))]
        if found:
            preload = f"{preload}:{found[0]}" if preload else found[0]
    if "libtcmalloc" not in preload:
        libs = os.path.join(os.path.dirname(vllm.__file__), "libs")
        found = glob.glob(os.path.join(libs, "libtcmalloc_minimal*.so*")) or glob.glob(os.path.join(libs, "libtcmalloc.so*"))
        if found:
            preload = f"{found[0]}:{preload}" if preload else found[0]
    return preload


class _Process(multiprocessing.context.ForkServerProcess):
    """A forkserver child that runs with its creator's environment as of ``start()``."""

    def start(self):
        self._environ = dict(os.environ)
        super().start()

    def run(self):
        # The forkserver ends when every holder of its "alive" pipe is gone, and multiprocessing hands
        # that pipe to each child, in case the child starts processes the same way. The engine core
        # starts none. Holding it, an engine core whose owner was killed kept its parent, the forkserver,
        # alive, which kept the engine core alive (process_guard kills it only when its parent dies).
        server = multiprocessing.forkserver._forkserver
        if server._forkserver_alive_fd is not None:
            os.close(server._forkserver_alive_fd)
            server._forkserver_alive_fd = None
        os.environ.clear()
        os.environ.update(self._environ)
        # What the forkserver imported stays: out of the collector's sight, vLLM's gc.collect() calls
        # during start-up take milliseconds instead of ~0.4 s each (and copy no shared pages).
        gc.freeze()
        super().run()


class _Context(multiprocessing.context.ForkServerContext):
    Process = _Process


class EngineCoreForkserver:
    """Start it before importing vLLM's engine; hold ``engine_core_start`` while AsyncLLM starts."""

    def __init__(self):
        from vllm.utils.system_utils import set_env_var

        with set_env_var("LD_PRELOAD", vllm_ld_preload()), worker_omp_env(LONE_WORKER):
            self.omp = openmp_environ()
            multiprocessing.forkserver.set_forkserver_preload(PRELOAD)
            multiprocessing.forkserver.ensure_running()  # returns at once; the imports run in the forkserver

    @contextlib.contextmanager
    def engine_core_start(self):
        """Held inside the engine's ``worker_omp_env``: while held, vLLM starts its engine core from the
        forkserver if the OpenMP settings now in ``os.environ`` are the forkserver's; otherwise it spawns
        it as usual."""
        wanted = openmp_environ()
        if wanted != self.omp:
            logger.info("engine core spawned, not forked: its OpenMP settings %s are not the forkserver's %s",
                        wanted, self.omp)
            yield
            return
        import vllm.v1.engine.utils as engine_utils

        vllm_context = engine_utils.get_mp_context

        def get_mp_context():
            vllm_context()  # for what it sets on the way (the Ray address, inside a Ray actor)
            return _Context()

        engine_utils.get_mp_context = get_mp_context
        try:
            yield
        finally:
            engine_utils.get_mp_context = vllm_context


_forkserver: EngineCoreForkserver | None = None  # multiprocessing keeps one forkserver per process


def start() -> EngineCoreForkserver | None:
    """This process's forkserver (started by the first engine that asks), or None where it could not
    start (the engine core is then spawned)."""
    global _forkserver
    if _forkserver is None:
        try:
            _forkserver = EngineCoreForkserver()
        except Exception:  # noqa: BLE001 - an optimization of the start-up only
            logger.warning("could not start the engine core's forkserver; vLLM will spawn it", exc_info=True)
    return _forkserver
