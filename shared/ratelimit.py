"""Slowing down and blocking sources that keep failing authentication (pure: time is an input).

Used by the main host for trunk logins and by the remote host's registrar for digest failures.
Keyed by whatever the caller chooses (usually the source IP), so a brute-force attempt from one
address never locks out the real office or phone at another address. The table is bounded: the
oldest entries are forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Entry:
    failures: int
    last: float


class FailureThrottle:
    """After `free_failures`, each failure doubles the delay (capped) and may block the source."""

    def __init__(
        self,
        *,
        free_failures: int = 3,
        base_delay: float = 0.5,
        max_delay: float = 10.0,
        block_after: int | None = None,
        block_for: float = 300.0,
        forget_after: float = 600.0,
        max_entries: int = 10_000,
    ) -> None:
        self.free_failures = free_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.block_after = block_after
        self.block_for = block_for
        self.forget_after = forget_after
        self.max_entries = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def _entry(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        # A block outlives forget_after if block_for is longer: forgetting it would unblock.
        horizon = self.forget_after
        if self.block_after is not None:
            horizon = max(horizon, self.block_for)
        if entry is not None and now - entry.last > horizon:
            del self._entries[key]
            return None
        return entry

    def delay(self, key: str, now: float) -> float:
        """How long to wait before answering this source's next attempt."""
        entry = self._entry(key, now)
        if entry is None or entry.failures < self.free_failures:
            return 0.0
        extra = entry.failures - self.free_failures
        return float(min(self.max_delay, self.base_delay * (2 ** min(extra, 30))))

    def blocked(self, key: str, now: float) -> bool:
        if self.block_after is None:
            return False
        entry = self._entry(key, now)
        return (
            entry is not None
            and entry.failures >= self.block_after
            and now - entry.last < self.block_for
        )

    def failure(self, key: str, now: float) -> int:
        """Count a failure; return how many this source has now."""
        entry = self._entry(key, now)
        if entry is None:
            entry = _Entry(0, now)
            self._entries[key] = entry
        entry.failures += 1
        entry.last = now
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry.failures

    def success(self, key: str) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
