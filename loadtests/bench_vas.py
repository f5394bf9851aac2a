"""Value models inside the bare vLLM engine: mean reward of VAS against plain and top-k sampling.

    python -m loadtests.bench_vas [--value-models sentiment=DIR,safety=DIR] [--prompts rotten_tomatoes]
        [--conditions 'none;topk;sentiment=1@2;sentiment=1@4'] [--samples 2] [--max-tokens 48]

No server: one offline ``vllm.LLM`` with the VAS logits processor, all requests of a condition as
one batch, on held-out prompts (decoders.prompts.heldout_prompts, never used for training). Every
condition answers the same (prompt, seed) pairs. A condition is ``none`` (plain sampling),
``topk`` (the VAS decoder with beta 0: top-k sampling, no value model) or
``objective=w[+objective=w...]@beta``. Prints mean reward ± standard error per scored objective
and the batch wall time (a ratio between conditions of one run; the machine may be shared).
Use it to check a freshly trained checkpoint before shipping it (docs/vas.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time


def parse_condition(cond: str, default_objective: str) -> dict | None:
    """The ``vas`` extra_args of a condition (None: plain sampling)."""
    if cond == "none":
        return None
    if cond == "topk":
        return {"weights": {default_objective: 1.0}, "beta": 0.0, "top_k": 20}
    weights, _, beta = cond.partition("@")
    parsed = {}
    for part in weights.split("+"):
        name, _, w = part.partition("=")
        parsed[name] = float(w or 1)
    return {"weights": parsed, "beta": float(beta or 2.0), "top_k": 20}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--value-models", default=None,
                    help="objective=checkpoint dir, comma-separated (default: the shipped ones)")
    ap.add_argument("--prompts", default="rotten_tomatoes", help="packaged prompt set (its held-out part is used)")
    ap.add_argument("--limit", type=int, default=64, help="held-out prompts")
    ap.add_argument("--samples", type=int, default=2, help="seeded samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--conditions", default="none;topk;sentiment=1@2;sentiment=1@4;sentiment=1@8")
    ap.add_argument("--score", default="sentiment,safety", help="objectives to report")
    args = ap.parse_args(argv)

    from decoders.vas_processor import VAS_CONFIG_ENV, default_value_model_dirs

    if args.value_models:
        models = dict(kv.split("=", 1) for kv in args.value_models.split(","))
    else:
        models = default_value_model_dirs()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Read by the processor in vLLM's engine process (inherits the environment).
    os.environ[VAS_CONFIG_ENV] = json.dumps({"value_models": models, "stats_dir": None})

    from vllm import LLM, SamplingParams

    from decoders.prompts import heldout_prompts
    from decoders.rewards import build_objectives
    from decoders.train_value import chat_prompt_ids
    from decoders.vas_processor import VASLogitsProcessor
    from decoders.base_model import materialize_embedded

    prompts = heldout_prompts(args.prompts, limit=args.limit)
    objectives = build_objectives()
    score = [o for o in args.score.split(",") if o]
    llm = LLM(model=str(materialize_embedded()), enforce_eager=True, max_model_len=2048, dtype="bfloat16",
              max_num_seqs=128, enable_chunked_prefill=False, max_num_batched_tokens=4096,
              logits_processors=[VASLogitsProcessor], seed=0)
    tok = llm.get_tokenizer()
    ids = [chat_prompt_ids(tok, p) for p in prompts]
    jobs = [(i, s) for i in range(len(prompts)) for s in range(args.samples)]
    print(f"{len(prompts)} held-out {args.prompts} prompts x {args.samples} samples, {args.max_tokens} tokens, "
          f"temperature 1; value models: {sorted(models)}\n")
    print("| condition | " + " | ".join(f"{o} (± s.e.)" for o in score) + " | batch wall s |")
    print("|---|" + "---|" * len(score) + "---|", flush=True)
    results = {}
    for cond in [c for c in args.conditions.split(";") if c]:
        vas = parse_condition(cond, next(iter(models), "sentiment"))
        extra = None if vas is None else {"alignserve": {"vas": vas}}
        params = [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=1000 + 10 * i + s, extra_args=extra)
                  for i, s in jobs]
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": ids[i]} for i, _ in jobs], params, use_tqdm=False)
        wall = time.perf_counter() - t0
        texts = [o.outputs[0].text for o in outs]
        row = {"wall_s": round(wall, 1)}
        cells = []
        for o in score:
            vals = [float(x) for x in objectives[o]([prompts[i] for i, _ in jobs], texts)]
            mean, se = statistics.mean(vals), statistics.stdev(vals) / math.sqrt(len(vals))
            row[o], row[f"{o}_se"] = round(mean, 3), round(se, 3)
            cells.append(f"{mean:.3f} ± {se:.3f}")
        results[cond] = row
        print(f"| {cond} | " + " | ".join(cells) + f" | {wall:.1f} |", flush=True)
    print("\n" + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
