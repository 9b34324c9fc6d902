"""The office's call controller: the call vocabulary and the policy of every call.

A call is two sides and this controller between them (STYLE.md: a back-to-back user agent is
two legs and a controller). The side the call came from is `a` (the calling phone's SIP leg, or
the trunk leg of a call from another office); the side it goes to is `b`: one SIP leg per
registered contact of the called phone (forked in parallel, the first answer wins), or the trunk
leg of a call to another office. Legs tell the controller what happened in the call vocabulary
(`Ring`, `Connect`, `Update`, `Disconnect`, `Fail`, and `WanMedia` for where a trunk call's
audio goes); the controller tells legs what to do in the same words, plus `Offer` (try). It
never touches a SIP header or a wire message: `legs.py` translates.

Policy lives here: where a dialled number goes (F5 inside the office with a grant from the main
host, decided alone from the mirrored directory when the main host is silent or unreachable, F6;
F3 through the trunk otherwise), the bound on concurrent calls, the no-answer timeout, what a
trunk outage does to calls (unanswered trunk calls fail at once, answered ones wait), and the
media anchor of trunk calls (SDP toward the phone points at the anchor, the anchor's WAN side at
the relay the main host names). Calls inside the office keep the phones' SDP untouched, so their
audio goes phone to phone on the LAN.

It does not parse SIP or frames, or move audio (`anchor.py`). It is long (about 850 lines)
because the policy of the three kinds of call (inside the office, to and from another office)
shares one state machine, and the SDP each kind gives the phones belongs next to it.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from shared.media.sdp import (
    PCMA,
    PCMU,
    TELEPHONE_EVENT,
    Codec,
    Origin,
    SdpNegotiationError,
    SdpParseError,
    SessionDescription,
    build_answer,
    build_offer,
    is_on_hold,
    parse_sdp_untrusted,
    with_next_version,
)
from shared.wire.messages import CallSetup, DirectPath, GrantReply, Message

log = logging.getLogger("remotehost.calls")

# --- The call vocabulary ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Offer:
    """Try: a new call from `caller` to the dialled `callee`, with the caller's SDP offer (SIP
    side) or its codec list (trunk side)."""

    caller: str
    callee: str
    sdp: bytes | None = None
    codecs: tuple[str, ...] = ()
    caller_name: str = ""


@dataclass(frozen=True, slots=True)
class Ring:
    """The called side rings (180) or has early media (183)."""

    status: int = 180
    reason: str = "Ringing"
    sdp: bytes | None = None


@dataclass(frozen=True, slots=True)
class Connect:
    """The called side answered: its SDP answer (SIP side) or the codec it chose (trunk)."""

    sdp: bytes | None = None
    codec: str = ""


@dataclass(frozen=True, slots=True)
class Update:
    """A request inside the call, passed to the other side: a re-INVITE (hold, resume), INFO,
    UPDATE, MESSAGE. `hold` is set when it comes from the trunk (CallHold)."""

    method: str
    content_type: str = ""
    body: bytes = b""
    hold: bool | None = None


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """The other side's final answer to an `Update`."""

    status: int
    reason: str = ""
    content_type: str = ""
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Hang up: the call ends normally (for a side that has not answered: cancel it)."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class Fail:
    """The call failed: a SIP status and a reason a person can read. `warning` is set when the
    reason came from the main host (it becomes a Warning header)."""

    status: int
    reason: str
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class WanMedia:
    """The main host's relay for this call's WAN audio (from MediaLeg)."""

    leg: int
    relay_host: str
    relay_port: int


CallEvent = Offer | Ring | Connect | Disconnect | Fail | WanMedia


class Leg(Protocol):
    """One side of a call as the controller sees it (`legs.py` has the three kinds)."""

    call: Call | None
    peer_ip: str
    """The phone's address (for the anchor's LAN address toward it); "" for the trunk."""

    async def send(self, event: CallEvent) -> None: ...
    async def update(self, update: Update) -> UpdateResult: ...
    def close(self) -> None: ...


class CallListener(Protocol):
    """Hears every call's events, for call records (`records.py`, F15). `event` is started,
    ringing, answered or ended; `status` and `reason` say how it ended (0: a normal hangup).
    The call goes on when `record_event` returns (the records write the row to disk first)."""

    async def record_event(
        self,
        call_id: str,
        event: str,
        *,
        caller: str,
        callee: str,
        direction: str,
        status: int = 0,
        reason: str = "",
    ) -> None: ...


