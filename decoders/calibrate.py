"""Measure reference statistics of each objective on base-model samples.

    python -m decoders.calibrate [--prompt-set chat_mix --limit 64 --samples 2 --max-tokens 64]

Samples the frozen base model (vLLM offline, chat template) at temperature 1 on a packaged
prompt set, scores every (prompt, sample) with each registered objective, and writes
decoders/data/reward_stats.json. Per objective: mean and std (population) for `standardize`,
and `reference` = the median (a quantile, see --reference-quantile) for `log_sigmoid`: a
candidate at the base model's typical reward sits at log σ(0) = −log 2, the point where
further gains start to saturate (Wang et al. 2024).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from decoders.rewards import REWARD_STATS_PATH


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default method)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("quantile of no values")
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(scores: Sequence[float], reference_quantile: float = 0.5) -> dict[str, float]:
    n = len(scores)
    mean = sum(scores) / n
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / n)
    return {
        "mean": mean, "std": std, "reference": quantile(scores, reference_quantile),
        "median": quantile(scores, 0.5), "p05": quantile(scores, 0.05), "p95": quantile(scores, 0.95),
        "min": min(scores), "max": max(scores), "count": n,
    }


def generate(model_dir: str, prompts: list[str], samples: int, max_tokens: int, temperature: float,
             seed: int) -> tuple[list[str], list[str]]:
    """(prompt, response) pairs: `samples` responses per prompt, prompts repeated to match."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, enforce_eager=True, max_model_len=2048, dtype="bfloat16", seed=seed)
    # No per-request seed: vllm-cpu 0.32 crashes on seeded requests ("CPU Generator does not use
    # offset"); the engine-level seed keeps runs reproducible enough for statistics.
    params = SamplingParams(n=samples, max_tokens=max_tokens, temperature=temperature, top_p=1.0)
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=True)
    pairs_p, pairs_r = [], []
    for prompt, out in zip(prompts, outputs):
        for completion in out.outputs:
            pairs_p.append(prompt)
            pairs_r.append(completion.text)
    return pairs_p, pairs_r


def score_all(objectives: dict, prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
    from tqdm import tqdm

    scores: dict[str, list[float]] = {name: [] for name in objectives}
    chunk = 32
    with tqdm(total=len(objectives) * len(prompts), desc="scoring", unit="pair") as bar:
        for name, objective in objectives.items():
            for start in range(0, len(prompts), chunk):
                scores[name].extend(objective(prompts[start:start + chunk], responses[start:start + chunk]))
                bar.update(len(prompts[start:start + chunk]))
    return scores


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from decoders.prompts import PROMPT_SETS, load_prompts
    from decoders.rewards import build_objectives, default_objective_configs
    from decoders.base_model import EMBEDDED_MODEL, resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model path (default: the embedded SmolLM2)")
    parser.add_argument("--prompt-set", default="chat_mix", choices=list(PROMPT_SETS))
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-quantile", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=REWARD_STATS_PATH)
    args = parser.parse_args(argv)

    prompts = load_prompts(args.prompt_set, args.limit, args.seed)
    model_dir = resolve_model(args.model)
    pair_prompts, responses = generate(model_dir, prompts, args.samples, args.max_tokens,
                                       args.temperature, args.seed)
    # Calibrate the objectives as registered by default, without any stats (raw scores only).
    configs = {name: cfg.model_copy(update={"mean": None, "std": None, "reference": None})
               for name, cfg in default_objective_configs().items()}
    objectives = build_objectives(configs)
    scores = score_all(objectives, pair_prompts, responses)

    result = {
        "metadata": {
            "model": args.model, "model_dir": str(model_dir), "prompt_set": args.prompt_set,
            "prompts": len(prompts), "samples_per_prompt": args.samples, "count": len(responses),
            "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
            "reference": f"quantile {args.reference_quantile:g} of base-sample scores",
            "std": "population std", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "objectives": {
            name: {"kind": configs[name].kind, "params": configs[name].params,
                   **summarize(values, args.reference_quantile)}
            for name, values in scores.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for name, stats in result["objectives"].items():
        print(f"{name:10s} mean={stats['mean']:+.4f} std={stats['std']:.4f} reference={stats['reference']:+.4f}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":  # vLLM spawns workers that re-import this module: keep the guard
    main()
