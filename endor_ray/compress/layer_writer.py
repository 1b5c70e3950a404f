"""One conversion's layer writer: each decoder layer (and each MoE expert) compressed, encoded and
written into the staging directory as it comes, its manifest entry kept; under one
``--bytes-per-weight`` budget, every layer's options measured first and one plan made for all."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from endor_ray.compress.mixed import GPTQ_SETTINGS, choose_global, measure
from endor_ray.compress.setting import CalibrationStats, Setting, compress_weight, prune
from endor_ray.errors import ConfigError, StoreError
from endor_ray.format.tensor import EncodedTensor, decode, encode
from endor_ray.models.architecture import is_prunable
from endor_ray.store.store import PART_ALIGNMENT, expert_file_name, layer_file_name, write_tensor_file

if TYPE_CHECKING:
    from endor_ray.compress.convert import ConvertConfig

KEEP = "keep"  # values: a GGUF's own blocks, stored as they are


class LayerWriter:
    """Prunes, encodes and writes layers into the staging directory, collecting manifest entries."""

    def __init__(self, staging: Path, config: ConvertConfig, dtype: torch.dtype, num_layers: int, progress: bool,
                 unpruned: frozenset[str] = frozenset(), transposed_experts: bool = False):
        """`unpruned`: names inside a layer stored as they are whatever the settings (an MoE router:
        a few thousand weights that choose which experts run). `transposed_experts`: the experts'
        weights are [in, out] (x @ W, gpt-oss): each is pruned as its transpose, so that every output
        loses the same count of inputs, as a Linear's rows do, then stored as it is."""
        self.staging, self.config, self.dtype, self.unpruned = staging, config, dtype, unpruned
        self.transposed_experts = transposed_experts
        self.entries: list[dict[str, Any] | None] = [None] * num_layers
        # whole-model budget: options per unit (a layer, or (layer, expert) for an MoE expert) ...
        self.measured: dict[int | tuple[int, int], tuple[int, int, dict[str, list]]] = {}
        self.planned: dict[int | tuple[int, int], dict[str, Setting]] = {}  # ... and the settings chosen from them
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

    def _encode(self, unit: int | tuple[int, int], weights: dict[str, torch.Tensor],
                stats: dict[str, CalibrationStats] | None, kept: dict[str, EncodedTensor] | None
                ) -> tuple[dict[str, torch.Tensor], dict[str, EncodedTensor]]:
        """(weights as stored, their encodings) of one unit: a layer, or one expert of it ((layer, expert))."""
        config = self.config
        prunable = self._prunable(weights)
        stats = stats or {}
        for name in prunable if stats else []:
            if stats[name].input_sq_sum is None:
                where = f"layer {unit}" if isinstance(unit, int) else f"layer {unit[0]} expert {unit[1]}"
                raise StoreError(f"{where}: {name} saw no calibration input; is it a Linear?")
        settings = {name: Setting(config.sparsity, "raw" if config.values == KEEP else config.values)
                    for name in prunable}
        if config.bytes_per_weight is not None:
            settings = self._choose(unit)
        stored, encoded = {}, dict(kept or {})
        for name, weight in weights.items():
            layout = "dense" if config.store_format == "dense" or name not in settings else None
            setting = settings.get(name, Setting(0.0))
            if setting == Setting(0.0):
                encoded[name] = encode(weight.to(self.dtype), config.block_size, layout=layout)
                stored[name] = weight
            elif self.transposed_experts and isinstance(unit, tuple):  # magnitude or Wanda (convert refuses others)
                pruned = prune(weight.T, setting.sparsity, config.method, stats.get(name) or CalibrationStats()).T
                encoded[name] = encode(pruned.to(self.dtype).contiguous(), config.block_size, layout=layout,
                                       encoding=setting.values, group_size=config.group_size)
                stored[name] = decode(encoded[name]).to(weight.dtype)
            else:
                by_gptq = config.bytes_per_weight is not None and setting in GPTQ_SETTINGS  # as measured
                method = "sparsegpt" if by_gptq else config.method
                encoded[name], held = compress_weight(weight, setting, method, self.dtype, config.block_size,
                                                      config.group_size, stats.get(name), layout)
                stored[name] = held.to(weight.dtype)
        return stored, encoded

    def write_experts(self, layer_idx: int, experts: dict[int, dict[str, torch.Tensor]],
                      stats: dict[int, dict[str, CalibrationStats]] | None = None
                      ) -> dict[int, dict[str, torch.Tensor]]:
        """Compress and store each expert of an MoE layer (written after the layer) as its own file;
        return each expert's weights as stored. `stats`: per expert, what calibration gathered."""
        entries, stored = [], {}
        for expert_idx, weights in sorted(experts.items()):
            stored[expert_idx], encoded = self._encode((layer_idx, expert_idx), weights,
                                                       (stats or {}).get(expert_idx), None)
            file_name = expert_file_name(layer_idx, expert_idx)
            entry = write_tensor_file(self.staging / file_name, encoded, file_name, layer_idx)
            entries.append({"expert": expert_idx, "file": entry["file"], "nbytes": entry["nbytes"],
                            "tensors": entry["tensors"]})
        self.entries[layer_idx]["experts"] = entries
        return stored

    def _prunable(self, weights: dict[str, torch.Tensor]) -> list[str]:
        return [name for name, weight in weights.items() if is_prunable(name, weight) and name not in self.unpruned]

    def _choose(self, unit: int | tuple[int, int]) -> dict[str, Setting]:
        """Mixed precision: each prunable tensor's setting, from the whole model's plan (`plan`)."""
        if unit not in self.planned:
            raise StoreError(f"unit {unit} has no mixed-precision plan (internal: measure and plan first)")
        return self.planned[unit]

    def measure(self, layer_idx: int, weights: dict[str, torch.Tensor], stats: dict[str, CalibrationStats],
                sensitivities: dict[str, torch.Tensor] | None = None, expert: int | None = None) -> None:
        """Record one layer's (or one of its experts') options for the whole model's plan (nothing is
        written); with the loss's output sensitivities (`endor_ray.compress.sensitivity`; none for an
        expert), errors are predicted losses."""
        config = self.config
        prunable = self._prunable(weights)
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
        self.measured[layer_idx if expert is None else (layer_idx, expert)] = (fixed, numel, options)

    def plan(self) -> None:
        """One budget for all decoder layers: each tensor's setting by `choose_global` over every
        measured layer (bytes may move to the layers whose tensors lose most per byte)."""
        fixed = sum(entry[0] for entry in self.measured.values())
        numel = sum(entry[1] for entry in self.measured.values())
        options = {(unit, name): candidates for unit, entry in self.measured.items()
                   for name, candidates in entry[2].items()}
        least = fixed + sum(min(option.nbytes for option in candidates) for candidates in options.values())
        if least > self.config.bytes_per_weight * numel:
            raise ConfigError(f"the decoder layers need at least {least / numel:.3f} bytes per weight even at their "
                              f"cheapest settings; raise --bytes-per-weight (got {self.config.bytes_per_weight})")
        for (unit, name), setting in choose_global(options, self.config.bytes_per_weight * numel - fixed).items():
            self.planned.setdefault(unit, {})[name] = setting
