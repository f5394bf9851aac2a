"""The VAS processor for vLLM's Model Runner V2 (the default wherever Triton is installed: every GPU
install), on this CPU, with vLLM's own V2 interface objects: a ``LogitsContext`` per step and a
request-state object shaped like ``LogitsProcRequestState`` built from CPU tensors.

The V2 runner keeps a request's state in a slot (recycled through a free list, re-initialized by
``add_request``) and calls ``apply`` with logits *rows* mapped to slots; the V1 runner keeps rows in
request order and moves them with ``BatchUpdate``. On the same logits and value models both must
steer every request the same way.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState
from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

from decoders.vas_processor import VASLogitsProcessor, VASLogitsProcessorV2, processor_for_runner
from test_vas import EOS, VOCAB, FakeTrunk, FakeValueModel, _only_eos, expected_row, params, rand_logits, upd, \
    v_safety, v_sentiment

SLOTS, MAX_LEN = 8, 64


class ReqStates:
    """The model runner's per-slot buffers as V2 processors see them (``.gpu`` device tensors,
    ``.np`` host mirrors), on the CPU; the test plays the runner: it writes prompts and commits
    sampled tokens."""

    def __init__(self):
        self.all_token_ids = SimpleNamespace(gpu=torch.zeros(SLOTS, MAX_LEN, dtype=torch.int32))
        self.prompt_len = SimpleNamespace(np=np.zeros(SLOTS, dtype=np.int32))
        self.prefill_len = SimpleNamespace(np=np.zeros(SLOTS, dtype=np.int32))
        self.total_len = SimpleNamespace(gpu=torch.zeros(SLOTS, dtype=torch.int32))
        self.lp = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=SLOTS, vocab_size=VOCAB,
                                         all_token_ids=self.all_token_ids, prompt_len=self.prompt_len,
                                         prefill_len=self.prefill_len, total_len=self.total_len)

    def admit(self, slot: int, tokens: list[int], prompt_len: int | None = None) -> None:
        n = len(tokens)
        self.all_token_ids.gpu[slot, :n] = torch.tensor(tokens, dtype=torch.int32)
        self.prompt_len.np[slot] = prompt_len if prompt_len is not None else n
        self.prefill_len.np[slot] = n
        self.total_len.gpu[slot] = n

    def commit(self, slot: int, token: int) -> None:
        n = int(self.total_len.gpu[slot])
        self.all_token_ids.gpu[slot, n] = token
        self.total_len.gpu[slot] = n + 1

    def tokens(self, slot: int) -> list[int]:
        return self.all_token_ids.gpu[slot, :int(self.total_len.gpu[slot])].tolist()


def context(rs: ReqStates, slots: list[int]) -> LogitsContext:
    """One decode step of these slots (in this row order): each row feeds its last committed token."""
    pos = [int(rs.total_len.gpu[s]) - 1 for s in slots]
    ids = [rs.tokens(s)[-1] for s in slots]
    idx = torch.tensor(slots, dtype=torch.int32)
    return LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=np.array(slots, dtype=np.int32),
                         expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32),
                         input_ids=torch.tensor(ids, dtype=torch.int32), pos=torch.tensor(pos, dtype=torch.int64),
                         seq_lens_upper_bound_np=np.array([p + 1 for p in pos], dtype=np.int32))


def fakes():
    trunk = FakeTrunk()
    return trunk, {"sentiment": FakeValueModel(trunk, v_sentiment), "safety": FakeValueModel(trunk, v_safety)}


def test_v2_steers_like_v1_on_the_same_logits_and_value_models(tmp_path):
    reqs = {  # request id -> (prompt, weights, beta, k)
        "A": ([1, 2], {"sentiment": 1.0}, 2.0, 3),
        "B": ([4], {"safety": 1.0}, 1.0, 4),
        "C": ([2, 2, 2], {"sentiment": 0.5, "safety": 2.0}, 4.0, 2),
    }
    _, vms1 = fakes()
    trunk2, vms2 = fakes()
    v1 = VASLogitsProcessor(None, "cpu", False, value_models=vms1, stats_dir=tmp_path / "v1")
    rs = ReqStates()
    v2 = VASLogitsProcessorV2(None, rs.lp, value_models=vms2, stats_dir=tmp_path / "v2")
    slot_of = {"A": 5, "B": 1, "C": 3}                # V2: persistent slots, not batch positions
    outputs = {rid: [] for rid in reqs}              # V1: vLLM's live output lists
    v1.update_state(upd(4, added=[(i, params(rid, weights=w, beta=b, top_k=k), p, outputs[rid])
                                  for i, (rid, (p, w, b, k)) in enumerate(reqs.items())]
                          + [(3, params(vas_on=False), [9], [])]))
    plain_slot = 7
    for rid, (p, w, b, k) in reqs.items():
        assert v2.add_request(slot_of[rid], params(rid, weights=w, beta=b, top_k=k)) is True
        rs.admit(slot_of[rid], p)
    assert v2.add_request(plain_slot, params(vas_on=False)) is False   # declined: not a VAS request
    rs.admit(plain_slot, [9])
    for step in range(5):
        # V1 rows in request order; V2 rows in another order each step (the runner reorders them)
        order = ["A", "B", "C", None]
        v2_order = [order[(j + step) % 4] for j in range(4)]
        logits_by_rid = {rid: rand_logits(1, seed=10 * step + j)[0] for j, rid in enumerate(order)}
        l1 = torch.stack([logits_by_rid[r] for r in order])
        l2 = torch.stack([logits_by_rid[r] for r in v2_order])
        got1 = v1.apply(l1.clone())
        got2 = v2.apply(l2.clone(), context(rs, [slot_of[r] if r else plain_slot for r in v2_order]))
        for j, rid in enumerate(v2_order):
            if rid is None:
                assert torch.equal(got2[j], l2[j])    # the declined request is untouched, bit for bit
                continue
            torch.testing.assert_close(got2[j], got1[order.index(rid)], rtol=0, atol=1e-6)
            p, w, b, k = reqs[rid]
            torch.testing.assert_close(got2[j], expected_row(l2[j], p + outputs[rid], w, b, k), rtol=0, atol=1e-5)
        for rid in reqs:                              # both runners commit the same sampled token
            token = int(torch.argmax(got1[order.index(rid)]))
            outputs[rid].append(token)
            rs.commit(slot_of[rid], token)
        rs.commit(plain_slot, 3)
    assert [len(n) for n in trunk2.calls[-1]] == [1, 1, 1]  # incremental: only the new token per request
    # the same receipts
    for rid in reqs:
        a, b = (json.loads((tmp_path / d / f"{rid}.json").read_text()) for d in ("v1", "v2"))
        assert a["steps"] == b["steps"] == 5 and a["kl"] == pytest.approx(b["kl"], abs=1e-6)


def test_v2_slots_are_recycled_and_a_preempted_request_resumes_its_caches(tmp_path):
    trunk, vms = fakes()
    rs = ReqStates()
    proc = VASLogitsProcessorV2(None, rs.lp, value_models=vms, stats_dir=tmp_path)
    proc.add_request(2, params("A"))
    rs.admit(2, [1, 2])
    proc.add_request(4, params("B", top_k=4))
    rs.admit(4, [3])
    for step in range(3):
        got = proc.apply(rand_logits(2, step), context(rs, [2, 4]))
        rs.commit(2, int(torch.argmax(got[0])))
        rs.commit(4, int(torch.argmax(got[1])))
    # A finishes; its slot 2 is recycled for C, whose state starts from its own prompt.
    proc.add_request(2, params("C"))
    rs.admit(2, [7, 7, 7])
    logits = rand_logits(2, 9)
    got = proc.apply(logits.clone(), context(rs, [4, 2]))
    assert trunk.calls[-1] == [[rs.tokens(4)[-1]], [7, 7, 7]]
    torch.testing.assert_close(got[1], expected_row(logits[1], [7, 7, 7], {"sentiment": 1.0}, 2.0, 3), rtol=0,
                               atol=1e-5)
    rs.commit(4, int(torch.argmax(got[0])))
    # B is preempted and re-added in slot 6 with its output so far: its caches come along, nothing redone.
    b_tokens = rs.tokens(4)
    proc.add_request(6, params("B", top_k=4))
    rs.admit(6, b_tokens, prompt_len=1)
    logits = rand_logits(1, 11)
    got = proc.apply(logits.clone(), context(rs, [6]))
    assert trunk.calls[-1] == [[b_tokens[-1]]]  # the new input token only (a fresh cache would see them all)
    torch.testing.assert_close(got[0], expected_row(logits[0], b_tokens, {"sentiment": 1.0}, 2.0, 4), rtol=0,
                               atol=1e-5)
    assert json.loads((tmp_path / "B.json").read_text())["steps"] == 5  # its receipt continued too


def test_v2_a_fault_fails_only_its_own_request(tmp_path):
    trunk = FakeTrunk()

    class Picky(FakeValueModel):
        def values(self, h, cands):
            if any(int(s) % 11 == 0 and int(s) > 0 for s in h[:, 1].tolist()):
                raise RuntimeError("cannot score this state")
            return super().values(h, cands)

    rs = ReqStates()
    proc = VASLogitsProcessorV2(None, rs.lp, value_models={"sentiment": Picky(trunk, v_sentiment)},
                                stats_dir=tmp_path, eos_token_ids=[EOS])
    for slot, rid, prompt in ((0, "ok", [1, 2]), (1, "poison", [11])):
        proc.add_request(slot, params(rid))
        rs.admit(slot, prompt)
    logits = rand_logits(2, 3)
    got = proc.apply(logits.clone(), context(rs, [1, 0]))
    assert _only_eos(got[0])
    torch.testing.assert_close(got[1], expected_row(logits[1], [1, 2], {"sentiment": 1.0}, 2.0, 3), rtol=0, atol=1e-5)
    assert "cannot score" in json.loads((tmp_path / "poison.json").read_text())["error"]


def test_vllm_v2_loader_takes_the_v2_processor_and_refuses_the_v1_one():
    """Why the engine registers the processor of the runner it uses: the V2 loader refuses V1 classes."""
    assert _load_v2_logitsprocs_by_fqcns(["decoders.vas_processor:VASLogitsProcessorV2"]) == [VASLogitsProcessorV2]
    with pytest.raises(ValueError, match="not a subclass"):
        _load_v2_logitsprocs_by_fqcns([VASLogitsProcessor])
    assert processor_for_runner(True) is VASLogitsProcessorV2 and processor_for_runner(False) is VASLogitsProcessor
    VASLogitsProcessorV2.validate_params(params(vas_on=False))  # the frontend's admission check


def test_v2_refuses_speculative_decoding():
    cfg = SimpleNamespace(speculative_config=object())
    with pytest.raises(ValueError, match="speculative"):
        VASLogitsProcessorV2(cfg, ReqStates().lp, value_models={})


def test_the_runner_switch_decides_which_processor_the_engine_registers(monkeypatch):
    """server/engine.py registers processor_for_runner(vllm_config.use_v2_model_runner): with
    VLLM_USE_V2_MODEL_RUNNER=0 the V1 runner (and processor) is used wherever V2 cannot be served;
    =1 forces V2, which on this CPU (no Triton) is refused at startup instead of falling back silently."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from decoders.base_model import materialize_embedded

    args = AsyncEngineArgs(model=str(materialize_embedded()), max_model_len=256, enforce_eager=True, dtype="float32")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    cfg = args.create_engine_config()
    assert cfg.use_v2_model_runner is False and processor_for_runner(cfg.use_v2_model_runner) is VASLogitsProcessor
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(Exception, match="Triton"):
        args.create_engine_config()


def test_engine_dtype_auto_follows_the_hardware(monkeypatch):
    from server import engine

    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: False)
    assert engine.resolve_dtype("auto", on_cpu=True)[0] == "float32"
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: True)
    assert engine.resolve_dtype("auto", on_cpu=True)[0] == "bfloat16"
    assert engine.resolve_dtype("auto", on_cpu=False)[0] == "auto"          # vLLM's: the model's dtype
    assert engine.resolve_dtype("float16", on_cpu=True)[0] == "float16"     # an explicit choice wins
    from server.config import ServerConfig

    assert ServerConfig().engine.dtype == "auto"


def test_tensor_parallel_engine_args_use_ray_workers():
    from server.config import ServerConfig
    from server.engine import engine_parallelism

    assert engine_parallelism(ServerConfig()) == {}
    tp = engine_parallelism(ServerConfig.model_validate({"engine": {"tensor_parallel_size": 2}}))
    assert tp == {"tensor_parallel_size": 2, "pipeline_parallel_size": 1, "distributed_executor_backend": "ray"}
