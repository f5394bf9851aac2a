"""Train a VAS value model (the head; the trunk is the frozen base) for one objective.

    python -m decoders.train_value --objective sentiment --prompts rotten_tomatoes \
        --samples 512 --max-tokens 48 --out decoders/value_models/sentiment

1. sample ``--samples`` responses from the FROZEN base model through vLLM (chat template applied,
   ``--samples-per-prompt`` per prompt, temperature 1);
2. score each final response with the objective from the reward registry (decoders/rewards.py)
   and standardize the scores (mean/std of these samples; stored in the checkpoint);
3. run the trunk (the base's first ``--trunk-layers`` layers) once over every sample, keeping the
   feature h(s_t) of every prefix s_t and the taken token y_{t+1};
4. fit the head by TD(lambda) (gamma = 1, lambda = 0.95 by default): the target of V(s_t, y_{t+1})
   is the lambda-return from s_{t+1} built from the current head's own values of the following
   states (bootstrapping) and the terminal reward; targets are recomputed every epoch.

The result is a checkpoint directory (value_model.json + head.safetensors), see docs/vas.md.
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
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from decoders.value_model import LlamaTrunk, ValueHead, ValueModel, pooled_state_features, td_lambda_targets

logger = logging.getLogger("alignserve.train_value")


# ----------------------------------------------------------------------------------------------
# 1. sampling from the frozen base with vLLM
# ----------------------------------------------------------------------------------------------

def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The same rendering as the server: chat template text, then encode without extra specials."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def close_llm(llm) -> None:
    """Stop an offline ``vllm.LLM``'s engine processes now (the CLIs go on to train on the same cores)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort, the process exits soon anyway
        pass
    gc.collect()


def sample_responses(base_dir: str, prompts: list[str], prompt_ids: list[list[int]], per_prompt: int,
                     max_tokens: int, seed: int, max_num_seqs: int = 128) -> list[dict[str, Any]]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=base_dir, enforce_eager=True, max_model_len=2048, dtype="bfloat16",
              enable_prefix_caching=True, max_num_seqs=max_num_seqs, seed=seed)
    try:
        # Reproducibility comes from the engine seed: per-request seeds crash vLLM-CPU 0.32 when a
        # seeded prompt's prefill is chunked ("CPU Generator does not use offset").
        params = SamplingParams(n=per_prompt, max_tokens=max_tokens, temperature=1.0)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=True)
    finally:
        close_llm(llm)
        del llm
    samples = []
    for i, out in enumerate(outs):
        for c in sorted(out.outputs, key=lambda c: c.index):
            samples.append({"prompt_index": i, "prompt": prompts[i], "prompt_ids": prompt_ids[i],
                            "response_ids": list(c.token_ids), "response": c.text,
                            "finish_reason": c.finish_reason})
    return samples


# ----------------------------------------------------------------------------------------------
# 3. trunk features
# ----------------------------------------------------------------------------------------------

