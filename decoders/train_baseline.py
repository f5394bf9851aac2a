"""Train a DPO baseline for Transfer Q*: a LoRA adapter on the frozen base model, for one objective.

    python -m decoders.train_baseline --objective sentiment --prompts rotten_tomatoes \
        --out decoders/baseline_adapters/sentiment

1. sample ``--samples-per-prompt`` answers per prompt from the FROZEN base model through vLLM, on the
   *training* split of the prompt set (decoders.prompts.training_prompts; the held-out prompts are
   never used), chat template applied, temperature 1;
2. score every answer with the objective (decoders/rewards.py); per prompt the best and the worst
   answer form a preference pair (chosen, rejected); the ``--pairs`` pairs with the largest reward
   margin are kept (a pair whose answers score the same teaches nothing);
3. DPO (TRL's ``DPOTrainer``) of a LoRA adapter (PEFT) on the base model with that data; the base
   weights stay frozen and, with the adapter switched off, are DPO's reference model;
4. evaluate on held-out prompts with vLLM (the adapter served as LoRA, as the server does): the
   objective's reward of base and adapter answers (mean and standard error), and KL(adapter || base)
   estimated on the adapter's answers as the mean of sum_t log pi_adapter(y_t) - log pi_base(y_t).

The output directory is a PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors`` in
bf16) with ``card.json`` (data, recipe, evaluation) and ``README.md`` (the same, for people).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("alignserve.train_baseline")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------------
# 1.-2. preference pairs from the base model's own samples
# ----------------------------------------------------------------------------------------------

def preference_pairs(samples: list[dict[str, Any]], rewards: list[float], limit: int,
                     min_margin: float) -> list[dict[str, Any]]:
    """Per prompt, (best, worst) of its samples by reward; the ``limit`` pairs of largest margin with a
    margin above ``min_margin``, largest first (ties: prompt order)."""
    by_prompt: dict[int, list[tuple[float, dict[str, Any]]]] = {}
    for s, r in zip(samples, rewards):
        by_prompt.setdefault(s["prompt_index"], []).append((float(r), s))
    pairs = []
    for i, scored in sorted(by_prompt.items()):
        hi = max(scored, key=lambda x: x[0])
        lo = min(scored, key=lambda x: x[0])
        margin = hi[0] - lo[0]
        if margin > min_margin:
            pairs.append({"prompt_index": i, "prompt": hi[1]["prompt"], "chosen": hi[1]["response"],
                          "rejected": lo[1]["response"], "chosen_reward": hi[0], "rejected_reward": lo[0],
                          "margin": margin})
    pairs.sort(key=lambda p: (-p["margin"], p["prompt_index"]))
    return pairs[:limit]


def dpo_dataset(pairs: list[dict[str, Any]]):
    """TRL's conversational preference format: the prompt as a user turn, answers as assistant turns."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                               "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])


# ----------------------------------------------------------------------------------------------
# 3. DPO of a LoRA adapter
# ----------------------------------------------------------------------------------------------

def train_adapter(base_dir: str, pairs: list[dict[str, Any]], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, args.threads))
    tok = AutoTokenizer.from_pretrained(base_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    work = out.parent / f".{out.name}.trainer"
    cfg = DPOConfig(output_dir=str(work), beta=args.beta, learning_rate=args.lr, num_train_epochs=args.epochs,
                    per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                    lr_scheduler_type="cosine", warmup_steps=0.1, max_length=args.max_length,
                    precompute_ref_log_probs=True, logging_steps=5, save_strategy="no", report_to=[],
                    seed=args.seed, use_cpu=True, bf16=args.precision == "bf16", dataloader_num_workers=0,
                    dataset_num_proc=None)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=dpo_dataset(pairs), processing_class=tok,
                         peft_config=lora)
    result = trainer.train()
    log = [r for r in trainer.state.log_history if "loss" in r]
    save_adapter(trainer.model, out)
    del trainer, model
    gc.collect()
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    last = log[-1] if log else {}
    return {"steps": result.global_step, "train_loss": float(result.training_loss),
            "final": {k: last.get(k) for k in ("loss", "rewards/accuracies", "rewards/margins")},
            "history": [{k: r.get(k) for k in ("step", "loss", "rewards/accuracies", "rewards/margins")} for r in log]}


