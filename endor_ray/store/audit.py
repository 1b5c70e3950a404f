"""Reading a whole store and checking every byte and name: `endor inspect --verify`.

Opening a store checks its manifest (schema and checksum); reading a layer checks that layer's
tensor checksums and block offsets. An audit does all of it for every file, plus the tokenizer
files' checksums and the tensors' names and shapes against the architecture's own model (built
on the meta device: no weights are allocated), and reports every problem it finds.
"""

from __future__ import annotations

from tqdm import tqdm

from endor_ray.errors import EndorError
from endor_ray.store.store import Store


def audit(store: Store, progress: bool = True) -> list[str]:
    """Problems found in `store` (empty: every byte and name checks out)."""
    problems = []

    def check(what: str, action) -> None:
        try:
            action()
        except EndorError as exc:
            problems.append(f"{what}: {exc}")

    check("tokenizer", store.tokenizer_files)
    check("non-layer weights", lambda: store.dense_tensors(verify=True))
    for layer_idx in tqdm(range(store.num_layers), desc="verify", unit="layer", disable=not progress):
        check(f"layer {layer_idx}", lambda idx=layer_idx: store.layer_tensors(idx, verify=True))

    def against_model() -> None:
        from endor_ray.models.skeleton import check_tensors_match, meta_model

        shapes = [{t["name"]: t["shape"] for t in entry["tensors"]} for entry in store.manifest["layers"]]
        check_tensors_match(meta_model(store.config), store.architecture, shapes, store.location)

    check("names and shapes", against_model)
    return problems
