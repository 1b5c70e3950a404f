"""Which waiting sequences join the next pass over the weights (continuous batching).

A pass over the weights costs the same for one sequence as for many, so the engine admits
waiting sequences at every pass, first come first served, as long as the limits of
`SchedulerConfig` allow, and finished or cancelled sequences leave at every pass. A plain class:
the engine calls it from its stepping thread; `add` and `cancel` may come from any thread.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from endor_ray.engine.sequence import Sequence
from endor_ray.errors import ConfigError, EndorError


class QueueFull(EndorError):
    """The scheduler's waiting queue is full; the caller should retry later (HTTP 429)."""


@dataclass
class SchedulerConfig:
    """Limits on what shares a pass."""

    max_num_seqs: int = 16  # sequences in one pass over the weights
    # Padded tokens (rows x longest newcomer prompt) of a pass that admits newcomers: their prefill
    # shares the pass with the running rows' decode, and this bounds the compute it adds.
    max_prefill_tokens: int = 8192
    # KV cache budget in tokens: each running sequence reserves prompt + max_new_tokens. None: no limit.
    max_cache_tokens: int | None = None
    max_waiting: int = 4096  # sequences queued beyond the running ones; more is QueueFull

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_prefill_tokens < 1 or self.max_waiting < 0:
            raise ConfigError("max_num_seqs and max_prefill_tokens must be >= 1, max_waiting >= 0")
        if self.max_cache_tokens is not None and self.max_cache_tokens < 1:
            raise ConfigError(f"max_cache_tokens must be >= 1 or None, got {self.max_cache_tokens}")


def reserved_tokens(seq: Sequence) -> int:
    """The cache a sequence may need by its end."""
    return len(seq.prompt_ids) + seq.params.max_new_tokens


class Scheduler:
    """A FIFO of waiting sequences and the admission rule."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self._lock = threading.Lock()

    def check_fits(self, seq: Sequence) -> None:
        """ConfigError if `seq` could never be admitted (told at once, not after waiting)."""
        budget = self.config.max_cache_tokens
        if budget is not None and reserved_tokens(seq) > budget:
            raise ConfigError(f"a prompt of {len(seq.prompt_ids)} tokens plus max_new_tokens={seq.params.max_new_tokens} "
                              f"needs {reserved_tokens(seq)} tokens of KV cache; the server allows {budget}")

    def add(self, sequences: list[Sequence]) -> None:
        for seq in sequences:
            self.check_fits(seq)
        with self._lock:
            if len(self.waiting) + len(sequences) > self.config.max_waiting:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting already (the limit is "
                                f"{self.config.max_waiting}); retry later")
            self.waiting.extend(sequences)

    def take_cancelled(self) -> list[Sequence]:
        """Cancelled sequences that never ran: out of the queue, for the engine to report."""
        with self._lock:
            cancelled = [seq for seq in self.waiting if seq.cancelled]
            if cancelled:
                self.waiting = deque(seq for seq in self.waiting if not seq.cancelled)
        return cancelled

    def admit(self, running: list[Sequence]) -> list[Sequence]:
        """Waiting sequences to join the next pass beside `running` (FIFO, within the limits).
        The first in line always joins an empty batch, whatever the prefill bound says."""
        config = self.config
        reserved = sum(reserved_tokens(seq) for seq in running)
        admitted: list[Sequence] = []
        block = 0
        with self._lock:
            while self.waiting and len(running) + len(admitted) < config.max_num_seqs:
                seq = self.waiting[0]
                if seq.cancelled:
                    break  # take_cancelled() reports it before the next admission
                longest = max(block, len(seq.prompt_ids))
                alone = not running and not admitted
                if not alone and (len(running) + len(admitted) + 1) * longest > config.max_prefill_tokens:
                    break
                if (config.max_cache_tokens is not None and not alone
                        and reserved + reserved_tokens(seq) > config.max_cache_tokens):
                    break
                admitted.append(self.waiting.popleft())
                block, reserved = longest, reserved + reserved_tokens(seq)
        return admitted

    def __len__(self) -> int:
        return len(self.waiting)
