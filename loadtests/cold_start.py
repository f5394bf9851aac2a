"""Cold start of the engine alone, without Ray: a fresh interpreter until its first output token.

    python -m loadtests.cold_start {vllm,ours}

``vllm``: the bare ``AsyncLLM`` in vLLM's own process layout (what a plain vLLM user starts);
``ours``: the server's ``Engine`` (server/engine.py: worker inside the engine core, forked from a
forkserver), without LoRA and the VAS processor. Same model, dtype, context and KV cache as the
server. Prints one line, ``COLD <seconds>``. ``make bench`` runs both after the served side, so
``make serve``'s cold start can be read against what vLLM alone needs on the same machine.
"""
from __future__ import annotations

import time

T0 = time.perf_counter()  # before the imports: they are part of a cold start

import asyncio  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

LAYOUTS = ("vllm", "ours")


async def first_token(layout: str) -> None:
    from vllm import SamplingParams

    from server.config import ServerConfig

    config = ServerConfig.model_validate({"engine": {"enable_lora": False}})
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.engine.cpu_kvcache_gib))
    if layout == "vllm":
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        from decoders.base_model import resolve_model
        from server.engine import resolve_dtype

        dtype, _ = resolve_dtype(config.engine.dtype, on_cpu=current_platform.is_cpu())
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=resolve_model(config.model), dtype=dtype, max_model_len=config.engine.max_model_len,
            enforce_eager=True))
    else:
        from server.engine import Engine

        llm = Engine(config, enable_vas=False).llm
    async for _ in llm.generate({"prompt_token_ids": [1, 2, 3, 4]}, SamplingParams(max_tokens=1), "cold-start"):
        pass
    print(f"COLD {time.perf_counter() - T0:.1f}", flush=True)
    llm.shutdown()


def measure(layout: str, timeout_s: float = 600) -> float | None:
    """Seconds from a fresh ``python -m loadtests.cold_start LAYOUT`` to its first token (None: failed)."""
    out = subprocess.run([sys.executable, "-m", "loadtests.cold_start", layout], capture_output=True, text=True,
                         timeout=timeout_s, cwd=Path(__file__).resolve().parent.parent)
    for line in out.stdout.splitlines():
        if line.startswith("COLD "):
            return float(line.split()[1])
    print(f"cold start of {layout} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}", file=sys.stderr)
    return None


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in LAYOUTS:
        print(__doc__, file=sys.stderr)
        return 2
    asyncio.run(first_token(args[0]))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # an engine's threads and atexit hooks have nothing left to tell
