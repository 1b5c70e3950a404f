"""Fetching ahead of use over a fixed order of keys (decoder layers, pass after pass).

`Prefetcher` is the part both layer streamers share, the engine's `LayerSource` (slots, a read and
a transfer stage, CUDA streams) and `models.skeleton.prefetching` (one thread, for calibration
passes over a checkpoint): which keys are in flight, which come next (cyclically: after the last
key of one pass, the first of the next), and what a request out of that order does (the fetches in
flight were wrong guesses: they are dropped). How a fetch runs is the caller's `start`; it returns
a handle (a future, a slot in flight), or None when there is no room for another fetch now.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

Fetch = TypeVar("Fetch")


class Prefetcher(Generic[Fetch]):
    """The fetches in flight over `order`, `depth` keys ahead of the one in use."""

    def __init__(self, order: Iterable[int], depth: int, start: Callable[[int], Fetch | None],
                 drop: Callable[[list[Fetch]], None], cyclic: bool = True):
        """`start(key)` begins a fetch (None: no room now); `drop(fetches)` lets dropped ones go."""
        self.order = list(order)
        self.depth, self.cyclic = depth, cyclic
        self._start, self._drop = start, drop
        self._position = {key: position for position, key in enumerate(self.order)}
        self.in_flight: dict[int, Fetch] = {}

    def claim(self, key: int) -> Fetch | None:
        """The fetch of `key` if it is in flight (it stays so until `finish`); otherwise None, after
        dropping every fetch in flight (a request out of order: they were guessed wrong)."""
        fetch = self.in_flight.get(key)
        if fetch is None:
            self.drop()
        return fetch

    def start(self, key: int) -> Fetch | None:
        """Begin fetching `key` now (None: `start` had no room)."""
        fetch = self._start(key)
        if fetch is not None:
            self.in_flight[key] = fetch
        return fetch

    def ahead(self, key: int) -> None:
        """Begin the fetches of the `depth` keys after `key` that are not in flight, until there is
        no room."""
        position = self._position[key]
        for offset in range(1, self.depth + 1):
            if not self.cyclic and position + offset >= len(self.order):
                return
            upcoming = self.order[(position + offset) % len(self.order)]
            if upcoming in self.in_flight:
                continue
            if self.start(upcoming) is None:
                return

    def finish(self, key: int) -> Fetch:
        """The fetch of `key`, no longer in flight (its user is done with it)."""
        return self.in_flight.pop(key)

    def drop(self) -> None:
        """Forget every fetch in flight, handing them to `drop`."""
        fetches = list(self.in_flight.values())
        self.in_flight.clear()
        self._drop(fetches)
