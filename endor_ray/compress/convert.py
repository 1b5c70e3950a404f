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
from tqdm import tqdm

from endor_ray._version import __version__
from endor_ray.models.architecture import is_prunable
from endor_ray.models.moe import ExpertLayout, expert_layout
from endor_ray.utils.atomic import staged_directory
from endor_ray.utils.system import available_memory_bytes
from endor_ray.compress.checkpoint import TensorSource
from endor_ray.compress.default_model import open_source
from endor_ray.compress.gguf_source import kept_tensors
from endor_ray.errors import ConfigError, FormatError, StoreError, UnsupportedModelError
from endor_ray.format.gguf_blocks import GGUF_ENCODINGS
from endor_ray.format.quant import DEFAULT_GROUP_SIZE, QUANTIZED_ENCODINGS, check_encoding
from endor_ray.format.tensor import DEFAULT_BLOCK_SIZE, DTYPES, EncodedTensor, check_block_size, encode
from endor_ray.compress.setting import CalibrationStats, Setting, compress_weight
from endor_ray.store.manifest import seal
from endor_ray.compress.mixed import GPTQ_SETTINGS, check_budget, choose_global, measure
from endor_ray.compress.prune import METHODS, InputNormCollector, check_sparsity
from endor_ray.store.store import (
    DENSE_FILE, MANIFEST_NAME, PART_ALIGNMENT, STORE_FORMAT_VERSION, TOKENIZER_DIR, expert_file_name,
    layer_file_name, write_tensor_file,
)

STORE_FORMATS = ("endor", "dense")
KEEP = "keep"  # values: a GGUF's own blocks, stored as they are
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


def source_dtype(config: dict[str, Any]) -> str:
    named = config.get("dtype") or config.get("torch_dtype") or "float32"
    return named if named in DTYPES else "float32"


