"""Calls through the main host: route a dialled number to an office, bridge the two offices'
call channels, set up the media relay, and answer grants for calls inside an office.

A call between offices is two channels, one on each office's trunk, bridged here: whatever call
message comes in on one side goes out on the other, until a CallEnd. Calls are keyed by
(office, channel), not by connection, so a call outlives a re-login of either office (a new
public address, a short outage): messages go to the office's current connection, and the relay
takes the office's new media key. A call whose office stays away longer than `grace` is ended.

F4, direct media: once the relay has latched both legs of a call (it has authenticated packets
from both anchors, so it knows their public addresses), both offices get a DirectPath naming the
other's address and a fresh key, unless either office's NAT type (RFC 3489 probe) makes hole
punching hopeless. The relay legs stay in place: they are the fallback (docs/wire-protocol.md
§9b). Which path a call's audio takes is read from the relay's counters: media still arriving
there means it is relayed.

Policy lives here (who may call what, where a number lives); the trunk server only delivers.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from mainhost.bandwidth import OfficeBudget, choose_codec, cost_kbps, is_audio
from shared.wire.messages import (
    CallAnswer,
    CallEnd,
    CallHold,
    CallInfo,
    CallProgress,
    CallSetup,
    DirectPath,
    GrantReply,
    GrantRequest,
    MediaLeg,
    Message,
)

log = logging.getLogger("mainhost.calls")
UNLIMITED_KBPS = 10**9
BRIDGED = (CallProgress, CallAnswer, CallHold, CallInfo)
# RFC 3489 §10.1 NAT types (pystun3's names) behind which hole punching works when both sides
# send: the mapping does not depend on the destination, so the address the relay saw is the one
# the other office must reach. Symmetric NAT, a blocked or failed probe, "unknown": don't try.
PUNCHABLE = frozenset({"Open Internet", "Full Cone", "Restric NAT", "Restric Port NAT"})
DIRECT_CHECK_INTERVAL = 0.25


class Relay(Protocol):
    """What the call router needs of the media relay (mainhost/relay.py)."""

    def offer(self, call_id: str, office: str) -> int: ...
    def answer(self, call_id: str, office: str) -> int: ...
    def delete(self, call_id: str) -> None: ...


@dataclass(frozen=True)
class OfficeRange:
    name: str
    first: int
    last: int
    digits: int

    def holds(self, number: str) -> bool:
        return (
            number.isdigit()
            and len(number) == self.digits
            and self.first <= int(number) <= self.last
        )


@dataclass
class Bridge:
    call_id: str
    a: tuple[str, int]  # (office, channel) of the calling side
    b: tuple[str, int] | None = None
    answered: bool = False
    orphaned_since: dict[str, float] = field(default_factory=dict)
    cost_kbps: float = 0.0  # reserved on both offices' WAN budgets while the call lasts
    direct_for: tuple[object, object] | None = None
    """F4: the two legs' relay addresses that the last DirectPath was sent for."""
    direct_skipped: str = ""
    """F4: why no DirectPath was sent (an office's NAT type), for status."""
    media_path: str = "relayed"
    """F4: "direct" when DirectPath went out and the relay carried none of its media lately."""
    relay_media: int = -1  # media packets the relay took for this call, at the last check

    def other(self, side: tuple[str, int]) -> tuple[str, int] | None:
        return self.b if side == self.a else self.a


Send = Callable[[str, Message, int], Awaitable[bool]]
SendMany = Callable[[str, Sequence[tuple[Message, int]]], Awaitable[bool]]


