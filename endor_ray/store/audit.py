"""Reading a whole store and checking every byte and name: `endor inspect --verify`.

Opening a store checks its manifest (schema, checksum, the config's sizes, file names); reading
a layer checks that layer's file (a regular file of the manifest's size), its tensor checksums
and block offsets. An audit does all of it for every file, plus the tokenizer files' checksums,
that every value and scale is finite (`endor_ray.format.verify.check_finite`, which the decode
path skips), and the config against the tensors: the architecture's own model built from it on
the meta device (no weights are allocated; a config transformers rejects is reported, not raised)
must have the store's tensor names and shapes, the non-layer ones too (so a vocab_size that is not
the embedding's row count is caught), and a positive context length. It reports every problem.
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from endor_ray.errors import EndorError, FormatError, StoreError
from endor_ray.format.verify import check_finite
from endor_ray.store.store import Store

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def audit(store: Store, progress: bool = True) -> list[str]:
    """Problems found in `store` (empty: every byte and name checks out)."""
    problems = []

    def check(what: str, action) -> None:
        try:
            action()
        except EndorError as exc:
            problems.append(f"{what}: {exc}")

    check("tokenizer", store.tokenizer_files)
    check("non-layer weights", lambda: _check_finite(store.dense_tensors(verify=True)))
    for layer_idx in tqdm(range(store.num_layers), desc="verify", unit="layer", disable=not progress):
        check(f"layer {layer_idx}", lambda idx=layer_idx: _check_finite(store.layer_tensors(idx, verify=True)))
        for expert_idx in range(store.num_experts(layer_idx)):
            check(f"layer {layer_idx} expert {expert_idx}",
                  lambda idx=layer_idx, expert=expert_idx: _check_finite(store.expert_tensors(idx, expert)))
    check("config against the tensors", lambda: check_against_model(store))
    return problems


def _check_finite(tensors: dict[str, Any]) -> None:
    for name, enc in tensors.items():
        try:
            check_finite(enc)
        except FormatError as exc:
            raise StoreError(f"tensor {name}: {exc}") from None


def check_against_model(store: Store) -> None:
    """StoreError unless the config builds a model whose tensors are the store's (names, shapes)
    and gives a positive context length (what export and `--verify` need of a config)."""
    from endor_ray.models.skeleton import check_tensors_match, meta_model

    for key in CONTEXT_KEYS:
        value = store.config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise StoreError(f"{store.location}: the model config's {key} is {value!r}, not a positive context "
                             "length; the manifest was tampered with: re-run endor convert")
    model = meta_model(store.config)  # UnsupportedModelError, one line, where transformers rejects the config
    check_tensors_match(model, store.architecture, store.layer_shapes(), store.location)
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    for tensor in store.manifest["dense"]["tensors"]:
        name, shape = tensor["name"], tensor["shape"]
        if name not in expected:
            raise StoreError(f"{store.location}: non-layer tensor {name} is not one the model has; re-run endor convert")
        if shape != expected[name]:
            raise StoreError(f"{store.location}: {name} has shape {shape}, the config's model has {expected[name]} "
                             "(the config contradicts the tensors, e.g. its vocab_size); re-run endor convert")
