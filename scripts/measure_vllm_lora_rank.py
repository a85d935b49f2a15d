"""What vLLM's max_lora_rank costs on CPU: 64 forced 24-token answers wearing the demo adapter
(r=8), all in flight, for each (max_lora_rank, max_loras) given; tokens/s of the second of two
rounds. Run in the vLLM environment, on an idle machine, after the vLLM engine has exported the
embedded default once (make test-vllm or make run-vllm do):

    .venv-vllm/bin/python scripts/measure_vllm_lora_rank.py 8:8 16:8 64:8 64:1

Why it exists: vllm.maxLoraRank's default (config.py, VllmSettings) was chosen from it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = ROOT / "models" / "adapters" / "genres" / "checkpoint-final"
PROMPTS = [f"The story of book number {i} begins" for i in range(64)]


async def measure(folder: Path, rank: int, loras: int) -> float:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(folder),
        dtype="float32",
        enable_lora=True,
        max_loras=loras,
        max_lora_rank=rank,
        seed=0,
        load_format="safetensors",
    )
    engine = AsyncLLM.from_engine_args(args)
    lora = LoRARequest("genres", 1, str(ADAPTER))

    async def answer(index: int, prompt: str) -> int:
        params = SamplingParams(max_tokens=24, min_tokens=24, temperature=0)
        final = None
        async for output in engine.generate(
            prompt, params, f"{index}-{time.time()}", lora_request=lora
        ):
            final = output
        assert final is not None
        return len(final.outputs[0].token_ids)

    try:
        rate = 0.0
        for _ in range(2):
            started = time.perf_counter()
            tokens = sum(await asyncio.gather(*(answer(i, p) for i, p in enumerate(PROMPTS))))
            rate = tokens / (time.perf_counter() - started)
        return rate
    finally:
        engine.shutdown()


def main() -> int:
    # As the sidecar sets them (vllm_models._prepare_environment).
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault(
        "VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0))))
    )
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from golem_sidecar.vllm_models import default_cache_dir

    cache = default_cache_dir()
    exported = sorted(cache.glob("SmolLM2-135M-Instruct.Q4_1-*"))
    if not exported:
        sys.exit(
            f"no exported default model under {cache}: run make test-vllm or make run-vllm once"
        )
    for pair in sys.argv[1:] or ["8:8", "16:8", "64:8"]:
        rank, loras = (int(part) for part in pair.split(":"))
        rate = asyncio.run(measure(exported[-1], rank, loras))
        print(f"max_lora_rank {rank:>3}, max_loras {loras}: {rate:6.1f} tokens/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
