"""Run by tests/test_routing.py in a process of its own (its own Ray): two replicas behind
server.routing.AffinityRouter, called the way the ingress calls the engine. Prints one JSON line."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
from ray import serve  # noqa: E402

from server.routing import router_config  # noqa: E402


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.1})
class Target:
    def __init__(self):
        self.me = serve.get_replica_context().replica_id.unique_id

    async def who(self, replica: str | None = None, exclude_replicas: list[str] | None = None) -> str:
        await asyncio.sleep(0.02)
        return self.me


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Caller:
    """All calls below belong to one Serve request (they share its internal request id)."""

    def __init__(self, target):
        self.target = target

    async def __call__(self) -> dict:
        unpinned = await asyncio.gather(*[self.target.who.remote() for _ in range(16)])
        pinned = {}
        for rid in sorted(set(unpinned)):
            got = await asyncio.gather(*[self.target.who.remote(replica=rid) for _ in range(16)])
            pinned[rid] = sorted(set(got))
        excluded = {rid: sorted({await self.target.who.remote(exclude_replicas=[rid]) for _ in range(6)})
                    for rid in sorted(set(unpinned))}
        try:
            await self.target.who.remote(replica="no-such-replica")
            gone = None
        except Exception as e:  # noqa: BLE001 - reported to the test
            gone = type(e).__name__
        return {"unpinned": sorted(set(unpinned)), "pinned": pinned, "excluded": excluded, "gone": gone}


if __name__ == "__main__":
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
             log_to_driver=False)
    try:
        handle = serve.run(Caller.bind(Target.options(request_router_config=router_config()).bind()),
                           name="routing_probe", route_prefix=None)
        print("RESULT " + json.dumps(handle.remote().result(timeout_s=120)), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
