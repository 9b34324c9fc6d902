"""The main host's side of the trunk: accept remote hosts, log them in, track them, sync data.

This module owns the live table of offices (who is online, from which public address, with which
NAT type) and the per-connection task. Each accepted TLS connection gets a `TrunkSession` driven by
`TrunkConnection`; the session decides the protocol, this module decides policy: which secret an
office has, when to slow down a source that keeps failing, that a new login replaces the old one,
and which directory version to send.

Nothing a remote host sends can stop the server: every failure of one connection ends that
connection with a logged reason.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from mainhost.announce import Announcer
from mainhost.calls import CallRouter, OfficeRange
from mainhost.records import CallRecordStore
from mainhost.store import MainStore
from shared.aio.trunk import ConnectionLost, TrunkConnection
from shared.ratelimit import FailureThrottle
from shared.wire.frame import ErrorCode
from shared.wire.messages import (
    AnnouncementReport,
    CallRecords,
    DirectoryAck,
    DirectorySnapshot,
    Message,
    OfficeReport,
    RegistrationUpdate,
)
from shared.wire.session import (
    Closed,
    Ignored,
    LoggedIn,
    LoginAttempt,
    LoginRejected,
    Received,
    TrunkSession,
)

log = logging.getLogger("mainhost.trunk")
SOFTWARE = "branchpbx-mainhost/0.1"


@dataclass
class OfficeLive:
    """An office that is logged in right now."""

    name: str
    conn: TrunkConnection
    session_id: str
    public_ip: str
    public_port: int
    since: float
    boot_id: str
    cancel: trio.CancelScope
    nat_type: str = "unknown"
    lan: list[dict[str, Any]] = field(default_factory=list)
    stun_ip: str | None = None
    stun_port: int | None = None
    dir_sent: int = 0
    dir_acked: int = 0
    replaced: bool = False
    registrations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class TrunkStatistics:
    connections: int = 0
    logins: int = 0
    login_failures: int = 0
    protocol_errors: int = 0
    transport_failures: int = 0
    replaced_sessions: int = 0
    ignored_messages: int = 0


class TrunkServer:
    def __init__(
        self,
        store: MainStore,
        *,
        realm: str,
        ca_der: bytes,
        heartbeat_interval: float,
        dead_after: float,
        free_login_failures: int = 3,
        wall_clock: Callable[[], float] = time.time,
        records: CallRecordStore | None = None,
    ) -> None:
        self.store = store
        self.records = records
        self.realm = realm
        self.ca_der = ca_der
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self.online: dict[str, OfficeLive] = {}
        self.stats = TrunkStatistics()
        self.throttle = FailureThrottle(free_failures=free_login_failures)
        self._wall = wall_clock
        # What call routing reads on every call: kept in memory, refreshed when the store changes.
        self.office_ranges: list[OfficeRange] = []
        self.directories: dict[str, frozenset[str]] = {}
        self.calls = CallRouter(
            send=self.send_to_office,
            send_many=self.send_many_to_office,
            is_online=lambda office: office in self.online,
            ranges=lambda: self.office_ranges,
            directory_has=lambda office, ext: ext in self.directories.get(office, ()),
            relay=None,
            relay_port=0,
        )
        self.announcer = Announcer(
            store,
            send=self.send_to_office,
            sessions=lambda: {name: live.session_id for name, live in self.online.items()},
            wall_clock=wall_clock,
        )

    def refresh_directory_cache(self) -> None:
        """Synchronous (sqlite): call through trio.to_thread."""
        offices = self.store.offices()
        self.office_ranges = [
            OfficeRange(o.name, o.ext_first, o.ext_last, len(str(o.ext_first))) for o in offices
        ]
        for office in offices:
            self.calls.set_budget(office.name, office.wan_kbps)
        directories: dict[str, set[str]] = {o.name: set() for o in offices}
        for phone in self.store.phones():
            directories.setdefault(phone["office"], set()).add(phone["ext"])
        self.directories = {name: frozenset(exts) for name, exts in directories.items()}

    async def send_to_office(self, office: str, msg: Message, channel: int) -> bool:
        """Deliver on the office's current connection; False if it is not connected."""
        live = self.online.get(office)
        if live is None:
            return False
        try:
            await live.conn.send(msg, channel=channel)
        except ConnectionLost:
            return False
        return True

    async def send_many_to_office(
        self, office: str, messages: Sequence[tuple[Message, int]]
    ) -> bool:
        """`send_to_office` for several messages, in one write: one TLS record for all, and the
        office reads them at once (a call's CallSetup and MediaLeg)."""
        live = self.online.get(office)
        if live is None:
            return False
        try:
            for msg, channel in messages:
                live.conn.send_nowait(msg, channel=channel)
            await live.conn.flush()
        except ConnectionLost:
            return False
        return True

    async def serve(
        self,
        listeners: list[trio.SSLListener[trio.SocketStream]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await trio.to_thread.run_sync(self.refresh_directory_cache)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.watch_directory)
            nursery.start_soon(self.calls.watch)
            nursery.start_soon(self.announcer.watch)
            task_status.started()
            await trio.serve_listeners(self.handle_connection, listeners)

    async def handle_connection(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stats.connections += 1
        try:
            peer_ip, peer_port = stream.transport_stream.socket.getpeername()[:2]
        except OSError:
            # Gone before we looked; serve_listeners does not close what its handler leaves.
            await trio.aclose_forcefully(stream)
            return
        session = TrunkSession.server(
            trio.current_time(),
            nonce=secrets.token_bytes(32),
            software=SOFTWARE,
            ca_cert=self.ca_der,
            heartbeat_interval=self.heartbeat_interval,
            dead_after=self.dead_after,
        )
        conn = TrunkConnection(stream, session)
        live: OfficeLive | None = None
        reason = "connection ended"
        try:
            with trio.CancelScope() as scope:
                while True:
                    event = await conn.next_event()
                    if isinstance(event, LoginAttempt):
                        await self._verify(conn, event, peer_ip, peer_port)
                    elif isinstance(event, LoggedIn):
                        live = self._attach(conn, event, scope)
                        await self._welcome(live, event)
                    elif isinstance(event, Received) and live is not None:
                        if event.channel != 0:
                            await self.calls.on_message(live.name, event.channel, event.message)
                        else:
                            await self._on_message(live, event.message)
                    elif isinstance(event, Ignored):
                        self.stats.ignored_messages += 1
                        log.debug("ignored message type %d from %s", event.unknown.type, peer_ip)
                    elif isinstance(event, LoginRejected):
                        pass  # _verify logged it
                    elif isinstance(event, Closed):
                        reason = event.reason
                        self._note_close(event, peer_ip)
                        break
        except ConnectionLost as exc:
            reason = str(exc)
            self.stats.transport_failures += 1
        except Exception:
            # A bug in our handling of one connection must not take the server down.
            log.exception("internal error on the trunk connection from %s", peer_ip)
            reason = "internal error"
        finally:
            if live is not None:
                if live.replaced:
                    reason = "replaced by a newer login"
                await self._detach(live, reason)
                code = ErrorCode.REPLACED if live.replaced else ErrorCode.SHUTDOWN
            else:
                code = ErrorCode.SHUTDOWN
            with trio.CancelScope(shield=True):
                await conn.aclose(code, reason)

    def _note_close(self, event: Closed, peer_ip: str) -> None:
        if event.code in (ErrorCode.NORMAL, ErrorCode.SHUTDOWN, ErrorCode.AUTH_FAILED):
            return
        if event.code == ErrorCode.TIMEOUT:
            log.info("trunk from %s timed out: %s", peer_ip, event.reason)
            return
        self.stats.protocol_errors += 1
        side = "peer" if event.by_peer else "us"
        log.warning(
            "trunk from %s closed by %s: %s (%s)",
            peer_ip,
            side,
            event.reason,
            ErrorCode.NAMES.get(event.code, event.code),
        )

    async def _verify(
        self, conn: TrunkConnection, event: LoginAttempt, peer_ip: str, peer_port: int
    ) -> None:
        delay = self.throttle.delay(peer_ip, trio.current_time())
        if delay:
            # Slow down guessing from this address; other addresses are not affected.
            await trio.sleep(delay)
        secret = await trio.to_thread.run_sync(self.store.office_secret, event.office)
        ok = conn.session.complete_login(
            secret,
            now=trio.current_time(),
            public_ip=peer_ip,
            public_port=peer_port,
            session=secrets.token_hex(8),
        )
        if not ok:
            self.stats.login_failures += 1
            failures = self.throttle.failure(peer_ip, trio.current_time())
            log.warning(
                "login refused for office %r from %s:%d: wrong office name or secret"
                " (%d failure(s) from this address)",
                event.office,
                peer_ip,
                peer_port,
                failures,
            )

    def _attach(
        self, conn: TrunkConnection, event: LoggedIn, scope: trio.CancelScope
    ) -> OfficeLive:
        """Make the session the office's live one (synchronous, so the caller holds `live`
        before any checkpoint: a newer login may cancel us during `_welcome`)."""
        self.stats.logins += 1
        self.throttle.success(event.public_ip)
        old = self.online.get(event.office)
        if old is not None:
            # A new login replaces the old session: the old one is usually a dead path the
            # remote host has already given up on (new public address, NAT rebinding).
            old.replaced = True
            old.cancel.cancel()
            self.stats.replaced_sessions += 1
        now = self._wall()
        live = OfficeLive(
            name=event.office,
            conn=conn,
            session_id=event.session,
            public_ip=event.public_ip,
            public_port=event.public_port,
            since=now,
            boot_id=event.boot_id,
            cancel=scope,
        )
        self.online[event.office] = live
        self.calls.office_back(event.office)
        return live

    async def _welcome(self, live: OfficeLive, event: LoggedIn) -> None:
        """Record the login and bring the office's mirror up to date."""
        previous = await trio.to_thread.run_sync(
            self.store.record_login, event.office, event.public_ip, event.public_port, live.since
        )
        if previous:
            log.warning(
                "office %s: public address changed from %s to %s",
                event.office,
                previous,
                event.public_ip,
            )
        log.info(
            "office %s logged in from %s:%d (session %s)",
            event.office,
            event.public_ip,
            event.public_port,
            event.session,
        )
        await self._sync_directory(live, event.directory_version)

    async def _detach(self, live: OfficeLive, reason: str) -> None:
        if self.online.get(live.name) is live:
            del self.online[live.name]
            await self.calls.office_lost(live.name, trio.current_time())
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(
                lambda: self.store.record_seen(
                    live.name, self._wall(), logout=None if live.replaced else reason
                )
            )
        log.info("office %s offline: %s", live.name, reason)

    async def _on_message(self, live: OfficeLive, msg: Message) -> None:
        if isinstance(msg, OfficeReport):
            live.nat_type = msg.nat_type
            live.lan = [{"name": i.name, "addresses": list(i.addresses)} for i in msg.lan]
            live.stun_ip, live.stun_port = msg.stun_ip, msg.stun_port
            await trio.to_thread.run_sync(
                self.store.record_report,
                live.name,
                msg.nat_type,
                live.lan,
                msg.stun_ip,
                msg.stun_port,
            )
            if msg.address_changed_from:
                detail = f"public address changed from {msg.address_changed_from}"
                log.warning("office %s reports: %s", live.name, detail)
                await trio.to_thread.run_sync(self.store.log_event, live.name, "address", detail)
        elif isinstance(msg, RegistrationUpdate):
            if msg.complete:
                live.registrations.clear()
            changed = set(msg.extensions) | {b.ext for b in msg.bindings}
            for ext in changed:
                live.registrations.pop(ext, None)
            for b in msg.bindings:
                live.registrations.setdefault(b.ext, []).append(
                    {
                        "ext": b.ext,
                        "contact": b.contact,
                        "expires_at": b.expires_at,
                        "source": b.source,
                        "user_agent": b.user_agent,
                        "reachable": b.reachable,
                    }
                )
        elif isinstance(msg, DirectoryAck):
            live.dir_acked = msg.version
            if msg.version != live.dir_sent:
                log.info(
                    "office %s mirror at version %d, expected %d: sending a snapshot",
                    live.name,
                    msg.version,
                    live.dir_sent,
                )
                await self._send_snapshot(live)
        elif isinstance(msg, AnnouncementReport):
            await self.announcer.on_report(live.name, msg)
        elif isinstance(msg, CallRecords) and self.records is not None:
            # F15: stored durably (unique by office, boot epoch, seq) before the ack.
            acks = await trio.to_thread.run_sync(self.records.add, live.name, msg.records)
            for ack in acks:
                await live.conn.send(ack)
        else:
            log.debug("office %s sent %s, not handled here", live.name, type(msg).__name__)

    # --- directory sync ---

    async def _send_snapshot(self, live: OfficeLive) -> None:
        snapshot: DirectorySnapshot = await trio.to_thread.run_sync(
            self.store.directory_snapshot, live.name, self.realm
        )
        await live.conn.send(snapshot)
        live.dir_sent = snapshot.version

    async def _sync_directory(self, live: OfficeLive, remote_version: int) -> None:
        """Bring the remote host's mirror from `remote_version` to the current version."""
        current = await trio.to_thread.run_sync(self.store.directory_version, live.name)
        if remote_version == current and remote_version > 0:
            live.dir_sent = live.dir_acked = current
            return
        delta = None
        if 0 < remote_version < current:
            delta = await trio.to_thread.run_sync(
                self.store.directory_delta, live.name, remote_version
            )
        if delta is None:
            await self._send_snapshot(live)
        else:
            await live.conn.send(delta)
            live.dir_sent = delta.version

    async def watch_directory(self, interval: float = 0.2) -> None:
        """Push directory changes (made by the CLI or the API) to online offices."""
        seen = await trio.to_thread.run_sync(self.store.data_version)
        while True:
            await trio.sleep(interval)
            version = await trio.to_thread.run_sync(self.store.data_version)
            if version == seen:
                continue
            seen = version
            await trio.to_thread.run_sync(self.refresh_directory_cache)
            for live in list(self.online.values()):
                current = await trio.to_thread.run_sync(self.store.directory_version, live.name)
                if current == live.dir_sent:
                    continue
                try:
                    await self._sync_directory(live, live.dir_sent)
                except ConnectionLost:
                    pass  # its own task notices and cleans up

    async def close_all(self, reason: str) -> None:
        for live in list(self.online.values()):
            with trio.move_on_after(1):
                await live.conn.aclose(ErrorCode.SHUTDOWN, reason)


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
