"""From a method's events (decoders/base.py ``Delta``, ``Finish``, ``Receipt``) to the wire: one
JSON body, or server-sent events (``data: {chunk}`` ... ``data: [DONE]``), in the typed shapes of
server/protocol.py. ``Outcome`` keeps what the request produced, for usage and metrics."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi.responses import StreamingResponse

from decoders.base import Delta, Finish, Receipt, TokenLogprob
from server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
                             ChatLogprobs, ChatMessageOut, CompletionChoice, CompletionChunk, CompletionLogprobs,
                             CompletionResponse, Usage, now)


@dataclass
class ChoiceState:
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class Outcome:
    """What a request produced, filled while its events are rendered."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    receipt: Receipt | None = None
    started_t: float | None = None       # admission (time.perf_counter)
    first_token_t: float | None = None
    last_token_t: float | None = None
    choices: dict[int, ChoiceState] = field(default_factory=dict)

    def track(self, ev: Any) -> None:
        if isinstance(ev, Delta):
            c = self.choices.setdefault(ev.index, ChoiceState())
            c.text += ev.text
            if ev.logprobs is not None:
                c.logprobs = (c.logprobs or []) + list(ev.logprobs)
            if ev.token_ids:
                t = time.perf_counter()
                self.first_token_t = self.first_token_t or t
                self.last_token_t = t
                self.completion_tokens += len(ev.token_ids)
        elif isinstance(ev, Finish):
            self.choices.setdefault(ev.index, ChoiceState()).finish_reason = ev.reason
        elif isinstance(ev, Receipt):
            self.receipt = ev

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)


def sse(payload: dict[str, Any] | str) -> bytes:
    import json

    # allow_nan=False: a value JSON cannot carry (NaN, Infinity) is an error here, never a chunk clients reject
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return f"data: {data}\n\n".encode()


DONE = b"data: [DONE]\n\n"


class Renderer:
    """Renders one request's events as a chat or a text completion.

    ``logprobs``: the request's top-logprob count (None: no logprobs); ``include_usage``: the final
    usage chunk of a stream (``stream_options.include_usage``)."""

    def __init__(self, kind: str, rid: str, model: str, outcome: Outcome, *, logprobs: int | None = None,
                 include_usage: bool = False):
        self.chat = kind == "chat"
        self.rid, self.model, self.outcome = rid, model, outcome
        self.k = logprobs
        self.include_usage = include_usage
        self.created = now()

    # -- one JSON body ----------------------------------------------------------------------------

    async def collect(self, events: AsyncIterator[Any]) -> dict[str, Any]:
        async for ev in events:
            self.outcome.track(ev)
        return self.body()

    def body(self) -> dict[str, Any]:
        out = self.outcome
        choices = []
        for i in sorted(out.choices):
            c = out.choices[i]
            lp = c.logprobs if self.k is not None else None
            if self.chat:
                choices.append(ChatChoice(index=i, message=ChatMessageOut(content=c.text), finish_reason=c.finish_reason,
                                          logprobs=None if lp is None else ChatLogprobs.of(lp, self.k)))
            else:
                choices.append(CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                                                logprobs=None if lp is None else CompletionLogprobs.of(lp, self.k)))
        cls = ChatCompletionResponse if self.chat else CompletionResponse
        return cls(id=self.rid, created=self.created, model=self.model, choices=choices, usage=out.usage(),
                   alignment=out.receipt).body()

    # -- server-sent events -----------------------------------------------------------------------

    async def stream(self, events: AsyncIterator[Any]) -> AsyncIterator[bytes]:
        """SSE chunks of ``events``: a chunk per Delta; the Finish chunks last, the final one with the
        receipt; then the usage chunk if asked for. [DONE] is the caller's (it also ends errors)."""
        started: set[int] = set()
        finishes: list[Finish] = []
        async for ev in events:
            self.outcome.track(ev)
            if isinstance(ev, Delta):
                yield sse(self._delta_chunk(ev, started))
            elif isinstance(ev, Finish):
                finishes.append(ev)  # sent last, so the final chunk can carry the receipt
        for j, ev in enumerate(finishes):
            last = j == len(finishes) - 1
            yield sse(self._finish_chunk(ev, started, self.outcome.receipt if last else None))
        if self.include_usage:
            yield sse(self._chunk([], usage=self.outcome.usage()))

    def _chunk(self, choices: list, receipt: Receipt | None = None, usage: Usage | None = None) -> dict[str, Any]:
        cls = ChatCompletionChunk if self.chat else CompletionChunk
        d = cls(id=self.rid, created=self.created, model=self.model, choices=choices, usage=usage,
                alignment=receipt).body()
        if not self.include_usage:
            d.pop("usage", None)  # OpenAI sends `usage` on chunks only when include_usage is set
        return d

    def _delta_chunk(self, ev: Delta, started: set[int]) -> dict[str, Any]:
        lp = ev.logprobs if self.k is not None else None
        if self.chat:
            delta = {"content": ev.text}
            if ev.index not in started:
                delta = {"role": "assistant", "content": ev.text}
                started.add(ev.index)
            choice: Any = ChatChunkChoice(index=ev.index, delta=delta,
                                          logprobs=None if lp is None else ChatLogprobs.of(lp, self.k))
        else:
            start = len(self.outcome.choices[ev.index].text) - len(ev.text)  # text offsets run on across chunks
            choice = CompletionChoice(index=ev.index, text=ev.text,
                                      logprobs=None if lp is None else CompletionLogprobs.of(lp, self.k, start))
        return self._chunk([choice])

    def _finish_chunk(self, ev: Finish, started: set[int], receipt: Receipt | None) -> dict[str, Any]:
        if self.chat:
            delta = {} if ev.index in started else {"role": "assistant", "content": ""}
            choice: Any = ChatChunkChoice(index=ev.index, delta=delta, finish_reason=ev.reason)
        else:
            choice = CompletionChoice(index=ev.index, text="", finish_reason=ev.reason)
        return self._chunk([choice], receipt=receipt)


