"""Baseline aligned models for Transfer Q* (and the rollout prompts built from them).

A *baseline* is a model already aligned to some reward(s) ``r_BL`` whose rollouts estimate the
value Q*(s, z) of a candidate continuation z (Chakraborty et al. 2024, "Transfer Q Star").
Three kinds are registered in the server config's ``baselines`` (:class:`BaselineConfig`):

* ``prompted``: the *base* model itself, steered by a system prompt toward the objective(s) in
  ``aligned_to``. Rollouts run on the same engine, only the context differs (so vLLM prefix
  caching shares the context across the k rollouts of a step).
* ``lora``: a LoRA adapter on the base model (``path`` = adapter dir). Rollouts run on the same
  engine, in the same continuous batch as the base model's candidates, with
  ``params["lora_request"] = {"lora_name", "lora_path"}``; the engine (server/engine.py) looks the
  name up in ITS OWN config's baselines, loads only the configured path, and turns it into a
  ``vllm.lora.request.LoRARequest`` (LoRA is switched on in the engine when a LoRA baseline is
  configured: ``EngineConfig.enable_lora``). The embedded default ships two, trained by DPO
  (decoders/train_baseline.py, ``make train-baselines``): ``sentiment`` and ``safety``
  (decoders/baseline_adapters/*, each with its card); they are the default baselines of the
  objectives they were trained for, and each is also served as a model of its own
  (``<served model name>-<baseline name>``, server/app.py).
* ``model``: another model served by vLLM. NOT SUPPORTED YET: the server has no second engine
  deployment to roll it out on, so :func:`validate_baselines` (run when the server config is
  loaded) refuses it rather than silently rolling out the base model. The decoder side is ready
  (``transfer_q_decode(rollout_gen=...)`` re-tokenizes prefix + candidate through text; see
  :func:`rollout_generator_name`).

Everything here is pure (no engine, no tokenizer): chat rendering is injected as a
``render_chat(messages) -> list[int]`` callable, so the prompt construction is unit-testable.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from decoders.base import ParamError

BASELINE_PARAM = "alignment.baseline"
# The DPO LoRA adapters trained for the embedded default model (decoders/train_baseline.py).
PACKAGED_ADAPTERS = Path(__file__).resolve().parent / "baseline_adapters"


class BaselineConfig(BaseModel):
    """A baseline aligned model for Transfer Q* (the server config's ``baselines``).

    kind `prompted`: the base model steered by a system prompt; `lora`: a LoRA adapter on the
    base model (`path`: the adapter dir; the engine turns LoRA on for it); `model`: another model
    served by vLLM -- reserved, not supported yet: a server config naming one is refused at load
    (:func:`validate_baselines`).
    """
    model_config = ConfigDict(extra="forbid")

    kind: Literal["prompted", "lora", "model"] = "prompted"
    aligned_to: list[str]
    system_prompt: str | None = None
    path: str | None = None
    description: str = ""


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

_POSITIVE = ("You are a warm, friendly and upbeat assistant. Answer helpfully, using positive, "
             "encouraging and kind wording.")
_HARMLESS = ("You are a careful, harmless assistant. Answer helpfully and politely; never use "
             "profanity, insults, slurs or offensive language, and decline harmful requests gently.")
_ON_TOPIC = ("You are a focused assistant. Answer exactly what the user asked, staying on the "
             "topic of the question and reusing its key terms; do not digress.")
_CONCISE = ("You are a concise assistant. Answer in as few words as possible: one or two short "
            "sentences, no preamble, no repetition.")
_WARM_HARMLESS = ("You are a warm, kind and harmless assistant. Answer helpfully with positive, "
                  "encouraging wording; never use profanity, insults or offensive language.")


def packaged_adapters(root: Path = PACKAGED_ADAPTERS) -> dict[str, BaselineConfig]:
    """The shipped DPO LoRA baselines of the embedded default model: one per adapter dir under
    ``root`` (name = dir name; aligned to the objective its card names)."""
    out: dict[str, BaselineConfig] = {}
    for cfg in sorted(root.glob("*/adapter_config.json")):
        d = cfg.parent
        card_path = d / "card.json"
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        objective = card.get("objective", d.name)
        out[d.name] = BaselineConfig(kind="lora", aligned_to=[objective], path=str(d),
                                     description=f"LoRA adapter trained by DPO for {objective} "
                                                 f"(decoders/baseline_adapters/{d.name}/README.md).")
    return out


def default_baseline_configs(embedded: bool = True) -> dict[str, BaselineConfig]:
    """The default baselines: for the embedded default model its DPO LoRA adapters
    (:func:`packaged_adapters`, sentiment and safety); for any model one ``prompted`` baseline per
    default objective (sentiment, safety, relevance, brevity), plus one for the sentiment+safety pair."""
    adapters = packaged_adapters() if embedded else {}
    return {**adapters, **_prompted_defaults()}


def _prompted_defaults() -> dict[str, BaselineConfig]:
    return {
        "positive": BaselineConfig(kind="prompted", aligned_to=["sentiment"], system_prompt=_POSITIVE,
                                   description="Base model prompted for warm, upbeat, positive wording."),
        "harmless": BaselineConfig(kind="prompted", aligned_to=["safety"], system_prompt=_HARMLESS,
                                   description="Base model prompted to avoid profanity and offensive language."),
        "on_topic": BaselineConfig(kind="prompted", aligned_to=["relevance"], system_prompt=_ON_TOPIC,
                                   description="Base model prompted to stay on the question's topic."),
        "concise": BaselineConfig(kind="prompted", aligned_to=["brevity"], system_prompt=_CONCISE,
                                  description="Base model prompted for short answers."),
        "warm_harmless": BaselineConfig(kind="prompted", aligned_to=["sentiment", "safety"],
                                        system_prompt=_WARM_HARMLESS,
                                        description="Base model prompted to be both positive and harmless."),
    }


def validate_baselines(baselines: Mapping[str, BaselineConfig], objectives: Iterable[str]) -> None:
    """Check a baseline registry against the registered objectives.

    Called when the server config is loaded (``ServerConfig`` validation, server/config.py), so a
    bad registry fails at startup. Raises ValueError naming the first offending baseline.
    """
    known = set(objectives)
    for name, bl in baselines.items():
        if bl.kind == "model":
            raise ValueError(f"baseline {name!r}: kind 'model' (another served model) is not supported yet: "
                             f"the server has no second engine to roll it out on. Use kind 'prompted' "
                             f"(a system prompt on the base model) or 'lora' (an adapter on the base model)")
        if not bl.aligned_to:
            raise ValueError(f"baseline {name!r}: aligned_to must name at least one objective")
        missing = [o for o in bl.aligned_to if o not in known]
        if missing:
            raise ValueError(f"baseline {name!r}: aligned_to names unregistered objective(s) {missing}; "
                             f"registered: {sorted(known)}")
        if bl.kind == "lora" and not bl.path:
            raise ValueError(f"baseline {name!r}: kind {bl.kind!r} needs a path")


def load_baselines(configured: Mapping[str, BaselineConfig] | None, objectives: Iterable[str], *,
                   embedded: bool = True, lora: bool = True) -> dict[str, BaselineConfig]:
    """The baseline registry a server uses: ``configured`` (validated against ``objectives``), or,
    when None, the defaults whose objectives are all registered (a config with its own objectives
    and no baselines gets only the defaults that fit it, never one that would score an
    unregistered objective). The default LoRA adapters belong to the embedded model: they are
    registered only for it (``embedded``) and when LoRA is not switched off (``lora``)."""
    names = list(objectives)
    if configured is not None:
        validate_baselines(configured, names)
        return dict(configured)
    known = set(names)
    return {n: bl for n, bl in default_baseline_configs(embedded=embedded and lora).items()
            if set(bl.aligned_to) <= known}


def _overlap(weights: Mapping[str, float], bl: BaselineConfig) -> tuple[float, int]:
    total = sum(float(weights.get(o, 0.0)) for o in set(bl.aligned_to))
    extra = sum(1 for o in set(bl.aligned_to) if float(weights.get(o, 0.0)) == 0.0)
    return total, extra


def default_baseline_for(weights: Mapping[str, float], baselines: Mapping[str, BaselineConfig]) -> str:
    """The baseline that best fits a reward mixture.

    A trained baseline (``lora``) aligned to an objective the request weights positively comes
    first: a model trained for the reward is what Transfer Q* assumes, and a mixture it was not
    trained for (e.g. sentiment + safety from the sentiment adapter) is indirect transfer, as in
    the paper. Among the candidates: highest total weight of the weighted objectives it is aligned
    to (a negative weight counts against a baseline aligned to that objective); ties: fewest
    aligned objectives the request does not weight (prefer an exact match), then name.
    """
    if not baselines:
        raise ParamError("no baselines are registered; Transfer Q* needs one", param=BASELINE_PARAM)

    def key(name: str):
        total, extra = _overlap(weights, baselines[name])
        return (-total, extra, name)

    trained = [n for n, bl in baselines.items() if bl.kind == "lora" and _overlap(weights, bl)[0] > 0]
    return min(trained or baselines, key=key)


def resolve_baseline(name: str | None, weights: Mapping[str, float],
                     baselines: Mapping[str, BaselineConfig]) -> tuple[str, BaselineConfig]:
    """``name`` (the request's ``alignment.baseline``) or the default for ``weights``."""
    if name is None:
        name = default_baseline_for(weights, baselines)
    if name not in baselines:
        raise ParamError(f"unknown baseline {name!r} in alignment.baseline; registered baselines: "
                         f"{', '.join(sorted(baselines)) or '(none)'}", param=BASELINE_PARAM,
                         code="unknown_baseline")
    return name, baselines[name]


def resolve_transfer(transfer: str, weights: Mapping[str, float], baseline_aligned_to: Sequence[str]) -> str:
    """``"direct"`` or ``"indirect"``.

    ``auto``: direct when the baseline is aligned to every objective with a non-zero weight and
    all those weights are positive (a negative weight asks for the opposite of what the
    baseline was aligned to); otherwise indirect. An all-zero mixture is direct (Q = 0 anyway).
    """
    if transfer in ("direct", "indirect"):
        return transfer
    if transfer != "auto":
        raise ParamError(f"alignment.transfer must be 'auto', 'direct' or 'indirect', got {transfer!r}",
                         param="alignment.transfer")
    aligned = set(baseline_aligned_to)
    active = {o: float(w) for o, w in weights.items() if float(w) != 0.0}
    if all(o in aligned and w > 0 for o, w in active.items()):
        return "direct"
    return "indirect"


# --------------------------------------------------------------------------------------------
# Rollout prompts
# --------------------------------------------------------------------------------------------

Messages = list[dict[str, Any]]


def _prepend_text(content: Any, text: str) -> Any:
    if content is None or content == "":
        return text
    if isinstance(content, str):
        return f"{text}\n\n{content}"
    if isinstance(content, list):  # OpenAI content parts
        return [{"type": "text", "text": text}] + list(content)
    return f"{text}\n\n{content}"


def baseline_messages(baseline: BaselineConfig, messages: Sequence[Mapping[str, Any]],
                      system_mode: str = "prepend") -> Messages:
    """The baseline's chat context for a chat request.

    With a ``system_prompt``: ``system_mode="prepend"`` (default) puts it first in the request's
    system message (the request's own system instructions are kept after it) or adds a system
    message when there is none; ``"replace"`` drops the request's system message(s) and uses the
    baseline's alone. Without a ``system_prompt`` the messages are returned unchanged (copied).
    """
    msgs = [dict(m) for m in messages]
    sp = baseline.system_prompt
    if not sp:
        return msgs
    if system_mode == "replace":
        return [{"role": "system", "content": sp}] + [m for m in msgs if m.get("role") != "system"]
    if system_mode != "prepend":
        raise ValueError(f"system_mode must be 'prepend' or 'replace', got {system_mode!r}")
    if msgs and msgs[0].get("role") == "system":
        msgs[0]["content"] = _prepend_text(msgs[0].get("content"), sp)
        return msgs
    return [{"role": "system", "content": sp}] + msgs


def build_rollout_context(baseline: BaselineConfig, messages_or_prompt: Any, *,
                          render_chat: Callable[[Messages], list[int]] | None = None,
                          encode: Callable[[str], list[int]] | None = None,
                          system_mode: str = "prepend") -> list[int]:
    """Token ids of the baseline's context (what the rollouts continue from, before the answer).

    * chat request (a list of message dicts): ``render_chat(baseline_messages(...))``.
      ``render_chat`` must apply the chat template *with the generation prompt*, exactly as the
      base prompt is rendered, so that ``context + answer-so-far`` is a well-formed prompt.
    * completion request, text prompt: ``encode(system_prompt + "\\n\\n" + prompt)`` (or
      ``encode(prompt)`` without a system prompt).
    * completion request, token-id prompt: ``encode(system_prompt + "\\n\\n") + prompt``.
    """
    if isinstance(messages_or_prompt, str):
        if encode is None:
            raise ValueError("a text prompt needs `encode`")
        sp = baseline.system_prompt
        return list(encode(f"{sp}\n\n{messages_or_prompt}" if sp else messages_or_prompt))
    seq = list(messages_or_prompt)
    if seq and all(isinstance(t, int) for t in seq):
        sp = baseline.system_prompt
        if not sp:
            return seq
        if encode is None:
            raise ValueError("a token-id prompt with a system prompt needs `encode`")
        return list(encode(f"{sp}\n\n")) + seq
    if render_chat is None:
        raise ValueError("a chat request needs `render_chat`")
    return list(render_chat(baseline_messages(baseline, seq, system_mode)))


def build_rollout_prompt(baseline: BaselineConfig, messages_or_prompt: Any,
                         prefix_ids: Sequence[int] = (), candidate_ids: Sequence[int] = (), *,
                         render_chat: Callable[[Messages], list[int]] | None = None,
                         encode: Callable[[str], list[int]] | None = None,
                         system_mode: str = "prepend") -> list[int]:
    """The full rollout prompt: baseline context + already generated prefix + candidate."""
    ctx = build_rollout_context(baseline, messages_or_prompt, render_chat=render_chat, encode=encode,
                                system_mode=system_mode)
    return ctx + list(prefix_ids) + list(candidate_ids)


def rollout_extra_params(name: str, baseline: BaselineConfig) -> dict[str, Any]:
    """Extra generate params for the baseline's rollouts (``lora`` → a LoRA request)."""
    if baseline.kind == "lora":
        return {"lora_request": {"lora_name": name, "lora_path": baseline.path}}
    return {}


def rollout_generator_name(name: str, baseline: BaselineConfig) -> str | None:
    """Which generator runs the rollouts: ``None`` = the base engine (prompted, lora); for
    ``model`` (not supported by the server yet, see :func:`validate_baselines`), the separately
    served model (its ``path``, or the baseline name)."""
    if baseline.kind == "model":
        return baseline.path or name
    return None


@dataclass
class RolloutTarget:
    """Everything a decoder needs to roll out a baseline for one request."""
    name: str
    baseline: BaselineConfig
    context_ids: list[int]
    params: dict[str, Any] = field(default_factory=dict)
    generator: str | None = None

    @property
    def aligned_to(self) -> list[str]:
        return list(self.baseline.aligned_to)


def prepare_rollout(name: str | None, weights: Mapping[str, float], baselines: Mapping[str, BaselineConfig],
                    messages_or_prompt: Any, *, render_chat: Callable[[Messages], list[int]] | None = None,
                    encode: Callable[[str], list[int]] | None = None,
                    system_mode: str = "prepend") -> RolloutTarget:
    """Resolve the baseline (explicit or default) and build its rollout context.

    For ``model`` baselines pass that model's ``render_chat``/``encode``.
    """
    name, bl = resolve_baseline(name, weights, baselines)
    ctx = build_rollout_context(bl, messages_or_prompt, render_chat=render_chat, encode=encode,
                                system_mode=system_mode)
    return RolloutTarget(name=name, baseline=bl, context_ids=ctx, params=rollout_extra_params(name, bl),
                         generator=rollout_generator_name(name, bl))
