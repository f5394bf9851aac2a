"""The decoders' interfaces (decoders/base.py ``Engine``, ``Scorer``) over Ray Serve deployment handles."""
from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from typing import Any, AsyncIterator, Sequence

from decoders.base import AlignmentFailure, Completion, ParamError, StreamChunk

logger = logging.getLogger("ray.serve")


def detached(coro) -> asyncio.Task:
    """Run ``coro`` in a task outside the current Serve request. When a request is cancelled (its
    client went away), Ray Serve cancels every call the request made that is still in flight or
    waiting for a replica, including those made after the cancellation by its cleanup; the calls
    that clean up after it (abort, budget release, metrics) must outlive it, so they run in a
    context that belongs to no request."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


class EngineClient:
    """``Engine`` for one request: every engine request it starts has an id derived from the API
    request's id (``abort`` stops them all) and goes to the engine replica that admitted the request
    (``replica``, set at admission; server/routing.py sends the calls there). ``delta``: stream one
    chunk per engine step (a client that streams) or one chunk at the end (fewer messages for a
    non-streamed answer). ``adapter``: a LoRA baseline that decodes in place of the base model (the
    request named it as its ``model``): calls without a ``lora_request`` of their own (a baseline's
    rollouts have one) get it."""

    def __init__(self, handle, tokenizer, request_id: str, *, delta: bool = True, replica: str | None = None,
                 adapter: str | None = None):
        self.handle = handle
        self.tokenizer = tokenizer
        self.request_id = request_id
        self.delta = delta
        self.replica = replica
        self.adapter = adapter
        self.calls = 0

    def _params(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.adapter is None or "lora_request" in params:
            return params
        return {**params, "lora_request": {"lora_name": self.adapter}}

    async def generate(self, prompts: list[list[int]], params: dict[str, Any]) -> list[list[Completion]]:
        self.calls += 1
        rid = f"{self.request_id}-{self.calls}-{uuid.uuid4().hex[:6]}"
        out = await self.handle.generate.remote(prompts, self._params(params), rid, replica=self.replica)
        if isinstance(out, ParamError):  # the engine replica refused the client's parameters
            raise out
        return out

    async def stream(self, prompt_ids: list[int], params: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        gen = self.handle.options(stream=True).stream.remote(prompt_ids, self._params(params), self.request_id,
                                                             self.delta, replica=self.replica)
        async for chunk in gen:
            if isinstance(chunk, ParamError):  # the engine replica refused the client's parameters
                raise chunk
            yield chunk

    async def abort(self) -> int:
        return await self.handle.abort.remote(self.request_id, replica=self.replica)

    async def release(self) -> None:
        """Give the request's budget back on the replica that admitted it."""
        await self.handle.release.remote(self.request_id, replica=self.replica)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


class RewardTimeout(Exception):
    """A call to the reward deployment ran past `limits.reward_timeout_s` (and was cancelled).
    Deliberately not a TimeoutError: the request's own deadline (`request_timeout_s`, a 504) is
    a different error."""


class RewardClient:
    """``Scorer`` over the reward deployment: every call bounded by ``limits.reward_timeout_s``
    (past it the call is cancelled on the reward replica), and every failure an explicit
    ``AlignmentFailure`` (502 ``reward_timeout`` / ``reward_failed``), never an unscored answer.
    All scoring of a request goes through it (final answers, best-of-N and Transfer Q* candidates)."""

    def __init__(self, handle, timeout_s: float | None, request_id: str = ""):
        self.handle = handle
        self.timeout_s = timeout_s
        self.request_id = request_id

    async def score(self, objectives: list[str], prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
        if not responses:
            return {o: [] for o in objectives}
        try:
            return await with_deadline(self.handle.score.remote(objectives, prompts, responses), self.timeout_s)
        except RewardTimeout as e:
            raise AlignmentFailure("reward scoring timed out (limits.reward_timeout_s)", code="reward_timeout") from e
        except Exception as e:  # noqa: BLE001 - any failure of the reward service is an explicit error
            logger.warning("request %s: reward scoring failed: %r", self.request_id, e)
            raise AlignmentFailure("reward scoring failed", code="reward_failed") from e


async def with_deadline(response, timeout_s: float | None):
    """Await a deployment response; past ``timeout_s`` cancel it on the replica and raise RewardTimeout."""
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
        raise RewardTimeout(f"the reward model did not answer within {timeout_s:g}s") from None
