"""The engine deployment: one vLLM v1 ``AsyncLLM`` with continuous batching across requests.

Everything above it talks to it through a small async interface (Ray Serve handle calls):
  * ``stream(prompt_token_ids, params, request_id)``: an async generator of ``StreamChunk``s,
    one per engine step (DELTA mode), for plain and token-level-steered (VAS) decoding;
  * ``generate(prompts, params, request_id)``: many prompts with the same params as one batch
    (best-of-N candidates, Transfer Q* rollouts), returning finished ``Completion``s;
  * ``abort(request_id)``, ``info()``, ``check_health()``.
Chunks and completions are the small dataclasses of decoders/base.py (cheap to pickle across Ray).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator

from ray import serve

from decoders.base import Completion, ParamError, StreamChunk, TokenLogprob, TopLogprob
from decoders.base_model import resolve_model
from server.config import ServerConfig
from server import engine_forkserver
from server.cpu_layout import restore_cpus
from server.routing import ReplicaGone

logger = logging.getLogger("ray.serve")

_VAS_STATS_WAIT_S = 0.5


def _completion(out) -> Completion:
    """A vLLM CompletionOutput as the decoders' Completion (raw logprobs, most likely first)."""
    logprobs = None
    if out.logprobs is not None:
        logprobs = []
        for tok, step in zip(out.token_ids, out.logprobs):
            chosen = step.get(tok)
            top = sorted(step.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
            logprobs.append(TokenLogprob(
                id=tok, logprob=chosen.logprob if chosen is not None else float("-inf"),
                token=chosen.decoded_token if chosen is not None else None,
                top=[TopLogprob(tid, lp.logprob, lp.decoded_token) for tid, lp in top]))
    return Completion(text=out.text, token_ids=list(out.token_ids), cumulative_logprob=out.cumulative_logprob,
                      finish_reason=out.finish_reason, logprobs=logprobs, stop_reason=out.stop_reason,
                      index=out.index)


def lora_adapters(config: ServerConfig) -> dict[str, str]:
    """LoRA adapters this engine may load: baseline name -> adapter path, from the server config only
    (its baselines, or the default ones: ServerConfig.baseline_registry)."""
    return {name: bl.path for name, bl in sorted(config.baseline_registry().items())
            if bl.kind == "lora" and bl.path}


def lora_enabled(config: ServerConfig) -> bool:
    """``engine.enable_lora``, or (None) whether any LoRA baseline is configured."""
    if config.engine.enable_lora is not None:
        return bool(config.engine.enable_lora)
    return bool(lora_adapters(config))


def split_lora(params: dict[str, Any], adapters: dict[str, str]) -> tuple[dict[str, Any], Any]:
    """Pop ``lora_request`` from generate params and resolve it against the configured adapters.

    ``lora_request`` is ``{"lora_name": <baseline name>, ...}`` (decoders/baselines.py); the adapter
    path is taken from the server config, never from the params: an unknown name, or a
    ``lora_path`` other than the configured one, is refused (nothing a request carries can make the
    engine load a file it was not configured with). Returns (params without it, LoRARequest | None).
    """
    params = dict(params)
    req = params.pop("lora_request", None)
    if req is None:
        return params, None
    if not isinstance(req, dict) or not isinstance(req.get("lora_name"), str):
        raise ValueError("lora_request must be {'lora_name': <configured LoRA baseline>}")
    name = req["lora_name"]
    if name not in adapters:
        raise ValueError(f"LoRA adapter {name!r} is not configured on this engine "
                         f"(configured: {sorted(adapters) or 'none'})")
    path = adapters[name]
    if req.get("lora_path") not in (None, path):
        raise ValueError(f"LoRA adapter {name!r}: lora_path does not match the configured path")
    from vllm.lora.request import LoRARequest

    # Stable ids (1-based, by sorted name): vLLM keys adapters and their prefix-cache entries by id.
    lora_id = sorted(adapters).index(name) + 1
    return params, LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (x86: AVX512-BF16 or AMX-BF16; Arm: BF16). Elsewhere torch
    emulates bf16 matmuls, ~80x slower than fp32 (seen on an AVX2-only AMD EPYC)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in info.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_dtype(configured: str, on_cpu: bool) -> tuple[str, str]:
    """(the dtype vLLM gets, why). ``auto``: vLLM's own choice on GPUs (the model's, bf16 or fp16);
    on CPUs bf16 only where the CPU computes in bf16, fp32 elsewhere."""
    if configured != "auto":
        return configured, "engine.dtype in the config"
    if not on_cpu:
        return "auto", "auto: the model's dtype on this accelerator"
    if cpu_has_bf16():
        return "bfloat16", "auto: this CPU has bf16 instructions (avx512_bf16 / amx_bf16)"
    return "float32", "auto: this CPU has no bf16 instructions, so bf16 would be emulated (slow)"


def engine_parallelism(config: ServerConfig) -> dict[str, Any]:
    """Tensor/pipeline parallel engine args: the workers run as Ray actors in the replica's placement
    group (one bundle per GPU, ``placement_group_bundles`` in server/app.py), as Ray Serve LLM does."""
    e = config.engine
    if e.tensor_parallel_size * e.pipeline_parallel_size == 1:
        return {}
    return {"tensor_parallel_size": e.tensor_parallel_size, "pipeline_parallel_size": e.pipeline_parallel_size,
            "distributed_executor_backend": "ray"}


def batching_args(config: ServerConfig, on_cpu: bool) -> dict[str, Any]:
    e = config.engine
    chunked = e.enable_chunked_prefill
    if chunked is None:
        chunked = False if on_cpu else None
    if chunked is False:
        # Whole prompts only: the step token budget must hold the longest one.
        return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(e.max_model_len, 2048)}
    return {}


