"""Calibration tokens for Wanda, and perplexity to judge a pruned model.

Without a ``--calib-text`` file (and with no dataset to download) the model calibrates on text it
writes itself: each sample starts from a random vocabulary token and is continued by sampling from
the unpruned model (the data-free recipe of LLM-QAT, Liu et al. 2023). The model runs through
`transformers`' own ``generate`` with decoder layers streamed in (`endor_ray.models.skeleton`), so this
works for models larger than memory, at one pass over the weights per generated token.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from endor_ray.errors import ConfigError


def text_calibration_ids(tokenizer, text_path: Path, num_samples: int, seq_len: int) -> torch.Tensor:
    """[samples, seq_len] int64: consecutive windows of the tokenized file (at most num_samples)."""
    try:
        text = Path(text_path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read calibration text {text_path}: {exc}") from exc
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    available = ids.numel() // seq_len
    if available == 0:
        raise ConfigError(
            f"{text_path} has {ids.numel()} tokens; calibration needs at least --calib-seq-len={seq_len}"
        )
    num_samples = min(num_samples, available)
    return ids[: num_samples * seq_len].view(num_samples, seq_len)


@torch.no_grad()
def self_calibration_ids(model: nn.Module, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """[samples, seq_len] int64 written by `model` itself from random first tokens (sampling, T=1)."""
    generator = torch.Generator().manual_seed(seed)
    vocab_size = model.config.vocab_size
    special = {model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id}
    first = torch.randint(0, vocab_size, (num_samples, 1), generator=generator)
    for row in range(num_samples):  # redraw special tokens so every sample starts with a word piece
        while int(first[row, 0]) in special:
            first[row, 0] = int(torch.randint(0, vocab_size, (1,), generator=generator))
    torch.manual_seed(seed)  # generate() samples from the global generator
    output = model.generate(
        input_ids=first,
        attention_mask=torch.ones_like(first),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=seq_len - 1,
        min_new_tokens=seq_len - 1,
        pad_token_id=model.config.eos_token_id,
    )
    return output[:, :seq_len]


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) of `model` on [samples, seq_len] token ids."""
    total_loss, total_tokens = 0.0, 0
    for start in range(0, input_ids.shape[0], batch_size):
        batch = input_ids[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_loss += float(loss)
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_loss / total_tokens)
