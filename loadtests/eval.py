"""The alignment evaluation: every method over a prompt set, reward against cost.

    python -m loadtests.eval --url http://127.0.0.1:8000 --prompts chat_mix --limit 16 \
        --methods 'none,best_of_n:n=1|4|8|16,transfer_q:block=8,args,vas:beta=0|1|2|4' \
        --weights sentiment=1 --max-tokens 48 --out out/eval [--pareto sentiment,brevity]

Method specs (``--methods``, comma-separated): ``METHOD[:KNOB=VALUE[|VALUE...]]...``

* ``best_of_n:n=4``                     one configuration
* ``best_of_n:n=1|4|8|16``              a sweep: one configuration per value
* ``transfer_q:block=8:rollout_tokens=8`` several knobs (``:``-separated); sweeps of several knobs
  are crossed (cartesian product)
* values are parsed as JSON where possible (``4``, ``0.5``, ``true``), else kept as strings.

Knobs are the method's params (decoders/registry.py ``knobs``; weights come from ``--weights``).
Every request goes through the HTTP API with the openai client (`extra_body={"alignment": ...}`),
non-streamed, at most ``--concurrency`` at a time; configurations run one after another so each one's
latency is measured alone. A configuration the server rejects with a 400 (e.g. ``vas`` without value
models) is reported as skipped with the server's message.

Rewards: the receipt's raw rewards of the weighted objectives and its mixed reward; every other
objective is scored locally with ``decoders.rewards`` (the server's default objectives; disable with
``--no-local-scoring``), so every row has every objective.

Writes OUT/results.json (summary rows, skipped configurations, metadata), OUT/results.csv (one row
per configuration), OUT/answers.jsonl (every answer with its scores and cost) and the plots
OUT/frontier.png (mean mixed reward against mean latency and against engine tokens per answer) and,
with ``--pareto A,B``, OUT/pareto.png (mean reward of A against B for weights (w, 1-w)).
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests import check_target

from decoders import registry

PARETO_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_METHODS = "none,best_of_n:n=2|4|8,transfer_q:block=8,args:block=8,vas:beta=1|2|4"
COST_KEYS = ("base_tokens", "candidates", "rollouts", "rollout_tokens", "value_model_steps", "steps")


# ----------------------------------------------------------------------------- specs

@dataclass
class Config:
    method: str
    knobs: dict[str, Any]
    weights: dict[str, float]
    sweep: str = "main"           # "main" or "pareto"
    pareto_w: float | None = None  # weight of the first Pareto objective

    @property
    def label(self) -> str:
        knobs = ",".join(f"{k}={_fmt(v)}" for k, v in self.knobs.items())
        s = f"{self.method}({knobs})" if knobs else self.method
        if self.sweep == "pareto":
            s += " w=" + "/".join(f"{k}:{_fmt(v)}" for k, v in self.weights.items())
        return s

    def alignment(self) -> dict[str, Any]:
        return {"method": self.method, **self.knobs, "weights": dict(self.weights)}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _value(s: str) -> Any:
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def parse_method_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """``best_of_n:n=1|4:early_pruning=true`` -> [("best_of_n", {"n": 1, "early_pruning": True}), ...]."""
    parts = [p.strip() for p in spec.strip().split(":") if p.strip()]
    if not parts:
        raise ValueError("empty method spec")
    method, knob_parts = parts[0], parts[1:]
    if method not in registry.methods():
        raise ValueError(f"unknown method {method!r} in {spec!r}; known: {', '.join(registry.methods())}")
    takes = registry.knobs(method)
    names, values = [], []
    for kp in knob_parts:
        if "=" not in kp:
            raise ValueError(f"knob {kp!r} in {spec!r} must be KNOB=VALUE[|VALUE...]")
        name, raw = kp.split("=", 1)
        name = name.strip()
        if name in ("weights", "method"):
            raise ValueError(f"{name!r} cannot be set in a method spec (use --weights)")
        if name not in takes:
            raise ValueError(f"{name!r} is not a knob of {method!r} (it takes: "
                             f"{', '.join(k for k in takes if k != 'weights') or 'nothing'})")
        if name in names:
            raise ValueError(f"knob {name!r} given twice in {spec!r}")
        opts = [_value(v.strip()) for v in raw.split("|") if v.strip()]
        if not opts:
            raise ValueError(f"knob {name!r} in {spec!r} has no value")
        names.append(name)
        values.append(opts)
    return [(method, dict(zip(names, combo))) for combo in itertools.product(*values)]


def parse_methods(specs: str) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for spec in specs.split(","):
        if spec.strip():
            out.extend(parse_method_spec(spec))
    if not out:
        raise ValueError("no methods given")
    return out


def parse_weights(s: str) -> dict[str, float]:
    """``sentiment=1,brevity=0.5`` (or a JSON object) -> {"sentiment": 1.0, "brevity": 0.5}."""
    s = s.strip()
    if s.startswith("{"):
        return {k: float(v) for k, v in json.loads(s).items()}
    out = {}
    for part in s.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"weight {part!r} must be OBJECTIVE=WEIGHT")
        k, v = part.split("=", 1)
        out[k.strip()] = float(v)
    if not out:
        raise ValueError("no weights given")
    return out


def build_configs(methods: str, weights: dict[str, float], pareto: tuple[str, str] | None = None,
                  pareto_methods: str = "best_of_n:n=8,vas:beta=2") -> list[Config]:
    configs = [Config(m, k, dict(weights)) for m, k in parse_methods(methods)]
    if pareto:
        a, b = pareto
        for m, k in parse_methods(pareto_methods):
            for w in PARETO_WEIGHTS:
                configs.append(Config(m, k, {a: w, b: round(1.0 - w, 6)}, sweep="pareto", pareto_w=w))
    return configs


# ----------------------------------------------------------------------------- running

@dataclass
class Result:
    config: Config
    answers: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None
    wall_s: float = 0.0
    retries: int = 0
    errors_retried: list[str] = field(default_factory=list)


async def _ask(client, model: str, prompt: str, cfg: Config, args, seed: int | None) -> dict:
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                          "max_tokens": args.max_tokens, "temperature": args.temperature,
                          "extra_body": {"alignment": cfg.alignment()}}
    if seed is not None:
        kw["seed"] = seed
    resp = await client.chat.completions.create(**kw)
    latency = time.perf_counter() - t0
    receipt = (resp.model_extra or {}).get("alignment") or {}
    choice = (receipt.get("choices") or [{}])[0]
    cost = dict(receipt.get("cost") or {})
    completion_tokens = resp.usage.completion_tokens if resp.usage else None
    if cost.get("base_tokens") is None:  # `none` has no cost block: it generated exactly the answer
        cost["base_tokens"] = completion_tokens
    if cost.get("candidates") is None and cfg.method == "none":
        cost["candidates"] = 1
    return {"text": resp.choices[0].message.content or "", "finish_reason": resp.choices[0].finish_reason,
            "latency_s": latency, "completion_tokens": completion_tokens,
            "raw": {o: s["raw"] for o, s in (choice.get("rewards") or {}).items()},
            "mixed": choice.get("mixed"), "kl_estimate": choice.get("kl_estimate"),
            "cost": cost, "timing": receipt.get("timing") or {}}


async def run_config(client, model: str, prompts: list[str], cfg: Config, args, bar) -> Result:
    import openai

    res = Result(cfg)
    sem = asyncio.Semaphore(args.concurrency)
    rejected = asyncio.Event()

    async def ask_with_retries(i: int, prompt: str) -> dict:
        seed = None if args.seed is None else args.seed + i
        for attempt in range(args.retries + 1):
            try:
                return await _ask(client, model, prompt, cfg, args, seed)
            except (openai.InternalServerError, openai.APIConnectionError) as e:
                # 5xx / connection: e.g. an engine replica that died and is being replaced by Serve.
                if attempt == args.retries:
                    raise
                res.retries += 1
                res.errors_retried.append(f"{type(e).__name__}: {e}"[:200])
                await asyncio.sleep(args.retry_wait)
        raise AssertionError("unreachable")

    async def one(i: int, prompt: str) -> None:
        async with sem:
            if rejected.is_set():
                bar.update(1)
                return
            try:
                ans = await ask_with_retries(i, prompt)
                ans.update(prompt_index=i, prompt=prompt)
                res.answers.append(ans)
            except openai.BadRequestError as e:
                body = e.body if isinstance(e.body, dict) else {}
                msg = body.get("message") or e.message
                if str(body.get("param") or "").startswith("alignment") or body.get("code") == "no_value_model":
                    # The configuration is rejected (e.g. vas without value models): skip all of it.
                    if not rejected.is_set():
                        res.skipped = f"400: {msg}"
                    rejected.set()
                else:  # this prompt only (e.g. too long)
                    res.errors.append(f"400: {msg}"[:300])
            except openai.APIStatusError as e:
                res.errors.append(f"{e.status_code}: {e.message}"[:300])
            except (openai.APIConnectionError, openai.APITimeoutError) as e:
                res.errors.append(f"{type(e).__name__}: {e}"[:300])
            bar.update(1)

    bar.set_postfix_str(cfg.label[:40])
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    res.wall_s = time.perf_counter() - t0
    res.answers.sort(key=lambda a: a["prompt_index"])
    if res.skipped:
        res.answers = []
    elif not res.answers and res.errors:
        res.skipped = f"all requests failed; first error: {res.errors[0]}"
    return res


class LocalScorer:
    """Scores objectives the receipt does not carry, with the same reward code as the server."""

    def __init__(self, names: list[str]):
        from decoders.rewards import build_objectives

        self.objectives = {k: v for k, v in build_objectives().items() if k in names}

    def fill(self, answers: list[dict], objectives: list[str]) -> None:
        for o in objectives:
            todo = [a for a in answers if o not in a["raw"]]
            if not todo or o not in self.objectives:
                continue
            scores = self.objectives[o]([a["prompt"] for a in todo], [a["text"] for a in todo])
            for a, s in zip(todo, scores):
                a["raw"][o] = float(s)
                a.setdefault("locally_scored", []).append(o)


# ----------------------------------------------------------------------------- summaries

def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _std(xs):
    xs = [x for x in xs if x is not None]
    return statistics.pstdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def summarize(res: Result, objectives: list[str]) -> dict[str, Any]:
    c = res.config
    row: dict[str, Any] = {"label": c.label, "method": c.method, "knobs": c.knobs, "weights": c.weights,
                           "sweep": c.sweep, "pareto_w": c.pareto_w, "status": "skipped" if res.skipped else "ok",
                           "error": res.skipped or (res.errors[0] if res.errors else None), "n_ok": len(res.answers),
                           "n_errors": len(res.errors), "n_retries": res.retries,
                           "wall_s": round(res.wall_s, 3)}
    ans = res.answers
    for o in objectives:
        vals = [a["raw"].get(o) for a in ans]
        row[f"{o}_mean"], row[f"{o}_std"] = _mean(vals), _std(vals)
    row["mixed_mean"], row["mixed_std"] = _mean([a["mixed"] for a in ans]), _std([a["mixed"] for a in ans])
    row["kl_mean"] = _mean([a["kl_estimate"] for a in ans])
    row["latency_mean_s"] = _mean([a["latency_s"] for a in ans])
    row["completion_tokens_mean"] = _mean([a["completion_tokens"] for a in ans])
    for k in COST_KEYS:
        row[f"{k}_mean"] = _mean([a["cost"].get(k) for a in ans])
    row["engine_tokens_mean"] = (None if row["base_tokens_mean"] is None
                                 else row["base_tokens_mean"] + (row["rollout_tokens_mean"] or 0.0))
    for k, v in list(row.items()):
        if isinstance(v, float):
            row[k] = round(v, 5)
    return row


CSV_FIELDS = ["label", "method", "knobs", "weights", "sweep", "pareto_w", "status", "n_ok", "n_errors",
              "n_retries"]


def write_csv(path: Path, rows: list[dict], objectives: list[str]) -> None:
    fields = CSV_FIELDS + [f"{o}_{s}" for o in objectives for s in ("mean", "std")] + \
        ["mixed_mean", "mixed_std", "kl_mean", "latency_mean_s", "completion_tokens_mean"] + \
        [f"{k}_mean" for k in COST_KEYS] + ["engine_tokens_mean", "wall_s", "error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else ("" if v is None else v)
                        for k, v in r.items()})


def format_table(rows: list[dict], objectives: list[str]) -> str:
    cols = ["label", "n_ok"] + [f"{o}_mean" for o in objectives] + \
        ["mixed_mean", "kl_mean", "latency_mean_s", "base_tokens_mean", "candidates_mean", "rollout_tokens_mean"]
    heads = ["config", "n"] + objectives + ["mixed", "KL", "latency s", "base tok", "cand", "rollout tok"]

    def cell(r, c):
        v = r.get(c)
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if c.endswith(("tokens_mean", "candidates_mean")) else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        if r["status"] != "ok":
            continue
        lines.append("| " + " | ".join(cell(r, c) for c in cols) + " |")
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"skipped {r['label']}: {r['error']}")
        elif r["n_errors"] or r["n_retries"]:
            lines.append(f"{r['label']}: {r['n_errors']} failed request(s), {r['n_retries']} retried; "
                         f"first error: {r['error']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

METHOD_STYLE = {"none": ("black", "*"), "best_of_n": ("tab:blue", "o"), "vas": ("tab:green", "s"),
                "transfer_q": ("tab:red", "^"), "args": ("tab:orange", "D")}


def _sweep_key(r: dict):
    return tuple(sorted((k, json.dumps(v)) for k, v in r["knobs"].items()))


def plot_frontier(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ok = [r for r in rows if r["sweep"] == "main" and r["status"] == "ok" and r["mixed_mean"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, xkey, xlabel in ((axes[0], "latency_mean_s", "mean latency per answer (s)"),
                             (axes[1], "engine_tokens_mean", "engine tokens per answer (base + rollout)")):
        by_method: dict[str, list[dict]] = {}
        for r in ok:
            if r.get(xkey) is not None:
                by_method.setdefault(r["method"], []).append(r)
        for method, rs in by_method.items():
            color, marker = METHOD_STYLE.get(method, ("gray", "x"))
            rs = sorted(rs, key=lambda r: r[xkey])
            xs, ys = [r[xkey] for r in rs], [r["mixed_mean"] for r in rs]
            errs = [(r["mixed_std"] or 0.0) / math.sqrt(max(r["n_ok"], 1)) for r in rs]
            ax.errorbar(xs, ys, yerr=errs, color=color, marker=marker, capsize=3, markersize=7,
                        linestyle="-" if len(rs) > 1 else "none", label=method)
            for r, x, y in zip(rs, xs, ys):
                knobs = ",".join(f"{k}={_fmt(v)}" for k, v in r["knobs"].items())
                if knobs:
                    ax.annotate(knobs, (x, y), textcoords="offset points", xytext=(4, 5), fontsize=7, color=color)
            if method == "none":
                ax.axhline(ys[0], color=color, linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel + " (log)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean mixed reward (± s.e.)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (maximising both coordinates)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front


def plot_pareto(rows: list[dict], a: str, b: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["sweep"] == "pareto" and r["status"] == "ok"
           and r.get(f"{a}_mean") is not None and r.get(f"{b}_mean") is not None]
    refs = [r for r in rows if r["sweep"] == "main" and r["method"] == "none" and r["status"] == "ok"
            and r.get(f"{a}_mean") is not None and r.get(f"{b}_mean") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    groups: dict[tuple, list[dict]] = {}
    for r in pts:
        groups.setdefault((r["method"], _sweep_key(r)), []).append(r)
    for (method, _), rs in groups.items():
        color, marker = METHOD_STYLE.get(method, ("gray", "x"))
        rs = sorted(rs, key=lambda r: r["pareto_w"])
        knobs = ",".join(f"{k}={_fmt(v)}" for k, v in rs[0]["knobs"].items())
        xs, ys = [r[f"{a}_mean"] for r in rs], [r[f"{b}_mean"] for r in rs]
        ax.plot(xs, ys, color=color, marker=marker, alpha=0.5, label=f"{method}({knobs})")
        front = pareto_front(list(zip(xs, ys)))
        fx = sorted(((xs[i], ys[i]) for i in front))
        ax.plot([p[0] for p in fx], [p[1] for p in fx], color=color, linewidth=2.5, alpha=0.9)
        labels: dict[tuple[float, float], list[str]] = {}
        for r, x, y in zip(rs, xs, ys):  # points that coincide share one label
            labels.setdefault((x, y), []).append(f"{r['pareto_w']:g}")
        for (x, y), ws in labels.items():
            ax.annotate("w=" + ",".join(ws), (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=color)
    for r in refs:
        ax.plot([r[f"{a}_mean"]], [r[f"{b}_mean"]], marker="*", color="black", markersize=12, linestyle="none",
                label="none (unaligned)")
    ax.set_xlabel(f"mean {a} reward (raw)")
    ax.set_ylabel(f"mean {b} reward (raw)")
    ax.set_title(title + f"\nweights ({a}: w, {b}: 1-w); thick line: Pareto front", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

async def evaluate(args) -> dict[str, Any]:
    import httpx
    from openai import AsyncOpenAI
    from tqdm import tqdm

    from decoders.prompts import load_prompts

    check_target(args.url, args.allow_remote)
    root = args.url.rstrip("/")
    if root.endswith("/v1"):
        root = root[:-3]
    weights = parse_weights(args.weights)
    pareto = None
    if args.pareto:
        pair = [p.strip() for p in args.pareto.split(",") if p.strip()]
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ValueError("--pareto takes two different objectives: A,B")
        pareto = (pair[0], pair[1])
    configs = build_configs(args.methods, weights, pareto, args.pareto_methods)
    prompts = load_prompts(args.prompts, args.limit, args.seed_prompts)
    if not prompts:
        raise ValueError("no prompts")

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(trust_env=False, headers=headers) as http:
        r = await http.get(f"{root}/v1/alignment/objectives", timeout=30)
        r.raise_for_status()
        objectives_info = r.json()["data"]
    objectives = [o["name"] for o in objectives_info]
    value_models = [o["name"] for o in objectives_info if o.get("value_model")]

    client = AsyncOpenAI(base_url=f"{root}/v1", api_key=args.api_key or "unused", max_retries=0,
                         timeout=args.timeout, http_client=None)
    model = args.model or (await client.models.list()).data[0].id
    scorer = None
    if not args.no_local_scoring:
        try:
            scorer = LocalScorer(objectives)
        except Exception as e:  # noqa: BLE001
            print(f"warning: local scoring unavailable ({type(e).__name__}: {e}); "
                  "only the weighted objectives are reported", file=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    t0 = time.perf_counter()
    with tqdm(total=len(configs) * len(prompts), desc="eval", unit="req", disable=args.quiet) as bar:
        for cfg in configs:
            res = await run_config(client, model, prompts, cfg, args, bar)
            if scorer and res.answers:
                scorer.fill(res.answers, objectives)
            results.append(res)
            if time.perf_counter() - t0 > args.max_time:
                print(f"warning: --max-time {args.max_time}s reached; remaining configurations not run",
                      file=sys.stderr)
                break
    await client.close()
    rows = [summarize(r, objectives) for r in results]
    meta = {"url": root, "model": model, "prompts": args.prompts, "limit": args.limit, "n_prompts": len(prompts),
            "methods": args.methods, "weights": weights, "pareto": list(pareto) if pareto else None,
            "pareto_methods": args.pareto_methods if pareto else None, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": args.seed, "concurrency": args.concurrency,
            "objectives": objectives, "value_models": value_models, "local_scoring": scorer is not None,
            "wall_s": round(time.perf_counter() - t0, 2), "command": " ".join(sys.argv)}
    skipped = [{"label": r["label"], "error": r["error"]} for r in rows if r["status"] != "ok"]
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": rows, "skipped": skipped}, indent=2))
    write_csv(out / "results.csv", rows, objectives)
    with open(out / "answers.jsonl", "w") as f:
        for res in results:
            for a in res.answers:
                f.write(json.dumps({"label": res.config.label, **a}) + "\n")
    pngs = replot(out)
    return {"meta": meta, "rows": rows, "skipped": skipped, "pngs": pngs, "objectives": objectives}


def _seed_arg(s: str) -> int | None:
    """--seed: an integer, or none/off for unseeded requests."""
    if s.strip().lower() in ("none", "off", "null"):
        return None
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--prompts", default="chat_mix",
                   help="packaged prompt set (decoders/prompts.py), or a file: one prompt a line, or JSONL with "
                        "a \"prompt\" field (read in file order)")
    p.add_argument("--limit", type=int, default=16, help="number of prompts")
    p.add_argument("--seed-prompts", type=int, default=0, help="prompt-set shuffle seed (packaged sets only)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated method specs (see above)")
    p.add_argument("--weights", default="sentiment=1", help="reward mixture: OBJ=W[,OBJ=W...] or JSON")
    p.add_argument("--pareto", default=None, help="two objectives A,B: also sweep weights (w, 1-w)")
    p.add_argument("--pareto-methods", default="best_of_n:n=8,vas:beta=2",
                   help="method specs swept for --pareto")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=_seed_arg, default=0, metavar="S|none",
                   help="request for prompt i gets seed+i (the same for every method: common random numbers); "
                        "'none' sends no seed (independent draws)")
    p.add_argument("--retries", type=int, default=2, help="retries of a request after a 5xx/connection error")
    p.add_argument("--retry-wait", type=float, default=20.0, help="seconds before such a retry")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    p.add_argument("--max-time", type=float, default=3600.0,
                   help="stop starting new configurations after this many seconds")
    p.add_argument("--model", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--no-local-scoring", action="store_true",
                   help="report only the objectives the receipt carries (the weighted ones)")
    p.add_argument("--out", default="out/eval")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--replot", metavar="DIR", default=None,
                   help="only redraw the PNGs of a finished run from DIR/results.json (no requests)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    return p


def replot(out: Path) -> list[str]:
    """Redraw the PNGs of a finished run from its results.json."""
    report = json.loads((out / "results.json").read_text())
    meta, rows = report["meta"], report["results"]
    model, n = meta["model"], meta["n_prompts"]
    plot_frontier(rows, out / "frontier.png", f"{model}: {meta['prompts']} x{n}, max_tokens {meta['max_tokens']}, "
                                              f"weights {json.dumps(meta['weights'])}")
    pngs = [str(out / "frontier.png")]
    if meta.get("pareto"):
        a, b = meta["pareto"]
        plot_pareto(rows, a, b, out / "pareto.png", f"{model}: {meta['prompts']} x{n}")
        pngs.append(str(out / "pareto.png"))
    return pngs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        print("\n".join(replot(Path(args.replot))))
        return 0
    if args.concurrency < 1:
        print("error: --concurrency must be >= 1", file=sys.stderr)
        return 2
    try:
        check_target(args.url, args.allow_remote)
        report = asyncio.run(evaluate(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report["rows"], report["objectives"]))
    print(f"wrote {args.out}/results.json, results.csv, answers.jsonl, " + ", ".join(Path(p).name for p in report["pngs"]))
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