def lora_args(config: ServerConfig) -> dict[str, Any]:
    if not lora_enabled(config):
        return {}
    max_loras = config.engine.max_loras or max(len(lora_adapters(config)), 1)
    return {"enable_lora": True, "max_lora_rank": config.engine.max_lora_rank, "max_loras": max_loras}


async def refusals_as_param_errors(outputs: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """vLLM's outputs; a request vLLM refuses at admission (its input validation: a VLLMClientError, or a
    ValueError before the first output) becomes a ParamError, a 400 at the edge instead of a 500."""
    from vllm.exceptions import VLLMClientError

    started = False
    try:
        async for out in outputs:
            started = True
            yield out
    except VLLMClientError as e:
        raise ParamError(f"the engine refused the request: {e}", param=getattr(e, "parameter", None)) from None
    except ValueError as e:
        if started:
            raise
        raise ParamError(f"the engine refused the request: {e}") from None


def engine_args(config: ServerConfig, model_path: str, dtype: str, on_cpu: bool, one_process: bool):
    """vLLM's AsyncEngineArgs from the server config (``engine.extra`` last: it overrides)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    e = config.engine
    return AsyncEngineArgs(**{
        "model": model_path,
        "served_model_name": config.model_name,
        "max_model_len": e.max_model_len,
        "enforce_eager": e.enforce_eager,
        "enable_prefix_caching": e.enable_prefix_caching,
        "max_num_seqs": e.max_num_seqs,
        "dtype": dtype,
        "seed": e.seed,
        "max_logprobs": e.max_logprobs,
        **engine_parallelism(config),
        **batching_args(config, on_cpu),
        **lora_args(config),
        **({"distributed_executor_backend": "uni"} if one_process else {}),
        **e.extra,
    })


def one_process_on_cpu(config: ServerConfig, on_cpu: bool) -> bool:
    """Whether the engine runs vLLM's worker inside its engine core (``engine.cpu_one_process``; not
    with several workers, nor where ``engine.extra`` names vLLM's executor)."""
    e = config.engine
    return (on_cpu and e.cpu_one_process and not engine_parallelism(config)
            and "distributed_executor_backend" not in e.extra)


class Engine:
    """vLLM AsyncLLM behind the interface above; usable without Ray (tests, CLIs, benchmarks)."""

    def __init__(self, config: ServerConfig, *, enable_vas: bool = True):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.engine.cpu_kvcache_gib))
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        self.one_process = one_process_on_cpu(config, on_cpu)
        if on_cpu:
            restore_cpus()  # a replica started after the serving layer was pinned (server/cpu_layout.py)
        # Its imports run while this process imports the rest of vLLM and builds the config.
        forkserver = engine_forkserver.start() if self.one_process else None
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.executor import Executor

        self.config = config
        self.model_path = resolve_model(config.model)
        self.stats_dir = Path(tempfile.mkdtemp(prefix="alignserve-vas-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        dtype, why = resolve_dtype(config.engine.dtype, on_cpu)
        self.lora_adapters = lora_adapters(config)
        with contextlib.ExitStack() as scope:  # environment settings held until the engine core is started
            if self.one_process:
                # vLLM's CPU platform turns the uniprocess executor into its multiprocess one unless this
                # is 0 when the config is made ("it is not possible to set the OMP environment correctly"):
                # the engine core is started below with the OpenMP settings vLLM gives its worker process.
                from vllm.utils.system_utils import set_env_var

                scope.enter_context(set_env_var("VLLM_ENABLE_V1_MULTIPROCESSING", "0"))
            args = engine_args(config, self.model_path, dtype, on_cpu, self.one_process)
            vllm_config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
            self.dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
            logger.info("engine dtype: %s (%s)", self.dtype, why)
            self.value_model_objectives: list[str] = []
            self.model_runner = "V2" if vllm_config.use_v2_model_runner else "V1"
            if enable_vas:
                # The processor must implement the interface of the runner vLLM will use: the V2 runner's
                # loader refuses V1-interface processors (VLLM_USE_V2_MODEL_RUNNER=0|1 forces the runner).
                processor, self.value_model_objectives = self._vas_processor(config, vllm_config.use_v2_model_runner)
                if processor is not None:
                    vllm_config.model_config.logits_processors = [processor]
                    logger.info("VAS: value models %s steer through the Model Runner %s logits processor %s",
                                self.value_model_objectives, self.model_runner, processor.__name__)
            from server.process_guard import mark_owner

            mark_owner()  # the engine core and its workers die with this process (server/process_guard.py)
            if self.one_process:
                scope.enter_context(engine_forkserver.worker_omp_env(vllm_config))
                if forkserver is not None:
                    scope.enter_context(forkserver.engine_core_start())
            t0 = time.time()
            self.llm = AsyncLLM(vllm_config=vllm_config, executor_class=Executor.get_class(vllm_config),
                                log_requests=args.enable_log_requests, log_stats=not args.disable_log_stats,
                                usage_context=UsageContext.ENGINE_CONTEXT)
        self.tokenizer = self.llm.tokenizer
        self.max_model_len = config.engine.max_model_len
        logger.info("vLLM engine ready in %.1fs: %s (runner %s, %s, %s, value models: %s)", time.time() - t0,
                    self.model_path, self.model_runner, self.dtype,
                    "worker inside the engine-core process" if self.one_process else "vLLM's process layout",
                    self.value_model_objectives or "none")

    def _vas_processor(self, config: ServerConfig, use_v2: bool) -> tuple[type | None, list[str]]:
        from decoders import vas_processor as vas

        dirs = config.value_models if config.value_models is not None else vas.default_value_model_dirs()
        if not dirs:
            return None, []
        # Value models follow the engine's dtype, on the device of the worker that samples.
        os.environ[vas.VAS_CONFIG_ENV] = json.dumps({"value_models": dirs, "stats_dir": str(self.stats_dir),
                                                    "dtype": self.dtype})
        return vas.processor_for_runner(use_v2), sorted(dirs)

    # ------------------------------------------------------------------ the async interface

    def _sampling_params(self, params: dict[str, Any], request_id: str, delta: bool):
        """(SamplingParams, LoRARequest | None): ``lora_request`` is not a SamplingParams field."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params, lora = split_lora(params, getattr(self, "lora_adapters", {}))
        extra = params.pop("extra_args", None)
        if extra is not None:
            extra = {"alignserve": {"request_id": request_id, **extra}}
        try:
            sp = SamplingParams(**params, extra_args=extra,
                                output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY)
        except ValueError as e:  # vLLM's own checks of the sampling parameters: the request's fault
            raise ParamError(f"the engine refused the request's sampling parameters: {e}") from None
        return sp, lora

    async def stream(self, prompt_token_ids: list[int], params: dict[str, Any], request_id: str,
                     delta: bool = True) -> AsyncIterator[StreamChunk]:
        """One StreamChunk per engine step (delta=True), or once with the finished outputs
        (delta=False: fewer messages for non-streamed requests); a VAS choice's value-model
        statistics come with its last chunk."""
        n = params.get("n", 1)
        if n > 1 and params.get("extra_args", {}).get("vas"):
            # VAS keeps per-request value-model state keyed by our request id, so its n choices run
            # as n requests (vLLM's own n fan-out would share one id); seeds stay distinct.
            async for msg in self._merge_choices(prompt_token_ids, params, request_id, n, delta):
                yield msg
            return
        async for msg in self._stream_one(prompt_token_ids, params, request_id, delta=delta):
            yield msg

    async def _stream_one(self, prompt_token_ids: list[int], params: dict[str, Any], request_id: str,
                          index: int | None = None, delta: bool = True) -> AsyncIterator[StreamChunk]:
        sp, lora = self._sampling_params(params, request_id, delta=delta)
        wants_vas = bool(sp.extra_args and "vas" in sp.extra_args["alignserve"])
        sent_prompt = False
        try:
            async for out in refusals_as_param_errors(self.llm.generate(
                    {"prompt_token_ids": prompt_token_ids}, sp, request_id, lora_request=lora)):
                choices = [_completion(c) for c in out.outputs]
                if index is not None:
                    for c in choices:
                        c.index = index
                chunk = StreamChunk(outputs=choices)
                if out.prompt_logprobs is not None and sent_prompt is False:
                    sent_prompt = True
                    chunk.prompt_logprobs = self._prompt_records(prompt_token_ids, out.prompt_logprobs)
                if out.finished and wants_vas:
                    chunk.vas = {index or 0: await self._vas_stats(request_id)}
                yield chunk
        finally:
            self._drop_vas_stats(request_id)

    async def _merge_choices(self, prompt_token_ids, params, request_id, n, delta) -> AsyncIterator[StreamChunk]:
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int) -> None:
            sub = dict(params, n=1, seed=None if params.get("seed") is None else params["seed"] + i)
            try:
                async for msg in self._stream_one(prompt_token_ids, sub, f"{request_id}-{i}", index=i, delta=delta):
                    await queue.put(msg)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                await queue.put(exc)
            finally:
                await queue.put(done)

        tasks = [asyncio.create_task(pump(i)) for i in range(n)]
        try:
            remaining = n
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def generate(self, prompts: list[list[int]], params: dict[str, Any],
                       request_id: str) -> list[list[Completion]]:
        """All prompts at once (the engine batches them); per prompt, its n completions by index."""
        async def one(i: int, ids: list[int]) -> list[Completion]:
            sp, lora = self._sampling_params(params, f"{request_id}-{i}", delta=False)
            final = None
            async for out in refusals_as_param_errors(self.llm.generate(
                    {"prompt_token_ids": ids}, sp, f"{request_id}-{i}", lora_request=lora)):
                final = out
            return sorted((_completion(c) for c in final.outputs), key=lambda c: c.index)

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    def _prompt_records(self, prompt_ids: list[int], prompt_logprobs) -> list[TokenLogprob]:
        """The prompt's log-prob records (echo): the first token has none, as in OpenAI's API."""
        first = prompt_ids[0]
        records = [TokenLogprob(id=first, logprob=None, token=self.tokenizer.decode([first]), top=[])]
        for tok, step in zip(prompt_ids[1:], prompt_logprobs[1:]):
            chosen = (step or {}).get(tok)
            top = sorted((step or {}).items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
            records.append(TokenLogprob(
                id=tok, logprob=chosen.logprob if chosen is not None else float("-inf"),
                token=chosen.decoded_token if chosen is not None and chosen.decoded_token is not None
                else self.tokenizer.decode([tok]),
                top=[TopLogprob(tid, lp.logprob, lp.decoded_token) for tid, lp in top]))
        return records

    # ------------------------------------------------------------------ VAS receipts

    async def _vas_stats(self, request_id: str) -> dict[str, Any] | None:
        # The processor writes the file synchronously before sampling each token, so it is
        # complete when the last token arrives; the short wait only covers filesystem latency.
        path = self.stats_dir / f"{request_id}.json"
        deadline = time.monotonic() + _VAS_STATS_WAIT_S
        while True:
            try:
                return json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                if time.monotonic() > deadline:
                    return None
                await asyncio.sleep(0.01)

    def _drop_vas_stats(self, request_id: str) -> None:
        (self.stats_dir / f"{request_id}.json").unlink(missing_ok=True)

    async def warm_up(self) -> None:
        """The first forward passes on CPU are slow (kernel selection); pay for them before traffic."""
        t0 = time.time()
        for n_prompt in (8, 256):
            await self.generate([[self.tokenizer.eos_token_id or 0] * n_prompt], {"max_tokens": 4, "n": 2}, f"warmup-{n_prompt}")
        logger.info("engine warm-up took %.1fs", time.time() - t0)

    async def info(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "max_model_len": self.max_model_len,
                "value_models": self.value_model_objectives, "dtype": self.dtype, "model_runner": self.model_runner}

    async def check_health(self) -> None:
        await self.llm.check_health()

    def unfinished(self) -> int:
        """Requests the engine is still working on (generating or queued)."""
        return self.llm.output_processor.get_num_unfinished_requests()

    async def abort(self, request_id_prefix: str) -> int:
        """Abort every engine request of one API request (all ids derive from its id); returns how many."""
        if not request_id_prefix:
            return 0
        ids = [r for r in list(self.llm.output_processor.external_req_ids) if r.startswith(request_id_prefix)]
        if ids:
            await self.llm.abort(ids)
        return len(ids)

    def shutdown(self) -> None:
        # Dropped, so that vLLM's AsyncLLM.__del__ runs now: the frames of this __init__ can outlive it
        # (an exception caught during an import keeps them), and at interpreter exit that __del__
        # finds vLLM's globals gone ("Exception ignored ... TypeError").
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()


class Budget:
    """The sequences this engine replica has admitted (``limits.max_concurrent_cost`` of them at most),
    each held until its request releases it or its lease runs out (an ingress that died)."""

    def __init__(self, capacity: int, lease_s: float):
        self.capacity, self.lease_s = capacity, lease_s
        self.admitted: dict[str, tuple[int, float]] = {}

    def used(self) -> int:
        now = time.monotonic()
        for rid in [r for r, (_, until) in self.admitted.items() if until < now]:
            logger.warning("budget lease of request %s expired without a release", rid)
            del self.admitted[rid]
        return sum(n for n, _ in self.admitted.values())

    def admit(self, request_id: str, sequences: int) -> bool:
        if self.used() + sequences > self.capacity:
            return False
        self.admitted[request_id] = (sequences, time.monotonic() + self.lease_s)
        return True

    def release(self, request_id: str) -> None:
        self.admitted.pop(request_id, None)


def replica_id() -> str:
    """This Ray Serve replica's unique id (``local`` outside a replica)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a replica (tests, CLIs)
        return "local"


@serve.deployment(name="EngineDeployment", health_check_period_s=10, health_check_timeout_s=30)
class EngineDeployment:
    """Ray Serve replica owning one ``Engine`` and the admission budget of the work it runs.

    Every call of a request after its admission names this replica (``replica``; server/routing.py
    routes it here) and is refused by any other. The replica reports its load to the
    MetricsDeployment every second and its free budget to the router (``record_routing_stats``)."""

    async def __init__(self, config: dict[str, Any], metrics=None):
        cfg = ServerConfig.model_validate(config)
        self.replica = replica_id()
        limits = cfg.limits
        self.budget = Budget(limits.max_concurrent_cost, limits.request_timeout_s + limits.drain_timeout_s + 60)
        self.engine = Engine(cfg)
        await self.engine.warm_up()
        self.metrics = metrics
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever()) if metrics else None

    def _here(self, replica: str | None) -> None:
        if replica is not None and replica != self.replica:
            raise ReplicaGone(f"engine replica {replica} is gone (this is {self.replica})")

    async def admit(self, request_id: str, sequences: int, exclude_replicas: list[str] | None = None) -> dict[str, Any]:
        """Take ``sequences`` of this replica's budget for a request, or say it is full."""
        ok = self.budget.admit(request_id, sequences)
        return {"admitted": ok, "replica": self.replica, "used": self.budget.used(), "capacity": self.budget.capacity}

    async def release(self, request_id: str, replica: str | None = None) -> None:
        self._here(replica)
        self.budget.release(request_id)

    async def stream(self, prompt_token_ids: list[int], params: dict[str, Any], request_id: str, delta: bool = True,
                     replica: str | None = None):
        self._here(replica)
        try:
            async for msg in self.engine.stream(prompt_token_ids, params, request_id, delta):
                yield msg
        except ParamError as e:
            # A refusal of the client's parameters (a 400) is an answer, not a failed call, which Ray
            # Serve would log at ERROR with its traceback; server/handles.py raises it again.
            yield e

    async def generate(self, prompts: list[list[int]], params: dict[str, Any], request_id: str,
                       replica: str | None = None) -> list[list[Completion]] | ParamError:
        self._here(replica)
        try:
            return await self.engine.generate(prompts, params, request_id)
        except ParamError as e:
            return e  # an answer, as in ``stream``

    async def info(self) -> dict[str, Any]:
        return {**await self.engine.info(), "replica": self.replica}

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def abort(self, request_id_prefix: str, replica: str | None = None) -> int:
        self._here(replica)
        return await self.engine.abort(request_id_prefix)

    async def load(self, replica: str | None = None) -> dict[str, Any]:
        self._here(replica)
        return {"replica": self.replica, "unfinished": self.engine.unfinished(), "cost_in_flight": self.budget.used(),
                "capacity": self.budget.capacity}

    def record_routing_stats(self) -> dict[str, float]:
        """For the router: admission calls prefer the replica with the most free budget."""
        return {"free": float(self.budget.capacity - self.budget.used())}

    async def _report_forever(self) -> None:
        while True:
            try:
                await self.metrics.push.remote([], "engine", self.replica, await self.load())
            except Exception:  # noqa: BLE001 - metrics must never stop the engine
                logger.debug("engine load report failed", exc_info=True)
            await asyncio.sleep(1.0)

    def __del__(self):
        if getattr(self, "_reporter", None) is not None:
            self._reporter.cancel()
        try:
            self.engine.shutdown()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