def save_adapter(peft_model, out: Path) -> None:
    """The adapter as vLLM loads it: PEFT's files, weights in bf16 (half the size; vLLM casts them to
    the engine's dtype), no local paths in its config."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    weights = out / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(weights)).items()}, str(weights))
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "SmolLM2-135M-Instruct"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "README.md").unlink(missing_ok=True)  # PEFT's template card; ours is written after evaluation


# ----------------------------------------------------------------------------------------------
# 4. held-out evaluation: reward before/after, KL to base
# ----------------------------------------------------------------------------------------------

def mean_se(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "se": statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def evaluate(base_dir: str, adapter: Path, objective, prompts: list[str], max_tokens: int, seed: int) -> dict[str, Any]:
    """Base and adapter answers (one each per held-out prompt, temperature 1) through vLLM with the
    adapter as LoRA; rewards, and the KL estimate from the adapter's sampled log-probs and the base's
    log-probs of the same tokens (prompt_logprobs of prompt + answer)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from decoders.train_value import chat_prompt_ids, close_llm

    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = [chat_prompt_ids(tok, p) for p in prompts]
    rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
    llm = LLM(model=base_dir, enforce_eager=True, max_model_len=2048, dtype="bfloat16", seed=seed,
              enable_prefix_caching=True, enable_lora=True, max_lora_rank=max(8, rank), max_loras=1)
    lora = LoRARequest("adapter", 1, str(adapter))
    try:
        sp = SamplingParams(max_tokens=max_tokens, temperature=1.0, logprobs=0)
        inputs = [{"prompt_token_ids": p} for p in ids]
        base_out = llm.generate(inputs, sp, use_tqdm=True)
        ad_out = llm.generate(inputs, sp, lora_request=lora, use_tqdm=True)
        # log pi_base of the adapter's tokens: the base model's prompt log-probs of prompt + answer.
        scored = [p + list(o.outputs[0].token_ids) for p, o in zip(ids, ad_out)]
        base_lp = llm.generate([{"prompt_token_ids": s} for s in scored],
                               SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=True)
    finally:
        close_llm(llm)
        del llm
    kls = []
    for p, o, b in zip(ids, ad_out, base_lp):
        c = o.outputs[0]
        lp_adapter = sum(step[t].logprob for t, step in zip(c.token_ids, c.logprobs))
        lp_base = sum(step[t].logprob for t, step in zip(c.token_ids, b.prompt_logprobs[len(p):]))
        kls.append(lp_adapter - lp_base)
    base_texts = [o.outputs[0].text for o in base_out]
    ad_texts = [o.outputs[0].text for o in ad_out]
    r_base = [float(x) for x in objective(prompts, base_texts)]
    r_ad = [float(x) for x in objective(prompts, ad_texts)]
    return {"prompts": len(prompts), "max_tokens": max_tokens, "temperature": 1.0,
            "reward_base": mean_se(r_base), "reward_adapter": mean_se(r_ad), "kl_to_base": mean_se(kls),
            "examples": [{"prompt": prompts[i], "base": base_texts[i], "adapter": ad_texts[i]} for i in range(min(3, len(prompts)))]}


# ----------------------------------------------------------------------------------------------
# the card
# ----------------------------------------------------------------------------------------------

def card_markdown(card: dict[str, Any]) -> str:
    d, r, e = card["data"], card["recipe"], card["evaluation"]

    def ms(x):
        return f"{x['mean']:.3f} ± {x['se']:.3f}"

    return "\n".join([
        f"# {card['name']}: DPO LoRA baseline for `{card['objective']}`",
        "",
        f"A LoRA adapter on the frozen SmolLM2-135M-Instruct, trained by DPO to raise the `{card['objective']}` "
        "reward. The server loads it as a Transfer Q* baseline and serves it as the model "
        f"`{card['served_as']}`. Retrain with `make train-baselines`.",
        "",
        "## Data",
        f"- prompts: the training split of `{d['prompt_set']}` ({d['prompts']} prompts; the held-out split is "
        "never used)",
        f"- {d['samples_per_prompt']} answers per prompt from the base model (temperature 1, {d['max_tokens']} "
        f"tokens max), scored by `{card['objective']}`; pair = best vs worst answer of a prompt",
        f"- {d['pairs']} pairs kept (largest margins, margin > {d['min_margin']}): mean margin "
        f"{d['mean_margin']:.3f}, chosen {d['mean_chosen']:.3f}, rejected {d['mean_rejected']:.3f}",
        *([f"- base samples reused: {d['samples_from']}"] if d.get("samples_from") else []),
        "",
        "## Recipe",
        f"- DPO (TRL {r['trl']}, PEFT {r['peft']}), beta {r['beta']}, {r['epochs']} epochs, lr {r['lr']} (cosine), "
        f"batch {r['batch_size']} x {r['grad_accum']}, max length {r['max_length']}, seed {r['seed']}, "
        f"{'bf16 autocast' if r['precision'] == 'bf16' else 'fp32'}",
        f"- LoRA r={r['lora_rank']}, alpha={r['lora_alpha']} on {', '.join(r['targets'])}; weights stored in bf16",
        f"- {card['training']['steps']} steps; DPO loss {card['training']['train_loss']:.3f} (mean), "
        f"{_fmt(card['training']['final'].get('loss'))} (last logged), reward accuracy "
        f"{_fmt(card['training']['final'].get('rewards/accuracies'))} (last logged)",
        f"- wall time: {card['wall_s']['total_s']:.0f} s on {card['machine']}",
        "",
        f"## Held-out evaluation ({e['prompts']} prompts of `{card['eval_prompt_set']}`, one answer each, "
        f"temperature 1, {e['max_tokens']} tokens)",
        "",
        "| | reward (mean ± s.e.) |",
        "|---|---|",
        f"| base | {ms(e['reward_base'])} |",
        f"| adapter | {ms(e['reward_adapter'])} |",
        "",
        f"KL(adapter ‖ base) per answer: {ms(e['kl_to_base'])} nats (log-ratio of the adapter's own samples).",
        "",
        f"Command: `{card['command']}`",
        "",
    ])


