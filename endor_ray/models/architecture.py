"""Which checkpoints endor-ray understands, and how their tensors split into decoder layers.

A checkpoint tensor is either a *layer tensor* (``model.layers.3.mlp.up_proj.weight`` is layer 3's
``mlp.up_proj.weight``) or a *dense tensor* (embeddings, final norm, LM head). Only the 2-D
weights of layer tensors (the Linear weights) are pruned and stored sparse.

This module imports neither transformers nor Ray; `endor_ray.models.skeleton` builds the modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from endor_ray.errors import UnsupportedModelError

# model_type -> prefix of decoder-layer tensor names. All of these run through transformers' own
# modeling code, so attention and KV caching are never re-implemented here.
LAYER_PREFIXES: dict[str, str] = {
    "llama": "model.layers.",
    "mistral": "model.layers.",
    "qwen2": "model.layers.",
    "qwen3": "model.layers.",
    "opt": "model.decoder.layers.",
    "gemma2": "model.layers.",
    "gemma3_text": "model.layers.",
    "phi3": "model.layers.",
    "olmo2": "model.layers.",
    "granite": "model.layers.",
    "gemma": "model.layers.",
    "cohere": "model.layers.",
    "cohere2": "model.layers.",
    "olmo3": "model.layers.",
    "smollm3": "model.layers.",
    "stablelm": "model.layers.",
    "starcoder2": "model.layers.",
    "phi": "model.layers.",
    # Mixture-of-Experts families (`endor_ray.models.moe`): each expert its own unit in the store
    "mixtral": "model.layers.",
    "qwen2_moe": "model.layers.",
    "qwen3_moe": "model.layers.",
    "deepseek_v3": "model.layers.",
    "gpt_oss": "model.layers.",
}


@dataclass(frozen=True)
class Architecture:
    """The naming facts of one supported architecture."""

    model_type: str
    num_layers: int

    @property
    def layer_prefix(self) -> str:
        return LAYER_PREFIXES[self.model_type]

    @property
    def layers_path(self) -> str:
        """Attribute path of the decoder-layer ModuleList inside the CausalLM module."""
        return self.layer_prefix.rstrip(".")

    @property
    def body_path(self) -> str:
        """Attribute path of the module that returns the final hidden states (the LM head's input)."""
        return self.layer_prefix[: -len(".layers.")]

    def split_name(self, name: str) -> tuple[int | None, str]:
        """('model.layers.3.mlp.up_proj.weight') -> (3, 'mlp.up_proj.weight'); (None, name) if dense."""
        match = re.match(re.escape(self.layer_prefix) + r"(\d+)\.(.+)$", name)
        if match is None:
            return None, name
        layer_idx = int(match.group(1))
        if layer_idx >= self.num_layers:
            raise UnsupportedModelError(
                f"tensor {name} belongs to layer {layer_idx}, but config.json says "
                f"num_hidden_layers={self.num_layers}; check that config and weights match"
            )
        return layer_idx, match.group(2)

    def full_name(self, layer_idx: int, name: str) -> str:
        """Inverse of `split_name` for a layer tensor."""
        return f"{self.layer_prefix}{layer_idx}.{name}"


def architecture_from_config(config: dict[str, Any]) -> Architecture:
    """The Architecture for a Hugging Face config.json dict, or UnsupportedModelError."""
    model_type = config.get("model_type")
    if model_type not in LAYER_PREFIXES:
        named = config.get("architectures") or [model_type]
        raise UnsupportedModelError(
            f"architecture {named[0]!r} (model_type {model_type!r}) is not supported; supported "
            f"model types: {', '.join(sorted(LAYER_PREFIXES))} (decoder-only families, Mixture-of-Experts among them)"
        )
    num_layers = config.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise UnsupportedModelError(f"config.json has no valid num_hidden_layers (got {num_layers!r})")
    return Architecture(model_type=model_type, num_layers=num_layers)


def is_prunable(name: str, tensor: torch.Tensor) -> bool:
    """True for the Linear weights inside a decoder layer (2-D '.weight' tensors) and an expert's
    slices of its fused projections ('gate_up_proj', 'down_proj': `endor_ray.models.moe`)."""
    return (name.endswith("weight") or name.endswith("_proj")) and tensor.dim() == 2
