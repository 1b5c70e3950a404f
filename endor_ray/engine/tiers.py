"""Which decoder layers live in which tier on one worker: resident on the device, in host memory,
or read from disk. A plain function from sizes and budgets to a plan (the cluster-wide layout
of shard servers is `endor_ray.service.placement`)."""

from __future__ import annotations

from dataclasses import dataclass

from endor_ray.errors import ConfigError
from endor_ray.utils.units import human_bytes

TIERS = ("device", "host", "disk", "remote")  # "remote": from a shard server (Ray service)


@dataclass(frozen=True)
class TierPlan:
    """Which layers sit in which tier."""

    device: tuple[int, ...]
    host: tuple[int, ...]
    disk: tuple[int, ...]

    @property
    def streamed(self) -> tuple[int, ...]:
        return tuple(sorted(self.host + self.disk))


def plan_tiers(
    compressed_nbytes: list[int],
    dense_nbytes: list[int],
    prefetch_depth: int,
    device_budget_bytes: int | None = None,
    device_layers: int | None = None,
    host_budget_bytes: int | None = None,
    resident_nbytes: list[int] | None = None,
) -> TierPlan:
    """Place layers: leading layers resident on the device while the budget lasts, the rest streamed.

    A byte budget covers the resident layers' dense weights plus, when anything streams, the
    ``prefetch_depth + 1`` slots (each one compressed layer file and one dense layer; a resident
    layer costs ``resident_nbytes``, by default its dense bytes). A layer
    count places exactly that many layers (memory is not checked). Streamed layers stay in host
    memory while ``host_budget_bytes`` lasts (None: all of them), the rest are read from disk.
    """
    num_layers = len(compressed_nbytes)
    resident_nbytes = dense_nbytes if resident_nbytes is None else resident_nbytes
    if device_layers is not None:
        if device_layers < 0:
            raise ConfigError(f"the GPU layer count must be >= 0, got {device_layers}")
        resident = min(device_layers, num_layers)
    elif device_budget_bytes is None or sum(resident_nbytes) <= device_budget_bytes:
        resident = num_layers
    else:
        slot_nbytes = max(compressed_nbytes) + max(dense_nbytes)
        streaming_nbytes = (prefetch_depth + 1) * slot_nbytes
        if device_budget_bytes < streaming_nbytes:
            raise ConfigError(
                f"GPU memory budget {human_bytes(device_budget_bytes)} ({device_budget_bytes} bytes) is below the "
                f"minimum {human_bytes(streaming_nbytes)} ({streaming_nbytes} bytes) for streaming with prefetch depth {prefetch_depth} "
                f"({prefetch_depth + 1} slots of {human_bytes(slot_nbytes)}: one compressed and one dense "
                "layer each); raise --gpu-memory or lower --prefetch"
            )
        resident, used = 0, streaming_nbytes
        while resident < num_layers and used + resident_nbytes[resident] <= device_budget_bytes:
            used += resident_nbytes[resident]
            resident += 1
    host, disk, host_used = [], [], 0
    for layer_idx in range(resident, num_layers):
        fits = host_budget_bytes is None or host_used + compressed_nbytes[layer_idx] <= host_budget_bytes
        if fits and not disk:  # keep host layers a prefix, so disk reads are one contiguous run
            host.append(layer_idx)
            host_used += compressed_nbytes[layer_idx]
        else:
            disk.append(layer_idx)
    return TierPlan(device=tuple(range(resident)), host=tuple(host), disk=tuple(disk))