def _fmt(x) -> str:
    return "n/a" if x is None else f"{float(x):.3f}"


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m decoders.train_baseline", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--objective", required=True, help="objective name in the reward registry")
    p.add_argument("--prompts", required=True, help="prompt set (training split; decoders.prompts)")
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--name", default=None, help="the baseline's name (default: the objective)")
    p.add_argument("--base", default=None, help="base model dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--pairs", type=int, default=256, help="preference pairs kept (largest reward margins)")
    p.add_argument("--candidate-prompts", type=int, default=384, help="training prompts sampled to find them")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--min-margin", type=float, default=0.0)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (KL strength)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=192, help="prompt + answer tokens per sequence")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts for the card's evaluation")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="training matmuls (fp32 weights either way); auto: bf16 autocast where the CPU computes "
                        "in bf16 (AVX512-BF16 / AMX), fp32 elsewhere (emulated bf16 is slower)")
    p.add_argument("--save-samples", default=None, help="write the scored base samples here (jsonl)")
    p.add_argument("--samples-from", default=None, help="reuse samples of --save-samples (no vLLM sampling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for training")
    p.add_argument("--max-num-seqs", type=int, default=128, help="vLLM batch size for sampling")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    random.seed(args.seed)
    from decoders.prompts import heldout_prompts, training_prompts
    from decoders.train_value import chat_prompt_ids, objective_and_base, sample_responses, score_samples

    objective, base_dir = objective_and_base(args.objective, args.base)
    if objective is None:
        return 2
    out = Path(args.out)
    wall: dict[str, float] = {}
    t_all = t0 = time.perf_counter()

    from transformers import AutoTokenizer

    if args.precision == "auto":
        from server.engine import cpu_has_bf16

        args.precision = "bf16" if cpu_has_bf16() else "fp32"
    if args.samples_from:
        samples = [json.loads(line) for line in Path(args.samples_from).read_text().splitlines() if line.strip()]
        prompts = sorted({s["prompt"] for s in samples})
    else:
        prompts = training_prompts(args.prompts, limit=args.candidate_prompts, seed=args.seed)
        tok = AutoTokenizer.from_pretrained(base_dir)
        samples = sample_responses(base_dir, prompts, [chat_prompt_ids(tok, p) for p in prompts],
                                   args.samples_per_prompt, args.max_tokens, args.seed, args.max_num_seqs)
    wall["sampling_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rewards = score_samples(samples, objective, args.objective)
    if args.save_samples:
        Path(args.save_samples).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_samples).write_text("".join(json.dumps(s) + "\n" for s in samples))
    pairs = preference_pairs(samples, rewards, args.pairs, args.min_margin)
    wall["scoring_s"] = time.perf_counter() - t0
    if not pairs:
        print("no preference pairs: every prompt's answers scored the same", file=sys.stderr)
        return 1
    logger.info("%d pairs from %d prompts: mean margin %.3f", len(pairs), len(prompts),
                statistics.fmean(p["margin"] for p in pairs))

    t0 = time.perf_counter()
    training = train_adapter(base_dir, pairs, out, args)
    wall["training_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    eval_set = args.prompts
    evaluation = evaluate(base_dir, out, objective, heldout_prompts(eval_set, limit=args.eval_prompts),
                          args.max_tokens, args.seed)
    wall["evaluation_s"] = time.perf_counter() - t0
    wall["total_s"] = time.perf_counter() - t_all

    import peft
    import trl

    from decoders.base_model import DEFAULT_SERVED_NAME

    name = args.name or args.objective
    card = {
        "name": name, "objective": args.objective, "served_as": f"{DEFAULT_SERVED_NAME}-{name}",
        "base_model": DEFAULT_SERVED_NAME, "eval_prompt_set": eval_set,
        "data": {"prompt_set": args.prompts, "split": "training", "prompts": len(prompts),
                 "samples_from": args.samples_from,
                 "samples_per_prompt": args.samples_per_prompt, "max_tokens": args.max_tokens,
                 "pairs": len(pairs), "min_margin": args.min_margin,
                 "mean_margin": statistics.fmean(p["margin"] for p in pairs),
                 "mean_chosen": statistics.fmean(p["chosen_reward"] for p in pairs),
                 "mean_rejected": statistics.fmean(p["rejected_reward"] for p in pairs)},
        "recipe": {"trl": trl.__version__, "peft": peft.__version__, "beta": args.beta, "lr": args.lr,
                   "epochs": args.epochs, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                   "max_length": args.max_length, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
                   "targets": LORA_TARGETS, "seed": args.seed, "precision": args.precision},
        "training": training, "evaluation": evaluation,
        "wall_s": {k: round(v, 1) for k, v in wall.items()}, "machine": machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m decoders.train_baseline " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(card_markdown(card))
    e = evaluation
    print(json.dumps({"out": str(out), "pairs": len(pairs), "reward_base": e["reward_base"],
                      "reward_adapter": e["reward_adapter"], "kl_to_base": e["kl_to_base"], "wall_s": card["wall_s"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
