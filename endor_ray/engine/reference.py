"""The independent reference: the store's pruned weights, decoded, in a plain transformers model
generating with transformers' own `generate`. `endor verify` and the tests compare against it."""

from __future__ import annotations

import torch

from endor_ray.format.tensor import decode
from endor_ray.store.store import Store


def load_dense_model(store: Store, device: str = "cpu", dtype: torch.dtype | None = None):
    """The store's pruned weights, decoded (and widened to `dtype` if given), in a plain
    transformers model (all layers in memory)."""
    from endor_ray.models.skeleton import build_skeleton, decoder_layers, materialize_layer

    dtype = dtype or store.dtype
    dense = {name: decode(enc).to(device) for name, enc in store.dense_tensors().items()}
    model = build_skeleton(store.config, dense, dtype=dtype, device=device)
    for layer_idx, layer in enumerate(decoder_layers(model, store.architecture)):
        materialize_layer(layer, {name: decode(enc).to(device=device, dtype=dtype)
                                  for name, enc in store.layer_tensors(layer_idx).items()})
    return model


def reference_greedy(engine, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy token ids from plain transformers (its own generate) on the store's decoded weights.

    The independent reference for `endor verify` and the tests: rows are cut at the first EOS,
    as the engine never includes EOS in its output.
    """
    model = load_dense_model(engine.store, device=str(engine.device), dtype=engine.dtype)
    inputs = engine.tokenizer(prompts, return_tensors="pt", padding=True).to(engine.device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=engine.pad_id)
    rows = []
    for row in output[:, inputs.input_ids.shape[1]:].tolist():
        cut = next((i for i, token in enumerate(row) if token in engine.eos_ids), len(row))
        rows.append(row[:cut])
    return rows
