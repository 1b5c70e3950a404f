"""Mixture-of-Experts layers: where a family's experts are, in its checkpoint and in transformers' modules.

Most checkpoints name each expert's Linears apart (Mixtral: ``block_sparse_moe.experts.3.w1.weight``,
Qwen-MoE and DeepSeek: ``mlp.experts.3.gate_proj.weight``); gpt-oss's hold them fused as the module
does (`ExpertLayout.fused_in_checkpoint`), and are cut into experts. transformers 5 holds a layer's experts fused in
3-D parameters of its experts module (``mlp.experts.gate_up_proj`` [experts, 2 * inter, hidden],
gate rows first, then up; ``mlp.experts.down_proj`` [experts, hidden, inter]), as its checkpoint
conversion mapping (``MergeModulelist(dim=0)``, ``Concatenate(dim=1)``) builds them.

A store keeps each expert as its own unit: the expert's slice of every fused parameter
(``gate_up_proj`` [2 * inter, hidden], ``down_proj`` [hidden, inter]; 2-D, so compressed like
any Linear), named by the parameter's name inside the experts module. The router, shared
experts, attention and norms stay in the layer's own unit, under the module's names. At run time
the engine fills the experts module with only the experts a pass selects (`endor_ray.engine.experts`).

Imports neither transformers nor the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from endor_ray.errors import UnsupportedModelError


@dataclass(frozen=True)
class ExpertLayout:
    """How one family's experts are named in its checkpoints and held in its modules."""

    experts_path: str  # the experts module inside a decoder layer
    # fused parameter -> the checkpoint's per-expert Linears concatenated along dim 0 into its slice
    fused: tuple[tuple[str, tuple[str, ...]], ...]
    renames: tuple[tuple[str, str], ...] = ()  # checkpoint name prefix in a layer -> the module's
    num_experts_key: str = "num_experts"  # the config field giving the experts per MoE layer
    # parameters the checkpoint itself holds fused, [experts, ...] under the module's name (gpt-oss)
    fused_in_checkpoint: tuple[str, ...] = ()
    router_path: str = "mlp.gate"  # the router inside a decoder layer (returns logits, scores, indices)
    transposed: bool = False  # the experts multiply x @ W, W [in, out] (gpt-oss), not F.linear(x, W)

    def in_features(self, weight: torch.Tensor) -> int:
        """The input features of one expert's 2-D weight (its dim 1, or dim 0 where `transposed`)."""
        return weight.shape[0] if self.transposed else weight.shape[1]

    def module_name(self, name: str) -> str:
        """A checkpoint name inside a layer -> the module's ('block_sparse_moe.gate.weight' -> 'mlp.gate.weight')."""
        for old, new in self.renames:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def checkpoint_name(self, name: str) -> str:
        """Inverse of `module_name` ('mlp.gate.weight' -> 'block_sparse_moe.gate.weight' for Mixtral)."""
        for old, new in self.renames:
            if name.startswith(new):
                return old + name[len(new):]
        return name

    def split_expert(self, name: str) -> tuple[int, str] | None:
        """('mlp.experts.3.gate_proj.weight') -> (3, 'gate_proj'); None for a tensor outside the experts."""
        match = re.fullmatch(re.escape(self.experts_path) + r"\.(\d+)\.(\w+)\.weight", self.module_name(name))
        return None if match is None else (int(match.group(1)), match.group(2))

    def fused_param(self, name: str) -> str | None:
        """('mlp.experts.gate_up_proj') -> 'gate_up_proj' where the checkpoint holds it fused, else None."""
        param = name.removeprefix(self.experts_path + ".")
        return param if name.startswith(self.experts_path + ".") and param in self.fused_in_checkpoint else None

    def fuse(self, linears: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """One expert's checkpoint Linears ({'gate_proj': [inter, hidden], ...}) -> its unit
        ({'gate_up_proj': [2 * inter, hidden], 'down_proj': [hidden, inter]})."""
        expected = sorted(part for _, parts in self.fused for part in parts)
        if sorted(linears) != expected:
            raise UnsupportedModelError(f"{where} has the expert tensors {sorted(linears)}; this family's experts "
                                        f"have {expected}: is the checkpoint complete?")
        return {param: torch.cat([linears[part] for part in parts], dim=0) for param, parts in self.fused}


    def unfuse(self, unit: dict[str, torch.Tensor], expert_idx: int, where: str) -> dict[str, torch.Tensor]:
        """Inverse of `fuse`: one expert's unit -> its checkpoint Linears by name inside the layer
        ('block_sparse_moe.experts.3.w1.weight' [inter, hidden], ...), each part an equal slice of dim 0."""
        linears = {}
        for param, parts in self.fused:
            tensor = unit[param]
            if tensor.shape[0] % len(parts):
                raise UnsupportedModelError(f"{where}: {param} {list(tensor.shape)} does not split into {len(parts)} "
                                            f"equal parts {parts}: the store is damaged; re-run endor convert")
            for part, piece in zip(parts, tensor.chunk(len(parts), dim=0)):
                linears[self.checkpoint_name(f"{self.experts_path}.{expert_idx}.{part}.weight")] = piece.contiguous()
        return linears


    def split_units(self, weights: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
        """A layer's tensors as its experts module holds them -> (the layer's own tensors, each expert's
        unit {param: its slice [out, in]}): the inverse of `stack_units`. ({...}, {}) for a dense layer."""
        prefix = self.experts_path + "."
        fused = {name.removeprefix(prefix): tensor for name, tensor in weights.items() if name.startswith(prefix)}
        own = {name: tensor for name, tensor in weights.items() if not name.startswith(prefix)}
        counts = {tensor.shape[0] for tensor in fused.values()}
        units = {expert: {param: tensor[expert] for param, tensor in fused.items()}
                 for expert in range(max(counts, default=0))}
        return own, units

    def stack_units(self, units: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Each expert's unit -> the experts module's fused parameters ({'mlp.experts.gate_up_proj': [E, ...]})."""
        if not units:
            return {}
        order = sorted(units)
        return {f"{self.experts_path}.{param}": torch.stack([units[expert][param] for expert in order])
                for param in units[order[0]]}


_QWEN = ExpertLayout("mlp.experts", (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))))
EXPERT_LAYOUTS: dict[str, ExpertLayout] = {
    "mixtral": ExpertLayout("mlp.experts", (("gate_up_proj", ("w1", "w3")), ("down_proj", ("w2",))),
                            renames=(("block_sparse_moe.", "mlp."),), num_experts_key="num_local_experts"),
    "qwen2_moe": _QWEN,
    "qwen3_moe": _QWEN,
    # dense first layers (first_k_dense_replace), shared experts, MLA attention: all the layer's own unit
    "deepseek_v3": ExpertLayout("mlp.experts", _QWEN.fused, num_experts_key="n_routed_experts"),
    # fused in the checkpoint too: gate_up_proj [experts, hidden, 2 * inter] (gate and up interleaved,
    # as the module reads them), down_proj [experts, inter, hidden], and a bias for each
    "gpt_oss": ExpertLayout("mlp.experts", (), num_experts_key="num_local_experts",
                            fused_in_checkpoint=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
                            router_path="mlp.router", transposed=True),
}


def expert_layout(config: dict[str, Any]) -> ExpertLayout | None:
    """The family's expert layout, or None for a dense family."""
    return EXPERT_LAYOUTS.get(config.get("model_type"))


def num_experts(config: dict[str, Any]) -> int:
    """Experts per MoE layer, from the config."""
    layout = expert_layout(config)
    count = None if layout is None else config.get(layout.num_experts_key)
    if not isinstance(count, int) or count <= 0:
        raise UnsupportedModelError(f"config.json gives no valid expert count ({count!r}); check the config")
    return count


def stacked_shapes(layout: ExpertLayout, expert_entries: list[dict[str, Any]]) -> dict[str, tuple[int, ...]]:
    """A layer's fused expert parameters' shapes from its experts' manifest entries ({param: [experts, ...]})."""
    if not expert_entries:
        return {}
    first = {tensor["name"]: tuple(tensor["shape"]) for tensor in expert_entries[0]["tensors"]}
    return {f"{layout.experts_path}.{name}": (len(expert_entries), *shape) for name, shape in first.items()}
