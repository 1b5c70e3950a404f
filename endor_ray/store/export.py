"""Store -> a standard Hugging Face checkpoint of the dense, pruned weights.

The output loads with plain ``transformers.AutoModelForCausalLM.from_pretrained(OUT)``: it is the
independent reference every correctness check compares against. One safetensors shard per
decoder layer (plus one for the non-layer weights) and an index, written layer by layer under a
temporary name and renamed at the end.

An MoE store's layers are written under the family's checkpoint names, as transformers' own
``save_pretrained`` writes them: each expert's unit cut back into its Linears
(``block_sparse_moe.experts.3.w1.weight``...; `ExpertLayout.unfuse`), or, for a family whose
checkpoints hold the experts fused (gpt-oss), the experts stacked into ``[experts, ...]`` tensors;
the layer's own tensors renamed back where the family's modules rename them (Mixtral's router).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from endor_ray.utils.atomic import staged_directory
from endor_ray.format.tensor import decode
from endor_ray.errors import StoreError
from endor_ray.store.store import Store


def export_checkpoint(store: Store, out: str | Path, force: bool = False, progress: bool = True) -> Path:
    """Write the store's weights, decoded, as an HF checkpoint directory at `out`.

    Every tensor is verified as it is read; the config is checked against the tensors (names and
    shapes against the architecture's model, a positive context) before anything is written, and what was written (config, tokenizer)
    is loaded back with transformers before the directory appears.
    """
    from endor_ray.store.audit import check_against_model

    architecture = store.architecture
    check_against_model(store)  # names, shapes (non-layer too) and context: a config that lies is not written
    num_shards = store.num_layers + 1
    weight_map: dict[str, str] = {}
    total_nbytes = 0
    with staged_directory(Path(out), force) as staging:
        for name, contents in store.tokenizer_files().items():
            (staging / name).write_bytes(contents)
        (staging / "config.json").write_text(json.dumps(store.config, indent=2))

        shard = f"model-{1:05d}-of-{num_shards:05d}.safetensors"
        dense = _finite({name: decode(enc) for name, enc in store.dense_tensors().items()}, "non-layer weights")
        save_file(dense, str(staging / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(dense, shard))
        total_nbytes += sum(t.numel() * t.element_size() for t in dense.values())

        for layer_idx in tqdm(range(store.num_layers), desc="export", unit="layer", disable=not progress):
            shard = f"model-{layer_idx + 2:05d}-of-{num_shards:05d}.safetensors"
            layer = _finite({architecture.full_name(layer_idx, name): tensor
                             for name, tensor in _layer_checkpoint(store, layer_idx).items()}, f"layer {layer_idx}")
            save_file(layer, str(staging / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(layer, shard))
            total_nbytes += sum(t.numel() * t.element_size() for t in layer.values())

        index = {"metadata": {"total_size": total_nbytes}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        _check_loadable(staging, has_tokenizer=any(name.startswith("tokenizer") for name in store.tokenizer_files()))
    return Path(out)


def _layer_checkpoint(store: Store, layer_idx: int) -> dict[str, torch.Tensor]:
    """One layer's decoded tensors under the checkpoint's names inside the layer (MoE: see the module doc)."""
    from endor_ray.models.moe import expert_layout

    tensors = {name: decode(enc) for name, enc in store.layer_tensors(layer_idx).items()}
    layout = expert_layout(store.config)
    if layout is None or not store.num_experts(layer_idx):
        return tensors
    tensors = {layout.checkpoint_name(name): tensor for name, tensor in tensors.items()}
    experts = [{name: decode(enc) for name, enc in store.expert_tensors(layer_idx, expert_idx).items()}
               for expert_idx in range(store.num_experts(layer_idx))]
    if layout.fused_in_checkpoint:
        tensors.update({f"{layout.experts_path}.{param}": torch.stack([expert[param] for expert in experts])
                        for param in experts[0]})
    else:
        for expert_idx, unit in enumerate(experts):
            tensors.update(layout.unfuse(unit, expert_idx, f"layer {layer_idx} expert {expert_idx}"))
    return tensors


def _finite(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """`tensors`, or StoreError naming the first that holds a NaN or infinity (CRCs prove bytes, not numbers)."""
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise StoreError(f"{where}: tensor {name} holds NaN or infinite values; the store was tampered with "
                             "or damaged: re-run endor convert")
    return tensors


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
