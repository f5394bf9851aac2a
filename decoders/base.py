"""The small interfaces every decoder is written against.

A decoder (best-of-N, Transfer Q*, ARGS, ...) orchestrates calls to two services:
  * a ``Generator``: the vLLM engine deployment (batched, continuous batching, prefix caching);
  * a ``Scorer``: the reward deployment (objectives by name, batched).
Both are async. In the server they are Ray Serve deployment handles behind thin adapters
(server/handles.py); in unit tests they are small hand-written fakes with known outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Completion:
    """One finished (or cut) sequence from the engine."""
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    finish_reason: str | None = None          # "stop" | "length" | None (still running)
    # Per generated token: {token_id: logprob} of the top candidates (raw, before processors),
    # present when params["logprobs"] was set.
    logprobs: list[dict[int, float]] | None = None
    stop_reason: Any = None
    # The engine's own per-token logprob records (with token strings), passed through to clients.
    raw_logprobs: Any = None


class Generator(Protocol):
    async def generate(self, prompts: list[list[int]], params: dict[str, Any]) -> list[list[Completion]]:
        """Run every prompt (token ids) with the same sampling params, as one batch.

        ``params`` are vllm.SamplingParams keyword arguments (n, max_tokens, temperature, top_p,
        seed, logprobs, stop, ...). Returns, per prompt, its ``n`` completions in index order.
        """
        ...

    def decode(self, token_ids: list[int]) -> str: ...

    def encode(self, text: str) -> list[int]: ...


class Scorer(Protocol):
    async def score(self, objectives: list[str], prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
        """Raw scores of each (prompt, response) pair for each named objective."""
        ...


@dataclass
class DecodeStats:
    """The cost side of an aligned answer, reported in the receipt and metrics."""
    candidates: int = 0
    base_tokens: int = 0
    rollouts: int = 0
    rollout_tokens: int = 0
    steps: int = 0
    generation_s: float = 0.0
    scoring_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
