"""`mainhost serve`: binds every port, then runs the trunk, STUN, control socket and web API.

This module owns start-up and shutdown order and the one status snapshot that the control socket,
the API and `mainhost status` all show. Ports are bound before anything starts, so a port in use
is reported as one clear line naming it, and nothing half-starts.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from mainhost import pki
from mainhost.announce import summaries
from mainhost.config import MainHostConfig
from mainhost.records import DB_NAME as CALLS_DB
from mainhost.records import CallRecord, CallRecordStore
from mainhost.store import DB_NAME, MainStore, Office
from mainhost.trunk import SOFTWARE, OfficeLive, TrunkServer, server_ssl_context
from shared.aio.control import serve_control
from shared.cli import leaf_exceptions

"""F4 direct audio between offices: "1" turns it on (off by default for now)."""

log = logging.getLogger("mainhost")


class StartupError(Exception):
    """The service cannot start; the message names the port, file or directory."""


def bind_error(what: str, host: str, port: int, proto: str, exc: OSError) -> StartupError:
    if exc.errno == errno.EADDRINUSE:
        why = "is in use by another program"
    elif exc.errno == errno.EACCES:
        why = "needs more privileges (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = "is not an address of this machine"
    else:
        why = exc.strerror or str(exc)
    return StartupError(f"{what}: {host} port {port}/{proto} {why}")


def check_data_dir(data: Path) -> None:
    if not data.is_dir():
        raise StartupError(f"data directory {data} does not exist (run `mainhost init` first)")
    probe = data / ".write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"data directory {data} is not writable: {exc.strerror}") from None


class MainHost:
    """The running main host: its parts and its status."""

    def __init__(self, data: Path, config: MainHostConfig) -> None:
        self.data = data
        self.config = config
        self.store = MainStore(data / DB_NAME)
        self.records = CallRecordStore(data / CALLS_DB)
        self.started = time.time()
        self.trunk = TrunkServer(
            self.store,
            realm=config.sip.realm,
            ca_der=pki.ca_der(data),
            heartbeat_interval=config.trunk.heartbeat_interval,
            dead_after=config.trunk.dead_after,
            free_login_failures=config.trunk.login_failures_before_delay,
            records=self.records,
        )
        self.addresses: dict[str, Any] = {}
        self.stun_service: Any = None
        self.relay: Any = None

    def read_database(
        self,
    ) -> tuple[list[Office], list[dict[str, Any]], list[dict[str, Any]], list[CallRecord]]:
        """What the status needs from sqlite: run in a worker thread (see `snapshot`)."""
        now = time.time()
        return (
            self.store.offices(),
            summaries(self.store, now),
            [g for g in self.records.gaps() if g["missing"]],
            self.records.calls(live=True),
        )

    async def snapshot(self) -> dict[str, Any]:
        """The status: the database read in a worker thread, the live state here in the trio
        thread, which is the only one that changes it (reading it from a worker could see a
        dict change size mid-iteration)."""
        return self.status(await trio.to_thread.run_sync(self.read_database))

    def status(
        self,
        database: tuple[list[Office], list[dict[str, Any]], list[dict[str, Any]], list[CallRecord]]
        | None = None,
    ) -> dict[str, Any]:
        """Call in the trio thread; without `database`, reads sqlite itself (blocking)."""
        now = time.time()
        stored, announcements, gaps, live_records = database or self.read_database()
        offices = [
            office_entry(
                office,
                self.trunk.online.get(office.name),
                now,
                self.trunk.calls.bandwidth(office.name),
            )
            for office in stored
        ]
        return {
            "running": True,
            "software": SOFTWARE,
            "public_address": self.config.public_address,
            "uptime": now - self.started,
            "listening": self.addresses,
            "trunk": asdict(self.trunk.stats),
            "stun": asdict(self.stun_service.statistics()) if self.stun_service else None,
            "relay": asdict(self.relay.statistics()) if self.relay else None,
            "calls": [
                {
                    "call_id": b.call_id,
                    "from_office": b.a[0],
                    "to_office": b.b[0] if b.b else None,
                    "answered": b.answered,
                    "media": self.relay.query(b.call_id) if self.relay else None,
                    "media_path": b.media_path,  # F4: "relayed" or "direct"
                    "direct_skipped": b.direct_skipped or None,
                }
                for b in self.trunk.calls.live_calls()
            ],
            "live_calls": self._live_calls(live_records, now),
            "offices": offices,
            "announcements": announcements,
            "call_records": {"gaps": gaps},
        }

    def _live_calls(self, records: list[CallRecord], now: float) -> list[dict[str, Any]]:
        """Every call going on, in every office (from the call records the offices upload as
        calls happen), with its media path: local (phone to phone on the office LAN), relayed
        (through the main host) or direct (office to office)."""
        bridges = {b.call_id: b for b in self.trunk.calls.live_calls()}
        calls = []
        for record in records:
            bridge = bridges.get(record.id)
            path = "local" if record.route == "local" else "relayed"
            if bridge is not None:
                path = bridge.media_path
            calls.append(
                {
                    "call_id": record.id,
                    "caller": record.caller,
                    "callee": record.callee,
                    "offices": record.offices,
                    "state": "talking" if record.answered_at else "ringing",
                    "since": record.answered_at or record.started_at,
                    "media_path": path,
                }
            )
        return calls

    async def serve(
        self, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self.config
        try:
            context = server_ssl_context(
                str(self.data / pki.TRUNK_CERT), str(self.data / pki.TRUNK_KEY)
            )
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot load the trunk certificate in {self.data}: {exc}") from None
        try:
            trunk_listeners = await trio.open_ssl_over_tcp_listeners(
                config.trunk.port, context, host=config.trunk.listen
            )
        except OSError as exc:
            raise bind_error("trunk", config.trunk.listen, config.trunk.port, "tcp", exc) from None
        transport = trunk_listeners[0].transport_listener
        assert isinstance(transport, trio.SocketListener)
        trunk_port = transport.socket.getsockname()[1]
        self.addresses["trunk"] = f"{config.trunk.listen}:{trunk_port}/tcp"
        # The store closes only after every task is gone: a task still inside trio.to_thread
        # when the nursery is cancelled would otherwise use a closed database.
        try:
            async with trio.open_nursery() as nursery:
                await self._start_relay(nursery)
                await nursery.start(self.trunk.serve, trunk_listeners)
                if config.stun.enabled:
                    await self._start_stun(nursery)
                self.addresses["control"] = str(
                    await nursery.start(serve_control, self.data, self._control_handlers())
                )
                if config.api.enabled:
                    from mainhost.api import serve_api  # FastAPI is slow to import: only when used

                    try:
                        binds = await nursery.start(
                            serve_api, self, config.api.listen, config.api.port
                        )
                    except (OSError, BaseExceptionGroup) as failure:
                        # hypercorn binds inside its own nurseries: the OSError comes in a group.
                        leaf = next(
                            (e for e in leaf_exceptions(failure) if isinstance(e, OSError)), None
                        )
                        if leaf is None:
                            raise
                        raise bind_error(
                            "web API", config.api.listen, config.api.port, "tcp", leaf
                        ) from None
                    self.addresses["api"] = binds
                log.info("main host serving: %s", self.addresses)
                task_status.started(dict(self.addresses))
                try:
                    await trio.sleep_forever()
                finally:
                    with trio.CancelScope(shield=True):
                        await self.trunk.close_all("main host shutting down")
        finally:
            self.store.close()
            self.records.close()

    async def _start_relay(self, nursery: trio.Nursery) -> None:
        """The media relay for calls between offices (F3), on the media port (UDP)."""
        from mainhost.relay import MediaRelay

        def key_for(office: str) -> bytes | None:
            # The office's current login's key: after a re-login (new public address) the
            # relay takes the new key at once and learns the new address from its packets.
            live = self.trunk.online.get(office)
            return live.conn.session.media_key if live is not None else None

        relay = MediaRelay(key_for)
        listen, port = self.config.trunk.listen, self.config.media_port
        try:
            address = await nursery.start(relay.serve, (listen, port))
        except OSError as exc:
            raise bind_error("media relay", listen, port, "udp", exc) from None
        self.relay = relay
        self.trunk.calls.relay = relay
        # F4: direct paths are offered only where both offices' NAT types allow them.
        trunk = self.trunk
        trunk.calls.direct_media = self.config.direct_media
        trunk.calls.nat_type_of = lambda o: getattr(trunk.online.get(o), "nat_type", "unknown")
        self.trunk.calls.relay_port = address[1]
        self.addresses["media"] = f"{address[0]}:{address[1]}/udp"

    async def _start_stun(self, nursery: trio.Nursery) -> None:
        from mainhost.stun import serve_stun

        stun = self.config.stun
        try:
            self.stun_service = await nursery.start(
                lambda task_status: serve_stun(
                    stun.listen,
                    stun.port,
                    alternate_ip=stun.alternate_address or None,
                    alternate_port=stun.alternate_port,
                    task_status=task_status,
                )
            )
        except OSError as exc:
            raise bind_error("STUN", stun.listen, stun.port, "udp", exc) from None
        addresses = getattr(self.stun_service, "addresses", None)
        self.addresses["stun"] = [f"{ip}:{port}/udp" for ip, port in addresses or []]

    def _control_handlers(self) -> dict[str, Any]:
        async def status(request: dict[str, Any]) -> Any:
            return await self.snapshot()

        return {"status": status}


def office_entry(
    office: Office,
    live: OfficeLive | None,
    now: float,
    bandwidth: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One office as `status` shows it: live state when online, the last known state otherwise."""
    return {
        "name": office.name,
        "online": live is not None,
        "public_address": live.public_ip if live else office.public_ip,
        "public_port": live.public_port if live else office.public_port,
        # Until a fresh login's probe reports, the last known NAT type and LAN are the best
        # answer (the probe takes a few seconds).
        "nat_type": (live.nat_type if live and live.nat_type != "unknown" else office.nat_type)
        or "unknown",
        "last_seen": now if live else office.last_seen,
        "since": live.since if live else None,
        "extensions": f"{office.ext_first}-{office.ext_last}",
        "phones": office.phones,
        "wan_kbps": office.wan_kbps,
        "lan": live.lan if live and live.lan else office.lan,
        "stun_address": f"{office.stun_ip}:{office.stun_port}" if office.stun_ip else None,
        "directory_version": office.dir_version,
        "directory_acked": live.dir_acked if live else None,
        "bandwidth": bandwidth
        or {"budget_kbps": office.wan_kbps, "used_kbps": 0, "calls": 0, "refused": 0},
        "registrations": (
            [b for ext in sorted(live.registrations) for b in live.registrations[ext]]
            if live
            else []
        ),
    }


def data_status_offline(data: Path) -> dict[str, Any]:
    """Status from the database alone, for when the main host is not running."""
    store = MainStore(data / DB_NAME)
    try:
        offices = [office_entry(o, None, time.time()) for o in store.offices()]
        announcements = summaries(store, time.time())
    finally:
        store.close()
    return {
        "running": False,
        "software": SOFTWARE,
        "offices": offices,
        "announcements": announcements,
    }
