"""Checkpoint -> store: prune every decoder layer, encode it, write it, one layer at a time.

With ``values="keep"`` (a GGUF source) nothing is re-compressed: each decoder Linear whose ggml
type the format stores (`endor_ray.format.gguf_blocks`) keeps the file's own blocks, byte for byte;
the other tensors are decoded to the stored dtype.

Only one layer's weights are in memory at once (plus the non-layer weights), so a model larger
than RAM converts. The store is written under a temporary name next to DST and renamed into place
at the end: an interrupted or failed conversion never leaves something that looks like a store.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from endor_ray._version import __version__
from endor_ray.models.moe import ExpertLayout, expert_layout
from endor_ray.utils.atomic import staged_directory
from endor_ray.compress.checkpoint import TensorSource
from endor_ray.compress.default_model import open_source
from endor_ray.compress.gguf_source import kept_tensors
from endor_ray.errors import ConfigError, FormatError, StoreError, UnsupportedModelError
from endor_ray.format.gguf_blocks import GGUF_ENCODINGS
from endor_ray.format.quant import DEFAULT_GROUP_SIZE, QUANTIZED_ENCODINGS, check_encoding
from endor_ray.format.tensor import DEFAULT_BLOCK_SIZE, DTYPES, EncodedTensor, check_block_size, encode
from endor_ray.compress.calibrated import calibrated_layers
from endor_ray.compress.layer_writer import KEEP, LayerWriter
from endor_ray.store.manifest import seal
from endor_ray.compress.mixed import check_budget
from endor_ray.compress.prune import METHODS, check_sparsity
from endor_ray.store.store import DENSE_FILE, MANIFEST_NAME, STORE_FORMAT_VERSION, TOKENIZER_DIR, write_tensor_file

STORE_FORMATS = ("endor", "dense")
CONVERT_VALUES = ("raw", *QUANTIZED_ENCODINGS, KEEP)


@dataclass
class ConvertConfig:
    """How to turn a checkpoint into a store."""

    sparsity: float | None = None  # fraction of each Linear row set to zero, in [0, 1); None: 0.5 (0 with "keep")
    method: str = "wanda"  # "wanda" or "sparsegpt" (both calibrate) or "magnitude"
    values: str = "raw"  # kept values of Linear weights: "raw" (the stored dtype), "int8", "int4" or "keep"
    group_size: int = DEFAULT_GROUP_SIZE  # kept values per quantization scale
    bytes_per_weight: float | None = None  # mixed precision: per-tensor settings within this budget
    store_format: str = "endor"  # "endor": bitmap-sparse where it pays; "dense": all dense (baseline)
    dtype: str | None = None  # stored dtype; None keeps the checkpoint's (float32 if it names none)
    block_size: int = DEFAULT_BLOCK_SIZE  # format block size (elements per decompression program)
    calib_text: Path | None = None  # text file for Wanda; None: the model writes its own
    calib_samples: int | None = None  # calibration sequences; None: 16, or 64 for sparsegpt (see below)
    calib_seq_len: int = 128  # tokens per calibration sequence
    seed: int = 0
    force: bool = False  # replace an existing DST

    def __post_init__(self) -> None:
        if self.sparsity is None:
            self.sparsity = 0.0 if self.values == KEEP else 0.5
        check_sparsity(self.sparsity)
        if self.method not in METHODS:
            raise ConfigError(f"unknown pruning method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.store_format not in STORE_FORMATS:
            raise ConfigError(f"unknown store format {self.store_format!r}; choose one of {', '.join(STORE_FORMATS)}")
        if self.values not in CONVERT_VALUES:
            raise ConfigError(f"unknown values encoding {self.values!r}; choose one of {', '.join(CONVERT_VALUES)}")
        if self.values == KEEP and (self.sparsity > 0 or self.bytes_per_weight is not None):
            raise ConfigError("--values keep stores a GGUF file's blocks as they are; drop --sparsity and "
                              "--bytes-per-weight, or re-compress with --values raw, int8 or int4")
        if self.store_format == "dense" and (self.values != "raw" or self.bytes_per_weight is not None):
            raise ConfigError("--format dense is the unquantized baseline; use the endor format for --values "
                              "and --bytes-per-weight")
        if self.bytes_per_weight is not None:
            check_budget(self.bytes_per_weight)
            if self.method == "magnitude":
                raise ConfigError("--bytes-per-weight measures each setting on calibration inputs: use --method "
                                  "wanda or sparsegpt")
        if self.values not in ("raw", KEEP):
            try:
                check_encoding(self.values, self.group_size)
            except FormatError as exc:
                raise ConfigError(str(exc)) from None
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        check_block_size(self.block_size)
        if self.calib_samples is None:
            # SparseGPT reconstructs each Linear from a Hessian of its inputs, which needs more tokens
            # than Wanda's norms: on SmolLM2 at 50%, perplexity 77.7 with 16 samples, 63.0 with 64
            # (Wanda: 69.1 and 68.2), at about 70 s more of self-generated text (benchmarks/fidelity.py).
            self.calib_samples = 64 if self.method == "sparsegpt" else 16
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise ConfigError("calibration needs at least 1 sample of at least 2 tokens")
        if self.calib_text is not None and not Path(self.calib_text).is_file():
            raise ConfigError(f"calibration text file {self.calib_text} does not exist")


def _check_moe(checkpoint: TensorSource, config: ConvertConfig) -> None:
    """What an MoE model does not convert with yet, refused before any work."""
    layout = expert_layout(checkpoint.config)
    if layout is None:
        return
    model_type = checkpoint.architecture.model_type
    if config.values == KEEP:
        raise ConfigError(f"{model_type} is a Mixture-of-Experts model: a GGUF's own blocks do not cover experts "
                          "yet; pass --bytes-per-weight, or --method wanda, sparsegpt or magnitude with --sparsity "
                          "and --values raw, int8 or int4")
    if layout.transposed and (config.method == "sparsegpt" and needs_calibration(config)
                              or config.bytes_per_weight is not None):
        raise ConfigError(f"{model_type}'s experts multiply as x @ W (W [in, out]), which SparseGPT and "
                          "--bytes-per-weight do not quantize yet; pass --method wanda or magnitude (any --sparsity "
                          "and --values raw, int8 or int4)")


def source_dtype(config: dict[str, Any]) -> str:
    named = config.get("dtype") or config.get("torch_dtype") or "float32"
    return named if named in DTYPES else "float32"


def convert(source: str, destination: str | Path, config: ConvertConfig, progress: bool = True) -> Path:
    """Convert `source` (a local HF directory, a GGUF file or the embedded model's name) into a store."""
    if "://" in str(destination):
        raise ConfigError(f"stores are written to a local directory; got {destination} (copy it up afterwards)")
    destination = Path(destination)
    if destination.exists() and not config.force:  # fail before the (slow) model preparation
        raise StoreError(f"{destination} already exists; pass --force to replace it")
    checkpoint = open_source(source, keep_blocks=config.values == KEEP)
    _check_moe(checkpoint, config)
    dtype_str = config.dtype or source_dtype(checkpoint.config)
    dtype = DTYPES[dtype_str]
    with staged_directory(destination, config.force) as staging:
        calibration = _write_store(checkpoint, staging, config, dtype, progress)
        layers = calibration.pop("_layers")
        model_config = dict(checkpoint.config, dtype=dtype_str)
        model_config.pop("torch_dtype", None)
        manifest = {
            "format": "endor-ray store",
            "format_version": STORE_FORMAT_VERSION,
            "created_by": f"endor-ray {__version__}",
            "model": {"model_type": checkpoint.architecture.model_type, "dtype": dtype_str, "config": model_config},
            "compression": _compression(config, calibration, layers),
            "tokenizer_files": {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                                for path in sorted((staging / TOKENIZER_DIR).iterdir())},
            "dense": write_tensor_file(staging / DENSE_FILE, _dense_tensors(checkpoint, dtype, config), DENSE_FILE),
            "layers": layers,
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(seal(manifest), indent=1))
    return destination


def _compression(config: ConvertConfig, calibration: dict[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's record of how the layers were made (a kept GGUF: its types, "q4_1" or "q4_k+q6_k")."""
    record = {
        "format": config.store_format, "block_size": config.block_size,
        "sparsity": config.sparsity if config.bytes_per_weight is None else "mixed",
        "method": config.method if _compresses(config) else "none",
        "values": config.values if config.bytes_per_weight is None else "mixed",
        "group_size": config.group_size, "bytes_per_weight": config.bytes_per_weight,
        "calibration": calibration,
    }
    if config.values == KEEP:
        kept = sorted({tensor["values_encoding"] for layer in layers for tensor in layer["tensors"]
                       if tensor["values_encoding"] in GGUF_ENCODINGS})
        record.update(method="gguf", values="+".join(kept) or "raw", group_size=0)
    return record


def _dense_tensors(checkpoint: TensorSource, dtype: torch.dtype, config: ConvertConfig) -> dict[str, EncodedTensor]:
    """The tensors outside the layers; with a GGUF's own blocks kept, its embeddings and LM head
    keep theirs too (the file's bytes: on the CPU they are multiplied and gathered from them)."""
    names = checkpoint.dense_names()
    kept = kept_tensors(checkpoint, names, dtype, config.block_size) if config.values == KEEP else {}
    return {name: kept[name] if name in kept else encode(checkpoint.get(name).to(dtype), layout="dense")
            for name in names}


def _write_store(checkpoint: TensorSource, staging: Path, config: ConvertConfig, dtype: torch.dtype, progress: bool) -> dict[str, Any]:
    """Write tokenizer and layers into `staging`; return the calibration record (+ layer entries)."""
    (staging / TOKENIZER_DIR).mkdir()
    for path in checkpoint.tokenizer_files():
        shutil.copy2(path, staging / TOKENIZER_DIR / path.name)
    architecture = checkpoint.architecture
    layer_names = checkpoint.layer_names()
    moe = expert_layout(checkpoint.config)  # None: a dense family
    writer = LayerWriter(staging, config, dtype, architecture.num_layers, progress,
                         unpruned=frozenset() if moe is None else frozenset({moe.router_path + ".weight"}),
                         transposed_experts=moe is not None and moe.transposed)
    experts_of = {layer_idx: moe_experts(moe, checkpoint, names) for layer_idx, names in layer_names.items()}

    def load_layer(layer_idx: int, compute_dtype: torch.dtype = dtype, skip: dict | None = None) -> dict[str, torch.Tensor]:
        # Round through the stored dtype first, so pruning scores see the weights that are stored.
        # An MoE layer's experts are their own units (`write_experts`), its other tensors under the module's names.
        apart, fused = experts_of[layer_idx]
        in_experts = {full for names in apart.values() for full in names.values()} | set(fused.values())
        short_names = {full: architecture.split_name(full)[1] for full in layer_names[layer_idx] if full not in in_experts}
        if moe is not None:
            short_names = {full: moe.module_name(name) for full, name in short_names.items()}
        return {name: checkpoint.get(full).to(dtype).to(compute_dtype)
                for full, name in short_names.items() if name not in (skip or {})}

    def expert_units(layer_idx: int) -> dict[int, dict[str, torch.Tensor]]:
        """Each expert's unit ({param: its slice}, in the stored dtype); {} for a dense layer."""
        apart, fused = experts_of[layer_idx]
        where = f"layer {layer_idx} of {checkpoint.directory}"
        if apart:
            return {expert_idx: moe.fuse({part: checkpoint.get(full).to(dtype) for part, full in names.items()}, where)
                    for expert_idx, names in apart.items()}
        if not fused:
            return {}
        stacked = {param: checkpoint.get(full).to(dtype) for param, full in fused.items()}  # [experts, ...] each
        count = {tensor.shape[0] for tensor in stacked.values()}
        if len(count) != 1 or set(stacked) != set(moe.fused_in_checkpoint):
            raise UnsupportedModelError(f"{where}: fused expert tensors {sorted(stacked)} with expert counts "
                                        f"{sorted(count)}; expected {sorted(moe.fused_in_checkpoint)}, one count")
        return {expert_idx: {param: tensor[expert_idx].contiguous() for param, tensor in stacked.items()}
                for expert_idx in range(count.pop())}

    def load_with_experts(layer_idx: int, compute_dtype: torch.dtype = dtype) -> dict[str, torch.Tensor]:
        """The layer as its modules hold it: the experts fused as the experts module's parameters."""
        units = {expert: {param: tensor.to(compute_dtype) for param, tensor in unit.items()}
                 for expert, unit in expert_units(layer_idx).items()}
        return {**load_layer(layer_idx, compute_dtype), **(moe.stack_units(units) if units else {})}

    calibration: dict[str, Any] = {"source": "none"}
    if config.values == KEEP:
        for layer_idx in range(architecture.num_layers):
            kept = kept_tensors(checkpoint, layer_names[layer_idx], dtype, config.block_size)
            writer.write(layer_idx, load_layer(layer_idx, skip=kept), kept=kept)
    elif not needs_calibration(config):
        for layer_idx in range(architecture.num_layers):
            writer.write(layer_idx, load_layer(layer_idx))
            if units := expert_units(layer_idx):
                writer.write_experts(layer_idx, units)
    else:
        calibration = calibrated_layers(checkpoint, config, writer, load_layer if moe is None else load_with_experts)
    writer.bar.close()
    calibration["_layers"] = writer.entries
    return calibration


def moe_experts(layout: ExpertLayout | None, checkpoint: TensorSource, names: list[str]
                ) -> tuple[dict[int, dict[str, str]], dict[str, str]]:
    """An MoE layer's experts: (expert -> {its Linear's name in the checkpoint ('w1') -> full tensor
    name}, {a parameter the checkpoint holds fused for all experts ('gate_up_proj') -> full name})."""
    experts: dict[int, dict[str, str]] = {}
    fused: dict[str, str] = {}
    for full in names if layout is not None else []:
        name = checkpoint.architecture.split_name(full)[1]
        found, param = layout.split_expert(name), layout.fused_param(name)
        if found is not None:
            experts.setdefault(found[0], {})[found[1]] = full
        elif param is not None:
            fused[param] = full
    return experts, fused


def _compresses(config: ConvertConfig) -> bool:
    return config.sparsity > 0 or config.values not in ("raw", KEEP) or config.bytes_per_weight is not None


def needs_calibration(config: ConvertConfig) -> bool:
    """Whether the methods need calibration inputs: Wanda's norms, SparseGPT's and the mixed choice's Hessians."""
    if config.bytes_per_weight is not None:
        return True
    if config.method == "wanda":
        return config.sparsity > 0
    return config.method == "sparsegpt" and _compresses(config)
