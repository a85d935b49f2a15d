"""The engines and vllm config sections that both config readers must take or refuse alike, in one
place. pytest imports the tables; jest (tests/unit/config.test.ts) runs

    python -m tests.engine_configs     (from inference_py/)

and reads the JSON it prints. Each refused case names a fragment that both readers' messages
hold: the key always, and the whole message where the two are written alike."""

from __future__ import annotations

import json

GGUF = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Every key set away from its default.
FULL = {
    "engines": {
        "default": "vllm",
        "models": {GGUF: "transformers", "HuggingFaceTB/SmolLM2-135M": "vllm"},
    },
    "vllm": {
        "kvCacheGiB": 2,
        "gpuMemoryUtilization": 0.5,
        "maxLoraRank": 320,
        "maxModelLen": 2048,
        "tensorParallelSize": 2,
        "pipelineParallelSize": 2,
        "distributedExecutorBackend": "ray",
    },
}

REFUSED: list[tuple[dict[str, object], str]] = [
    ({"engines": "vllm"}, "engines"),
    ({"engines": {"default": "tf"}}, 'engines.default: must be "transformers" or "vllm", got "tf"'),
    ({"engines": {"default": 1}}, "engines.default: "),
    ({"engines": {"models": [GGUF]}}, "engines.models: "),
    (
        {"engines": {"models": {"foo": "tf"}}},
        'engines.models["foo"]: must be "transformers" or "vllm", got "tf"',
    ),
    ({"engines": {"models": {GGUF: None}}}, f'engines.models["{GGUF}"]: '),
    ({"engines": {"models": {"": "vllm"}}}, 'engines.models[""]: model name must not be blank'),
    ({"engines": {"models": {" ": "vllm"}}}, 'engines.models[" "]: model name must not be blank'),
    ({"engines": {"model": {}}}, "engines.model"),
    ({"vllm": []}, "vllm"),
    ({"vllm": {"kvCacheGiB": 0}}, "vllm.kvCacheGiB: must be at least 1, got 0"),
    ({"vllm": {"kvCacheGiB": 1.5}}, "vllm.kvCacheGiB: "),
    ({"vllm": {"kvCacheGiB": "1"}}, "vllm.kvCacheGiB: "),
    ({"vllm": {"kvCacheGiB": True}}, "vllm.kvCacheGiB: "),
    (
        {"vllm": {"gpuMemoryUtilization": 0}},
        "vllm.gpuMemoryUtilization: must be above 0 and at most 1, got 0",
    ),
    (
        {"vllm": {"gpuMemoryUtilization": 1.5}},
        "vllm.gpuMemoryUtilization: must be above 0 and at most 1, got 1.5",
    ),
    (
        {"vllm": {"maxLoraRank": 48}},
        "vllm.maxLoraRank: must be one of 8, 16, 32, 64, 128, 256, 320, 512, got 48",
    ),
    ({"vllm": {"maxLoraRank": "64"}}, "vllm.maxLoraRank: "),
    ({"vllm": {"maxModelLen": -1}}, "vllm.maxModelLen: must be at least 0, got -1"),
    ({"vllm": {"maxModelLen": 1.5}}, "vllm.maxModelLen: "),
    ({"vllm": {"tensorParallelSize": 0}}, "vllm.tensorParallelSize: must be at least 1, got 0"),
    ({"vllm": {"pipelineParallelSize": 0}}, "vllm.pipelineParallelSize: must be at least 1, got 0"),
    (
        {"vllm": {"distributedExecutorBackend": "nccl"}},
        'vllm.distributedExecutorBackend: must be "", "mp" or "ray", got "nccl"',
    ),
    ({"vllm": {"distributedExecutorBackend": None}}, "vllm.distributedExecutorBackend: "),
    ({"vllm": {"kvCacheGib": 1}}, "vllm.kvCacheGib"),
]

if __name__ == "__main__":
    print(json.dumps({"full": FULL, "refused": REFUSED}))