class MediaCall(Protocol):
    """One call's anchored media (`anchor.py`)."""

    local_port: int

    def set_phone_target(self, ip: str, port: int) -> None: ...
    def set_wan(self, leg: int, relay: tuple[str, int], key: bytes) -> None: ...
    def update_key(self, key: bytes) -> None: ...
    def close(self) -> None: ...


class MediaAnchor(Protocol):
    async def open_call(self, call_id: str) -> MediaCall: ...


class Trunk(Protocol):
    """What the controller needs of the uplink (`uplink.py`)."""

    @property
    def online(self) -> bool: ...
    @property
    def media_key(self) -> bytes | None: ...
    async def request_grant(
        self, call_id: str, caller: str, callee: str, *, timeout: float = 1.0
    ) -> GrantReply | None: ...


class Bindings(Protocol):
    """A registered contact of a phone, as the SIP legs need it (`location.Binding`)."""

    @property
    def ext(self) -> str: ...
    @property
    def contact(self) -> str: ...
    @property
    def transport(self) -> str: ...
    @property
    def source_ip(self) -> str: ...
    @property
    def source_port(self) -> int: ...
    @property
    def reachable(self) -> bool: ...


class LegFactory(Protocol):
    """Makes the b legs the controller starts (`legs.Legs`)."""

    def sip_leg(self, binding: Bindings) -> Leg: ...
    def trunk_leg(self, call_id: str, channel: int | None = None) -> Leg: ...


class MirrorInfo(Protocol):
    @property
    def ext_first(self) -> int: ...
    @property
    def ext_last(self) -> int: ...


class Directory(Protocol):
    """The office's mirrored directory (`mirror.DirectoryMirror`)."""

    def lookup(self, ext: str) -> object | None: ...
    def info(self) -> MirrorInfo: ...


class Registrations(Protocol):
    """Where each extension's phones are (`location.Location`)."""

    def get(self, ext: str) -> Sequence[Bindings]: ...


@dataclass(frozen=True)
class CallPolicy:
    max_calls: int = 100
    """Calls at once; more are refused with 503 (the box is small, F7 budgets the WAN)."""
    no_answer_timeout: float = 60.0
    """Seconds a call may ring before the caller is told 480 No answer."""
    grant_timeout: float = 1.0
    """Seconds to wait for the main host's grant before deciding alone (F6)."""
    trunk_grace: float = 10.0
    """Seconds an answered call between offices waits for the trunk to come back; the main
    host keeps its bridge as long (`mainhost.calls.CallRouter.grace`), then both give up."""


@dataclass(eq=False)
class Call:
    """One call and where it stands. Its states, and what moves it (anything else is ignored:
    a late 180, a second answer, a failure of a fork when another one answered):

        trying --Ring--> ringing --Connect (first one wins)--> connected
        trying, ringing --every fork Fail / caller Disconnect / no answer--> ended (Fail to a)
        trying, ringing --trunk down (trunk calls)--> ended (503 to a)
        connected --Disconnect from either side / Fail from the winner--> ended
        connected --trunk down for longer than trunk_grace (trunk calls)--> ended

    `_run` owns the call's life: whichever way it ends, its legs and anchor call are closed.
    """

    call_id: str
    a: Leg
    offer: Offer
    kind: str = "local"  # local (F5), outbound (to another office), inbound (from one)
    b: list[Leg] = field(default_factory=list)
    winner: Leg | None = None
    state: str = "trying"  # trying, ringing, connected, ended
    media: MediaCall | None = None
    wan: WanMedia | None = None
    wan_wired: bool = False
    phone_sdp: SessionDescription | None = None
    sent_sdp: SessionDescription | None = None
    """The last SDP we gave the phone of a trunk call (RFC 3264 §8: same o=, next version)."""
    failure: Fail | None = None
    cause: tuple[int, str] | None = None
    """How the call ended (status, reason), for its record: the first cause wins."""
    answered: trio.Event = field(default_factory=trio.Event)
    ended: trio.Event = field(default_factory=trio.Event)

    @property
    def legs(self) -> list[Leg]:
        return [self.a, *self.b]


