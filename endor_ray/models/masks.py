"""Sliding-window attention masks counted in tokens, for a KV cache whose rows hold padding.

transformers measures a sliding window in cache columns (key column k is seen from query column q
when k > q - window) and keeps only the last window's columns in a sliding layer's cache. The
engine's running batch (`engine.kv_batch`) leaves padding between a row's tokens (newcomers join
with left-padded blocks, rows that leave leave holes until realigned), so columns outrun tokens
and a window in columns would see fewer tokens than the model was trained with. Models with
sliding layers (Gemma 2 and 3, Cohere 2, OLMo 3, Qwen2 with use_sliding_window; Mistral and
Phi-3 where their config sets a window) therefore get

- a cache of full layers (`full_cache`): no column is dropped, the mask decides what is seen;
- a mask per layer type (`sliding_masks`), which their forward accepts in place of the 2-D
  padding mask: the full layers' mask as transformers makes it, and the sliding layers' the same
  causal-and-padding mask and-ed with a window over token positions (row r's column k holds its
  token number cumsum(mask[r])[k] - 1). That is the window transformers' own generate applies on a
  left-padded batch, whose rows hold no padding between tokens. A model without layer_types
  (Mistral) gets the sliding mask alone, as a 4-D mask its forward hands to every layer.

Importing this module imports transformers (seconds).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask


def has_sliding_layers(config: PretrainedConfig) -> bool:
    """True for a model with sliding-window layers: named in layer_types (Gemma 2/3, Cohere 2), or
    all of them where a sliding_window is set and layer_types is not (Mistral, Phi-3), as
    transformers' own cache decides."""
    if not getattr(config, "sliding_window", None):
        return False
    layer_types = getattr(config, "layer_types", None)
    return layer_types is None or "sliding_attention" in layer_types


def full_cache() -> DynamicCache:
    """A DynamicCache of full layers only (sliding layers would drop columns the mask still counts)."""
    return DynamicCache()


def window_by_position(positions: torch.Tensor, window: int) -> Callable:
    """transformers' mask function: key column k is within the window of query column q in row b.

    `positions`: [rows, columns] int64, the token number each cache column holds.
    """

    def inside(batch_idx, head_idx, q_idx, kv_idx):
        return positions[batch_idx, kv_idx] > positions[batch_idx, q_idx] - window

    return inside


def sliding_masks(config: PretrainedConfig, attention_mask: torch.Tensor, cache: DynamicCache,
                  position_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor | None] | torch.Tensor:
    """{"full_attention": mask, "sliding_attention": mask} for one pass of a model with layer_types
    (its forward takes the dict), else the sliding mask alone as a 4-D tensor (its forward passes a
    4-D mask on as it is); each in the form the model's attention implementation takes
    (transformers' own mask builders).

    `attention_mask`: [rows, columns] padding mask over the cache and this pass's block;
    `position_ids`: [rows, block]; `cache` as it is before the pass (its length is the queries' offset).
    """
    rows, block = position_ids.shape
    shape_only = torch.empty((rows, block, 0), dtype=dtype, device=attention_mask.device)  # sizes, dtype, device
    positions = attention_mask.long().cumsum(dim=1) - 1  # [rows, columns]
    arguments = dict(config=config, inputs_embeds=shape_only, attention_mask=attention_mask, cache=cache,
                     position_ids=position_ids)
    sliding = create_causal_mask(**arguments, and_mask_function=window_by_position(positions, config.sliding_window))
    if getattr(config, "layer_types", None) is None:
        return sliding
    return {"full_attention": create_causal_mask(**arguments), "sliding_attention": sliding}
