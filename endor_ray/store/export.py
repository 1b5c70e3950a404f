"""Store -> a standard Hugging Face checkpoint of the dense, pruned weights.

The output loads with plain ``transformers.AutoModelForCausalLM.from_pretrained(OUT)``: it is the
independent reference every correctness check compares against. One safetensors shard per
decoder layer (plus one for the non-layer weights) and an index, written layer by layer under a
temporary name and renamed at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from endor_ray.utils.atomic import staged_directory
from endor_ray.format.tensor import decode
from endor_ray.errors import StoreError
from endor_ray.store.store import Store


def export_checkpoint(store: Store, out: str | Path, force: bool = False, progress: bool = True) -> Path:
    """Write the store's weights, decoded, as an HF checkpoint directory at `out`.

    Every tensor is verified as it is read; the names and shapes are checked against the
    architecture's model before anything is written, and what was written (config, tokenizer)
    is loaded back with transformers before the directory appears.
    """
    from endor_ray.models.skeleton import check_tensors_match, meta_model

    architecture = store.architecture
    check_tensors_match(meta_model(store.config), architecture,
                        [{t["name"]: t["shape"] for t in entry["tensors"]} for entry in store.manifest["layers"]],
                        store.location)
    num_shards = store.num_layers + 1
    weight_map: dict[str, str] = {}
    total_nbytes = 0
    with staged_directory(Path(out), force) as staging:
        for name, contents in store.tokenizer_files().items():
            (staging / name).write_bytes(contents)
        (staging / "config.json").write_text(json.dumps(store.config, indent=2))

        shard = f"model-{1:05d}-of-{num_shards:05d}.safetensors"
        dense = {name: decode(enc) for name, enc in store.dense_tensors().items()}
        save_file(dense, str(staging / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(dense, shard))
        total_nbytes += sum(t.numel() * t.element_size() for t in dense.values())

        for layer_idx in tqdm(range(store.num_layers), desc="export", unit="layer", disable=not progress):
            shard = f"model-{layer_idx + 2:05d}-of-{num_shards:05d}.safetensors"
            layer = {architecture.full_name(layer_idx, name): decode(enc)
                     for name, enc in store.layer_tensors(layer_idx).items()}
            save_file(layer, str(staging / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(layer, shard))
            total_nbytes += sum(t.numel() * t.element_size() for t in layer.values())

        index = {"metadata": {"total_size": total_nbytes}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        _check_loadable(staging, has_tokenizer=any(name.startswith("tokenizer") for name in store.tokenizer_files()))
    return Path(out)


def _check_loadable(directory: Path, has_tokenizer: bool) -> None:
    """The written config and tokenizer load with transformers (else StoreError, nothing appears)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(directory)
        if has_tokenizer:
            AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"the exported config or tokenizer does not load ({str(exc).splitlines()[0]}); "
                         "the store's model config or tokenizer files are damaged: re-run endor convert") from None
