"""Test helpers for call control: scripted SIP phones on loopback UDP, an office (SIP service,
legs, controller) with a fake uplink and a fake media anchor, and a main host (the real
`CallRouter`) between two offices.

A `SipPhone` is a raw UDP endpoint built on `shared.sip`: it sends what a test tells it to and
keeps everything it receives in a mailbox, from which the test takes messages by what they are
(`expect_request("INVITE")`, `expect_response(180)`), so retransmissions and 100 Trying never
get in the way of a script.
"""

from __future__ import annotations

import itertools
import random
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from mainhost.calls import CallRouter, OfficeRange
from remotehost.anchor import MediaAnchor
from remotehost.calls import CallController, CallPolicy
from remotehost.legs import Legs
from remotehost.location import Binding, Location, SqliteLocationStore
from remotehost.mirror import DirectoryMirror
from remotehost.sipservice import SipService
from shared.aio.trunk import ConnectionLost
from shared.sip.dialog import Dialog
from shared.sip.digest import answer_challenge, ha1, parse_challenge_untrusted, select_challenge
from shared.sip.message import (
    Headers,
    SipMessage,
    SipRequest,
    SipResponse,
    make_response,
    parse_message_untrusted,
)
from shared.sip.transaction import TimerConfig, TransactionLayer, make_ack_for_failure, make_cancel
from shared.wire.messages import DirectoryEntry, DirectorySnapshot, GrantReply, Message

REALM = "branchpbx.test"
GUARD = 10.0


def sdp(port: int, direction: str = "sendrecv", host: str = "127.0.0.1") -> bytes:
    """A phone's audio offer/answer: PCMU, PCMA and DTMF events on `host`:`port`."""
    return (
        "v=0\r\n"
        f"o=- {port} 1 IN IP4 {host}\r\n"
        "s=-\r\n"
        f"c=IN IP4 {host}\r\n"
        "t=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 8 101\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:8 PCMA/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\n"
        "a=fmtp:101 0-16\r\n"
        f"a={direction}\r\n"
    ).encode()


def sdp_lines(body: bytes, prefix: str) -> list[str]:
    return [line for line in body.decode().split("\r\n") if line.startswith(prefix)]


@dataclass
class Outgoing:
    """A call a phone makes: its INVITE (as last sent) and, once answered, its dialog."""

    invite: SipRequest
    dialog: Dialog | None = None


