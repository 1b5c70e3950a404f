"""Calibrated conversion: calibration tokens run through the model once, layer by layer, and each
layer is measured (one budget), pruned and written as it finishes; the next layer calibrates on
what the pruned layer outputs (as in Wanda).

An MoE layer arrives with its experts fused in its experts module (`load_layer` stacks them),
which runs transformers' eager loop; each expert's Linears are calibrated on the tokens routed
to it (`InputNormCollector.watch_experts`) and written as its own unit. An expert that no
calibration token reached is pruned by magnitude: Wanda with unit input norms, SparseGPT with an
identity Hessian (no compensation); the record counts them."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from endor_ray.compress.checkpoint import TensorSource
from endor_ray.compress.layer_writer import LayerWriter
from endor_ray.compress.prune import InputNormCollector
from endor_ray.compress.setting import CalibrationStats
from endor_ray.models.moe import expert_layout
from endor_ray.utils.memory import memory_limit

if TYPE_CHECKING:
    from endor_ray.compress.convert import ConvertConfig


def free_memory() -> int:
    """What this process may still allocate: its cgroup's room or the machine's available memory."""
    return memory_limit().available_bytes


@torch.no_grad()
def calibrated_layers(checkpoint: TensorSource, config: ConvertConfig, writer: LayerWriter, load_layer) -> dict[str, Any]:
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
        resident = layer_bytes < 0.5 * free_memory()
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
    layout = expert_layout(checkpoint.config)
    if layout is not None:
        model.set_experts_implementation("eager")  # the loop whose F.linear calls watch_experts sees
        record["experts_without_tokens"] = 0

    def stats_of(key: str) -> CalibrationStats:
        return CalibrationStats(collector.input_sq_sum(key), collector.hessian(key))

    def expert_stats(layer_idx: int, units: dict[int, dict[str, torch.Tensor]], count: bool = True
                     ) -> dict[int, dict[str, CalibrationStats]]:
        stats = {}
        for expert, unit in units.items():
            prefix = f"{layer_idx}.{layout.experts_path}.{expert}"
            stats[expert] = {param: stats_of(f"{prefix}.{param}") for param in unit}
            if any(stat.input_sq_sum is None for param, stat in stats[expert].items() if unit[param].dim() == 2):
                record["experts_without_tokens"] += count  # magnitude: unit norms, an identity Hessian
                stats[expert] = {param: CalibrationStats(
                    torch.ones(layout.in_features(weight)),
                    torch.eye(layout.in_features(weight)) if collector.full else None)
                    for param, weight in unit.items() if weight.dim() == 2}
        return stats

    def prune_and_rerun(layer_idx: int, layer, args: tuple, kwargs: dict, output):
        weights, units = dict(layer.state_dict()), {}
        if layout is not None:
            weights, units = layout.split_units(weights)
        stats = {name: stats_of(f"{layer_idx}.{name}") for name in weights}
        pruned = writer.write(layer_idx, weights, stats)
        if units:
            pruned.update(layout.stack_units(writer.write_experts(layer_idx, units, expert_stats(layer_idx, units))))
        collector.clear()
        # The next layer calibrates on what the *pruned* layer outputs (as in Wanda).
        materialize_layer(layer, pruned)
        collector.enabled = False
        try:
            return layer.forward(*args, **kwargs)
        finally:
            collector.enabled = True

    layers = decoder_layers(model, architecture)

    def watch_experts():
        return collector.watch_experts(layers, layout.experts_path) if layout is not None else contextlib.nullcontext()

    if config.bytes_per_weight is not None:
        # One budget for the whole model: every layer's options are measured first, on the
        # unpruned model's activations, then the plan is made and the pass below applies it. A
        # model that fits in memory also gets the loss's sensitivity to each Linear's outputs,
        # which puts every tensor's error on the scale of the loss. (Not for an MoE model: its experts
        # are no Linear modules to take the sensitivities of, so every error stays an output error.)
        sensitivities = None
        if layout is None and checkpoint.layer_nbytes(torch.float32) < 0.5 * free_memory():
            sensitivities = loss_sensitivities(model, layers, load_compute, ids)

        def measure_only(layer_idx: int, layer, args: tuple, kwargs: dict, output):
            weights, units = dict(layer.state_dict()), {}
            if layout is not None:
                weights, units = layout.split_units(weights)
            writer.measure(layer_idx, weights, {name: stats_of(f"{layer_idx}.{name}") for name in weights},
                           sensitivities)
            for expert, stats in expert_stats(layer_idx, units, count=False).items():
                writer.measure(layer_idx, units[expert], stats, expert=expert)
            collector.clear()
            return output

        with (prefetching(load_compute, architecture.num_layers, cyclic=False) as load_next, collector.watch(layers),
              watch_experts(), stream_layers(model, architecture, load_next, after_layer=measure_only)):
            model(input_ids=ids, use_cache=False)
        writer.plan()
    with (prefetching(load_compute, architecture.num_layers, cyclic=False) as load_next, collector.watch(layers),
          watch_experts(), stream_layers(model, architecture, load_next, after_layer=prune_and_rerun)):
        model(input_ids=ids, use_cache=False)
    return record


def loss_sensitivities(model, layers, load_layer, ids: torch.Tensor) -> dict[str, torch.Tensor]:
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
