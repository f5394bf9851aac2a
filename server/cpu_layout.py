"""On a CPU-only machine, keep the serving layer off the cores the vLLM workers compute on.

vLLM's CPU backend binds each worker's OpenMP threads to cores of its own and leaves the rest
(``reserve_cpu_num``, one core per worker on x86) to "the scheduler and the serving framework".
(With ``engine.cpu_one_process`` the worker runs inside its engine-core process, bound the same way.)
Ray does not know that: its daemons, the Serve controller and proxy, our ingress, reward and metrics
replicas float over every core and preempt the worker's threads, so every forward pass waits for them.
On 2 cores that cost plain requests 10-15 % of their speed (docs/performance.md). After the
application is up, ``reserve_worker_cores`` moves every other thread of the local Ray session onto the
cores the workers do not use. vLLM's engine-core processes stay where vLLM put them.

Only where there is something to separate: a CPU platform, workers bound to a strict subset of the
cores, and ``ALIGNSERVE_PIN_CPUS`` not set to 0. GPU machines are left alone.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("alignserve")

# vLLM's process titles (vllm.utils.system_utils.set_process_title).
WORKER_TITLES = ("VLLM::Worker",)
ENGINE_TITLES = ("VLLM::EngineCore",)


CPUS_ENV = "ALIGNSERVE_CPUS"  # the cores the session started with, for processes started after the pinning


def remember_cpus() -> None:
    """Before Ray starts: every process of the session learns the cores the machine gives it."""
    if hasattr(os, "sched_getaffinity"):
        os.environ.setdefault(CPUS_ENV, ",".join(str(c) for c in sorted(os.sched_getaffinity(0))))


def session_cpus() -> set[int]:
    raw = os.environ.get(CPUS_ENV, "")
    try:
        cpus = {int(c) for c in raw.split(",") if c}
    except ValueError:
        cpus = set()
    return cpus or set(os.sched_getaffinity(0))


def restore_cpus() -> None:
    """For an engine replica Ray starts after the pinning (a replaced one): it inherits the serving
    cores, so give it back all of them before vLLM binds its workers (called from the thread that
    starts vLLM's processes; they inherit it)."""
    if hasattr(os, "sched_setaffinity") and CPUS_ENV in os.environ:
        try:
            os.sched_setaffinity(0, session_cpus())
        except OSError:
            logger.warning("could not restore the engine's CPU affinity", exc_info=True)


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _title(proc) -> str:
    try:
        return proc.name()
    except Exception:  # noqa: BLE001 - gone
        return ""


def _cmdline(proc) -> str:
    try:
        return " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - gone
        return ""


def vllm_processes(procs: list) -> tuple[list, list]:
    """(workers, engine cores) among ``procs`` (psutil processes of one tree). vLLM titles them
    (``VLLM::Worker``, ``VLLM::EngineCore``), but an engine core and its worker were seen in CI still
    carrying the spawn command line as their title, so an engine replica's spawned child (not its
    resource tracker), or a child of its forkserver (server/engine_forkserver.py), counts as an engine
    core and that child's children as its workers."""
    workers = [p for p in procs if _title(p).startswith(WORKER_TITLES)]
    engines = [p for p in procs if _title(p).startswith(ENGINE_TITLES)]
    known = {p.pid for p in workers + engines}
    for replica in (p for p in procs if "ServeReplica" in _cmdline(p) and "EngineDeployment" in _cmdline(p)):
        for child in replica.children():
            if "multiprocessing.spawn" in _cmdline(child):
                cores = [child]
            elif "multiprocessing.forkserver" in _cmdline(child):
                cores = child.children()
            else:
                continue
            for core in cores:
                if core.pid not in known:
                    engines.append(core)
                    workers += [w for w in core.children() if w.pid not in known]
    return workers, engines


def compute_processes(workers: list, engines: list) -> list:
    """Of ``vllm_processes``' (workers, engine cores), those that run a worker's forward passes: the
    workers, and every engine core without worker processes (it runs its worker itself:
    ``engine.cpu_one_process``)."""
    parents = set()
    for w in workers:
        try:
            parents.add(w.ppid())
        except Exception:  # noqa: BLE001 - gone
            pass
    return workers + [e for e in engines if e.pid not in parents]


def reserve_worker_cores(root_pid: int | None = None, quiet: bool = False) -> dict[str, object] | None:
    """Pin every thread of ``root_pid``'s descendants (default: this process, the Ray driver that
    started the session) except vLLM's workers and engine cores to the cores no worker is bound to.
    Returns what it did ({"worker_cores", "serving_cores", "threads"}), or None if there was nothing
    to do (or it is switched off). Never raises: the layout is an optimization."""
    if os.environ.get("ALIGNSERVE_PIN_CPUS", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        return _reserve(root_pid or os.getpid(), quiet)
    except Exception:  # noqa: BLE001 - a process tree changing under us; serving goes on unpinned
        logger.warning("could not pin the serving layer off the vLLM workers' cores", exc_info=True)
        return None


def _reserve(root_pid: int, quiet: bool) -> dict[str, object] | None:
    import psutil

    allowed = session_cpus()
    root = psutil.Process(root_pid)
    procs = [root] + root.children(recursive=True)
    workers, engines = vllm_processes(procs)
    worker_cores: set[int] = set()
    for p in compute_processes(workers, engines):
        for tid in _threads(p.pid):
            try:
                cores = os.sched_getaffinity(tid)
            except OSError:
                continue
            if cores != allowed:  # an OpenMP thread vLLM bound
                worker_cores |= cores
    serving = allowed - worker_cores
    if not worker_cores or not serving:
        return None
    moved = 0
    vllm = {p.pid for p in workers + engines}
    for p in procs:
        if p.pid in vllm:
            continue
        for tid in _threads(p.pid):
            try:
                os.sched_setaffinity(tid, serving)
                moved += 1
            except OSError:  # exited meanwhile, or not ours to move
                pass
    if not quiet:
        logger.info("CPU layout: vLLM workers compute on cores %s; Ray and the serving layer (%d threads) "
                    "moved to cores %s (ALIGNSERVE_PIN_CPUS=0 leaves them floating)",
                    sorted(worker_cores), moved, sorted(serving))
    return {"worker_cores": sorted(worker_cores), "serving_cores": sorted(serving), "threads": moved}