class _LayerWriter:
    """Prunes, encodes and writes layers into the staging directory, collecting manifest entries."""

    def __init__(self, staging: Path, config: ConvertConfig, dtype: torch.dtype, num_layers: int, progress: bool):
        self.staging, self.config, self.dtype = staging, config, dtype
        self.entries: list[dict[str, Any] | None] = [None] * num_layers
        self.measured: dict[int, tuple[int, int, dict[str, list]]] = {}  # whole-model budget: options per layer
        self.planned: dict[int, dict[str, Setting]] = {}  # ... and the settings chosen from them
        self.progress, self._bar = progress, None

    @property
    def bar(self) -> tqdm:
        """Made at the first layer written: calibration comes first and has its own bar."""
        if self._bar is None:
            self._bar = tqdm(total=len(self.entries), desc="convert", unit="layer", disable=not self.progress)
        return self._bar

    def write(self, layer_idx: int, weights: dict[str, torch.Tensor],
              stats: dict[str, CalibrationStats] | None = None,
              kept: dict[str, EncodedTensor] | None = None) -> dict[str, torch.Tensor]:
        """Compress and store one layer; return the weights the store now holds (dtype as given).

        `stats`: what calibration gathered for each weight, by name within the layer (None: none ran).
        `kept`: tensors stored as they are (a GGUF's own blocks), by name within the layer.
        """
        stored, encoded = self._encode(layer_idx, weights, stats, kept)
        file_name = layer_file_name(layer_idx)
        self.entries[layer_idx] = write_tensor_file(self.staging / file_name, encoded, file_name, layer_idx)
        sizes = sum(enc.nbytes for enc in encoded.values()), sum(enc.dense_nbytes for enc in encoded.values())
        self.bar.set_postfix(ratio=f"{sizes[0] / sizes[1]:.3f}")
        self.bar.update(1)
        return stored

    def _encode(self, layer_idx: int, weights: dict[str, torch.Tensor], stats: dict[str, CalibrationStats] | None,
                kept: dict[str, EncodedTensor] | None) -> tuple[dict[str, torch.Tensor], dict[str, EncodedTensor]]:
        """(weights as stored, their encodings) of one unit: a layer, or one expert of it."""
        config = self.config
        prunable = [name for name, weight in weights.items() if is_prunable(name, weight)]
        stats = stats or {}
        for name in prunable if stats else []:
            if stats[name].input_sq_sum is None:
                raise StoreError(f"layer {layer_idx}: {name} saw no calibration input; is it a Linear?")
        settings = {name: Setting(config.sparsity, "raw" if config.values == KEEP else config.values)
                    for name in prunable}
        if config.bytes_per_weight is not None:
            settings = self._choose(layer_idx, weights, prunable, stats)
        stored, encoded = {}, dict(kept or {})
        for name, weight in weights.items():
            layout = "dense" if config.store_format == "dense" or name not in settings else None
            setting = settings.get(name, Setting(0.0))
            if setting == Setting(0.0):
                encoded[name] = encode(weight.to(self.dtype), config.block_size, layout=layout)
                stored[name] = weight
            else:
                by_gptq = config.bytes_per_weight is not None and setting in GPTQ_SETTINGS  # as measured
                method = "sparsegpt" if by_gptq else config.method
                encoded[name], held = compress_weight(weight, setting, method, self.dtype, config.block_size,
                                                      config.group_size, stats.get(name), layout)
                stored[name] = held.to(weight.dtype)
        return stored, encoded

    def write_experts(self, layer_idx: int, experts: dict[int, dict[str, torch.Tensor]]) -> None:
        """Compress and store each expert of an MoE layer (written after the layer) as its own file."""
        entries = []
        for expert_idx, weights in sorted(experts.items()):
            _, encoded = self._encode(layer_idx, weights, None, None)
            file_name = expert_file_name(layer_idx, expert_idx)
            entry = write_tensor_file(self.staging / file_name, encoded, file_name, layer_idx)
            entries.append({"expert": expert_idx, "file": entry["file"], "nbytes": entry["nbytes"],
                            "tensors": entry["tensors"]})
        self.entries[layer_idx]["experts"] = entries

    def _choose(self, layer_idx: int, weights: dict[str, torch.Tensor], prunable: list[str],
                stats: dict[str, CalibrationStats]) -> dict[str, Setting]:
        """Mixed precision: each prunable tensor's setting, from the whole model's plan (`plan`)."""
        if layer_idx not in self.planned:
            raise StoreError(f"layer {layer_idx} has no mixed-precision plan (internal: measure and plan first)")
        return self.planned[layer_idx]

    def measure(self, layer_idx: int, weights: dict[str, torch.Tensor], stats: dict[str, CalibrationStats],
                sensitivities: dict[str, torch.Tensor] | None = None) -> None:
        """Record one layer's options for the whole model's plan (nothing is written); with the
        loss's output sensitivities (`endor_ray.compress.sensitivity`), errors are predicted losses."""
        config = self.config
        prunable = [name for name, weight in weights.items() if is_prunable(name, weight)]
        fixed = sum(encode(weights[name].to(self.dtype), layout="dense").nbytes
                    for name in weights if name not in prunable)
        # The budget is the layer files' bytes (what bytes per weight reports), so their header and
        # alignment count too: about one padded part and its JSON entry (~100 bytes) per tensor (a
        # SmolLM2 layer of GGUF blocks has ~960 such bytes; this allows ~1550).
        fixed += 8 + PART_ALIGNMENT + len(weights) * (PART_ALIGNMENT + 100)
        numel = sum(weight.numel() for weight in weights.values())
        options = {}
        for name in prunable:  # "self_attn.q_proj.weight" -> its module's "{layer}.self_attn.q_proj"
            row_weights = None if sensitivities is None else sensitivities[f"{layer_idx}.{name.rpartition('.')[0]}"]
            options[name] = measure(weights[name], stats[name], self.dtype, config.block_size, config.group_size,
                                    row_weights)
        self.measured[layer_idx] = (fixed, numel, options)

    def plan(self) -> None:
        """One budget for all decoder layers: each tensor's setting by `choose_global` over every
        measured layer (bytes may move to the layers whose tensors lose most per byte)."""
        fixed = sum(entry[0] for entry in self.measured.values())
        numel = sum(entry[1] for entry in self.measured.values())
        options = {(layer_idx, name): candidates for layer_idx, entry in self.measured.items()
                   for name, candidates in entry[2].items()}
        least = fixed + sum(min(option.nbytes for option in candidates) for candidates in options.values())
        if least > self.config.bytes_per_weight * numel:
            raise ConfigError(f"the decoder layers need at least {least / numel:.3f} bytes per weight even at their "
                              f"cheapest settings; raise --bytes-per-weight (got {self.config.bytes_per_weight})")
        for (layer_idx, name), setting in choose_global(options, self.config.bytes_per_weight * numel - fixed).items():
            self.planned.setdefault(layer_idx, {})[name] = setting


