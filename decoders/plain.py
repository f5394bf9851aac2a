"""Method ``none``: plain decoding by the base model, streamed token by token. With ``weights`` the
answer is scored after it is generated and the receipt shows its rewards (nothing is steered)."""
from __future__ import annotations

import time
from typing import Any, AsyncIterator, ClassVar, Literal

from decoders.base import Budget, Delta, Event, Finish, Method, Receipt, StreamChunk, Timing
from decoders.rewards import MixtureParams, choice_scores, score_answers


class PlainParams(MixtureParams):
    needs_weights: ClassVar[bool] = False
    method: Literal["none"] = "none"


async def stream_choices(method: Method, sampling: dict[str, Any], texts: dict[int, str],
                         chunks: list[StreamChunk] | None = None) -> AsyncIterator[Event]:
    """Delta/Finish events of one engine stream; collects each choice's text into ``texts`` and the
    raw chunks that carry value-model statistics into ``chunks``. With ``echo`` (completions) each
    choice starts with the prompt (and its log-probs, when asked for); ``max_tokens: 0`` then
    generates nothing: vLLM samples one token, which is dropped."""
    req = method.request
    echo_only = False
    if req.echo:
        sampling = dict(sampling)
        if sampling.get("logprobs") is not None:
            sampling["prompt_logprobs"] = sampling["logprobs"]
        if sampling["max_tokens"] == 0:
            sampling["max_tokens"], echo_only = 1, True
    echoed = not req.echo
    async for chunk in method.ctx.engine.stream(req.prompt_ids, sampling):
        if not echoed:
            echoed = True
            for i in range(req.n):
                yield Delta(i, req.prompt_text, [], chunk.prompt_logprobs)
        for c in chunk.outputs:
            if (c.token_ids or c.text) and not echo_only:
                texts[c.index] = texts.get(c.index, "") + c.text
                yield Delta(c.index, c.text, list(c.token_ids), c.logprobs)
            if c.finish_reason:
                yield Finish(c.index, "length" if echo_only else c.finish_reason)
        if chunks is not None and chunk.vas:
            chunks.append(chunk)


async def score_receipt(method: Method, receipt: Receipt, texts: dict[int, str], *, aligning: bool) -> None:
    """Score the answers with the method's mixture into ``receipt.choices``; ``aligning``: the scoring
    is part of the method's work (added latency), not only a report."""
    mixture = getattr(method, "mixture", None)
    if mixture is None or not texts:
        return
    order = sorted(texts)
    t0 = time.perf_counter()
    raw, transformed, mixed = await score_answers(method.ctx.scorer, mixture, method.ctx.objectives,
                                                  method.request.prompt_text, [texts[i] for i in order])
    seconds = time.perf_counter() - t0
    receipt.choices = [choice_scores(i, raw, transformed, mixed, j) for j, i in enumerate(order)]
    receipt.timing = (receipt.timing or Timing()).model_copy(update={"scoring_s": round(seconds, 4)})
    if aligning:
        receipt.add_latency(seconds)


class Plain(Method):
    name = "none"
    Params = PlainParams
    summary = "Plain decoding; with `weights`, the answer is also scored and the receipt shows its rewards."
    streams = "tokens"
    echoes = True

    async def prepare(self) -> None:
        self.mixture = self.params.mixture(self.ctx.objectives, self.ctx.limits)

    def budget(self) -> Budget:
        n = self.request.n
        return Budget(sequences=n, tokens=n * self.request.max_tokens, scores=n if self.mixture else 0,
                      knobs=("n", "max_tokens"))

    async def decode(self) -> AsyncIterator[Event]:
        receipt = self.receipt()
        texts: dict[int, str] = {}
        async for ev in stream_choices(self, self.request.sampling, texts):
            yield ev
        await score_receipt(self, receipt, texts, aligning=False)
        yield receipt
