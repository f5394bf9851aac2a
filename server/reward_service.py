"""The reward deployment: registered objectives, scored in batches across concurrent requests.

Its replicas scale separately from the engine. Each call names objectives and passes
(prompt, response) pairs; `@serve.batch` gathers the pairs of concurrent callers so each
objective model runs on one larger batch.
"""
from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

from ray import serve

from server.config import ServerConfig

logger = logging.getLogger("ray.serve")


class RewardService:
    """Objectives by name; usable without Ray (CLIs, benchmarks)."""

    def __init__(self, config: ServerConfig):
        from decoders.rewards import build_objectives, describe

        self.objectives = build_objectives(config.objectives)
        self._describe = describe

    def describe(self) -> list[dict[str, Any]]:
        return self._describe(self.objectives)

    def score_now(self, objectives: list[str], prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
        unknown = [o for o in objectives if o not in self.objectives]
        if unknown:
            raise KeyError(f"unknown objectives: {unknown}")
        return {o: [float(x) for x in self.objectives[o](prompts, responses)] for o in objectives}


@serve.deployment(name="RewardDeployment", health_check_period_s=10)
class RewardDeployment:
    def __init__(self, config: dict[str, Any]):
        self.service = RewardService(ServerConfig.model_validate(config))
        # Load every model now, not on the first request.
        names = list(self.service.objectives)
        self.service.score_now(names, ["warm up"], ["Hello there."])
        # Fault injection for tests (see `inject_faults`): how many calls, and what happens to them.
        self._fail_next = 0
        self._fault_kind = "fail"
        self._fault_sleep_s = 0.0

    async def describe(self) -> list[dict[str, Any]]:
        return self.service.describe()

    async def score(self, objectives: list[str], prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
        if self._fail_next > 0:
            self._fail_next -= 1
            if self._fault_kind == "sleep":
                await asyncio.sleep(self._fault_sleep_s)  # a hung model: then score normally
            else:
                raise RuntimeError("injected reward failure")
        items = [(o, p, r) for o in objectives for p, r in zip(prompts, responses)]
        scores = await asyncio.gather(*(self._score_item(item) for item in items))
        out: dict[str, list[float]] = {o: [] for o in objectives}
        for (o, _, _), s in zip(items, scores):
            out[o].append(s)
        return out

    @serve.batch(max_batch_size=128, batch_wait_timeout_s=0.002)
    async def _score_item(self, items: list[tuple[str, str, str]]) -> list[float]:
        by_objective: dict[str, list[int]] = defaultdict(list)
        for i, (o, _, _) in enumerate(items):
            by_objective[o].append(i)
        result = [0.0] * len(items)
        loop = asyncio.get_running_loop()
        for o, idx in by_objective.items():
            prompts = [items[i][1] for i in idx]
            responses = [items[i][2] for i in idx]
            # Models are CPU-bound: keep the replica's event loop free for other batches.
            scores = await loop.run_in_executor(None, self.service.score_now, [o], prompts, responses)
            for i, s in zip(idx, scores[o]):
                result[i] = s
        return result

    async def inject_faults(self, count: int, kind: str = "fail", sleep_s: float = 0.0) -> None:
        """Make the next `count` score calls fail (`kind="fail"`) or stall `sleep_s` seconds first
        (`kind="sleep"`, to exercise limits.reward_timeout_s); used by fault-injection tests."""
        if kind not in ("fail", "sleep"):
            raise ValueError(f"unknown fault kind {kind!r}")
        self._fail_next = count
        self._fault_kind = kind
        self._fault_sleep_s = float(sleep_s)