def convert(source: str, destination: str | Path, config: ConvertConfig, progress: bool = True) -> Path:
    """Convert `source` (a local HF directory, a GGUF file or the embedded model's name) into a store."""
    if "://" in str(destination):
        raise ConfigError(f"stores are written to a local directory; got {destination} (copy it up afterwards)")
    destination = Path(destination)
    if destination.exists() and not config.force:  # fail before the (slow) model preparation
        raise StoreError(f"{destination} already exists; pass --force to replace it")
    checkpoint = open_source(source, keep_blocks=config.values == KEEP)
    if expert_layout(checkpoint.config) is not None and (needs_calibration(config) or config.values == KEEP):
        raise ConfigError(f"{checkpoint.architecture.model_type} is a Mixture-of-Experts model: its experts convert "
                          "without calibration for now; pass --method magnitude (any --sparsity, --values raw, int8 "
                          "or int4), or --sparsity 0")
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
            "dense": write_tensor_file(staging / DENSE_FILE, _dense_tensors(checkpoint, dtype), DENSE_FILE),
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


def _dense_tensors(checkpoint: TensorSource, dtype: torch.dtype) -> dict[str, EncodedTensor]:
    return {name: encode(checkpoint.get(name).to(dtype), layout="dense") for name in checkpoint.dense_names()}


def _write_store(checkpoint: TensorSource, staging: Path, config: ConvertConfig, dtype: torch.dtype, progress: bool) -> dict[str, Any]:
    """Write tokenizer and layers into `staging`; return the calibration record (+ layer entries)."""
    (staging / TOKENIZER_DIR).mkdir()
    for path in checkpoint.tokenizer_files():
        shutil.copy2(path, staging / TOKENIZER_DIR / path.name)
    architecture = checkpoint.architecture
    layer_names = checkpoint.layer_names()
    writer = _LayerWriter(staging, config, dtype, architecture.num_layers, progress)
    moe = expert_layout(checkpoint.config)  # None: a dense family
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

    def write_experts(layer_idx: int) -> None:
        apart, fused = experts_of[layer_idx]
        where = f"layer {layer_idx} of {checkpoint.directory}"
        if apart:
            writer.write_experts(layer_idx, {
                expert_idx: moe.fuse({part: checkpoint.get(full).to(dtype) for part, full in names.items()}, where)
                for expert_idx, names in apart.items()})
        elif fused:  # [experts, ...] each: cut into the experts' slices
            stacked = {param: checkpoint.get(full).to(dtype) for param, full in fused.items()}
            count = {tensor.shape[0] for tensor in stacked.values()}
            if len(count) != 1 or set(stacked) != set(moe.fused_in_checkpoint):
                raise UnsupportedModelError(f"{where}: fused expert tensors {sorted(stacked)} with expert counts "
                                            f"{sorted(count)}; expected {sorted(moe.fused_in_checkpoint)}, one count")
            writer.write_experts(layer_idx, {expert_idx: {param: tensor[expert_idx].contiguous()
                                                          for param, tensor in stacked.items()}
                                             for expert_idx in range(count.pop())})

    calibration: dict[str, Any] = {"source": "none"}
    if config.values == KEEP:
        for layer_idx in range(architecture.num_layers):
            kept = kept_tensors(checkpoint, layer_names[layer_idx], dtype, config.block_size)
            writer.write(layer_idx, load_layer(layer_idx, skip=kept), kept=kept)
    elif not needs_calibration(config):
        for layer_idx in range(architecture.num_layers):
            writer.write(layer_idx, load_layer(layer_idx))
            write_experts(layer_idx)
    else:
        calibration = _calibrated_layers(checkpoint, config, writer, load_layer)
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


