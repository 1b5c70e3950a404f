"""Which waiting sequences join the next pass over the weights (continuous batching).

A pass over the weights costs the same for one sequence as for many, so the engine admits
waiting sequences at every pass as long as the limits of `SchedulerConfig` allow, and finished or
cancelled sequences leave at every pass. A plain class: the engine calls it from its stepping
thread; `add` and `cancel` may come from any thread.

Fairness: each `add` is one request. Admission is round-robin over the waiting requests, oldest
first: one sequence of each in turn (first come first served within a request), so a request of
many sequences cannot make a later small one wait for all of them. With `max_seqs_per_request`,
while more than one request is active (running or waiting) none holds more rows of a pass than
that; a request alone may hold them all (nothing is kept idle). When a request that holds fewer
rows than the cap is waiting, the rows a request holds beyond the cap are handed back
(`preempt`): they leave the batch, their cache with them, and rejoin later at the head of their
request's queue, their prompt and the tokens generated so far prefilled again (recompute, as
vLLM preempts). So a pass that a newcomer joins holds at most a few rows of each request: on a
device where a pass's cost grows with its rows (a CPU), a small request beside a big one costs
little more than alone. A request that is larger than the whole queue is refused at once
(ConfigError), one that does not fit beside the waiting ones is QueueFull (retry later).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
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
    # Rows of a pass one request may hold while others are active (None: all); a request alone holds all
    max_seqs_per_request: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_prefill_tokens < 1 or self.max_waiting < 0:
            raise ConfigError("max_num_seqs and max_prefill_tokens must be >= 1, max_waiting >= 0")
        if self.max_cache_tokens is not None and self.max_cache_tokens < 1:
            raise ConfigError(f"max_cache_tokens must be >= 1 or None, got {self.max_cache_tokens}")
        if self.max_seqs_per_request is not None and self.max_seqs_per_request < 1:
            raise ConfigError(f"max_seqs_per_request must be >= 1 or None, got {self.max_seqs_per_request}")

    def rows_per_request(self, shared: bool) -> int:
        """Rows of a pass one request may hold, `shared` with other active requests or alone."""
        if not shared:
            return self.max_num_seqs
        return min(self.max_num_seqs, self.max_seqs_per_request or self.max_num_seqs)


def reserved_tokens(seq: Sequence) -> int:
    """The cache a sequence may need by its end."""
    return len(seq.prompt_ids) + seq.params.max_new_tokens


class Scheduler:
    """The waiting sequences, one FIFO per request, and the admission rule (round-robin over requests)."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.requests: deque[deque[Sequence]] = deque()  # oldest request first
        self._num_waiting = 0
        self._num_requests = 0  # numbers the requests (Sequence.request)
        self._lock = threading.Lock()

    def check_fits(self, seq: Sequence) -> None:
        """ConfigError if `seq` could never be admitted (told at once, not after waiting)."""
        budget = self.config.max_cache_tokens
        if budget is not None and reserved_tokens(seq) > budget:
            raise ConfigError(f"a prompt of {len(seq.prompt_ids)} tokens plus max_new_tokens={seq.params.max_new_tokens} "
                              f"needs {reserved_tokens(seq)} tokens of KV cache; the server allows {budget}")

    def add(self, sequences: list[Sequence]) -> None:
        """Queue one request's sequences: ConfigError if they could never be queued, QueueFull if
        they do not fit now."""
        for seq in sequences:
            self.check_fits(seq)
        limit = self.config.max_waiting
        if len(sequences) > limit:
            raise ConfigError(f"this request has {len(sequences)} sequences; the server queues at most {limit}: "
                              "send fewer prompts or a lower n")
        if not sequences:
            return
        with self._lock:
            if self._num_waiting + len(sequences) > limit:
                raise QueueFull(f"the queue is full: {self._num_waiting} sequences are waiting already and this "
                                f"request's {len(sequences)} would pass the limit of {limit}; retry later")
            self._num_requests += 1
            for seq in sequences:
                seq.request = self._num_requests
            self.requests.append(deque(sequences))
            self._num_waiting += len(sequences)

    def take_cancelled(self) -> list[Sequence]:
        """Cancelled sequences that never ran: out of the queue, for the engine to report."""
        with self._lock:
            cancelled = [seq for queue in self.requests for seq in queue if seq.cancelled]
            if cancelled:
                kept = (deque(seq for seq in queue if not seq.cancelled) for queue in self.requests)
                self.requests = deque(queue for queue in kept if queue)
                self._num_waiting -= len(cancelled)
        return cancelled

    def preempt(self, running: list[Sequence]) -> list[Sequence]:
        """Running rows to hand back now: while a request holding fewer rows than the cap waits,
        each request's rows beyond the cap (those with the fewest generated tokens: the cheapest to
        prefill again, and the furthest from finishing). They go back to the head of their
        request's queue; the caller takes them out of the batch."""
        cap = self.config.max_seqs_per_request
        if cap is None or len(running) <= cap:
            return []
        held = Counter(seq.request for seq in running)
        with self._lock:
            starved = any(held[queue[0].request] < cap for queue in self.requests if not queue[0].cancelled)
            if not starved:
                return []
            taken = []
            for request, count in held.items():
                if count <= cap:
                    continue
                rows = sorted((seq for seq in running if seq.request == request), key=lambda seq: len(seq.output_ids))
                chosen = {id(seq) for seq in rows[:count - cap]}
                back = [seq for seq in running if id(seq) in chosen]  # in the batch's order
                queue = next((queue for queue in self.requests if queue[0].request == request), None)
                if queue is None:
                    self.requests.append(deque(back))  # behind the requests waiting now
                else:
                    queue.extendleft(reversed(back))
                taken += back
            self._num_waiting += len(taken)
        return taken

    def admit(self, running: list[Sequence]) -> list[Sequence]:
        """Waiting sequences to join the next pass beside `running`: round-robin over requests,
        within the limits (a limit that stops the next in turn ends this pass's admission). The
        first in line always joins an empty batch, whatever the prefill bound says."""
        config = self.config
        reserved = sum(reserved_tokens(seq) for seq in running)
        held = Counter(seq.request for seq in running)  # rows each request holds
        admitted: list[Sequence] = []
        block = 0
        with self._lock:
            shared = len(set(held) | {queue[0].request for queue in self.requests}) > 1
            cap = config.rows_per_request(shared)
            passed = 0  # requests in a row skipped for holding their share of the rows
            while self.requests and passed < len(self.requests) and len(running) + len(admitted) < config.max_num_seqs:
                queue = self.requests[0]
                seq = queue[0]
                if seq.cancelled:
                    break  # take_cancelled() reports it before the next admission
                if held[seq.request] >= cap:
                    self.requests.rotate(-1)
                    passed += 1
                    continue
                longest = max(block, len(seq.prefill_ids))
                alone = not running and not admitted
                if not alone and (len(running) + len(admitted) + 1) * longest > config.max_prefill_tokens:
                    break
                if (config.max_cache_tokens is not None and not alone
                        and reserved + reserved_tokens(seq) > config.max_cache_tokens):
                    break
                admitted.append(queue.popleft())
                self._num_waiting -= 1
                held[seq.request] += 1
                block, reserved, passed = longest, reserved + reserved_tokens(seq), 0
                if queue:
                    self.requests.rotate(-1)  # the next request's turn
                else:
                    self.requests.popleft()
        return admitted

    def __len__(self) -> int:
        return self._num_waiting
