"""Whether one call's audio goes host to host or through the main host's relay (F4).

This module owns the decision for one call at one remote host, as a pure state machine with time
as an input (`now` arguments, `get_timer()` / `handle_timer(now)`): when to send a probe to the
other office, when to switch outgoing audio to the direct path and when to fall back to the
relay. It does not own sockets, keys, packets or addresses: the anchor (`remotehost.anchor`)
seals and sends, and tells us what authentic packets it got on the direct path.

The path is used only when both directions are confirmed: we have heard the other side (an
authenticated probe or media on the direct path) and the other side has said it hears us (its
probe's flag) or sends us media directly (it does so only once it is confirmed itself). That is
ICE's rule too (RFC 8445 §7.2.5.3.1: a pair is valid only after a check succeeded both ways).
The relay path is never torn down: its keepalives go on, and incoming audio is accepted from
both paths at all times, so falling back costs nothing but the silence timeout.

States (outgoing audio)::

    RELAYED --(heard the peer, peer hears us)--> DIRECT
    DIRECT  --(nothing direct for SILENCE s,
               or the peer says it no longer hears us)---> RELAYED   (probing goes on)

Probes go every FAST_INTERVAL for FAST_FOR seconds after `start`, then every SLOW_INTERVAL;
while DIRECT, a probe goes whenever we have sent nothing directly for KEEP_INTERVAL, so that a
silent phone (hold, mute) does not make the other side fall back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["DirectPathState", "DirectPathTimers", "PathState"]


class PathState(enum.Enum):
    RELAYED = "relayed"
    DIRECT = "direct"


@dataclass(frozen=True)
class DirectPathTimers:
    """Seconds. Defaults follow docs/wire-protocol.md §9b."""

    fast_interval: float = 0.05
    """Between probes while trying hard (NAT bindings open within one round trip or two)."""
    fast_for: float = 5.0
    """How long to try hard after `start` before probing only slowly."""
    slow_interval: float = 1.0
    """Between probes afterwards, and after a fallback: a path may come back (a NAT reboots)."""
    keep_interval: float = 0.2
    """While direct: the longest we send nothing on the path (well under `silence`)."""
    silence: float = 1.0
    """Nothing authentic on the direct path for this long: back to the relay (the caller hears
    at most this much of a gap, since incoming relay audio is accepted all along)."""


class DirectPathState:
    """The path decision of one call at one remote host; see the module docstring."""

    def __init__(self, now: float, timers: DirectPathTimers | None = None) -> None:
        self.timers = timers or DirectPathTimers()
        self.state = PathState.RELAYED
        self._started = now
        self._last_heard = -float("inf")
        self._peer_hears_us = False
        self._last_sent = -float("inf")
        self._next_probe = now  # the first probe goes at once
        self.switches_to_direct = 0
        self.fallbacks = 0

    # -- inputs --

    def on_packet(self, now: float, *, peer_hears_us: bool | None) -> None:
        """An authenticated, fresh packet came on the direct path: a probe with its flag, or
        media (`peer_hears_us=True`: the peer sends media directly only once confirmed).
        None: a probe older than one already seen (reordered), whose flag is stale."""
        self._last_heard = now
        if peer_hears_us is not None:
            # False: the peer has not heard us (yet, or any more: it fell back). Then our
            # direct packets are lost on the way, even though its own reach us (one way).
            self._peer_hears_us = peer_hears_us
        self._update(now)

    def on_sent(self, now: float) -> None:
        """Something (media or a probe) went out on the direct path."""
        self._last_sent = now

    def handle_timer(self, now: float) -> bool:
        """Expire the path if silent; True when a probe is to be sent now (then `on_sent`)."""
        self._update(now)
        if now < self._next_probe:
            return False
        self._next_probe = now + self._probe_interval(now)
        return True

    # -- outputs --

    @property
    def direct(self) -> bool:
        """Send outgoing audio on the direct path (as of the last input)."""
        return self.state is PathState.DIRECT

    def hears_peer(self, now: float) -> bool:
        """The flag for our probes: we heard the other side within the silence timeout."""
        return now - self._last_heard < self.timers.silence

    def get_timer(self) -> float:
        """When `handle_timer` has something to do: the next probe, or the silence deadline."""
        if self.state is PathState.DIRECT:
            return min(self._next_probe, self._last_heard + self.timers.silence)
        return self._next_probe

    # -- internals --

    def _probe_interval(self, now: float) -> float:
        t = self.timers
        if self.state is PathState.DIRECT:
            return t.keep_interval
        if now - self._started < t.fast_for:
            return t.fast_interval
        return t.slow_interval

    def _update(self, now: float) -> None:
        heard = self.hears_peer(now)
        if self.state is PathState.RELAYED:
            if heard and self._peer_hears_us:
                self.state = PathState.DIRECT
                self.switches_to_direct += 1
                # Media counts as a probe from now on; keep the path warm when there is none.
                self._next_probe = max(self._last_sent, now) + self.timers.keep_interval
        elif not heard or not self._peer_hears_us:
            self.state = PathState.RELAYED
            self.fallbacks += 1
            self._peer_hears_us = False  # needs new confirmation before we trust the path
            self._next_probe = now  # tell the peer at once that we no longer hear it
        elif self._last_sent + self.timers.keep_interval > self._next_probe:
            # Media went direct since the probe was planned: no need for one yet.
            self._next_probe = self._last_sent + self.timers.keep_interval
