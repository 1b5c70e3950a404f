"""How many streaming slots and how large a host tier the process's real memory holds.

The budgets the engine sizes by default (CPU: resident layers in half the memory, all of it where a
resident layer holds no more than its file; the host tier: every streamed layer) come from
`utils.memory.memory_limit`, the tighter of the cgroup's limit and the machine's available memory,
measured after the non-layer weights are loaded. A model that does not fit is streamed through
``prefetch_depth + 1`` slots; when the memory does not hold that many, the prefetch depth is lowered
(and said so) rather than the process killed for memory, and when it does not hold even one slot
that is a clear error naming the numbers. Budgets given explicitly (--gpu-memory, --host-memory)
are taken as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from endor_ray.engine.config import EngineConfig
from endor_ray.engine.tiers import TierPlan
from endor_ray.errors import ConfigError
from endor_ray.utils.memory import MemoryLimit
from endor_ray.utils.units import human_bytes

HEADROOM_BYTES = 256 << 20  # activations, KV cache, the allocator's slack and a layer's transient buffers
HEADROOM_FRACTION = 0.1
IN_BLOCKS = 1.05  # resident bytes over file bytes up to which CPU layers count as held in their blocks


@dataclass(frozen=True)
class MemorySizing:
    """The engine config with the prefetch depth the memory holds, and the budgets to plan tiers with."""

    config: EngineConfig
    memory: MemoryLimit
    usable_bytes: int  # the free memory less the headroom
    slot_bytes: int  # host memory one streaming slot takes
    device_budget_bytes: int | None  # CPU: resident layers + slots (None: the caller's own default)
    host_budget_bytes: int | None  # the host tier (None: every streamed layer)

    def describe(self, plan: TierPlan, host_nbytes: int) -> str:
        """One line: the limit, the slots and the tiers chosen from it."""
        slots = self.config.prefetch_depth + 1 if plan.streamed else 0
        return (f"{self.memory.describe()}: {slots} slots of {human_bytes(self.slot_bytes)}, "
                f"host tier {human_bytes(host_nbytes)} ({len(plan.host)} layers), {len(plan.device)} layers resident, "
                f"{len(plan.disk)} read from disk")


def size_for_memory(compressed_nbytes: list[int], dense_nbytes: list[int], config: EngineConfig, device_type: str,
                    memory: MemoryLimit, resident_nbytes: list[int] | None = None) -> MemorySizing:
    """The prefetch depth and budgets that keep the layers' memory within `memory` (see the module doc).

    `dense_nbytes`: what a layer decodes into beyond the bytes read (a slot holds both);
    `resident_nbytes`: what a resident layer holds (default: its dense bytes; on the CPU, a layer
    whose products run from its blocks keeps its file bytes instead)."""
    resident = dense_nbytes if resident_nbytes is None else resident_nbytes
    usable = max(int(memory.available_bytes * (1 - HEADROOM_FRACTION)) - HEADROOM_BYTES, 0)
    # CPU resident layers may take half the usable memory, the host tier the rest: a decoded layer holds
    # more than its file, so the host tier keeps more layers compressed. A layer whose products run from
    # its blocks holds its file bytes either way, and resident it skips the pass through a slot: all of it
    resident_share = usable if sum(resident) <= IN_BLOCKS * sum(compressed_nbytes) else usable // 2
    budget_bytes, budget_layers = config.gpu_budget
    # A slot's host memory: its read buffer, and on CPU the dense weights decoded into it
    slot = max(compressed_nbytes, default=0) + (max(dense_nbytes, default=0) if device_type == "cpu" else 0)
    if device_type == "cpu" and budget_bytes is None and budget_layers is None:
        if sum(resident) <= resident_share:  # fits: decoded once (or kept in its blocks), never streamed
            return MemorySizing(config, memory, usable, slot, resident_share, config.host_budget_bytes)
    depth = config.prefetch_depth
    if not (budget_layers is not None and budget_layers >= len(dense_nbytes)):  # something may stream
        if slot > usable:
            raise ConfigError(
                f"{memory.describe()}: one streaming slot needs {human_bytes(slot)} ({slot} bytes: the largest "
                f"compressed layer {human_bytes(max(compressed_nbytes))}" +
                (f" and its dense weights {human_bytes(max(dense_nbytes))}" if device_type == "cpu" else "") +
                f") but only {human_bytes(usable)} ({usable} bytes) is usable after a headroom of "
                f"{HEADROOM_FRACTION:.0%} + {human_bytes(HEADROOM_BYTES)}; raise the memory limit (cgroup memory.max / "
                "memory.limit_in_bytes, or free memory) or use a store with smaller layers")
        depth = min(depth, usable // slot - 1)
    config = dataclasses.replace(config, prefetch_depth=depth)
    slots_bytes = (depth + 1) * slot
    device_budget = None
    if device_type == "cpu" and budget_bytes is None and budget_layers is None:
        device_budget = max(resident_share, slots_bytes)  # slots first, then resident layers while the share lasts
    host_budget = config.host_budget_bytes
    if host_budget is None:
        held = device_budget if device_budget is not None else slots_bytes
        if device_type == "cpu" and budget_bytes is not None:
            held = max(budget_bytes, slots_bytes)
        host_budget = max(usable - held, 0)
    return MemorySizing(config, memory, usable, slot, device_budget, host_budget)