# RFC 3261 §16.7 step 6, simplified: among the forks' failures a 6xx wins, then busy, then the
# first one (a phone that declines says more than one that timed out).
def _better(new: Fail, old: Fail | None) -> bool:
    if old is None:
        return True
    rank = {600: 0, 603: 0, 486: 1}
    return rank.get(new.status, 9) < rank.get(old.status, 9)


class CallController:
    """Every call of the office. `media_address(phone_ip)` is our LAN address facing a phone:
    what the SDP we send it names when the anchor carries the media.

    `serve` runs the calls' tasks (grant waits, ringing timeouts, clean-up) in its nursery.
    """

    def __init__(
        self,
        *,
        legs: LegFactory,
        directory: Directory,
        location: Registrations,
        trunk: Trunk,
        anchor: MediaAnchor,
        media_address: Callable[[str], str],
        main_host: str,
        policy: CallPolicy = CallPolicy(),
    ) -> None:
        self.legs = legs
        self.directory = directory
        self.location = location
        self.trunk = trunk
        self.anchor = anchor
        self.media_address = media_address
        self.main_host = main_host
        self.policy = policy
        self.calls: dict[str, Call] = {}
        self._trunk_legs: dict[int, Callable[[Message], Awaitable[None]]] = {}
        self._nursery: trio.Nursery | None = None
        self._trunk_epoch = 0  # counts trunk losses, so a late grace timer knows it is stale
        self.listener: CallListener | None = None

    async def _note(
        self, call_id: str, offer: Offer, kind: str, event: str, *cause: int | str
    ) -> None:
        """Tell the listener (call records); its failure must never fail a call."""
        if self.listener is None:
            return
        status, reason = cause if cause else (0, "")
        try:
            await self.listener.record_event(
                call_id,
                event,
                caller=offer.caller,
                callee=offer.callee,
                direction=kind,
                status=int(status),
                reason=str(reason),
            )
        except Exception:
            log.exception("call %s: the call listener failed", call_id)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                # Stopping: the nursery takes no new task once this body is left, and the
                # uplink's last on_trunk_down comes from its own clean-up, after ours.
                self._nursery = None

    def _spawn(self, fn: Callable[[], Awaitable[None]]) -> bool:
        """Run `fn` in the controller's nursery; False when it is not serving (stopping)."""
        nursery = self._nursery
        if nursery is None:
            return False

        async def guarded() -> None:
            # One call's bug must not take every call of the office (and the service) down.
            try:
                await fn()
            except Exception:
                log.exception("call control task failed")

        try:
            nursery.start_soon(guarded)
        except RuntimeError:
            # The nursery is closing (the remote host is shutting down and the uplink reports
            # the trunk gone on its way out): nothing more to start.
            return False
        return True

    def status(self) -> list[dict[str, object]]:
        """The live calls, for `remotehost status`."""
        return [  # a copy first: `remotehost status` reads this from a worker thread
            {
                "call_id": call.call_id,
                "caller": call.offer.caller,
                "callee": call.offer.callee,
                "kind": call.kind,
                "state": call.state,
                "forks": len(call.b),
                "anchored": call.media is not None,
                # F4: "relayed" or "direct", and the anchor's counters (packets direct and
                # relayed); getattr: the MediaCall fakes of tests need not have them.
                "media_path": getattr(call.media, "media_path", None),
                "media": _media_statistics(call.media),
            }
            for call in list(self.calls.values())
        ]

    # --- new calls ---

    async def new_call(self, a: Leg, offer: Offer) -> None:
        """A call arrives from `a` (a phone's INVITE, a CallSetup from the trunk)."""
        if len(self.calls) >= self.policy.max_calls:
            log.warning("call from %s to %s refused: %d calls", offer.caller, offer.callee,
                        len(self.calls))  # fmt: skip
            refusal = Fail(503, f"Service Unavailable (at most {self.policy.max_calls} calls)")
            call_id = secrets.token_hex(8)
            await self._note(call_id, offer, "local", "started")
            await self._note(call_id, offer, "local", "ended", refusal.status, refusal.reason)
            await a.send(refusal)
            a.close()
            return
        call = Call(secrets.token_hex(8), a, offer)
        a.call = call
        self.calls[call.call_id] = call
        await self._note(call.call_id, offer, call.kind, "started")
        if not self._spawn(lambda: self._run(call)):
            await self._refuse_stopping(call)

    async def _refuse_stopping(self, call: Call) -> None:
        del self.calls[call.call_id]
        refusal = Fail(503, "Service Unavailable (shutting down)")
        await self._note(
            call.call_id, call.offer, call.kind, "ended", refusal.status, refusal.reason
        )
        await call.a.send(refusal)
        call.a.close()

    def register_trunk_leg(
        self, channel: int, on_message: Callable[[Message], Awaitable[None]]
    ) -> None:
        """Trunk messages on `channel` go to `on_message` (the trunk leg of a call)."""
        self._trunk_legs[channel] = on_message

    def forget_trunk_leg(self, channel: int) -> None:
        self._trunk_legs.pop(channel, None)

    @property
    def trunk_channels(self) -> int:
        """Trunk channels with a call leg on them (0 once every call is over)."""
        return len(self._trunk_legs)

    async def _run(self, call: Call) -> None:
        try:
            await self._run_call(call)
        except Exception:
            log.exception("call %s: call control failed", call.call_id)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self._fail(call, Fail(500, "Server Internal Error (call control failed)"))
        finally:
            call.state = "ended"
            for leg in call.legs:
                leg.close()
            if call.media is not None:
                call.media.close()
            self.calls.pop(call.call_id, None)
            cause = call.cause or (500, "Server Internal Error (call control stopped)")
            await self._note(call.call_id, call.offer, call.kind, "ended", *cause)
            log.info("call %s ended", call.call_id)

    async def _run_call(self, call: Call) -> None:
        await self._route(call)
        if call.state != "ended":
            with trio.move_on_after(self.policy.no_answer_timeout):
                await call.answered.wait()
            if call.state in ("trying", "ringing"):
                log.info("call %s: no answer", call.call_id)
                await self._fail(call, Fail(480, "No answer"))
        await call.ended.wait()

    def _in_office_range(self, number: str) -> bool:
        info = self.directory.info()
        return (
            number.isdigit()
            and info.ext_last > 0
            and (info.ext_first <= int(number) <= info.ext_last)
        )

    async def _route(self, call: Call) -> None:
        offer = call.offer
        if call.kind == "inbound":
            await self._ring_phones(call, offer)
            return
        if not offer.callee:
            await self._fail(call, Fail(404, "Not Found (no number dialled)"))
        elif self.directory.lookup(offer.callee) is not None:
            await self._local(call, offer)
        elif self._in_office_range(offer.callee):
            await self._fail(call, Fail(404, f"Not Found ({offer.callee} is no extension)"))
        elif not self.trunk.online:
            await self._fail(call, Fail(503, "Service Unavailable (main host unreachable)"))
        else:
            await self._outbound(call, offer)

    async def _local(self, call: Call, offer: Offer) -> None:
        # F5: the main host grants calls inside the office; F6: without an answer in time (or
        # without a trunk) the office decides alone from its mirror: both ends are in it.
        grant = await self.trunk.request_grant(
            call.call_id, offer.caller, offer.callee, timeout=self.policy.grant_timeout
        )
        if call.state == "ended":
            return  # cancelled while we asked
        if grant is not None and not grant.granted:
            reason = grant.reason or "call not allowed"
            await self._fail(call, Fail(403, f"Forbidden ({reason})", warning=reason))
            return
        if grant is None:
            log.info("call %s: no grant from the main host, decided alone", call.call_id)
        await self._ring_phones(call, offer)

    async def _ring_phones(self, call: Call, offer: Offer) -> None:
        if self.directory.lookup(offer.callee) is None:
            await self._fail(call, Fail(404, f"Not Found ({offer.callee} is no extension)"))
            return
        bindings = [b for b in self.location.get(offer.callee) if b.reachable]
        if not bindings:
            await self._fail(
                call, Fail(480, f"Temporarily Unavailable ({offer.callee} is not registered)")
            )
            return
        sdp = offer.sdp
        if call.kind == "inbound":
            # F3: the phone gets an offer pointing at the anchor, with the caller's codecs.
            sdp = await self._anchor_offer(call, offer, bindings[0].source_ip)
        for binding in bindings:
            leg = self.legs.sip_leg(binding)
            leg.call = call
            call.b.append(leg)
        for leg in list(call.b):
            if call.state == "ended":
                return
            await leg.send(Offer(offer.caller, offer.callee, sdp, offer.codecs, offer.caller_name))

    async def _outbound(self, call: Call, offer: Offer) -> None:
        assert offer.sdp is not None
        call.kind = "outbound"
        try:
            phone = parse_sdp_untrusted(offer.sdp)
        except SdpParseError as exc:
            await self._fail(call, Fail(488, f"Not Acceptable Here (bad SDP: {exc})"))
            return
        codecs = tuple(_codec_name(c) for c in _audio_codecs(phone))
        if not codecs:
            await self._fail(call, Fail(488, "Not Acceptable Here (no audio codec offered)"))
            return
        call.phone_sdp = phone
        _aim_at_phone(await self._open_media(call), phone)
        if call.state == "ended":
            return
        leg = self.legs.trunk_leg(call.call_id)
        leg.call = call
        call.b.append(leg)
        await leg.send(Offer(offer.caller, offer.callee, None, codecs, offer.caller_name))

    async def _anchor_offer(self, call: Call, offer: Offer, phone_ip: str) -> bytes:
        media = await self._open_media(call)
        codecs = [c for c in (_codec_of(name) for name in offer.codecs) if c is not None]
        address = self.media_address(phone_ip)
        sdp = build_offer(
            origin=_origin(address),
            address=address,
            port=media.local_port,
            codecs=[*codecs, TELEPHONE_EVENT],
        )
        return self._to_phone(call, sdp)

    # --- what the legs say ---

    async def on_event(self, leg: Leg, event: CallEvent) -> None:
        call = leg.call
        if call is None or call.state == "ended":
            return
        if isinstance(event, WanMedia):
            call.wan = event  # it may come before the anchor call is open
            await self._wire_wan(call)
        elif leg is call.a:
            if isinstance(event, Disconnect | Fail):
                await self._hang_up(call, leg, event)
        elif isinstance(event, Ring):
            if call.state in ("trying", "ringing"):
                first = call.state == "trying"
                call.state = "ringing"
                if first:
                    await self._note(call.call_id, call.offer, call.kind, "ringing")
                if call.state == "ringing":  # not answered or ended while the row was written
                    await call.a.send(self._ring_for_a(call, event))
        elif isinstance(event, Connect):
            await self._connected(call, leg, event)
        elif isinstance(event, Fail):
            if leg is call.winner:
                # An answered call ended by a failure (the main host gave up on the other
                # office after its grace period): the caller is hung up on, not refused.
                await self._hang_up(call, leg, Disconnect(event.reason))
            else:
                await self._b_failed(call, leg, event)
        elif isinstance(event, Disconnect):
            if leg is call.winner:
                await self._hang_up(call, leg, event)
            else:
                await self._b_failed(
                    call, leg, Fail(480, event.reason or "Temporarily Unavailable")
                )

    def _ring_for_a(self, call: Call, ring: Ring) -> Ring:
        if call.kind == "local":
            return ring  # the callee's early media SDP, untouched (phone to phone)
        return Ring(ring.status, ring.reason, None)

    async def _wire_wan(self, call: Call) -> None:
        # The media key of the login in use now; a later login's key comes by on_trunk_up.
        key = self.trunk.media_key
        wan = call.wan
        if call.media is None or wan is None or key is None or call.wan_wired:
            return
        host = await _ip_of(wan.relay_host or self.main_host, wan.relay_port)
        if host is None or call.media is None:
            log.warning("call %s: cannot resolve the relay %r", call.call_id, wan.relay_host)
            return
        call.media.set_wan(wan.leg, (host, wan.relay_port), key)
        call.wan_wired = True

    async def _open_media(self, call: Call) -> MediaCall:
        media = await self.anchor.open_call(call.call_id)
        call.media = media
        await self._wire_wan(call)
        return media

    async def _connected(self, call: Call, leg: Leg, event: Connect) -> None:
        if call.state == "connected":
            if leg is not call.winner:
                await leg.send(Disconnect("answered elsewhere"))
            return
        answer = await self._answer_for_a(call, event)
        if answer is None:
            await leg.send(Disconnect("no common codec"))
            await self._fail(call, Fail(488, "Not Acceptable Here (no common codec)"))
            return
        call.state = "connected"
        call.winner = leg
        call.answered.set()
        await self._note(call.call_id, call.offer, call.kind, "answered")
        # The first answer wins; the other forks are cancelled (RFC 3261 §16.7 step 10), also
        # when the caller hung up while the row was written (then it gets no answer).
        for other in call.b:
            if other is not leg:
                await other.send(Disconnect("answered elsewhere"))
        if call.state == "connected":
            await call.a.send(answer)

    async def _answer_for_a(self, call: Call, event: Connect) -> Connect | None:
        if call.kind == "local":
            return event  # the callee's SDP, untouched
        if call.kind == "outbound":
            # The far office chose a codec; the caller gets an answer pointing at the anchor.
            assert call.phone_sdp is not None and call.media is not None
            codec = _codec_of(event.codec)
            if codec is None:
                return None
            address = self.media_address(call.a.peer_ip)
            try:
                sdp = build_answer(
                    call.phone_sdp,
                    origin=_origin(address),
                    address=address,
                    port=call.media.local_port,
                    codecs=[codec, TELEPHONE_EVENT],
                )
            except SdpNegotiationError:
                return None
            return Connect(self._to_phone(call, sdp))
        # inbound: the phone answered our anchor offer; the trunk gets the codec it chose.
        try:
            answer = parse_sdp_untrusted(event.sdp or b"")
        except SdpParseError:
            return None
        codecs = _audio_codecs(answer)
        if not codecs or call.media is None:
            return None
        call.phone_sdp = answer
        _aim_at_phone(call.media, answer)
        return Connect(codec=_codec_name(codecs[0]))

    async def _b_failed(self, call: Call, leg: Leg, event: Fail) -> None:
        if leg in call.b:
            call.b.remove(leg)
            leg.close()
        if _better(event, call.failure):
            call.failure = event
        if not call.b and call.state in ("trying", "ringing"):
            assert call.failure is not None
            await self._fail(call, call.failure)

    async def _fail(self, call: Call, event: Fail) -> None:
        """The call cannot be completed: cancel what rings, tell the caller why."""
        if call.state == "ended":
            return
        call.state = "ended"
        call.cause = call.cause or (event.status, event.reason)
        log.info("call %s failed: %d %s", call.call_id, event.status, event.reason)
        for leg in call.b:
            await leg.send(Disconnect(event.reason))
        await call.a.send(event)
        self._end(call)

    async def _hang_up(self, call: Call, by: Leg, event: Disconnect | Fail) -> None:
        connected = call.state == "connected"
        call.state = "ended"
        side = "caller" if by is call.a else "callee"
        if connected:
            call.cause = call.cause or (0, event.reason or f"{side} hung up")
        else:
            call.cause = call.cause or (
                487,
                f"Request Terminated ({event.reason or side + ' hung up'})",
            )
        targets = [leg for leg in call.legs if leg is not by]
        if connected:
            targets = [call.a if by is not call.a else call.winner] if call.winner else []
        for leg in targets:
            if leg is not None:
                await leg.send(Disconnect(event.reason))
        self._end(call)

    def _end(self, call: Call) -> None:
        call.state = "ended"
        call.answered.set()
        call.ended.set()

    async def on_update(self, leg: Leg, update: Update) -> UpdateResult:
        """A request inside the call from `leg`, for the other side; its answer."""
        call = leg.call
        if call is None or call.state != "connected" or call.winner is None:
            return UpdateResult(491, "Request Pending (the call is not established)")
        other = call.winner if leg is call.a else call.a
        if call.kind == "local":
            return await other.update(update)  # phone to phone: passed through untouched
        sip_side = call.a if call.kind == "outbound" else call.winner
        if leg is sip_side:
            return await self._update_from_phone(call, other, update)
        return await self._update_from_trunk(call, other, update)

    async def _update_from_phone(self, call: Call, trunk: Leg, update: Update) -> UpdateResult:
        assert call.media is not None
        offers = update.method in ("INVITE", "UPDATE") and "sdp" in update.content_type.lower()
        if update.method == "INVITE" and not update.body:
            # RFC 3264 §5 / RFC 3261 §14.1: an offerless re-INVITE asks for our offer (in the
            # 200; the phone answers in its ACK, and the anchor latches on its packets anyway).
            return UpdateResult(200, "OK", "application/sdp", self._anchor_sdp(call, "sendrecv"))
        if not offers:
            if update.body and "sdp" in update.content_type.lower():
                # The phone's own SDP never crosses the WAN: its address means nothing there.
                return UpdateResult(488, "Not Acceptable Here (SDP outside an offer)")
            await trunk.update(update)  # INFO and the like travel as CallInfo
            return UpdateResult(200, "OK")
        try:
            offer = parse_sdp_untrusted(update.body)
        except SdpParseError as exc:
            return UpdateResult(400, f"Bad Request (bad SDP: {exc})")
        hold = bool(offer.media) and is_on_hold(offer, 0)
        if not hold:
            _aim_at_phone(call.media, offer)
        await trunk.update(Update("hold", hold=hold))
        codecs = _audio_codecs(call.phone_sdp) if call.phone_sdp else []
        address = self.media_address(self._sip_leg(call).peer_ip)
        try:
            answer = build_answer(
                offer,
                origin=_origin(address),
                address=address,
                port=call.media.local_port,
                codecs=[*codecs[:1], TELEPHONE_EVENT] if codecs else _default_codecs(),
            )
        except SdpNegotiationError as exc:
            return UpdateResult(488, f"Not Acceptable Here ({exc})")
        return UpdateResult(200, "OK", "application/sdp", self._to_phone(call, answer))

    async def _update_from_trunk(self, call: Call, phone: Leg, update: Update) -> UpdateResult:
        if update.hold is None:
            if update.method in _NOT_PASSED or "sdp" in update.content_type.lower():
                # Session changes come as CallHold; a far phone's SDP means nothing here.
                return UpdateResult(488, f"Not Acceptable Here ({update.method} not passed on)")
            return await phone.update(update)
        offer = self._anchor_sdp(call, "sendonly" if update.hold else "sendrecv")
        return await phone.update(Update("INVITE", "application/sdp", offer))

    def _sip_leg(self, call: Call) -> Leg:
        leg = call.a if call.kind == "outbound" else call.winner
        assert leg is not None
        return leg

    def _anchor_sdp(self, call: Call, direction: str) -> bytes:
        """An offer to the phone of a trunk call: the anchor, the codec in use."""
        assert call.media is not None
        codecs = _audio_codecs(call.phone_sdp) if call.phone_sdp else []
        address = self.media_address(self._sip_leg(call).peer_ip)
        offer = build_offer(
            origin=_origin(address),
            address=address,
            port=call.media.local_port,
            codecs=[*codecs[:1], TELEPHONE_EVENT] if codecs else _default_codecs(),
            direction=direction,
        )
        return self._to_phone(call, offer)

    def _to_phone(self, call: Call, sdp: SessionDescription) -> bytes:
        # RFC 3264 §8: every SDP in a session keeps the first o= line, the version going up.
        call.sent_sdp = with_next_version(call.sent_sdp, sdp)
        return call.sent_sdp.encode()

    # --- the trunk ---

    async def on_trunk_message(self, channel: int, msg: Message) -> None:
        if isinstance(msg, DirectPath):  # F4: for the call's anchor, not its legs
            call = self.calls.get(msg.call_id)
            set_direct = getattr(call.media, "set_direct", None) if call else None
            try:
                if set_direct is not None:
                    set_direct((msg.peer_ip, msg.peer_port), msg.peer_leg, msg.key, msg.direction)
            except ValueError as exc:  # a bad key or address: the relay carries on alone
                log.warning("call %s: DirectPath refused: %s", msg.call_id, exc)
            return
        handle = self._trunk_legs.get(channel)
        if handle is not None:
            await handle(msg)
            return
        # A new call from another office comes on a channel the main host numbered (even).
        if isinstance(msg, CallSetup) and channel % 2 == 0:
            leg = self.legs.trunk_leg(msg.call_id, channel)
            offer = Offer(msg.caller, msg.callee, None, tuple(msg.codecs), msg.caller_name)
            if len(self.calls) >= self.policy.max_calls:
                refusal = Fail(503, f"office busy ({self.policy.max_calls} calls)")
                await self._note(msg.call_id, offer, "inbound", "started")
                await self._note(
                    msg.call_id, offer, "inbound", "ended", refusal.status, refusal.reason
                )
                await leg.send(refusal)
                leg.close()
                return
            call = Call(msg.call_id, leg, offer, kind="inbound")
            leg.call = call
            self.calls[call.call_id] = call
            await self._note(call.call_id, offer, call.kind, "started")
            if not self._spawn(lambda: self._run(call)):
                await self._refuse_stopping(call)

    async def on_trunk_up(self, media_key: bytes) -> None:
        # F9: a new login has a new media key; the anchor's WAN legs take it at once.
        self._trunk_epoch += 1
        for call in list(self.calls.values()):
            if call.media is None:
                continue
            if call.wan_wired:
                call.media.update_key(media_key)
            else:
                await self._wire_wan(call)  # MediaLeg came while we had no key

    async def on_trunk_down(self) -> None:
        # Unanswered calls through the trunk cannot complete; answered ones wait, since the
        # main host keeps their bridge for a grace period and the audio may still flow.
        for call in list(self.calls.values()):
            if call.kind != "local" and call.state in ("trying", "ringing"):
                await self._fail(call, Fail(503, "Service Unavailable (main host unreachable)"))
        self._trunk_epoch += 1
        epoch = self._trunk_epoch
        self._spawn(lambda: self._after_grace(epoch))

    async def _after_grace(self, epoch: int) -> None:
        await trio.sleep(self.policy.trunk_grace)
        if epoch != self._trunk_epoch or self.trunk.online:
            return  # the trunk came back in time (or went down again: a newer timer runs)
        for call in list(self.calls.values()):
            if call.kind != "local" and call.state == "connected":
                log.info("call %s: the trunk stayed down, hanging up", call.call_id)
                await self._hang_up(call, call.b[0] if call.kind == "outbound" else call.a,
                                    Disconnect("main host unreachable"))  # fmt: skip

    def spawn_update(
        self, leg: Leg, update: Update, reply: Callable[[UpdateResult], Awaitable[None]]
    ) -> None:
        """Run `on_update` in the controller's nursery (a leg must not wait for it inline)."""

        async def run() -> None:
            result = await self.on_update(leg, update)
            await reply(result)

        self._spawn(run)