@torch.no_grad()
def _calibrated_layers(checkpoint: TensorSource, config: ConvertConfig, writer: _LayerWriter, load_layer) -> dict[str, Any]:
    """Run calibration tokens through the model once, pruning and writing each layer as it finishes."""
    from endor_ray.compress.calibration import self_calibration_ids, text_calibration_ids
    from endor_ray.models.skeleton import build_skeleton, decoder_layers, materialize_layer, prefetching, stream_layers

    architecture = checkpoint.architecture
    compute_dtype = torch.float32  # scores and activations in fp32 whatever is stored
    dense = {name: checkpoint.get(name).to(writer.dtype) for name in checkpoint.dense_names()}
    model = build_skeleton(checkpoint.config, dense, dtype=compute_dtype)

    def load_compute(layer_idx: int) -> dict[str, torch.Tensor]:
        return load_layer(layer_idx, compute_dtype)

    if config.calib_text is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint.directory)
        ids = text_calibration_ids(tokenizer, config.calib_text, config.calib_samples, config.calib_seq_len)
        record = {"source": "file", "file": Path(config.calib_text).name}
    else:
        # One pass over all layers per generated token. A model that fits in memory is read once and
        # kept (seconds for the embedded model); a larger one is streamed from the checkpoint each pass.
        layer_bytes = checkpoint.layer_nbytes(torch.float32)
        resident = layer_bytes < 0.5 * available_memory_bytes()
        loaded = ({idx: load_compute(idx) for idx in tqdm(range(architecture.num_layers), desc="load for calibration",
                                                          unit="layer", disable=not writer.progress)}
                  if resident else None)
        passes = tqdm(total=config.calib_seq_len - 1, desc="write calibration text", unit="token",
                      disable=not writer.progress)

        with prefetching(load_compute, architecture.num_layers) as load_next:
            def load_counting(layer_idx: int) -> dict[str, torch.Tensor]:
                if layer_idx == 0:
                    passes.update(1)
                return loaded[layer_idx] if loaded is not None else load_next(layer_idx)

            with stream_layers(model, architecture, load_counting):
                ids = self_calibration_ids(model, config.calib_samples, config.calib_seq_len, config.seed)
        passes.close()
        del loaded
        record = {"source": "self-generated", "seed": config.seed}
    record.update(num_samples=ids.shape[0], seq_len=ids.shape[1])

    collector = InputNormCollector(hessians=config.method == "sparsegpt" or config.bytes_per_weight is not None)

    def prune_and_rerun(layer_idx: int, layer, args: tuple, kwargs: dict, output):
        weights = dict(layer.state_dict())
        stats = {name: CalibrationStats(collector.input_sq_sum(f"{layer_idx}.{name}"),
                                        collector.hessian(f"{layer_idx}.{name}")) for name in weights}
        pruned = writer.write(layer_idx, weights, stats)
        collector.clear()
        # The next layer calibrates on what the *pruned* layer outputs (as in Wanda).
        materialize_layer(layer, pruned)
        collector.enabled = False
        try:
            return layer.forward(*args, **kwargs)
        finally:
            collector.enabled = True

    layers = decoder_layers(model, architecture)
    if config.bytes_per_weight is not None:
        # One budget for the whole model: every layer's options are measured first, on the
        # unpruned model's activations, then the plan is made and the pass below applies it. A
        # model that fits in memory also gets the loss's sensitivity to each Linear's outputs,
        # which puts every tensor's error on the scale of the loss.
        sensitivities = None
        if checkpoint.layer_nbytes(torch.float32) < 0.5 * available_memory_bytes():
            sensitivities = _loss_sensitivities(model, layers, load_compute, ids)

        def measure_only(layer_idx: int, layer, args: tuple, kwargs: dict, output):
            weights = dict(layer.state_dict())
            writer.measure(layer_idx, weights, {
                name: CalibrationStats(collector.input_sq_sum(f"{layer_idx}.{name}"),
                                       collector.hessian(f"{layer_idx}.{name}")) for name in weights},
                sensitivities)
            collector.clear()
            return output

        with (prefetching(load_compute, architecture.num_layers, cyclic=False) as load_next, collector.watch(layers),
              stream_layers(model, architecture, load_next, after_layer=measure_only)):
            model(input_ids=ids, use_cache=False)
        writer.plan()
    with (prefetching(load_compute, architecture.num_layers, cyclic=False) as load_next, collector.watch(layers),
          stream_layers(model, architecture, load_next, after_layer=prune_and_rerun)):
        model(input_ids=ids, use_cache=False)
    return record


def _loss_sensitivities(model, layers, load_layer, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every Linear's output sensitivity on the calibration ids, the whole model in memory once."""
    from endor_ray.compress.sensitivity import output_sensitivities
    from endor_ray.models.skeleton import materialize_layer, release_layer

    for layer_idx, layer in enumerate(layers):
        materialize_layer(layer, load_layer(layer_idx))
    try:
        with torch.enable_grad():
            return output_sensitivities(model, layers, ids)
    finally:
        for layer in layers:
            release_layer(layer)
