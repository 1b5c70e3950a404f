"""What both offload benchmarks run (`offload_bench.py` on a GPU, `offload_cpu.py` on this machine's
links): a random-weight Llama checkpoint, its magnitude pruning, and transformers' own greedy
decoding loop (the Accelerate arm). Both scripts import this; neither imports the other's pieces.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kernel_bench import CUDA  # this folder

from endor_ray.compress.prune import prune_weight
from endor_ray.models.architecture import is_prunable

SEED = 0
Run = tuple[float, list[list[int]], dict[str, Any] | None]  # (s per decode step, tokens, engine stats)


def random_checkpoint(shape: dict[str, int], num_layers: int, dtype: torch.dtype = torch.float16):
    """A random-weight LlamaForCausalLM on the CPU (fixed seed), and a tokenizer mapping "t<id>" to <id>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(**shape, num_hidden_layers=num_layers, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{token}": token for token in range(3, shape["vocab_size"])}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return model, PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@torch.no_grad()
def prune_layers(model, sparsity: float, device: torch.device) -> None:
    """Magnitude-prune every decoder-layer Linear weight in place, sorting on `device` (fast on a GPU)."""
    for name, param in model.model.layers.named_parameters():
        if is_prunable(name, param):
            param.copy_(prune_weight(param.to(device), sparsity, "magnitude").cpu())


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


@torch.inference_mode()
def model_decode(model, ids: list[list[int]], new_tokens: int, device: torch.device) -> Run:
    """Greedy decoding of a transformers model with its KV cache, timing the decode steps only."""
    from transformers import DynamicCache

    input_ids = torch.tensor(ids, device=device)  # [batch, prompt_len] int64
    mask = torch.ones_like(input_ids)
    cache, tokens, started = DynamicCache(config=model.config), [], 0.0
    for step in range(new_tokens):
        if step == 1:  # after the prefill
            synchronize()
            started = time.perf_counter()
        logits = model(input_ids=input_ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        input_ids = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # [batch, 1]
        mask = torch.cat([mask, torch.ones_like(input_ids)], dim=1)
        tokens.append(input_ids)
    synchronize()
    return (time.perf_counter() - started) / (new_tokens - 1), torch.cat(tokens, dim=1).tolist(), None