# Requests that change the session or the dialog: never passed through the trunk as CallInfo.
_NOT_PASSED = frozenset({"INVITE", "UPDATE", "ACK", "BYE", "CANCEL", "PRACK"})


# --- SDP helpers -------------------------------------------------------------------------------


def _origin(address: str) -> Origin:
    return Origin(
        username="branchpbx",
        session_id=str(secrets.randbits(32)),
        address=address,
        addrtype="IP6" if ":" in address else "IP4",
    )


def _audio_codecs(sdp: SessionDescription) -> list[Codec]:
    for media in sdp.media:
        if media.media == "audio" and media.port != 0:
            return [
                c for _, c in media.codecs() if c.encoding.lower() not in ("telephone-event", "cn")
            ]
    return []


def _codec_name(codec: Codec) -> str:
    return f"{codec.encoding}/{codec.clock_rate}"


_STATIC = {"PCMU/8000": 0, "PCMA/8000": 8, "G722/8000": 9, "GSM/8000": 3, "G729/8000": 18}


def _codec_of(name: str) -> Codec | None:
    encoding, _, rate = name.partition("/")
    if not encoding or not (rate or "8000").isdigit():
        return None
    clock = int(rate or "8000")
    return Codec(encoding, clock, payload_type=_STATIC.get(f"{encoding.upper()}/{clock}"))


def _default_codecs() -> list[Codec]:
    return [PCMU, PCMA, TELEPHONE_EVENT]


def _aim_at_phone(media: MediaCall, sdp: SessionDescription) -> None:
    """Where the phone said it receives; the anchor latches on its real source anyway
    (symmetric RTP), so a private or wrong address here costs nothing."""
    for index, stream in enumerate(sdp.media):
        connection = sdp.connection_for(index)
        if stream.media == "audio" and stream.port and connection is not None:
            try:
                media.set_phone_target(connection.address, stream.port)
            except ValueError:
                pass  # a host name, not an address: the first packet will tell
            return


async def _ip_of(host: str, port: int) -> str | None:
    """`host` as an IP address (the anchor wants addresses; the main host may be a name)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        found = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_DGRAM)
    except OSError:
        return None
    return str(found[0][4][0]) if found else None


def _media_statistics(media: object) -> dict[str, object] | None:
    """The anchor's counters of one call, for status (F4: direct and relayed packets)."""
    statistics = getattr(media, "statistics", None)
    if statistics is None:
        return None
    return dict(vars(statistics()))
