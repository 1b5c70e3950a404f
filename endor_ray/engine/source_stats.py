"""What the layer source did, and the bounded set of CUDA timing events each slot owns."""

from __future__ import annotations

from dataclasses import dataclass, field

from endor_ray.engine.tiers import TIERS


@dataclass
class SourceStats:
    """Counters of the layer source; times in seconds."""

    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    bytes_to_device: int = 0  # compressed bytes copied host -> device (CUDA), or decoded (CPU)
    read_s: float = 0.0  # obtaining layer bytes on the I/O thread (disk reads, network)
    transfer_s: float = 0.0  # host -> device copies (CUDA events)
    decompress_s: float = 0.0
    compute_s: float = 0.0  # between a layer's acquire and release
    stall_s: float = 0.0  # compute waiting for weights (host wait + GPU-side wait)
    # MoE layers (`endor_ray.engine.experts`): experts a pass picked, found in the expert cache or
    # read from the store (misses), and the compressed bytes those misses read
    expert_hits: int = 0
    expert_misses: int = 0
    expert_bytes: int = 0  # misses' and prefetches' (everything read for experts)
    # next-layer prefetch (`endor_ray.engine.expert_prefetch`): experts read on a guess, and those of
    # them the layer's router then picked (counted among the hits)
    expert_prefetched: int = 0
    expert_prefetch_useful: int = 0

    def __sub__(self, earlier: SourceStats) -> SourceStats:
        """What happened between two snapshots."""
        return SourceStats(
            hits={tier: count - earlier.hits.get(tier, 0) for tier, count in self.hits.items()},
            **{name: getattr(self, name) - getattr(earlier, name) for name in
               ("bytes_to_device", "read_s", "transfer_s", "decompress_s", "compute_s", "stall_s",
                "expert_hits", "expert_misses", "expert_bytes", "expert_prefetched",
                "expert_prefetch_useful")})


class SlotTiming:
    """Timing events of one slot: two sets used in turn, so a slot never holds more than 12.

    A set is folded into the stats when the slot starts its use after next: by then the compute
    of the use that recorded it was issued long ago (the slot has been refilled since), so the
    `synchronize` below normally returns at once; at worst it keeps the host from running more
    than two slot cycles ahead of the GPU.
    """

    KINDS = ("copy_start", "copy_end", "decompress_start", "decompress_end",
             "stall_start", "compute_start", "compute_end")

    def __init__(self, ops):
        self._sets = [{kind: ops.event(kind, timing=True) for kind in self.KINDS} for _ in range(2)]
        self._recorded = [False, False]
        self._current = 1

    def begin_use(self, stats: SourceStats) -> dict:
        """The events for the slot's next use (the set before it is folded into `stats` first)."""
        self._current ^= 1
        self.fold(self._current, stats)
        return self._sets[self._current]

    @property
    def current(self) -> dict:
        return self._sets[self._current]

    def end_use(self) -> None:
        """Every event of the current set is recorded (the compute was released): fold it later.
        A fetch that was dropped unused is never folded: its events may be incomplete."""
        self._recorded[self._current] = True

    def fold(self, index: int, stats: SourceStats) -> None:
        if not self._recorded[index]:
            return
        events = self._sets[index]
        events["compute_end"].synchronize()  # the last of the set: the others happened before it
        stats.transfer_s += events["copy_start"].elapsed_time(events["copy_end"]) / 1e3
        stats.decompress_s += events["decompress_start"].elapsed_time(events["decompress_end"]) / 1e3
        stats.stall_s += events["stall_start"].elapsed_time(events["compute_start"]) / 1e3
        stats.compute_s += events["compute_start"].elapsed_time(events["compute_end"]) / 1e3
        self._recorded[index] = False

    def fold_all(self, stats: SourceStats) -> None:
        for index in (0, 1):
            self.fold(index, stats)
