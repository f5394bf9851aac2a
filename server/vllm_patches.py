"""Two fixes to vLLM's CPU LoRA kernels (vLLM 0.32), applied in every vLLM process.

A vLLM general plugin (entry point ``vllm.general_plugins`` in pyproject.toml), like
server/process_guard.py. Both bugs are in the PyTorch-native LoRA ops that the CPU backend uses
(``vllm.lora.ops.torch_ops``, through ``PunicaWrapperCPU``); GPU backends use other kernels and are
left untouched (nothing is patched unless the CPU punica wrapper is what vLLM would use).

1. **A request without an adapter got one.** Tokens of requests without LoRA carry the adapter index
   -1, and the torch ops index the stacked adapter weights with it, i.e. take the LAST adapter slot.
   When every slot holds an adapter (``max_loras`` adapters active in one batch: Transfer Q*
   rollouts next to base-model requests), base-model tokens were computed with that adapter
   (tests/test_lora_baselines.py shows it on the engine). Here rows with index -1 get no LoRA delta,
   and a batch without any adapter skips the LoRA math (its speed-up is not established: base-only
   decoding with LoRA enabled measured 0.75-0.97x of LoRA off, patched and unpatched within noise).
2. **Prompt log-probs crashed the engine.** ``add_lora_logits`` indexes with one adapter index per
   *sampled* row; prompt log-probs pass every prompt position (einsum size mismatch, engine dead).
   Those rows get the base head's logits (adapters with an ``lm_head`` LoRA would miss its delta in
   prompt log-probs only; the shipped adapters have none).
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
