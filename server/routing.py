"""Request affinity across engine (and ingress) replicas: every call of one API request reaches the
replica that runs it.

A request is admitted by one engine replica (``EngineDeployment.admit``, which answers with its
replica id); every later call of that request (its candidates, blocks, rollouts, its abort and the
release of its budget) names that replica in the ``replica`` keyword, and this router sends it
there, or fails it at once with ``ReplicaGone`` when that replica no longer runs. Calls that name no
replica (admission, ``info``) go to the replica with the most free budget among two picked at
random (power of two choices on the replicas' reported routing stats, then on queue length),
skipping the replicas in ``exclude_replicas`` (those that refused it).

Why a router (and not multiplexing or a broadcast abort): prefix caching needs a request's
candidates and rollouts on the engine that holds its prefix, and a budget is only real where the
work runs; multiplexed model ids are for models, not requests, and a broadcast abort still leaves
the other calls scattered. docs/deploy.md says more.

Why pinned calls skip the routing queue: Ray Serve (2.60) files a pending call under the
``internal_request_id`` of the API request it belongs to, which every call made while serving that
request shares; two such calls in flight at once (a request's candidates) collide there, and the
one routed second is handed the replica chosen for the first, or never handed one (its routing
task then spins, holding the router's event loop). A pinned call needs no choice, so it goes
straight to its replica; only unpinned calls, one per API request, take the queue.
"""
from __future__ import annotations

import asyncio
import random
from typing import Any

from ray.serve.request_router import FIFOMixin, LocalityMixin, PendingRequest, RequestRouter, RunningReplica

REPLICA_KWARG = "replica"
EXCLUDE_KWARG = "exclude_replicas"
# A pinned replica that refused a call (at max_ongoing_requests) is asked again after this long.
PINNED_RETRY_S = 0.05


class ReplicaGone(RuntimeError):
    """A call named an engine replica that no longer exists (replaced or scaled down): the request
    it belongs to cannot continue there; the client retries (503)."""


def _free(replica: RunningReplica) -> float:
    stats = getattr(replica, "routing_stats", None) or {}
    return float(stats.get("free", 0.0))


class AffinityRouter(FIFOMixin, LocalityMixin, RequestRouter):

    async def _choose_replica_for_request(self, pending_request: PendingRequest, *,
                                          is_retry: bool = False) -> RunningReplica:
        target = (pending_request.kwargs or {}).get(REPLICA_KWARG)
        if not target:
            return await super()._choose_replica_for_request(pending_request, is_retry=is_retry)
        if is_retry:
            await asyncio.sleep(PINNED_RETRY_S)
        for replica in self.curr_replicas.values():
            if replica.replica_id.unique_id == target:
                return replica
        raise ReplicaGone(f"engine replica {target} is gone")

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        kwargs: dict[str, Any] = pending_request.kwargs if pending_request is not None else {}
        exclude = set(kwargs.get(EXCLUDE_KWARG) or ())
        pool = [r for r in candidate_replicas if r.replica_id.unique_id not in exclude] or list(candidate_replicas)
        if pending_request is not None:
            # all of them full: back off before asking again (else the routing loop spins)
            pending_request.routing_context.should_backoff = True
        picked = pool if len(pool) <= 2 else random.sample(pool, 2)
        return [sorted(picked, key=_free, reverse=True)]


def router_config() -> dict[str, Any]:
    """``request_router_config`` of the deployments that use it (routing stats every second)."""
    return {"request_router_class": "server.routing.AffinityRouter", "request_routing_stats_period_s": 1.0,
            "request_routing_stats_timeout_s": 5.0}
