"""What a method emits while it decodes; the HTTP layer renders these as JSON or SSE."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Delta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None = None


@dataclass
class Finish:
    index: int
    reason: str | None


@dataclass
class Outcome:
    """What a request produced, filled while its events are emitted."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    receipt: dict[str, Any] | None = None
    first_token_t: float | None = None
    last_token_t: float | None = None
    added_latency_s: float = 0.0
    choices: dict[int, dict[str, Any]] = field(default_factory=dict)


