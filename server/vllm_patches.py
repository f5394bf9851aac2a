"""Two fixes to vLLM's CPU LoRA kernels (vLLM 0.32) and one speed-up, applied in every vLLM process.

A vLLM general plugin (entry point ``vllm.general_plugins`` in pyproject.toml), like
server/process_guard.py. Both bugs are in the PyTorch-native LoRA ops that the CPU backend uses
(``vllm.lora.ops.torch_ops``, through ``PunicaWrapperCPU``); GPU backends use other kernels and are
left untouched (nothing is patched unless the CPU punica wrapper is what vLLM would use).

1. **A request without an adapter got one.** Tokens of requests without LoRA carry the adapter index
   -1, and the torch ops index the stacked adapter weights with it, i.e. take the LAST adapter slot.
   When every slot holds an adapter (``max_loras`` adapters active in one batch: Transfer Q*
   rollouts next to base-model requests), base-model tokens were computed with that adapter
   (tests/test_lora_baselines.py shows it on the engine). Here rows with index -1 get no LoRA delta.
2. **Prompt log-probs crashed the engine.** ``add_lora_logits`` indexes with one adapter index per
   *sampled* row; prompt log-probs pass every prompt position (einsum size mismatch, engine dead).
   Those rows get the base head's logits (adapters with an ``lm_head`` LoRA would miss its delta in
   prompt log-probs only; the shipped adapters have none).

And one speed-up: **a batch without adapters skips the LoRA layers' work.** With LoRA enabled every
linear layer calls the wrapper, which allocates buffers and runs a shrink and an expand per output
slice, even when no request in the batch has an adapter; on a 2-core CPU that made plain decoding
~10 % slower than with LoRA off (docs/performance.md). The wrapper now notes, whenever vLLM hands it a
new token-to-adapter mapping, whether any token has an adapter, and returns at once when none has.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

logger = logging.getLogger("alignserve.vllm_patches")

_PATCHED = "_alignserve_masked"


def _masked(op: Callable[..., Any], region: Callable[..., slice], adds: Callable[..., bool]) -> Callable[..., Any]:
    """``op(inputs, weights, out, indices, ...)`` with rows of index -1 left without a LoRA delta.

    ``region(weights, out, *args, **kw)``: the columns of ``out`` the op writes; ``adds(*args, **kw)``:
    whether it adds to them (else it overwrites them, and rows without an adapter get zeros there)."""
    def patched(inputs, weights, out, indices, *args, **kw):
        if indices.shape[0] != inputs.shape[0]:
            return op(inputs, weights, out, indices, *args, **kw)
        valid = indices >= 0
        n_valid = int(valid.sum())
        if n_valid == indices.shape[0]:
            return op(inputs, weights, out, indices, *args, **kw)
        cols = region(weights, out, *args, **kw)
        overwrite = not adds(*args, **kw)
        if n_valid == 0:
            if overwrite:
                out[:, cols] = 0
            return None
        rows = valid.nonzero().squeeze(1)
        part = out[rows]
        op(inputs[rows], weights, part, indices[rows], *args, **kw)
        if overwrite:
            out[~valid, cols] = 0
        out[rows] = part
        return None

    setattr(patched, _PATCHED, True)
    patched.__wrapped__ = op
    return patched


def _rank_cols(weights, out, *args, **kw) -> slice:
    return slice(0, weights.shape[-2])


def _expand_cols(weights, out, *args, **kw) -> slice:
    return slice(0, min(weights.shape[-2], out.shape[1]))


def _slice_cols(weights, out, slice_offset, slice_size, *args, **kw) -> slice:
    return slice(slice_offset, slice_offset + slice_size)


def _expand_adds(*args, add_inputs: bool = True, **kw) -> bool:
    return bool(args[0]) if args else add_inputs


def _slice_adds(slice_offset=None, slice_size=None, *args, add_inputs: bool = True, **kw) -> bool:
    return bool(args[0]) if args else add_inputs


def _logits_rows_guard(method: Callable[..., Any]) -> Callable[..., Any]:
    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, **kw):
        if x.view(-1, x.shape[-1]).shape[0] != self.sampler_indices.shape[0]:
            return None  # prompt log-probs: every prompt row, one adapter index per request (bug 2)
        return method(self, y, x, lora_a_stacked, lora_b_stacked, scale, **kw)

    setattr(add_lora_logits, _PATCHED, True)
    add_lora_logits.__wrapped__ = method
    return add_lora_logits


def _noting_idle(method: Callable[..., Any]) -> Callable[..., Any]:
    """``update_metadata`` (vLLM calls it when the batch's token-to-adapter mapping changes), noting
    whether no token and no sampled row of the batch has an adapter (index -1 everywhere)."""
    def update_metadata(self, *args, **kw):
        method(self, *args, **kw)
        self.alignserve_idle = bool((self.token_lora_indices < 0).all() and (self.sampler_indices < 0).all())

    update_metadata.__wrapped__ = method
    return update_metadata


def _skipped_when_idle(method: Callable[..., Any]) -> Callable[..., Any]:
    """A wrapper op that adds a LoRA delta in place: nothing to add in a batch without adapters."""
    def op(self, *args, **kw):
        if self.alignserve_idle:
            return None
        return method(self, *args, **kw)

    op.__name__ = method.__name__
    op.__wrapped__ = method
    return op


def install() -> None:
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except Exception:  # noqa: BLE001 - a vLLM without these modules: nothing to fix
        return
    if getattr(lora_ops.bgmv_shrink, _PATCHED, False):
        return
    ops = {"bgmv_shrink": _masked(lora_ops.bgmv_shrink, _rank_cols, lambda *a, **k: False),
           "bgmv_expand": _masked(lora_ops.bgmv_expand, _expand_cols, _expand_adds),
           "bgmv_expand_slice": _masked(lora_ops.bgmv_expand_slice, _slice_cols, _slice_adds)}
    for name, fn in ops.items():
        setattr(lora_ops, name, fn)      # the sgmv_* ops call these through the module
        setattr(punica_cpu, name, fn)    # the CPU wrapper imported them by name
    cls = punica_cpu.PunicaWrapperCPU
    cls.add_lora_logits = _logits_rows_guard(cls.add_lora_logits)
    cls.alignserve_idle = False  # until vLLM hands the wrapper its first mapping
    cls.update_metadata = _noting_idle(cls.update_metadata)
    for name in ("add_lora_linear", "add_lora_embedding", "add_lora_logits"):
        setattr(cls, name, _skipped_when_idle(getattr(cls, name)))