def error_chunk(err_body: dict[str, Any]) -> bytes:
    return sse(err_body)


async def first_event(events: AsyncIterator[Any]) -> Any:
    """Run a method up to its first event, so that its early errors become HTTP errors, not SSE."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


def prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async def gen():
        if first is not None:
            yield first
        async for ev in rest:
            yield ev
    return gen()


# ----------------------------------------------------------------------------- streamed responses

class ClosingStream(StreamingResponse):
    """A StreamingResponse that runs ``on_close`` however it ends, even if its body was never iterated
    (a client that disconnects before the first chunk), so budgets and engine requests are freed."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


async def cancel_quietly(fut: asyncio.Future) -> None:
    fut.cancel()
    try:
        await fut
    except BaseException:  # noqa: BLE001 - the stream was abandoned; its error no longer matters
        pass


async def with_deadline(chunks: AsyncIterator[bytes], deadline: float,
                        on_timeout: Callable[[], Awaitable[bytes]]) -> AsyncIterator[bytes]:
    """Stream ``chunks`` until they end or ``deadline`` (time.perf_counter) passes, even while they
    produce nothing; past it, ``on_timeout()`` gives the error chunk, then [DONE]."""
    pending: asyncio.Future | None = None
    try:
        while True:
            pending = asyncio.ensure_future(chunks.__anext__())
            await asyncio.wait({pending}, timeout=max(0.0, deadline - time.perf_counter()))
            if not pending.done():
                error = await on_timeout()  # first: it records the 504 the cancellation would hide
                await cancel_quietly(pending)
                pending = None
                yield error
                yield DONE
                return
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None and not pending.done():
            await cancel_quietly(pending)
        await chunks.aclose()


# ----------------------------------------------------------------------------- batched prompts

async def merge_events(streams: list[AsyncIterator[Any]], n: int) -> AsyncIterator[Any]:
    """The events of one method run per prompt (a batched completion), as one request's: choice j of
    prompt i becomes choice ``i * n + j`` (OpenAI's order); the receipts become one (merge_receipts).
    The prompts decode concurrently; a failure in one stops them all."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, events: AsyncIterator[Any]) -> None:
        try:
            async for ev in events:
                await queue.put((i, ev))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    receipts: dict[int, Receipt] = {}
    try:
        remaining = len(streams)
        while remaining:
            i, ev = await queue.get()
            if ev is done:
                remaining -= 1
            elif isinstance(ev, BaseException):
                raise ev
            elif isinstance(ev, Receipt):
                receipts[i] = ev
            else:
                ev = dataclasses.replace(ev, index=i * n + ev.index)
                yield ev
    finally:
        for t in tasks:
            t.cancel()
    if receipts:
        yield merge_receipts([receipts[i] for i in sorted(receipts)], n)


def merge_receipts(receipts: list[Receipt], n: int) -> Receipt:
    """One receipt for a batch: the knobs of the first, every prompt's choices (re-indexed), costs and
    times summed, gains averaged."""
    from decoders.base import Cost, Timing

    merged = receipts[0].model_copy(deep=True)
    merged.choices = [c.model_copy(update={"index": i * n + c.index})
                      for i, r in enumerate(receipts) for c in (r.choices or [])] or None

    def total(parts, cls):
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        keys = {k for p in parts for k, v in p.model_dump().items() if v is not None}
        return cls(**{k: sum(getattr(p, k) or 0 for p in parts) for k in keys})

    merged.cost = total([r.cost for r in receipts], Cost)
    merged.timing = total([r.timing for r in receipts], Timing)
    gains = [r.reward_gain for r in receipts if r.reward_gain]
    if gains:
        merged.reward_gain = {o: sum(g[o] for g in gains) / len(gains) for o in gains[0]}
    means = [r.candidate_mean_mixed for r in receipts if r.candidate_mean_mixed is not None]
    merged.candidate_mean_mixed = sum(means) / len(means) if means else None
    merged._added_latency_s = sum(r.added_latency_s for r in receipts)
    return merged