def trunk_features(trunk: LlamaTrunk, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Per (trajectory, t): the state features of s_t (LlamaTrunk.features: [h_last ; h_pool]) and
    the taken token y_{t+1}, flat and trajectory-major."""
    by_prompt: dict[int, list[int]] = {}
    for j, s in enumerate(samples):
        by_prompt.setdefault(s["prompt_index"], []).append(j)
    feats: list[torch.Tensor | None] = [None] * len(samples)
    for _, js in tqdm(sorted(by_prompt.items()), desc="trunk features", unit="prompt"):
        base = trunk.new_cache(256, pool_from=len(samples[js[0]]["prompt_ids"]))
        h0 = trunk.extend([base], [samples[js[0]]["prompt_ids"]])  # [1, H]: state s_0
        longer = [j for j in js if len(samples[j]["response_ids"]) > 1]
        rest: dict[int, torch.Tensor] = {}
        if longer:
            caches = [base.clone() for _ in longer]
            outs = trunk.extend(caches, [samples[j]["response_ids"][:-1] for j in longer], return_all=True)
            rest = dict(zip(longer, outs))
        for j in js:
            parts = [h0] + ([rest[j]] if j in rest else [])
            feats[j] = pooled_state_features(torch.cat(parts)).clone()
    lengths = torch.tensor([len(s["response_ids"]) for s in samples])
    return {
        "h": torch.cat(feats),  # [N_pairs, H]
        "z": torch.tensor([t for s in samples for t in s["response_ids"]], dtype=torch.long),
        "traj": torch.repeat_interleave(torch.arange(len(samples)), lengths),
        "t": torch.cat([torch.arange(n) for n in lengths.tolist()]),
        "lengths": lengths,
    }


# ----------------------------------------------------------------------------------------------
# 4. TD(lambda) fitting of the head
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(head: ValueHead, h: torch.Tensor, e: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    head.eval()
    out = [head(h[i:i + batch], e[i:i + batch, None, :])[:, 0] for i in range(0, h.shape[0], batch)]
    return torch.cat(out) if out else torch.empty(0)


def targets_for(q_flat: torch.Tensor, traj: torch.Tensor, t: torch.Tensor, lengths: torch.Tensor,
                rewards: torch.Tensor, lam: float, gamma: float) -> torch.Tensor:
    n, tmax = lengths.shape[0], int(lengths.max())
    q = torch.zeros(n, tmax)
    q[traj, t] = q_flat
    return td_lambda_targets(q, rewards, lengths, lam=lam, gamma=gamma)[traj, t]


def fit_head(head: ValueHead, feats: dict[str, torch.Tensor], e: torch.Tensor, rewards: torch.Tensor,
             train_mask: torch.Tensor, *, lam: float, gamma: float, epochs: int, passes: int, lr: float,
             batch_size: int, weight_decay: float, seed: int) -> dict[str, Any]:
    h, traj, t, lengths = feats["h"], feats["traj"], feats["t"], feats["lengths"]
    pair_train = train_mask[traj]
    train_idx = pair_train.nonzero().squeeze(1)
    val_idx = (~pair_train).nonzero().squeeze(1)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_total = epochs * passes * math.ceil(len(train_idx) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps_total), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    history = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    bar = tqdm(range(epochs), desc="TD(lambda) epochs", unit="epoch")
    for epoch in bar:
        targets = targets_for(predict(head, h, e), traj, t, lengths, rewards, lam, gamma)
        head.train()
        total, count = 0.0, 0
        for _ in range(passes):
            perm = train_idx[torch.randperm(len(train_idx), generator=g)]
            for i in range(0, len(perm), batch_size):
                b = perm[i:i + batch_size]
                pred = head(h[b], e[b, None, :])[:, 0]
                loss = F.mse_loss(pred, targets[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(b)
                count += len(b)
        q = predict(head, h, e)
        new_targets = targets_for(q, traj, t, lengths, rewards, lam, gamma)
        rec = {"epoch": epoch + 1, "train_td_loss": float(F.mse_loss(q[train_idx], new_targets[train_idx])),
               "train_mc_mse": float(F.mse_loss(q[train_idx], rewards[traj[train_idx]]))}
        if len(val_idx):
            rec["val_td_loss"] = float(F.mse_loss(q[val_idx], new_targets[val_idx]))
            rec["val_mc_mse"] = float(F.mse_loss(q[val_idx], rewards[traj[val_idx]]))
        history.append(rec)
        bar.set_postfix({k: round(v, 4) for k, v in rec.items() if k != "epoch"})
        # Model selection on held-out prompts: the epoch whose values best predict the final
        # reward (MSE against the Monte-Carlo return, an unbiased if noisy target).
        crit = rec.get("val_mc_mse", rec["train_td_loss"])
        if best is None or crit < best[0]:
            best = (crit, epoch + 1, {k: v.detach().clone() for k, v in head.state_dict().items()})
    if best is not None:
        head.load_state_dict(best[2])
    return {"history": history, "train_pairs": int(len(train_idx)), "val_pairs": int(len(val_idx)),
            "best_epoch": best[1] if best else 0, "selection": "val_mc_mse" if len(val_idx) else "train_td_loss"}


def value_quality(q: torch.Tensor, feats: dict[str, torch.Tensor], rewards: torch.Tensor,
                  mask: torch.Tensor) -> dict[str, float]:
    """How well V(s_t, y_{t+1}) predicts the final reward on the given trajectories: the share of
    reward variance explained (1 - MSE/Var) over all prefixes, and the Pearson correlation with
    the final reward at the first and the middle token."""
    traj, t, lengths = feats["traj"], feats["t"], feats["lengths"]
    sel = mask[traj]
    if not sel.any():
        return {}
    r = rewards[traj[sel]]
    out = {"explained_variance_all_prefixes": float(1 - F.mse_loss(q[sel], r) / r.var(unbiased=False).clamp(min=1e-8))}

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-8))

    for name, pos in (("first_token", torch.zeros_like(lengths)), ("middle_token", lengths // 2)):
        pick = sel & (t == pos[traj])
        if pick.sum() > 2:
            out[f"corr_with_reward_{name}"] = corr(q[pick], rewards[traj[pick]])
    return out


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m decoders.train_value", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--objective", required=True, help="objective name in the reward registry")
    p.add_argument("--prompts", required=True, help="prompt set (decoders.prompts.load_prompts)")
    p.add_argument("--samples", type=int, default=1024, help="number of sampled responses")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--base", default=None, help="base model dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--trunk-layers", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.3, help="head dropout while training")
    p.add_argument("--td-lambda", type=float, default=0.95)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=6, help="TD target refreshes (best epoch on held-out prompts kept)")
    p.add_argument("--passes", type=int, default=1, help="passes over the data per epoch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--val-fraction", type=float, default=0.15, help="share of prompts held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=128, help="vLLM batch size for sampling")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for trunk features and fitting (1 is robust on a shared CPU)")
    p.add_argument("--save-samples", default=None, help="write the scored samples here (jsonl)")
    p.add_argument("--samples-from", default=None, help="reuse samples from a --save-samples file (no vLLM)")
    return p.parse_args(argv)


def collect_samples(args: argparse.Namespace, base_dir: str) -> list[dict[str, Any]]:
    """The base model's own samples on the training split (or those saved by an earlier run)."""
    if args.samples_from:
        samples = [json.loads(line) for line in Path(args.samples_from).read_text().splitlines() if line.strip()]
        logger.info("reusing %d samples of %d prompts from %s", len(samples),
                    len({s["prompt_index"] for s in samples}), args.samples_from)
        return samples
    from transformers import AutoTokenizer

    from decoders.prompts import training_prompts

    n_prompts = math.ceil(args.samples / args.samples_per_prompt)
    # Held-out prompts (decoders.prompts.heldout_prompts) are never trained on: tests and
    # benchmarks measure the value models on them.
    prompts = training_prompts(args.prompts, limit=n_prompts, seed=args.seed)
    if len(prompts) < n_prompts:
        logger.warning("prompt set %s has only %d prompts; sampling more per prompt", args.prompts, len(prompts))
    per = math.ceil(args.samples / len(prompts))
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = [chat_prompt_ids(tok, p) for p in prompts]
    samples = sample_responses(base_dir, prompts, ids, per, args.max_tokens, args.seed, args.max_num_seqs)
    return samples[: args.samples]


def score_samples(samples: list[dict[str, Any]], objective: Any, name: str) -> list[float]:
    """Each sample's raw reward (kept on the samples, reused when they were scored for ``name`` already)."""
    if all(s.get("objective") == name and "reward" in s for s in samples):
        return [float(s["reward"]) for s in samples]
    raw: list[float] = []
    for i in tqdm(range(0, len(samples), objective.batch_size), desc=f"scoring {name}", unit="batch"):
        chunk = samples[i:i + objective.batch_size]
        raw += [float(x) for x in objective([s["prompt"] for s in chunk], [s["response"] for s in chunk])]
    for s, r in zip(samples, raw):
        s["reward"], s["objective"] = r, name
    return raw


def held_out_mask(samples: list[dict[str, Any]], fraction: float, seed: int) -> torch.Tensor:
    """True for the samples whose prompt is in the training part (a whole prompt is held out or not)."""
    prompt_ids = sorted({s["prompt_index"] for s in samples})
    n_val = int(round(len(prompt_ids) * fraction))
    val = set(random.Random(seed).sample(prompt_ids, n_val)) if n_val else set()
    return torch.tensor([s["prompt_index"] not in val for s in samples])


def training_meta(args: argparse.Namespace, argv: list[str] | None, samples: list[dict[str, Any]],
                  raw_t: torch.Tensor, scale: float, fit: dict[str, Any], quality: dict[str, Any],
                  objective: Any, wall: dict[str, float]) -> dict[str, Any]:
    """What the checkpoint says about how it was made (value_model.json)."""
    r_mean, r_std = float(raw_t.mean()), float(raw_t.std(unbiased=False))
    last = fit["history"][fit["best_epoch"] - 1] if fit["history"] else {}
    return {
        "value_units": {"reward_mean": r_mean, "reward_std": scale,
                        "meaning": "V(s, z) estimates E[(R - reward_mean) / reward_std] of the prefix s + z "
                                   "continued by the base model"},
        "td": {"lambda": args.td_lambda, "gamma": args.gamma},
        "training": {
            "prompt_set": args.prompts, "prompts": len({s["prompt_index"] for s in samples}),
            "samples": len(samples), "samples_per_prompt": args.samples_per_prompt, "max_tokens": args.max_tokens,
            "temperature": 1.0, "seed": args.seed, "objective_kind": getattr(objective, "kind", None),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "epochs": args.epochs, "passes": args.passes, "lr": args.lr, "batch_size": args.batch_size,
            "weight_decay": args.weight_decay, "dropout": args.dropout, "val_fraction": args.val_fraction,
            "train_pairs": fit["train_pairs"], "val_pairs": fit["val_pairs"], "best_epoch": fit["best_epoch"],
            "selection": fit["selection"],
            "final_loss": last.get("train_td_loss"), "final_val_loss": last.get("val_td_loss"),
            "reward": {"mean": r_mean, "std": r_std, "min": float(raw_t.min()), "max": float(raw_t.max())},
            "truncated_share": sum(s.get("finish_reason") == "length" for s in samples) / max(1, len(samples)),
            "quality": quality, "history": fit["history"],
            "wall_s": {k: round(v, 1) for k, v in wall.items()},
            "command": "python -m decoders.train_value " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
    }


def objective_and_base(name: str, base: str | None) -> tuple[Any, str]:
    """(the registered objective ``name``, or None after printing the known ones; the base model dir:
    ``base`` or the embedded default, materialized)."""
    from decoders.rewards import build_objectives

    objectives = build_objectives()
    if name not in objectives:
        print(f"unknown objective {name!r}; known: {', '.join(sorted(objectives))}", file=sys.stderr)
        return None, ""
    if base is None:
        from decoders.base_model import materialize_embedded

        base = str(materialize_embedded())
    return objectives[name], base


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t_all = time.perf_counter()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    objective, base_dir = objective_and_base(args.objective, args.base)
    if objective is None:
        return 2
    wall: dict[str, float] = {}

    t0 = time.perf_counter()
    samples = collect_samples(args, base_dir)                                  # 1. samples
    wall["sampling_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    raw_t = torch.tensor(score_samples(samples, objective, args.objective))    # 2. rewards
    wall["scoring_s"] = time.perf_counter() - t0
    if args.save_samples:
        Path(args.save_samples).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_samples).write_text("".join(json.dumps(s) + "\n" for s in samples))
    scale = max(float(raw_t.std(unbiased=False)), 1e-3)
    rewards = (raw_t - raw_t.mean()) / scale
    logger.info("%d samples, %s reward mean %.4f std %.4f (min %.3f, max %.3f)", len(samples), args.objective,
                float(raw_t.mean()), float(raw_t.std(unbiased=False)), float(raw_t.min()), float(raw_t.max()))

    t0 = time.perf_counter()                                                   # 3. trunk features
    torch.set_num_threads(max(1, args.threads))
    trunk = LlamaTrunk.from_pretrained(base_dir, args.trunk_layers)
    feats = trunk_features(trunk, samples)
    with torch.no_grad():
        e = trunk.embed(feats["z"]).float().clone()
    wall["features_s"] = time.perf_counter() - t0
    logger.info("trunk features: %d prefixes (%d layers) in %.1fs", feats["h"].shape[0], args.trunk_layers,
                wall["features_s"])

    t0 = time.perf_counter()                                                   # 4. fit
    train_mask = held_out_mask(samples, args.val_fraction, args.seed)
    head = ValueHead(trunk.hidden_size, trunk.hidden_size, dim=args.head_dim, dropout=args.dropout)
    fit = fit_head(head, feats, e, rewards, train_mask, lam=args.td_lambda, gamma=args.gamma, epochs=args.epochs,
                   passes=args.passes, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
                   seed=args.seed)
    head.eval()
    head.requires_grad_(False)
    q = predict(head, feats["h"], e)
    quality = {"train": value_quality(q, feats, rewards, train_mask),
               "val": value_quality(q, feats, rewards, ~train_mask)}
    wall["fit_s"] = time.perf_counter() - t0
    wall["total_s"] = time.perf_counter() - t_all

    meta = training_meta(args, argv, samples, raw_t, scale, fit, quality, objective, wall)
    out = ValueModel(args.objective, trunk, head, meta).save(args.out)
    print(json.dumps({"out": str(out), "final_loss": meta["training"]["final_loss"], "val": quality["val"],
                      "reward": meta["training"]["reward"], "wall_s": meta["training"]["wall_s"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
