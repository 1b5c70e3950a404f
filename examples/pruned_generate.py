"""Greedy generation straight from an Endor store, on CPU.

Every decoder layer is read from the store, checksum-verified and decoded with the format's torch
path just before transformers runs it, then dropped again. (The offloaded engine, with GPU
prefetch and the Triton kernel, builds on the same pieces.)

    python examples/pruned_generate.py STORE [--prompt TEXT] [--max-new-tokens N]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from endor_ray.errors import EndorError
from endor_ray.format import decode
from endor_ray.store import Store


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    try:
        store = Store(args.store)
    except EndorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    from transformers import AutoTokenizer

    from endor_ray.skeleton import build_skeleton, stream_layers

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        for name, contents in store.tokenizer_files().items():
            (Path(tokenizer_dir) / name).write_bytes(contents)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dense = {name: decode(enc) for name, enc in store.dense_tensors().items()}
    model = build_skeleton(store.config, dense, dtype=store.dtype)

    def load_layer(layer_idx: int) -> dict[str, torch.Tensor]:
        return {name: decode(enc) for name, enc in store.layer_tensors(layer_idx).items()}

    messages = [{"role": "user", "content": args.prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt")
    start = time.perf_counter()
    with torch.no_grad(), stream_layers(model, store.architecture, load_layer):
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    new_tokens = output[0, inputs.input_ids.shape[1]:]
    print(f"prompt: {args.prompt}")
    print(f"output: {tokenizer.decode(new_tokens, skip_special_tokens=True)}")
    print(f"{len(new_tokens)} tokens in {elapsed:.1f} s ({len(new_tokens) / elapsed:.2f} tokens/s), "
          f"{store.num_layers} layers streamed from the store per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
