"""A transformers model whose decoder layers hold no weights until they run.

`build_skeleton` creates the architecture's own CausalLM module on the meta device and gives real
tensors only to what lies outside the decoder layers (embeddings, final norm, LM head, rotary
tables). `stream_layers` installs forward hooks so that the model's *own* forward pass (masks,
rotary embeddings, KV cache: all transformers code) asks a callback for each layer's weights just
before the layer runs and hands the layer back just after. Calibration for pruning uses this, and
so does any code that runs a model larger than memory.

Importing this module imports transformers (seconds); keep it out of light import paths.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from endor_ray.models.architecture import Architecture, architecture_from_config
from endor_ray.errors import UnsupportedModelError

LoadLayer = Callable[[int], dict[str, torch.Tensor]]
# (layer_idx, layer module, args, kwargs, output) -> output to pass on
AfterLayer = Callable[[int, nn.Module, tuple, dict, Any], Any]


def hf_config(config: dict[str, Any]) -> PretrainedConfig:
    """A transformers config object from a config.json dict."""
    fields = {key: value for key, value in config.items() if key != "model_type"}
    return AutoConfig.for_model(config["model_type"], **fields)


def decoder_layers(model: nn.Module, architecture: Architecture) -> nn.ModuleList:
    return operator.attrgetter(architecture.layers_path)(model)


def build_skeleton(
    config: dict[str, Any],
    dense_tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """The CausalLM with real non-layer weights on `device` and meta-device decoder layers."""
    architecture = architecture_from_config(config)
    with torch.device("meta"):
        model = _from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)

    state = {name: tensor.to(device=device, dtype=dtype) for name, tensor in dense_tensors.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise UnsupportedModelError(f"tensors the model does not have: {result.unexpected_keys[:5]}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()

    layers_path = architecture.layers_path + "."
    for module_name, module in model.named_modules():
        if module_name.startswith(layers_path) or module_name == architecture.layers_path:
            continue
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if any(tensor.is_meta for _, tensor in own):
            # Non-persistent buffers (rotary inv_freq, Gemma's embed_scale) are not in any checkpoint:
            # recompute them with transformers' own initialisation, as from_pretrained does. Tensors
            # the checkpoint gave (Gemma's embedding beside its embed_scale) are flagged so that
            # transformers' init functions leave them as they are.
            for name, tensor in own:
                if not tensor.is_meta:
                    tensor._is_hf_initialized = True
                elif name in module._parameters:
                    empty = torch.empty_like(tensor, device=device)
                    module._parameters[name] = nn.Parameter(empty, requires_grad=False)
                else:
                    module._buffers[name] = torch.empty_like(tensor, device=device)
            model._init_weights(module)
    missing = [
        name for name, tensor in list(model.named_parameters()) + list(model.named_buffers())
        if tensor.is_meta and not name.startswith(layers_path)
    ]
    if missing:
        raise UnsupportedModelError(f"the checkpoint lacks non-layer tensors: {missing[:5]}")
    return model


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[..., vocab] logits from final hidden states [..., hidden], as the family's CausalLM forward
    makes them: the LM head, then Granite's division by logits_scaling, Cohere's logit_scale and
    Gemma's final soft-capping (cap * tanh(logits / cap))."""
    config = model.config
    logits = model.lm_head(hidden)
    if config.model_type in ("granite",):
        logits = logits / config.logits_scaling
    if config.model_type in ("cohere", "cohere2"):
        logits = logits * config.logit_scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def materialize_layer(layer: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Give a meta-device layer real weights (no copy: the tensors become its parameters)."""
    layer.load_state_dict(weights, strict=True, assign=True)


def release_layer(layer: nn.Module) -> None:
    """Drop the layer's weights (back to meta), so their memory can be freed or reused."""
    layer.to("meta")


@contextlib.contextmanager
def stream_layers(
    model: nn.Module,
    architecture: Architecture,
    load_layer: LoadLayer,
    after_layer: AfterLayer | None = None,
    layer_indices: list[int] | None = None,
) -> Iterator[None]:
    """While active, each decoder layer (or those in `layer_indices`) gets `load_layer(idx)`
    before it runs and is released after."""
    handles = []
    layers = decoder_layers(model, architecture)
    streamed = range(len(layers)) if layer_indices is None else layer_indices
    for layer_idx in streamed:
        layer = layers[layer_idx]

        def before(module: nn.Module, args: tuple, kwargs: dict, layer_idx: int = layer_idx) -> None:
            materialize_layer(module, load_layer(layer_idx))

        def after(module: nn.Module, args: tuple, kwargs: dict, output: Any, layer_idx: int = layer_idx) -> Any:
            if after_layer is not None:
                output = after_layer(layer_idx, module, args, kwargs, output)
            release_layer(module)
            return output

        handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.register_forward_hook(after, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer_idx in streamed:
            release_layer(layers[layer_idx])


@contextlib.contextmanager
def prefetching(load_layer: LoadLayer, num_layers: int, cyclic: bool = True) -> Iterator[LoadLayer]:
    """`load_layer` with the next layer read on a background thread while the current one
    computes, for streamed passes over a model larger than memory (`cyclic`: after the last
    layer, the next pass's layer 0). At most two layers are in memory at once."""
    from concurrent.futures import ThreadPoolExecutor

    from endor_ray.utils.prefetch import Prefetcher

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="endor-prefetch")

    def cancel(futures: list) -> None:
        for future in futures:
            future.cancel()

    prefetcher = Prefetcher(range(num_layers), 1, lambda layer_idx: pool.submit(load_layer, layer_idx), cancel, cyclic)

    def load(layer_idx: int) -> dict:
        future = prefetcher.claim(layer_idx)  # None: out of order, what was guessed is cancelled
        if future is not None:
            prefetcher.finish(layer_idx)
        weights = future.result() if future is not None else load_layer(layer_idx)
        prefetcher.ahead(layer_idx)
        return weights

    try:
        yield load
    finally:
        prefetcher.drop()
        pool.shutdown(wait=True)


def check_tensors_match(model: nn.Module, architecture: Architecture, layer_tensors: list[dict[str, tuple]],
                        where: str) -> None:
    """Every decoder layer lists exactly the tensors the model's layer has, with their shapes.

    `layer_tensors`: per layer, tensor name (within the layer) -> shape. The model may be the
    meta-device skeleton: only names and shapes are compared. StoreError names the first mismatch.
    """
    from endor_ray.errors import StoreError

    layers = decoder_layers(model, architecture)
    for layer_idx, tensors in enumerate(layer_tensors):
        # per layer: DeepSeek-V3's first layers are dense, the rest MoE
        expected = {name: tuple(tensor.shape) for name, tensor in layers[layer_idx].state_dict().items()}
        given = {name: tuple(shape) for name, shape in tensors.items()}
        missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
        if missing or unexpected:
            raise StoreError(f"{where}: layer {layer_idx} lacks {missing[:3]} / has unexpected {unexpected[:3]} "
                             f"for a {architecture.model_type} layer; re-run endor convert")
        wrong = [name for name in expected if given[name] != expected[name]]
        if wrong:
            name = wrong[0]
            raise StoreError(f"{where}: layer {layer_idx} {name} has shape {list(given[name])}, the model's is "
                             f"{list(expected[name])}; re-run endor convert")


def meta_model(config: dict[str, Any]) -> nn.Module:
    """The architecture's model with every tensor on the meta device (names and shapes only)."""
    with torch.device("meta"):
        return _from_config(config)


def _from_config(config: dict[str, Any], **options: Any) -> nn.Module:
    """The architecture's CausalLM for a config dict; UnsupportedModelError (one line) where
    transformers rejects the config (a store's tampered manifest, a damaged config.json)."""
    try:
        return AutoModelForCausalLM.from_config(hf_config(config), **options)
    except Exception as exc:  # noqa: BLE001 - transformers raises KeyError, ZeroDivisionError, its own errors...
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise UnsupportedModelError(f"transformers rejects the model config ({type(exc).__name__}: {reason}); check "
                                    "the config (a store's config is its manifest's: re-run endor convert)") from None
