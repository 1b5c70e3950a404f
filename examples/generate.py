"""Local generation through the Python API: a batch of prompts, layers streamed from a store.

    python examples/generate.py STORE [--gpu-memory 0] [--max-new-tokens 32]

Every decoder layer not resident on the device is fetched from the store's host (or disk) tier,
decompressed (the Triton kernel on a GPU, the C decoder on CPU) and dropped after use; one pass
over the weights serves all prompts of the batch.
"""

import argparse
import json
import sys

from endor_ray.engine import Engine, EngineConfig
from endor_ray.errors import EndorError
from endor_ray.engine.sampling import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write a haiku about the sea.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--gpu-memory", default="0", help="device tier: size or layer count (default 0: stream all)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    try:
        with Engine(args.store, EngineConfig(gpu_memory=args.gpu_memory)) as engine:
            prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                            add_generation_prompt=True) for q in QUESTIONS]
            completions, stats = engine.generate(prompts, SamplingParams(max_new_tokens=args.max_new_tokens))
    except EndorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for question, completion in zip(QUESTIONS, completions):
        print(f"Q: {question}\nA: {completion.text.strip()}\n")
    print(json.dumps(stats.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
