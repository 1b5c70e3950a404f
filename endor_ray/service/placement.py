"""Which node's shard server holds which layers: a plain function from cluster facts to a plan.

Shard servers keep their layers in the Ray object store of their node (put once, read zero-copy
by a worker on the same node), so a node's budget is bounded by its object store. Layers are
assigned in order, as contiguous runs: first to the GPU worker's own node while its budget lasts
(no network hop), then to the other shard nodes, largest budget first. Layers that fit nowhere
are read from the store on demand by a shard server ("disk" tier) when spilling is allowed;
otherwise placement fails and says how many bytes are missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from endor_ray.errors import EndorError
from endor_ray.utils.units import human_bytes


class PlacementError(EndorError):
    """The cluster cannot hold the model as asked."""


@dataclass(frozen=True)
class NodeInfo:
    """What placement needs to know about one node that may host a shard server."""

    node_id: str
    budget_bytes: int  # host memory (object store) the node's shard server may fill


@dataclass(frozen=True)
class Placement:
    """layers held in memory per node, and layers read from the store on demand per node."""

    memory: dict[str, tuple[int, ...]]
    disk: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def nodes(self) -> list[str]:
        return sorted(set(self.memory) | set(self.disk), key=lambda node: (node not in self.memory, node))

    def layers_of(self, node_id: str) -> tuple[int, ...]:
        return tuple(sorted(self.memory.get(node_id, ()) + self.disk.get(node_id, ())))

    def node_of(self, layer_idx: int) -> str:
        for node_id in self.nodes:
            if layer_idx in self.layers_of(node_id):
                return node_id
        raise KeyError(layer_idx)


def plan_placement(
    layer_nbytes: list[int],
    shard_nodes: list[NodeInfo],
    worker_node_id: str | None,
    spill_to_disk: bool = True,
) -> Placement:
    """Assign each layer to a shard node's memory, or to its disk tier when nothing has room."""
    if not shard_nodes:
        raise PlacementError("no node can host a shard server; check the cluster's nodes and resources")
    ordered = sorted(shard_nodes, key=lambda node: (node.node_id != worker_node_id, -node.budget_bytes))
    memory: dict[str, list[int]] = {}
    layer_idx = 0
    for node in ordered:
        used = 0
        while layer_idx < len(layer_nbytes) and used + layer_nbytes[layer_idx] <= node.budget_bytes:
            memory.setdefault(node.node_id, []).append(layer_idx)
            used += layer_nbytes[layer_idx]
            layer_idx += 1
    remaining = list(range(layer_idx, len(layer_nbytes)))
    disk: dict[str, list[int]] = {}
    if remaining:
        missing = sum(layer_nbytes[idx] for idx in remaining)
        if not spill_to_disk:
            total = sum(node.budget_bytes for node in shard_nodes)
            raise PlacementError(
                f"the shard nodes' memory budgets ({human_bytes(total)} over {len(shard_nodes)} nodes) cannot "
                f"hold the model's {human_bytes(sum(layer_nbytes))} of layers: {human_bytes(missing)} "
                f"({len(remaining)} layers) missing; add nodes, raise the shard memory, or allow spilling to disk"
            )
        # The node with the fewest memory layers reads the rest from storage, keeping work spread.
        reader = min(ordered, key=lambda node: (len(memory.get(node.node_id, ())), node.node_id != worker_node_id))
        disk[reader.node_id] = remaining
    return Placement(
        memory={node: tuple(layers) for node, layers in memory.items()},
        disk={node: tuple(layers) for node, layers in disk.items()},
    )
