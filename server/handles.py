"""Adapters from Ray Serve deployment handles to the decoder interfaces (decoders/base.py)."""
from __future__ import annotations

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
