"""Method ``vas``: value-augmented sampling (Han et al. 2024, arXiv 2405.06639).

Value models trained on the base model's own samples steer every token inside the vLLM engine:
the request carries its weights, beta and top-k to the engine's logits processor
(decoders/vas_processor.py) in ``SamplingParams.extra_args``; the engine reports, per choice, the
value-model statistics (KL estimate, steps, time, or the error that stopped steering), which end
up in the receipt. Several value models compose per request (one weight each).
"""
from __future__ import annotations

import time
from typing import AsyncIterator, ClassVar, Literal

from pydantic import Field

from decoders.base import (AlignmentFailure, Budget, Cost, Event, FiniteFloat, int_in, Method, MethodParams,
                           ParamError, StreamChunk, Text, Timing, need)
from decoders.plain import score_receipt, stream_choices
from decoders.rewards import build_mixture, check_weights

DEFAULT_BETA = 2.0  # logits per standard deviation of reward on base samples (value units)
DEFAULT_TOP_K = 20


class VASParams(MethodParams):
    needs_weights: ClassVar[bool] = True

    method: Literal["vas"] = "vas"
    weights: dict[Text, FiniteFloat] | None = Field(
        default=None, description="objective -> weight; each objective needs a value model")
    beta: FiniteFloat = Field(default=DEFAULT_BETA, description="steering strength (logits per value unit)")
    top_k: int_in(ge=1) = Field(default=DEFAULT_TOP_K, description="base candidates re-scored per token")

    def check(self, limits) -> None:
        check_weights(self.weights, limits, self.method, required=True)
        need(0.0 <= self.beta <= limits.max_beta, "beta", f"beta must be in [0, {limits.max_beta:g}]")
        need(self.top_k <= limits.max_top_k, "top_k", f"top_k must be <= {limits.max_top_k}")


class VAS(Method):
    name = "vas"
    Params = VASParams
    summary = ("Value models trained on the base model's own samples steer each token inside the vLLM "
               "engine; several compose per request.")
    streams = "tokens"

    async def prepare(self) -> None:
        self.mixture = build_mixture(self.params.weights, "raw", None, self.ctx.objectives, self.ctx.limits,
                                     required=True)
        missing = [o for o in self.mixture.active() if o not in self.ctx.value_models]
        if missing:
            raise ParamError(f"no value model for objective(s) {missing}; VAS can steer: "
                             f"{sorted(self.ctx.value_models)}", param="alignment.weights", code="no_value_model")

    def budget(self) -> Budget:
        n = self.request.n
        return Budget(sequences=n, tokens=n * self.request.max_tokens, scores=n, knobs=("n", "max_tokens"))

    def engine_args(self) -> dict:
        """What the engine's VAS processor reads from ``SamplingParams.extra_args``."""
        return {"vas": {"weights": {o: self.mixture.weights[o] for o in self.mixture.active()},
                        "beta": self.params.beta, "top_k": self.params.top_k}}

    async def decode(self) -> AsyncIterator[Event]:
        sampling = dict(self.request.sampling, extra_args=self.engine_args())
        texts: dict[int, str] = {}
        chunks: list[StreamChunk] = []
        tokens = 0
        t0 = time.perf_counter()
        async for ev in stream_choices(self, sampling, texts, chunks):
            tokens += len(getattr(ev, "token_ids", ()))
            yield ev
        generation_s = time.perf_counter() - t0
        stats = {int(i): s for chunk in chunks for i, s in (chunk.vas or {}).items()}
        if any(stats.get(i) is None for i in texts):
            raise AlignmentFailure("value models did not report for this request; the answer may be unaligned",
                                   code="value_model_failed", component="value_model")
        failed = sorted({s["error"] for s in stats.values() if s.get("error")})
        if failed:
            # The processor's message is logged by the engine; the client gets the fact, not internals.
            raise AlignmentFailure("a value model failed while decoding this request, so the answer is not "
                                   "aligned", code="value_model_failed", component="value_model")
        value_s = sum(s.get("value_model_s", 0.0) for s in stats.values())
        receipt = self.receipt(
            cost=Cost(base_tokens=tokens, value_model_steps=sum(s.get("steps", 0) for s in stats.values()),
                      candidates=0),
            timing=Timing(generation_s=round(generation_s, 4), value_model_s=round(value_s, 4)))
        receipt.add_latency(value_s)
        await score_receipt(self, receipt, texts, aligning=True)
        for choice in receipt.choices or []:
            if choice.index in stats:
                choice.kl_estimate = stats[choice.index].get("kl")
        yield receipt
