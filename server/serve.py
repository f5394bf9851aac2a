"""`make serve`: run the application locally on Ray Serve until Ctrl-C / SIGTERM.

    python -m server.serve [--host 127.0.0.1] [--port 8000] [--config my.yaml]

The config file (optional) is a ServerConfig dict, the same as `args` in
deploy/serve_config.yaml; without one the embedded default model is served.
Also installed as the `alignserve` command (pyproject.toml [project.scripts]).

Ray's own Prometheus metrics (ray_*, ray_serve_*) are exported on RAY_METRICS_EXPORT_PORT when it
is set (otherwise Ray picks a free port); the alignserve_* series are on the API's GET /metrics.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import yaml

logger = logging.getLogger("alignserve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--config", default=os.environ.get("ALIGNSERVE_CONFIG") or None,
                        help="YAML/JSON file with ServerConfig fields (or a Serve config; its first app's args); "
                             "default: $ALIGNSERVE_CONFIG, else the embedded defaults")
    parser.add_argument("--num-cpus", type=int, default=int(os.environ.get("RAY_NUM_CPUS", "8")),
                        help="logical CPUs for Ray (more than cores, so all deployments schedule on small machines)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config: dict = {}
    if args.config:
        with open(args.config) as f:
            config = yaml.safe_load(f) or {}
        if "applications" in config:
            config = config["applications"][0].get("args", {}) or {}

    t0 = time.time()
    from server.config import ServerConfig
    from decoders.base_model import resolve_model

    # Materialize the model before Ray starts, so its log line is visible and replicas reuse it.
    resolve_model(ServerConfig.model_validate(config).model)

    import ray
    from ray import serve

    from server.app import build_app
    from server.cpu_layout import remember_cpus, reserve_worker_cores

    remember_cpus()  # before Ray starts: its processes inherit it (server/cpu_layout.py)
    # Ray starts its workers at nice 15, below its own daemons and this process: here the workers are
    # the service, and vLLM's engine core (the engine replica's child) would inherit it, yielding its
    # core to any nice-0 process that wants it. A RAY_worker_niceness set by the user still wins.
    os.environ.setdefault("RAY_worker_niceness", "0")
    init_kwargs: dict = {}
    if os.environ.get("RAY_METRICS_EXPORT_PORT"):
        # A fixed port for Ray's metrics agent, so Prometheus can scrape ray_serve_* (default: random).
        init_kwargs["_metrics_export_port"] = int(os.environ["RAY_METRICS_EXPORT_PORT"])
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level=logging.WARNING, **init_kwargs)
    serve.start(http_options={"host": args.host, "port": args.port})
    stop = threading.Event()

    def _on_signal(signum, _frame):
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    started = False
    try:
        serve.run(build_app(config), name="alignserve", route_prefix="/", blocking=False)
        started = True
        layout = reserve_worker_cores()  # CPU-only: the serving layer off the vLLM workers' cores
        logger.info("alignserve ready in %.1fs: http://%s:%d/v1 (model %s)", time.time() - t0, args.host, args.port,
                    ServerConfig.model_validate(config).model_name)
        print(f"READY http://{args.host}:{args.port}", flush=True)
        ticks = 0
        while not stop.wait(0.5):
            ticks += 1
            if layout is not None and ticks % 60 == 0:
                reserve_worker_cores(quiet=True)  # replicas Ray started since (a replaced one) join them
    finally:
        # Graceful: serve.shutdown() kills the HTTP proxy at once, cutting open connections, so first
        # let the ingress refuse new requests (503) and finish those in flight (up to drain_timeout_s).
        if started:
            _drain(serve, ServerConfig.model_validate(config).limits.drain_timeout_s)
        serve.shutdown()
        ray.shutdown()
        logger.info("alignserve stopped")
    return 0


def _drain(serve, timeout_s: float) -> None:
    """Drain every ingress replica at once (each refuses new requests and finishes those in flight)."""
    try:
        handle = serve.get_deployment_handle("OpenAIIngress", app_name="alignserve")
        registry = serve.get_deployment_handle("MetricsDeployment", app_name="alignserve")
        replicas = list(registry.replicas.remote("ingress").result(timeout_s=10)) or [None]
        calls = [handle.drain.remote(timeout_s, replica=r) for r in replicas]
        left = [c.result(timeout_s=timeout_s + 15) for c in calls]
        logger.info("drained in-flight requests of %d ingress replica(s) (%s left)", len(calls), sum(left))
    except Exception as e:  # noqa: BLE001 - shutting down anyway
        logger.warning("could not drain in-flight requests: %s", e)


if __name__ == "__main__":
    sys.exit(main())
