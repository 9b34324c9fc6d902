"""The remote host's side of the trunk: dial out, log in, stay logged in, notice address changes.

This module owns the one outbound connection to the main host. It dials (TLS, the main host's CA
pinned), logs in with the office secret, keeps the directory mirror in step, reports the office's
LAN and NAT type after every login, and reconnects with exponential backoff and jitter, capped at
a few seconds while an outage is short, so an office is back within seconds of the WAN or the
main host coming back. A STUN binding check every few seconds notices a new public address even
while the TCP connection still looks alive, and forces a new login from the new address.
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from remotehost import natprobe
from remotehost.config import RemoteHostConfig
from remotehost.location import Binding, Location
from remotehost.mirror import DirectoryMirror
from shared.aio.trunk import ConnectionLost, TrunkConnection
from shared.wire.frame import ErrorCode
from shared.wire.messages import (
    Announcement,
    AnnouncementReport,
    CallRecordsAck,
    DirectoryAck,
    DirectoryDelta,
    DirectorySnapshot,
    GrantReply,
    GrantRequest,
    LanInterface,
    Message,
    OfficeReport,
    RegistrationInfo,
    RegistrationUpdate,
)
from shared.wire.session import (
    Closed,
    Ignored,
    LoggedIn,
    LoginRejected,
    Received,
    TrunkSession,
)

log = logging.getLogger("remotehost.uplink")
SOFTWARE = "branchpbx-remotehost/0.1"
SERVER_NAME = "branchpbx-mainhost"
LONG_OUTAGE = 300.0


class CallHandler(Protocol):
    """The office's call control (remotehost/calls.py), as the uplink sees it."""

    async def on_trunk_message(self, channel: int, msg: Message) -> None:
        """A call message from the main host on a call channel (odd: ours, even: theirs)."""

    async def on_trunk_up(self, media_key: bytes) -> None:
        """Logged in (again): a new media key for the WAN legs of calls in progress."""

    async def on_trunk_down(self) -> None:
        """The trunk is gone: calls waiting on the main host should fail now."""


class AnnouncementHandler(Protocol):
    """The office's announcements (remotehost/announce.py), as the uplink sees them."""

    async def on_announcement(self, announcement: Announcement) -> None:
        """An announcement from the main host (sent again after every login)."""

    def directory_changed(self) -> None:
        """The directory mirror changed (who is pending may have)."""


class RecordHandler(Protocol):
    """The office's call records (remotehost/records.py), as the uplink sees them."""

    async def upload(self, send: Callable[[Message], Awaitable[None]]) -> None:
        """Upload records until cancelled (run once per login)."""

    async def on_ack(self, ack: CallRecordsAck) -> None:
        """The main host stored records durably."""


@dataclass
class UplinkState:
    state: str = "starting"  # connecting, online, offline, refused
    since: float | None = None
    session: str | None = None
    public_ip: str | None = None
    public_port: int | None = None
    stun_ip: str | None = None
    stun_port: int | None = None
    nat_type: str = "unknown"
    nat_error: str | None = None
    lan: list[dict[str, Any]] = field(default_factory=list)
    last_error: str | None = None
    logins: int = 0
    connect_attempts: int = 0
    outage_since: float | None = None


def client_ssl_context(ca_pem: str | None) -> ssl.SSLContext:
    """Verify the main host against our pinned CA (or, during join, against nothing yet)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # The CA is private and signs only the trunk certificate, so the name adds nothing; the
    # main host may also be reached by an address that is not in its certificate.
    context.check_hostname = False
    if ca_pem is None:
        context.verify_mode = ssl.CERT_NONE  # join: checked by fingerprint after the handshake
    return context


def backoff_delay(attempt: int, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter (the "equal jitter" variant): never 0, never over cap."""
    ceiling = min(cap, 0.25 * 2 ** min(attempt, 16))
    return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