class SipPhone:
    """A scripted SIP phone on 127.0.0.1 (UDP)."""

    def __init__(self, ext: str, server: tuple[str, int], password: str | None = None) -> None:
        self.ext = ext
        self.server = server
        self.password = password if password is not None else f"secret-{ext}"
        self.auth_user: str | None = None  # who it authenticates as (default: its extension)
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.port = 0
        self.inbox: list[SipMessage] = []
        self._arrived = trio.Event()
        self.cseq = itertools.count(1)

    async def bind(self) -> None:
        await self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    @property
    def contact(self) -> str:
        return f"sip:{self.ext}@127.0.0.1:{self.port}"

    def binding(self, expires_at: float = 4e9) -> Binding:
        return Binding(
            ext=self.ext,
            contact=self.contact,
            expires_at=expires_at,
            call_id=f"reg-{self.ext}-{self.port}",
            cseq=1,
            transport="udp",
            source_ip="127.0.0.1",
            source_port=self.port,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        with self.sock:
            while True:
                data = await self.sock.recv(65535)
                message = parse_message_untrusted(data)
                self.inbox.append(message)
                self._arrived.set()

    def via(self) -> str:
        return f"SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK{secrets.token_hex(8)};rport"

    async def send(self, message: SipMessage) -> None:
        await self.sock.sendto(message.encode(), self.server)

    async def _take(self, match: Callable[[SipMessage], bool], what: str) -> SipMessage:
        with trio.fail_after(GUARD):
            while True:
                for i, message in enumerate(self.inbox):
                    if match(message):
                        return self.inbox.pop(i)
                self._arrived = trio.Event()
                await self._arrived.wait()
        raise AssertionError(what)  # pragma: no cover

    async def expect_request(self, method: str) -> SipRequest:
        message = await self._take(
            lambda m: isinstance(m, SipRequest) and m.method == method, method
        )
        assert isinstance(message, SipRequest)
        return message

    async def expect_response(
        self, status: int | None = None, method: str = "INVITE", call_id: str | None = None
    ) -> SipResponse:
        """The next response to `method` (not 100 Trying) with `status` if given."""

        def match(m: SipMessage) -> bool:
            return (
                isinstance(m, SipResponse)
                and m.status != 100
                and m.cseq.method == method
                and (status is None or m.status == status)
                and (call_id is None or m.call_id == call_id)
            )

        message = await self._take(match, f"{status} to {method}")
        assert isinstance(message, SipResponse)
        return message

    def received(self, method: str) -> list[SipMessage]:
        return [m for m in self.inbox if isinstance(m, SipRequest) and m.method == method]

    # -- as the caller --

    def make_invite(self, callee: str, body: bytes, authorization: str | None = None) -> SipRequest:
        headers = Headers()
        headers.add("Via", self.via())
        headers.add("Max-Forwards", "70")
        headers.add(
            "From", f'"Phone {self.ext}" <sip:{self.ext}@{REALM}>;tag={secrets.token_hex(4)}'
        )
        headers.add("To", f"<sip:{callee}@{REALM}>")
        headers.add("Call-ID", secrets.token_hex(10))
        headers.add("CSeq", f"{next(self.cseq)} INVITE")
        headers.add("Contact", f"<{self.contact}>")
        if authorization is not None:
            headers.add("Proxy-Authorization", authorization)
        if body:
            headers.add("Content-Type", "application/sdp")
        return SipRequest("INVITE", f"sip:{callee}@{REALM}", headers, body)

    async def call(self, callee: str, body: bytes) -> Outgoing:
        """INVITE `callee`, answer the 407 challenge, and return the authenticated INVITE."""
        first = self.make_invite(callee, body)
        await self.send(first)
        challenge = await self.expect_response(407, call_id=first.call_id)
        await self.send(make_ack_for_failure(first, challenge))
        chosen = select_challenge(
            [parse_challenge_untrusted(v) for v in challenge.headers.get_all("Proxy-Authenticate")]
        )
        assert chosen is not None
        invite = self.make_invite(callee, body)
        authorization = answer_challenge(
            chosen,
            method="INVITE",
            uri=invite.uri,
            username=self.auth_user or self.ext,
            password=self.password,
            cnonce=secrets.token_hex(4),
            nc=1,
        )
        invite.headers.add("Proxy-Authorization", authorization)
        # Same dialog identity as the first try, next CSeq (RFC 3261 §22.2).
        invite.headers.set("Call-ID", first.call_id)
        invite.headers.set("From", str(first.from_))
        await self.send(invite)
        return Outgoing(invite)

    async def answered(self, call: Outgoing) -> SipResponse:
        """Wait for the 200 to our INVITE, ACK it, and keep the dialog."""
        ok = await self.expect_response(200, call_id=call.invite.call_id)
        call.dialog = Dialog.as_uac(call.invite, ok)
        await self.send(call.dialog.create_ack(via=self.via()))
        return ok

    async def ack_failure(self, call: Outgoing, response: SipResponse) -> None:
        await self.send(make_ack_for_failure(call.invite, response))

    async def cancel(self, call: Outgoing) -> None:
        await self.send(make_cancel(call.invite))

    # -- as the called phone --

    async def reply(
        self, request: SipRequest, status: int, body: bytes = b"", tag: str = "callee"
    ) -> SipResponse:
        headers = [("Contact", f"<{self.contact}>")] if 100 < status < 300 else []
        if body:
            headers.append(("Content-Type", "application/sdp"))
        response = make_response(request, status, to_tag=tag, headers=headers, body=body)
        await self.send(response)
        return response

    async def answer(self, invite: SipRequest, body: bytes) -> Dialog:
        ok = await self.reply(invite, 200, body)
        dialog = Dialog.as_uas(invite, ok)
        dialog.local_contact = None
        await self.expect_request("ACK")
        return dialog

    # -- inside a dialog --

    async def request_in(
        self, dialog: Dialog, method: str, body: bytes = b"", content_type: str = ""
    ) -> SipRequest:
        headers = [("Content-Type", content_type)] if body else []
        if method == "INVITE":
            headers.append(("Contact", f"<{self.contact}>"))
        request = dialog.create_request(method, via=self.via(), headers=headers, body=body)
        await self.send(request)
        return request

    async def answer_in(self, request: SipRequest, status: int = 200, body: bytes = b"",
                        content_type: str = "application/sdp") -> None:  # fmt: skip
        headers = [("Content-Type", content_type)] if body else []
        if request.method == "INVITE":
            headers.append(("Contact", f"<{self.contact}>"))
        tag = request.to_tag
        await self.send(make_response(request, status, to_tag=tag, headers=headers, body=body))


# --- Fakes around the controller ----------------------------------------------------------------


@dataclass
class FakeMedia:
    call_id: str
    local_port: int
    phone_target: tuple[str, int] | None = None
    wan: tuple[int, tuple[str, int], bytes] | None = None
    keys: list[bytes] = field(default_factory=list)
    closed: bool = False

    def set_phone_target(self, ip: str, port: int) -> None:
        self.phone_target = (ip, port)

    def set_wan(self, leg: int, relay: tuple[str, int], key: bytes) -> None:
        self.wan = (leg, relay, key)

    def update_key(self, key: bytes) -> None:
        self.keys.append(key)

    def close(self) -> None:
        self.closed = True


class FakeAnchor:
    """The media anchor's control API (remotehost/anchor.py), recording what it is told."""

    def __init__(self, first_port: int = 41000) -> None:
        self.ports = itertools.count(first_port, 2)
        self.calls: list[FakeMedia] = []

    async def open_call(self, call_id: str) -> FakeMedia:
        media = FakeMedia(call_id, next(self.ports))
        self.calls.append(media)
        return media

    @property
    def open(self) -> list[FakeMedia]:
        return [m for m in self.calls if not m.closed]


class FakeUplink:
    """The uplink's call API. With a `MainHost` it talks to the real CallRouter; alone, it
    answers grants with `grant` (a reply, or None: the main host stays silent)."""

    def __init__(self, office: str, *, online: bool = True) -> None:
        self.office = office
        self.online_flag = online
        self.media_key: bytes | None = b"k" * 32 if online else None
        self.grant: GrantReply | str | None = "granted"
        self.sent: list[tuple[int, Message]] = []
        self.main: MainHost | None = None
        self.controller: CallController | None = None
        self._next = -1
        self._grants: dict[int, trio.MemorySendChannel[GrantReply]] = {}

    @property
    def online(self) -> bool:
        return self.online_flag

    def new_call_channel(self) -> int:
        self._next += 2
        return self._next

    async def send_call(self, channel: int, msg: Message) -> None:
        if not self.online_flag:
            raise ConnectionLost("the trunk to the main host is down")
        self.sent.append((channel, msg))
        if self.main is not None:
            await self.main.to_router.send((self.office, channel, msg))

    async def request_grant(
        self, call_id: str, caller: str, callee: str, *, timeout: float = 1.0
    ) -> GrantReply | None:
        if not self.online_flag:
            return None
        if self.main is not None:
            from shared.wire.messages import GrantRequest

            channel = self.new_call_channel()
            send, receive = trio.open_memory_channel[GrantReply](1)
            self._grants[channel] = send
            try:
                with trio.move_on_after(timeout):
                    await self.send_call(channel, GrantRequest(call_id, caller, callee))
                    return await receive.receive()
                return None
            finally:
                del self._grants[channel]
        if self.grant == "granted":
            return GrantReply(call_id, True)
        if self.grant is None or isinstance(self.grant, str):
            await trio.sleep(timeout)  # the main host stays silent
            return None
        return self.grant

    async def deliver(self, channel: int, msg: Message) -> None:
        """A message from the main host (what Uplink._on_call_message does)."""
        if isinstance(msg, GrantReply):
            waiting = self._grants.get(channel)
            if waiting is not None:
                waiting.send_nowait(msg)
            return
        assert self.controller is not None
        await self.controller.on_trunk_message(channel, msg)

    async def go_down(self) -> None:
        self.online_flag = False
        self.media_key = None
        assert self.controller is not None
        await self.controller.on_trunk_down()

    async def come_back(self, key: bytes) -> None:
        self.online_flag = True
        self.media_key = key
        assert self.controller is not None
        await self.controller.on_trunk_up(key)


class FakeRelay:
    def __init__(self) -> None:
        self.legs = itertools.count(7)
        self.deleted: list[str] = []

    def offer(self, call_id: str, office: str) -> int:
        return next(self.legs)

    def answer(self, call_id: str, office: str) -> int:
        return next(self.legs)

    def delete(self, call_id: str) -> None:
        self.deleted.append(call_id)


@dataclass
class Office:
    name: str
    sip: SipService
    legs: Legs
    controller: CallController
    anchor: FakeAnchor
    uplink: FakeUplink
    mirror: DirectoryMirror
    location: Location
    address: tuple[str, int]
    media_anchor: MediaAnchor | None = None

    async def phone(self, ext: str, nursery: trio.Nursery, *, register: bool = True) -> SipPhone:
        phone = SipPhone(ext, self.address)
        await phone.bind()
        await nursery.start(phone.run)
        if register:
            self.add_binding(phone)
        return phone

    def add_binding(self, phone: SipPhone) -> None:
        binding = phone.binding()
        current = {b.contact: b for b in self.location.get(phone.ext)}
        current[binding.contact] = binding
        self.location.replace(phone.ext, current)

    async def settled(self) -> None:
        """Every call over, every anchor call closed, no SIP leg left."""
        with trio.fail_after(GUARD):
            # Nothing signals "all cleaned up" to a test: look until it is so (or time out).
            while (  # noqa: ASYNC110
                self.controller.calls
                or self.controller.trunk_channels
                or self.anchor.open
                or len(self.legs)
                or (self.media_anchor is not None and self.media_anchor.statistics().calls)
            ):
                await trio.sleep(0.01)


def write_directory(path: Path, office: str, first: int, exts: list[str]) -> DirectoryMirror:
    mirror = DirectoryMirror(path)
    entries = [
        DirectoryEntry(ext, ha1("MD5", ext, REALM, f"secret-{ext}"),
                       ha1("SHA-256", ext, REALM, f"secret-{ext}"), f"Phone {ext}")
        for ext in exts
    ]  # fmt: skip
    mirror.apply_snapshot(DirectorySnapshot(office, REALM, 1, first, first + 99, entries))
    return mirror


@asynccontextmanager
async def open_office(
    tmp_path: Path,
    name: str = "lyon",
    *,
    first: int = 200,
    exts: tuple[str, ...] = ("201", "202", "203", "204"),
    policy: CallPolicy | None = None,
    uplink: FakeUplink | None = None,
    anchor_port: int = 41000,
    fast_timers: bool = False,
    real_anchor: bool = False,
) -> AsyncIterator[Office]:
    """An office's SIP service, legs and controller on 127.0.0.1 port 0. `fast_timers`: SIP
    timers 25 times shorter (T1 20 ms), so timeouts happen within a test; `real_anchor`: the
    real `MediaAnchor` on 127.0.0.1 instead of the recording fake."""
    uplink = uplink or FakeUplink(name)
    mirror = write_directory(tmp_path / f"{name}.db", name, first, list(exts))
    location = Location()
    store = SqliteLocationStore(tmp_path / f"{name}-location.db")
    sip = SipService(
        lookup_ha1=mirror.lookup_ha1,
        realm=lambda: REALM,
        domains=lambda: {"127.0.0.1", REALM},
        location=location,
        store=store,
        digest_algorithms=("MD5",),
    )
    anchor = FakeAnchor(anchor_port)
    media_anchor = MediaAnchor("127.0.0.1", wan_ip="127.0.0.1") if real_anchor else None
    t1 = 0.5
    if fast_timers:
        t1 = 0.02
        sip.layer = TransactionLayer(timers=TimerConfig(t1=t1, t2=0.16, t4=0.2, timer_d=0.5))
    legs = Legs(sip, uplink, t1=t1, t2=8 * t1)
    controller = CallController(
        legs=legs,
        directory=mirror,
        location=location,
        trunk=uplink,
        anchor=media_anchor or anchor,
        media_address=lambda phone_ip: "127.0.0.1",
        main_host="127.0.0.9",
        policy=policy or CallPolicy(no_answer_timeout=30.0),
    )
    legs.controller = controller
    uplink.controller = controller
    sip.attach_calls(legs)
    try:
        async with trio.open_nursery() as nursery:
            if media_anchor is not None:
                await nursery.start(media_anchor.serve)
            address = await nursery.start(sip.serve, "127.0.0.1", 0)
            await nursery.start(legs.serve)
            await nursery.start(controller.serve)
            yield Office(
                name, sip, legs, controller, anchor, uplink, mirror, location, address, media_anchor
            )
            nursery.cancel_scope.cancel()
    finally:
        mirror.close()
        store.close()


class MainHost:
    """The real CallRouter between fake uplinks, with message queues both ways so that no
    office's handler runs inside another's."""

    def __init__(self) -> None:
        self.offices: dict[str, FakeUplink] = {}
        self.ranges: list[OfficeRange] = []
        self.directory: dict[str, set[str]] = {}
        self.relay = FakeRelay()
        self.to_router, self._from_offices = trio.open_memory_channel[tuple[str, int, Message]](
            1000
        )
        self.router = CallRouter(
            send=self._send,
            is_online=lambda office: office in self.offices and self.offices[office].online,
            ranges=lambda: self.ranges,
            directory_has=lambda office, ext: ext in self.directory.get(office, set()),
            relay=self.relay,
            relay_port=5090,
        )
        self._queues: dict[str, trio.MemorySendChannel[tuple[int, Message]]] = {}
        self.delivered: list[tuple[str, int, Message]] = []

    def add(self, office: Office) -> None:
        uplink = office.uplink
        uplink.main = self
        self.offices[office.name] = uplink
        info = office.mirror.info()
        self.ranges.append(OfficeRange(office.name, info.ext_first, info.ext_last, 3))
        self.directory[office.name] = {e.ext for e in office.mirror.entries()}
        self.router.set_budget(office.name, 10_000)  # F7: room for every call of a test

    async def _send(self, office: str, msg: Message, channel: int) -> bool:
        uplink = self.offices.get(office)
        if uplink is None or not uplink.online:
            return False
        self.delivered.append((office, channel, msg))
        await self._queues[office].send((channel, msg))
        return True

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for name, uplink in self.offices.items():
                send, receive = trio.open_memory_channel[tuple[int, Message]](1000)
                self._queues[name] = send
                nursery.start_soon(self._deliver, uplink, receive)
            nursery.start_soon(self._route)
            task_status.started()

    async def _deliver(
        self, uplink: FakeUplink, receive: trio.MemoryReceiveChannel[tuple[int, Message]]
    ) -> None:
        async for channel, msg in receive:
            await uplink.deliver(channel, msg)

    async def _route(self) -> None:
        async for office, channel, msg in self._from_offices:
            await self.router.on_message(office, channel, msg)


@asynccontextmanager
async def open_two_offices(
    tmp_path: Path, policy: CallPolicy | None = None, *, real_anchor: bool = False
) -> AsyncIterator[tuple[Office, Office, MainHost]]:
    """Offices lyon (200-299) and paris (300-399) with the main host's CallRouter between."""
    main = MainHost()
    async with (
        open_office(tmp_path, "lyon", policy=policy, real_anchor=real_anchor) as lyon,
        open_office(
            tmp_path,
            "paris",
            first=300,
            exts=("301", "302"),
            policy=policy,
            anchor_port=42000,
            real_anchor=real_anchor,
        ) as paris,
        trio.open_nursery() as nursery,
    ):
        main.add(lyon)
        main.add(paris)
        await nursery.start(main.serve)
        yield lyon, paris, main
        nursery.cancel_scope.cancel()


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll until `predicate()` (clean-up runs in the calls' own tasks, signalling no one)."""
    with trio.fail_after(GUARD):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


class LossyLink:
    """A terrible network between one phone and the office: a UDP shim that drops, duplicates
    and reorders (delays) datagrams both ways, with a seeded random source. The phone talks to
    `address`; the office sees the shim as the phone (as it would see a NAT)."""

    def __init__(
        self,
        office: tuple[str, int],
        *,
        seed: int,
        drop: float = 0.15,
        duplicate: float = 0.1,
        max_delay: float = 0.03,
    ) -> None:
        self.office = office
        self.rng = random.Random(seed)
        self.drop, self.duplicate, self.max_delay = drop, duplicate, max_delay
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.phone: tuple[str, int] | None = None
        self.dropped = 0
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.sock:
            await self.sock.bind(("127.0.0.1", 0))
            self.address = self.sock.getsockname()
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    data, source = await self.sock.recvfrom(65535)
                    if source == self.office:
                        target = self.phone
                    else:
                        self.phone, target = source, self.office
                    if target is None:
                        continue
                    if self.rng.random() < self.drop:
                        self.dropped += 1
                        continue
                    copies = 2 if self.rng.random() < self.duplicate else 1
                    for _ in range(copies):
                        nursery.start_soon(self._later, data, target, self.rng.random())

    async def _later(self, data: bytes, target: tuple[str, int], fraction: float) -> None:
        await trio.sleep(fraction * self.max_delay)  # later ones may overtake: reordering
        await self.sock.sendto(data, target)
