"""Adapters from Ray Serve deployment handles to the decoder interfaces (decoders/base.py)."""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

from decoders.base import Completion


def to_completion(d: dict[str, Any]) -> Completion:
    logprobs = None
    if d.get("logprobs") is not None:
        logprobs = [{tid: lp for tid, lp, _ in step["top"]} | {step["id"]: step["logprob"]} for step in d["logprobs"]]
    return Completion(text=d["text"], token_ids=d["token_ids"], cumulative_logprob=d.get("cumulative_logprob"),
                      finish_reason=d.get("finish_reason"), logprobs=logprobs, stop_reason=d.get("stop_reason"),
                      raw_logprobs=d.get("logprobs"))


class EngineGenerator:
    """`Generator` over the engine deployment handle (one batched call per `generate`)."""

    def __init__(self, engine_handle, tokenizer, request_id: str):
        self.handle = engine_handle
        self.tokenizer = tokenizer
        self.request_id = request_id
        self.calls = 0

    async def generate(self, prompts: list[list[int]], params: dict[str, Any]) -> list[list[Completion]]:
        self.calls += 1
        rid = f"{self.request_id}-{self.calls}-{uuid.uuid4().hex[:6]}"
        out = await self.handle.generate.remote(prompts, params, rid)
        return [[to_completion(c) for c in per_prompt] for per_prompt in out]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


class RewardScorer:
    """`Scorer` over the reward deployment handle."""

    def __init__(self, rewards_handle):
        self.handle = rewards_handle

    async def score(self, objectives: list[str], prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
        if not responses:
            return {o: [] for o in objectives}
        return await self.handle.score.remote(objectives, prompts, responses)


class RewardTimeout(Exception):
    """A call to the reward deployment ran past `limits.reward_timeout_s` (and was cancelled).
    Deliberately not a TimeoutError: the request's own deadline (`request_timeout_s`, a 504) is
    a different error."""


class TimedRewards:
    """The reward deployment handle with a deadline on `score.remote(...)`; other methods pass through.

    The ingress holds this instead of the bare handle, so every scoring path (methods._score, the
    best-of-N and Transfer Q* scorers) is bounded: past the deadline the call is cancelled on the
    reward replica and `RewardTimeout` is raised (methods._FailLoudScorer turns it into a 502 `reward_timeout`).
    """

    def __init__(self, handle, timeout_s: float | None):
        self._handle = handle
        self.timeout_s = timeout_s
        self.score = _Deadline(handle.score, timeout_s)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


class _Deadline:
    def __init__(self, method, timeout_s: float | None):
        self._method = method
        self._timeout_s = timeout_s

    def options(self, **kwargs) -> "_Deadline":
        return _Deadline(self._method.options(**kwargs), self._timeout_s)

    def remote(self, *args, **kwargs):
        return _await_with_deadline(self._method.remote(*args, **kwargs), self._timeout_s)


async def _await_with_deadline(response, timeout_s: float | None):
    async def result():
        return await response

    if timeout_s is None or timeout_s <= 0:
        return await result()
    try:
        return await asyncio.wait_for(result(), timeout=timeout_s)
    except asyncio.TimeoutError:
        cancel = getattr(response, "cancel", None)  # stop the work on the reward replica too
        if cancel is not None:
            cancel()
        raise RewardTimeout(f"the reward model did not answer within {timeout_s:g}s "
                            "(limits.reward_timeout_s)") from None