class Uplink:
    def __init__(
        self,
        config: RemoteHostConfig,
        *,
        secret: bytes,
        ca_sha256: bytes | None,
        ssl_context: ssl.SSLContext,
        mirror: DirectoryMirror,
        boot_id: str,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.secret = secret
        self.ca_sha256 = ca_sha256
        self.ssl_context = ssl_context
        self.mirror = mirror
        self.boot_id = boot_id
        self.state = UplinkState()
        self.conn: TrunkConnection | None = None
        self._rng = rng or random.Random()
        self._cancel_connection: trio.CancelScope | None = None
        self._address_changed_from: str | None = None
        self._wake = trio.Event()
        self.location: Location | None = None
        self._dirty_extensions: set[str] = set()
        self.call_handler: CallHandler | None = None
        self.announcements: AnnouncementHandler | None = None
        self.records: RecordHandler | None = None
        self._next_channel = -1  # ours are odd: 1, 3, 5, ... (the main host's even)
        self._grants: dict[int, trio.MemorySendChannel[GrantReply]] = {}

    # --- what call control uses ---

    @property
    def online(self) -> bool:
        return self.conn is not None

    @property
    def media_key(self) -> bytes | None:
        conn = self.conn
        return conn.session.media_key if conn is not None else None

    def new_call_channel(self) -> int:
        """A trunk channel for a call we start. Numbers are kept across re-logins, so a call
        keeps its channel when the trunk comes back (F9)."""
        self._next_channel += 2
        return self._next_channel

    async def send_call(self, channel: int, msg: Message) -> None:
        """Send a call message; ConnectionLost if the trunk is down."""
        conn = self.conn
        if conn is None:
            raise ConnectionLost("the trunk to the main host is down")
        await conn.send(msg, channel=channel)

    async def request_grant(
        self, call_id: str, caller: str, callee: str, *, timeout: float = 1.0
    ) -> GrantReply | None:
        """Ask the main host whether a call inside the office may go ahead (F5).

        None when the main host does not answer within `timeout` (or the trunk is down): the
        caller then decides alone (F6), without waiting for TCP to notice anything.
        """
        if self.conn is None:
            return None
        channel = self.new_call_channel()
        send, receive = trio.open_memory_channel[GrantReply](1)
        self._grants[channel] = send
        try:
            with trio.move_on_after(timeout):
                await self.send_call(channel, GrantRequest(call_id, caller, callee))
                return await receive.receive()
            return None
        except ConnectionLost:
            return None
        finally:
            del self._grants[channel]

    async def send_report(self, report: AnnouncementReport) -> bool:
        """Tell the main host where an announcement got to; False if the trunk is down."""
        conn = self.conn
        if conn is None:
            return False
        try:
            await conn.send(report)
        except ConnectionLost:
            return False
        return True

    def attach_location(self, location: Location) -> None:
        """Report this office's registrations to the main host (all at login, then changes)."""
        self.location = location
        location.add_listener(lambda ext, bindings: self._dirty_extensions.add(ext))

    @property
    def stun_server(self) -> tuple[str, int]:
        return (self.config.stun.server or self.config.trunk.main_host, self.config.stun.port)

    def reconnect_now(self, reason: str) -> None:
        """Drop the current connection (if any) and dial again at once."""
        log.info("reconnecting: %s", reason)
        if self._cancel_connection is not None:
            self._cancel_connection.cancel()
        self._wake.set()

    async def run(self) -> None:
        attempt = 0
        while True:
            self.state.connect_attempts += 1
            logged_in = await self._connect_once()
            now = time.time()
            if logged_in:
                attempt = 0
            if self.state.outage_since is None:
                self.state.outage_since = now
            if self.state.state != "refused":
                self.state.state = "offline"
            long_outage = now - self.state.outage_since > LONG_OUTAGE
            cap = (
                self.config.trunk.backoff_max_long if long_outage else self.config.trunk.backoff_max
            )
            if self.state.state == "refused":
                cap = max(cap, 10.0)  # a wrong secret will not fix itself quickly
            delay = backoff_delay(attempt, cap, self._rng)
            attempt += 1
            self._wake = trio.Event()
            with trio.move_on_after(delay):
                await self._wake.wait()

    async def _connect_once(self) -> bool:
        """One connection's life; True if it logged in."""
        trunk = self.config.trunk
        self.state.state = "connecting"
        logged_in = False
        stream: trio.SSLStream[trio.SocketStream] | None = None
        try:
            with trio.fail_after(trunk.connect_timeout):
                stream = await trio.open_ssl_over_tcp_stream(
                    trunk.main_host,
                    trunk.port,
                    ssl_context=self.ssl_context,
                    https_compatible=True,
                )
                await stream.do_handshake()
        except trio.TooSlowError:
            await _discard(stream)
            self._failed(
                f"no answer from {trunk.main_host}:{trunk.port} within"
                f" {trunk.connect_timeout:.0f} s"
            )
            return False
        except (OSError, ssl.SSLError, trio.BrokenResourceError) as exc:
            await _discard(stream)
            self._failed(f"cannot connect to {trunk.main_host}:{trunk.port}: {_reason(exc)}")
            return False
        info = await trio.to_thread.run_sync(self.mirror.info)
        session = TrunkSession.client(
            trio.current_time(),
            office=self.config.office,
            secret=self.secret,
            client_nonce=secrets.token_bytes(32),
            software=SOFTWARE,
            ca_sha256=self.ca_sha256,
            directory_version=info.version,
            boot_id=self.boot_id,
        )
        conn = TrunkConnection(stream, session)
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_connection = nursery.cancel_scope
                while True:
                    event = await conn.next_event()
                    if isinstance(event, LoggedIn):
                        logged_in = True
                        self.conn = conn
                        await self._on_login(event, nursery)
                    elif isinstance(event, Received) and event.channel != 0:
                        await self._on_call_message(event.channel, event.message)
                    elif isinstance(event, Received):
                        await self._on_message(conn, event)
                    elif isinstance(event, LoginRejected):
                        self.state.state = "refused"
                        self._failed(f"login refused by the main host: {event.reason}")
                    elif isinstance(event, Ignored):
                        log.debug("ignored message type %d", event.unknown.type)
                    elif isinstance(event, Closed):
                        if logged_in:
                            log.warning("trunk to the main host lost: %s", event.reason)
                            self.state.last_error = event.reason
                        elif self.state.state != "refused":
                            self._failed(event.reason)
                        nursery.cancel_scope.cancel()
                        break
        except* ConnectionLost as group:
            # except*: a send that fails inside the connection's nursery arrives wrapped in an
            # ExceptionGroup, and a plain except would let it end the whole remote host.
            self._failed(str(group.exceptions[0]))
        finally:
            self.conn = None
            self._cancel_connection = None
            if logged_in and self.call_handler is not None:
                with trio.CancelScope(shield=True):
                    await self.call_handler.on_trunk_down()
            with trio.CancelScope(shield=True):
                await conn.aclose(ErrorCode.NORMAL, "reconnecting")
        return logged_in

    def _failed(self, reason: str) -> None:
        if reason != self.state.last_error:
            log.warning("%s", reason)
        self.state.last_error = reason

    async def _on_login(self, event: LoggedIn, nursery: trio.Nursery) -> None:
        state = self.state
        previous = await trio.to_thread.run_sync(self.mirror.get_meta, "public_ip")
        if previous and previous != event.public_ip:
            log.warning("public address changed from %s to %s", previous, event.public_ip)
            self._address_changed_from = self._address_changed_from or previous
        await trio.to_thread.run_sync(self.mirror.set_meta, "public_ip", event.public_ip)
        outage = time.time() - state.outage_since if state.outage_since else None
        state.state = "online"
        state.since = time.time()
        state.session = event.session
        state.public_ip, state.public_port = event.public_ip, event.public_port
        state.logins += 1
        state.last_error = None
        state.outage_since = None
        log.info(
            "logged in to the main host as office %s; it sees us at %s:%d%s",
            self.config.office,
            event.public_ip,
            event.public_port,
            f" (after {outage:.1f} s offline)" if outage else "",
        )
        nursery.start_soon(self._report)
        nursery.start_soon(self._report_registrations)
        if self.records is not None and self.conn is not None:
            nursery.start_soon(self._upload_records, self.records, self.conn)
        if self.call_handler is not None:
            await self.call_handler.on_trunk_up(self.conn.session.media_key if self.conn else b"")

    async def _report(self) -> None:
        """Learn the LAN and the NAT type, and tell the main host (at every login)."""
        lan = natprobe.lan_interfaces()
        self.state.lan = [
            {"name": i.name, "addresses": [str(a.ip) for a in i.ipv4] + [str(a.ip) for a in i.ipv6]}
            for i in lan
        ]
        host, port = self.stun_server
        probe = await natprobe.probe_nat_type(host, port, timeout=self.config.stun.probe_timeout)
        self.state.nat_type = probe.nat_type
        self.state.nat_error = probe.error
        if probe.external_ip:
            self.state.stun_ip, self.state.stun_port = probe.external_ip, probe.external_port
        if probe.error:
            log.info("NAT type probe: %s", probe.error)
        else:
            log.info(
                "NAT type: %s, public %s:%s", probe.nat_type, probe.external_ip, probe.external_port
            )
        report = OfficeReport(
            lan=[LanInterface(i["name"], list(i["addresses"])) for i in self.state.lan],
            nat_type=probe.nat_type,
            stun_ip=self.state.stun_ip,
            stun_port=self.state.stun_port,
            address_changed_from=self._address_changed_from,
            software=SOFTWARE,
        )
        conn = self.conn
        if conn is not None:
            try:
                await conn.send(report)
                self._address_changed_from = None
            except ConnectionLost:
                pass

    async def _report_registrations(self, interval: float = 0.2) -> None:
        """All registrations at login, then the changed extensions every `interval`."""
        location = self.location
        if location is None:
            return
        self._dirty_extensions.clear()
        update: RegistrationUpdate | None = RegistrationUpdate(
            True, [], [_info(b) for b in location.all()]
        )
        while True:
            conn = self.conn
            if conn is None:
                return
            if update is not None:
                try:
                    await conn.send(update)
                except ConnectionLost:
                    return
            await trio.sleep(interval)
            if self._dirty_extensions:
                extensions = sorted(self._dirty_extensions)
                self._dirty_extensions.clear()
                bindings = [_info(b) for ext in extensions for b in location.get(ext)]
                update = RegistrationUpdate(False, extensions, bindings)
            else:
                update = None

    async def _upload_records(self, records: RecordHandler, conn: TrunkConnection) -> None:
        async def send(msg: Message) -> None:
            await conn.send(msg)

        try:
            await records.upload(send)
        except ConnectionLost:
            pass  # the connection's task notices; the next login uploads again

    async def _on_call_message(self, channel: int, msg: Message) -> None:
        if isinstance(msg, GrantReply):
            waiting = self._grants.get(channel)
            if waiting is not None:
                with contextlib.suppress(trio.WouldBlock):  # a duplicate answer: the first counts
                    waiting.send_nowait(msg)
            return
        if self.call_handler is not None:
            await self.call_handler.on_trunk_message(channel, msg)

    async def _on_message(self, conn: TrunkConnection, event: Received) -> None:
        msg = event.message
        if isinstance(msg, DirectorySnapshot):
            if msg.office != self.config.office:
                log.error("main host sent the directory of office %r, not ours", msg.office)
                return
            await trio.to_thread.run_sync(self.mirror.apply_snapshot, msg)
            log.info("directory: %d extension(s), version %d", len(msg.entries), msg.version)
            await conn.send(DirectoryAck(msg.version))
            if self.announcements is not None:
                self.announcements.directory_changed()
        elif isinstance(msg, DirectoryDelta):
            applied = await trio.to_thread.run_sync(self.mirror.apply_delta, msg)
            info = await trio.to_thread.run_sync(self.mirror.info)
            if applied:
                log.info(
                    "directory: version %d (+%d, -%d)", msg.version, len(msg.put), len(msg.delete)
                )
            else:
                log.warning(
                    "directory delta %d->%d does not fit our version %d: asking for a snapshot",
                    msg.base_version,
                    msg.version,
                    info.version,
                )
            await conn.send(DirectoryAck(info.version))
            if self.announcements is not None:
                self.announcements.directory_changed()
        elif isinstance(msg, Announcement) and self.announcements is not None:
            await self.announcements.on_announcement(msg)
        elif isinstance(msg, CallRecordsAck) and self.records is not None:
            await self.records.on_ack(msg)
        else:
            log.debug("unhandled message %s", type(msg).__name__)

    async def watch_public_address(self) -> None:
        """STUN binding every few seconds: a new public address means a new login from it."""
        interval = self.config.stun.keepalive_interval
        while True:
            mapped = await natprobe.stun_binding(self.stun_server, timeout=min(interval, 3.0))
            if mapped is not None:
                old = self.state.stun_ip
                self.state.stun_ip, self.state.stun_port = mapped
                if old is not None and mapped[0] != old:
                    log.warning("STUN: public address changed from %s to %s", old, mapped[0])
                    self._address_changed_from = old
                    self.reconnect_now("public address changed")
            await trio.sleep(interval)


def _info(binding: Binding) -> RegistrationInfo:
    return RegistrationInfo(
        ext=binding.ext,
        contact=binding.contact,
        expires_at=binding.expires_at,
        source=binding.source,
        user_agent=binding.user_agent,
        reachable=binding.reachable,
    )


async def _discard(stream: trio.SSLStream[trio.SocketStream] | None) -> None:
    """Close a stream whose TLS handshake failed: its TCP socket is still open."""
    if stream is not None:
        await trio.aclose_forcefully(stream)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause):
        return str(cause)
    return str(exc) or type(exc).__name__