class CallRouter:
    """Routes and bridges calls between offices.

    `send(office, message, channel)` delivers on the office's current trunk connection and
    returns False when the office is not connected; `send_many(office, [(message, channel)])`
    does the same for several messages in one write (one TLS record, one read at the far end),
    and is `send` for each when not given. `ranges()` lists the offices' extension ranges;
    `directory_has(office, ext)` says whether an extension exists.
    """

    def __init__(
        self,
        *,
        send: Send,
        is_online: Callable[[str], bool],
        ranges: Callable[[], list[OfficeRange]],
        directory_has: Callable[[str, str], bool],
        relay: Relay | None,
        relay_port: int,
        grace: float = 10.0,
        send_many: SendMany | None = None,
    ) -> None:
        self._send = send
        self._send_many = send_many or self._send_each
        self._is_online = is_online
        self._ranges = ranges
        self._directory_has = directory_has
        self.relay = relay
        self.relay_port = relay_port
        self.grace = grace
        self.bridges: dict[tuple[str, int], Bridge] = {}
        self._next_channel: dict[str, int] = {}
        self.calls_routed = 0
        self.calls_refused = 0
        self.budgets: dict[str, OfficeBudget] = {}
        self.direct_media = True
        """F4: offer calls between offices a direct path (the relay stays as the fallback)."""
        self.nat_type_of: Callable[[str], str] = lambda office: "unknown"
        """F4: an office's NAT type from its STUN probe (set by the service)."""
        self.direct_offered = 0
        self.direct_skipped = 0

    def set_budget(self, office: str, kbps: int) -> None:
        """The office's WAN voice budget (changeable while calls run: they keep their share)."""
        budget = self.budgets.get(office)
        if budget is None:
            self.budgets[office] = OfficeBudget(kbps)
        else:
            budget.budget_kbps = kbps

    def _budget(self, office: str) -> OfficeBudget:
        # An office whose budget was never set (not in the store yet) is not limited: refusing
        # its calls would be a surprise, and the store always sets one for real offices.
        return self.budgets.setdefault(office, OfficeBudget(UNLIMITED_KBPS))

    def _reserve(self, bridge: Bridge, kbps: float) -> None:
        offices = {bridge.a[0], bridge.b[0] if bridge.b else bridge.a[0]}
        for office in offices:
            budget = self._budget(office)
            budget.used_kbps += kbps - bridge.cost_kbps
            if bridge.cost_kbps == 0 and kbps:
                budget.calls += 1
        bridge.cost_kbps = kbps

    async def _send_each(self, office: str, messages: Sequence[tuple[Message, int]]) -> bool:
        for msg, channel in messages:
            if not await self._send(office, msg, channel):
                return False
        return True

    def route(self, number: str) -> OfficeRange | None:
        for office in self._ranges():
            if office.holds(number):
                return office
        return None

    def _channel_for(self, office: str) -> int:
        # The main host numbers its channels even (the remote hosts odd), never 0.
        channel = self._next_channel.get(office, 0) + 2
        self._next_channel[office] = channel
        return channel

    async def on_message(self, office: str, channel: int, msg: Message) -> None:
        side = (office, channel)
        if isinstance(msg, GrantRequest):
            await self._grant(office, channel, msg)
        elif isinstance(msg, CallSetup):
            await self._setup(side, msg)
        elif isinstance(msg, CallEnd):
            await self._end(side, msg)
        elif isinstance(msg, BRIDGED):
            bridge = self.bridges.get(side)
            other = bridge.other(side) if bridge else None
            if bridge is None or other is None:
                log.debug("%s on unknown call channel %s", type(msg).__name__, side)
                return
            if isinstance(msg, CallAnswer):
                bridge.answered = True
                # The callee may have answered with another codec of the offer: pay for that.
                self._reserve(bridge, cost_kbps(msg.codec, msg.ptime))
            await self._send(other[0], msg, other[1])
        else:
            log.debug("%s from %s on channel %d not handled", type(msg).__name__, office, channel)

    async def _grant(self, office: str, channel: int, msg: GrantRequest) -> None:
        # F5: a call inside one office may go phone to phone when both ends belong to it.
        if not self._directory_has(office, msg.caller):
            reply = GrantReply(
                msg.call_id, False, f"{msg.caller} is not a phone of office {office}"
            )
        elif not self._directory_has(office, msg.callee):
            reply = GrantReply(
                msg.call_id, False, f"{msg.callee} is not a phone of office {office}"
            )
        else:
            reply = GrantReply(msg.call_id, True)
        await self._send(office, reply, channel)

    async def _refuse(self, side: tuple[str, int], call_id: str, status: int, reason: str) -> None:
        self.calls_refused += 1
        log.info("call %s from %s refused: %d %s", call_id, side[0], status, reason)
        await self._send(side[0], CallEnd(call_id, status, reason), side[1])

    async def _setup(self, side: tuple[str, int], msg: CallSetup) -> None:
        if side in self.bridges:
            return  # a repeated setup on a live channel: ignore
        target = self.route(msg.callee)
        if target is None:
            await self._refuse(side, msg.call_id, 404, f"no office serves the number {msg.callee}")
            return
        if not self._directory_has(target.name, msg.callee):
            await self._refuse(side, msg.call_id, 404, f"{msg.callee} is not a phone")
            return
        if not self._is_online(target.name):
            await self._refuse(side, msg.call_id, 480, f"office {target.name} is offline right now")
            return
        # F7: the call crosses both offices' WAN links; it must fit both voice budgets.
        budgets = [self._budget(side[0]), self._budget(target.name)]
        choice = choose_codec(msg.codecs or ["PCMU/8000"], budgets)
        if choice is None:
            full = side[0] if not budgets[0].room_for(_cheapest(msg.codecs)) else target.name
            budget = self._budget(full)
            budget.refused += 1
            await self._refuse(
                side,
                msg.call_id,
                503,
                f"office {full}'s WAN is full ({budget.used_kbps:.0f} of {budget.budget_kbps}"
                " kbit/s for voice in use)",
            )
            return
        codecs, cost = choice
        if codecs != msg.codecs:
            log.info("call %s: %s instead, to fit the WAN budget", msg.call_id, codecs[0])
        bridge = Bridge(msg.call_id, side)
        self.bridges[side] = bridge
        channel = self._channel_for(target.name)
        bridge.b = (target.name, channel)
        self.bridges[bridge.b] = bridge
        self._reserve(bridge, cost)
        self.calls_routed += 1
        if self.relay is not None:
            leg_a = self.relay.offer(msg.call_id, side[0])
            leg_b = self.relay.answer(msg.call_id, target.name)
            await self._send(side[0], MediaLeg(msg.call_id, leg_a, self.relay_port), side[1])
        setup = CallSetup(msg.call_id, msg.caller, msg.callee, codecs, msg.caller_name, side[0])
        to_target: list[tuple[Message, int]] = [(setup, channel)]
        if self.relay is not None:
            to_target.append((MediaLeg(msg.call_id, leg_b, self.relay_port), channel))
        delivered = await self._send_many(target.name, to_target)
        if not delivered:
            await self._drop(bridge)
            await self._refuse(side, msg.call_id, 480, f"office {target.name} went offline")
            return
        log.info(
            "call %s: %s@%s -> %s@%s", msg.call_id, msg.caller, side[0], msg.callee, target.name
        )

    async def _end(self, side: tuple[str, int], msg: CallEnd) -> None:
        bridge = self.bridges.get(side)
        if bridge is None:
            return
        other = bridge.other(side)
        await self._drop(bridge)
        if other is not None:
            await self._send(other[0], msg, other[1])
        log.info("call %s ended by %s: %d %s", msg.call_id, side[0], msg.status, msg.reason)

    async def _drop(self, bridge: Bridge) -> None:
        for side in (bridge.a, bridge.b):
            if side is not None and self.bridges.get(side) is bridge:
                del self.bridges[side]
        if bridge.cost_kbps:
            offices = {bridge.a[0], bridge.b[0] if bridge.b else bridge.a[0]}
            for office in offices:
                budget = self._budget(office)
                budget.used_kbps = max(0.0, budget.used_kbps - bridge.cost_kbps)
                budget.calls = max(0, budget.calls - 1)
            bridge.cost_kbps = 0.0
        if self.relay is not None:
            self.relay.delete(bridge.call_id)

    def live_calls(self) -> list[Bridge]:
        return list({id(b): b for b in self.bridges.values()}.values())

    async def office_lost(self, office: str, now: float) -> None:
        """The office's trunk went down: its calls wait `grace` seconds for it to log in again."""
        for bridge in self.live_calls():
            if office in (bridge.a[0], bridge.b[0] if bridge.b else None):
                bridge.orphaned_since.setdefault(office, now)

    def office_back(self, office: str) -> None:
        for bridge in self.live_calls():
            bridge.orphaned_since.pop(office, None)

    async def reap(self, now: float) -> None:
        """End calls whose office did not come back within the grace period."""
        for bridge in self.live_calls():
            gone = [o for o, t in bridge.orphaned_since.items() if now - t > self.grace]
            if not gone:
                continue
            office = gone[0]
            await self._drop(bridge)
            for side in (bridge.a, bridge.b):
                if side is not None and side[0] != office:
                    await self._send(
                        side[0],
                        CallEnd(bridge.call_id, 503, f"office {office} lost its connection"),
                        side[1],
                    )

    def bandwidth(self, office: str) -> dict[str, float | int]:
        budget = self._budget(office)
        return {
            "budget_kbps": budget.budget_kbps,
            "used_kbps": round(budget.used_kbps, 1),
            "calls": budget.calls,
            "refused": budget.refused,
        }

    async def check_direct_paths(self) -> None:
        """F4: offer a direct path to calls whose relay legs both have an address (again when
        one moved), and note which path each call's audio takes."""
        # The relay's query (mainhost.relay.MediaRelay.query); a relay without it (a test's
        # fake) gets no direct paths.
        query: Callable[[str], dict[str, Any]] | None = getattr(self.relay, "query", None)
        if query is None:
            return
        for bridge in self.live_calls():
            try:
                media = query(bridge.call_id)
            except KeyError:
                continue
            offer, answer = media.get("offer"), media.get("answer")
            if bridge.b is None or offer is None or answer is None:
                continue
            relayed = sum(leg["packets_in"] - leg["keepalives_in"] for leg in (offer, answer))
            if bridge.direct_for is None or relayed != bridge.relay_media:
                bridge.media_path = "relayed"
            else:
                bridge.media_path = "direct"
            bridge.relay_media = relayed
            pair = (offer["address"], answer["address"])
            if None in pair or pair == bridge.direct_for:
                continue
            # Asked again at every check: an office's NAT type is known only some seconds
            # after its login (its STUN probe), and may change at the next one.
            refusal = (
                self._direct_refusal(bridge.a[0], bridge.b[0])
                if self.direct_media
                else "direct media is off"
            )
            if refusal:
                if refusal != bridge.direct_skipped:
                    self.direct_skipped += 1
                    log.info("call %s: relayed only (%s)", bridge.call_id, refusal)
                bridge.direct_skipped = refusal
                continue
            bridge.direct_skipped = ""
            await self._offer_direct(bridge, offer, answer)
            bridge.direct_for = pair

    def _direct_refusal(self, *offices: str) -> str:
        """Why hole punching is hopeless between these offices, or "" when it is worth a try."""
        for office in offices:
            nat = self.nat_type_of(office)
            if nat not in PUNCHABLE:
                return f"office {office}'s NAT: {nat}"
        return ""

    async def _offer_direct(
        self, bridge: Bridge, offer: dict[str, Any], answer: dict[str, Any]
    ) -> None:
        assert bridge.b is not None
        # §9b: one key for both sides, fresh each time (each side's counter starts at 0 again);
        # the direction bytes 2 and 3 keep the two senders' nonces apart.
        key = secrets.token_bytes(32)
        (a_ip, a_port), (b_ip, b_port) = offer["address"], answer["address"]
        call_id = bridge.call_id
        to_a = DirectPath(call_id, str(b_ip), int(b_port), answer["leg"], key, 2)
        to_b = DirectPath(call_id, str(a_ip), int(a_port), offer["leg"], key, 3)
        await self._send(bridge.a[0], to_a, bridge.a[1])
        await self._send(bridge.b[0], to_b, bridge.b[1])
        self.direct_offered += 1
        log.info(
            "call %s: direct path offered (%s:%s <-> %s:%s)", call_id, a_ip, a_port, b_ip, b_port
        )

    async def watch(self, interval: float = 1.0) -> None:
        next_reap = trio.current_time() + interval
        while True:
            await trio.sleep(min(interval, DIRECT_CHECK_INTERVAL))
            await self.check_direct_paths()
            now = trio.current_time()
            if now >= next_reap:
                next_reap = now + interval
                await self.reap(now)


def _cheapest(codecs: list[str]) -> float:
    return min((cost_kbps(c) for c in codecs if is_audio(c)), default=cost_kbps("PCMU/8000"))
