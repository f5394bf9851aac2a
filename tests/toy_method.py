"""A toy alignment method, loaded as a plug-in (``ALIGNSERVE_METHODS=toy_method:Shout``) by the
hardened test server: it proves that a method is one class in one file, that the protocol, the
admission budget, the objectives endpoint and the receipt all read it from the registry, and that
the handles it gets (the engine, the rewards) work from outside the package."""
from __future__ import annotations

from typing import AsyncIterator, ClassVar, Literal

from pydantic import Field

from decoders.base import Budget, Cost, Delta, Event, Finish, Method, int_in
from decoders.plain import score_receipt
from decoders.rewards import MixtureParams


class ShoutParams(MixtureParams):
    needs_weights: ClassVar[bool] = False

    method: Literal["shout"] = "shout"
    exclamations: int_in(ge=0, le=5) = Field(default=1, description="'!' appended to each answer")


class Shout(Method):
    name = "shout"
    Params = ShoutParams
    summary = "Toy plug-in (tests): plain decoding in one engine call, upper-cased, with `exclamations` '!'."
    streams = "whole"

    async def prepare(self) -> None:
        self.mixture = self.params.mixture(self.ctx.objectives, self.ctx.limits)

    def budget(self) -> Budget:
        n = self.request.n
        return Budget(sequences=n, tokens=n * self.request.max_tokens, scores=n if self.mixture else 0,
                      knobs=("n", "max_tokens"))

    async def decode(self) -> AsyncIterator[Event]:
        [completions] = await self.ctx.engine.generate([self.request.prompt_ids], self.request.sampling)
        texts = {}
        for c in completions:
            texts[c.index] = c.text.upper() + "!" * self.params.exclamations
            yield Delta(c.index, texts[c.index], list(c.token_ids))
            yield Finish(c.index, c.finish_reason)
        receipt = self.receipt(cost=Cost(base_tokens=sum(len(c.token_ids) for c in completions)))
        await score_receipt(self, receipt, texts, aligning=False)
        yield receipt
