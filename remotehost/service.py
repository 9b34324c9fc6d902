"""`remotehost serve`: the office's services and the one status snapshot they all show.

Owns start-up (the mirror first, so the office works from disk even when the main host is
unreachable), the uplink to the main host, the public-address watcher, the control socket, and
the wiring of call control: the media anchor, the SIP and trunk legs, and the call controller
that the SIP service and the uplink hand calls to.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from remotehost import natprobe
from remotehost.anchor import MediaAnchor
from remotehost.announce import DB_NAME as ANNOUNCE_DB
from remotehost.announce import AnnouncementStore, Announcer
from remotehost.calls import CallController, CallPolicy
from remotehost.config import CA_NAME, CONFIG_NAME, SECRET_NAME, RemoteHostConfig
from remotehost.legs import Legs
from remotehost.location import DB_NAME as LOCATION_DB
from remotehost.location import Location, SqliteLocationStore, registration_entry
from remotehost.mirror import DB_NAME, DirectoryMirror, MirrorInfo
from remotehost.records import DB_NAME as RECORDS_DB
from remotehost.records import CallLog, RecordStore
from remotehost.sipservice import SipService
from remotehost.uplink import SOFTWARE, Uplink, client_ssl_context
from shared.aio.control import serve_control
from shared.cli import CliError

log = logging.getLogger("remotehost")
DEFAULT_REALM = "branchpbx"


def read_secret(data: Path) -> bytes:
    try:
        secret = (data / SECRET_NAME).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {data / SECRET_NAME}: {exc.strerror} (join again?)") from None
    if len(secret) < 16:
        raise CliError(f"{data / SECRET_NAME} is damaged (too short): join again")
    return secret


def read_ca(data: Path) -> str:
    try:
        return (data / CA_NAME).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {data / CA_NAME}: {exc.strerror} (join again?)") from None


class RemoteHost:
    def __init__(self, data: Path, config: RemoteHostConfig) -> None:
        self.data = data
        self.config = config
        self.mirror = DirectoryMirror(data / DB_NAME)
        self.started = time.time()
        self.boot_id = uuid.uuid4().hex
        try:
            context = client_ssl_context(read_ca(data))
        except ValueError as exc:  # ssl refuses a damaged PEM
            raise CliError(f"{data / CA_NAME} is not a valid certificate: {exc}") from None
        secret = read_secret(data)
        self.uplink = Uplink(
            config,
            secret=secret,
            ca_sha256=None,  # the TLS handshake already verified against the pinned CA
            ssl_context=context,
            mirror=self.mirror,
            boot_id=self.boot_id,
        )
        self.location = Location()
        self.location_store = SqliteLocationStore(data / LOCATION_DB)
        self.location.load(self.location_store.load(time.time()))
        self.uplink.attach_location(self.location)
        self._domains = self._find_domains()
        self.sip = SipService(
            lookup_ha1=self.mirror.lookup_ha1,
            realm=lambda: self.mirror.realm or DEFAULT_REALM,
            domains=lambda: self._domains,
            location=self.location,
            store=self.location_store,
            keepalive_interval=config.sip.keepalive_interval,
            digest_algorithms=config.sip.digest_algorithms,
            # Digest nonces stay valid across restarts (stale, not forged): key them with the
            # office secret, which only this box and the main host know.
            nonce_secret=hmac.new(secret, b"branchpbx sip digest nonces", "sha256").digest(),
        )
        # Call control: the anchor faces the phones on the SIP service's address; the SDP we
        # give a phone names our address as that phone reaches it.
        self.anchor = MediaAnchor(config.sip.listen)
        self.legs = Legs(self.sip, self.uplink)
        self.calls = CallController(
            legs=self.legs,
            directory=self.mirror,
            location=self.location,
            trunk=self.uplink,
            anchor=self.anchor,
            media_address=lambda phone_ip: self.sip.local_address(phone_ip)[0],
            main_host=config.trunk.main_host,
            policy=CallPolicy(
                max_calls=config.calls.max_calls,
                no_answer_timeout=config.calls.no_answer_timeout,
                grant_timeout=config.calls.grant_timeout,
                trunk_grace=config.calls.trunk_grace,
            ),
        )
        self.legs.controller = self.calls
        # Call records (F15): on disk first, uploaded by the uplink while it is logged in.
        self.records = CallLog(
            RecordStore(data / RECORDS_DB),
            office=config.office,
            boot_id=self.boot_id,
            wall_clock=time.time,
        )
        self.calls.listener = self.records
        self.uplink.records = self.records
        self.sip.attach_calls(self.legs)
        self.uplink.call_handler = self.calls
        # Announcements (F8): to the phones through the SIP service, reports through the uplink.
        self.announcer = Announcer(
            AnnouncementStore(data / ANNOUNCE_DB),
            self.location,
            deliver=lambda binding, a, now: self.sip.send_text(
                binding, a.text, sender=a.sender or "main host", now=now
            ),
            directory=lambda: [entry.ext for entry in self.mirror.entries()],
            wall_clock=time.time,
        )
        self.announcer.report_to = self.uplink.send_report
        self.uplink.announcements = self.announcer

    def _find_domains(self) -> set[str]:
        """What a phone may put in its REGISTER's Request-URI: our addresses, the realm."""
        domains = {"localhost", "127.0.0.1", "::1", *self.config.sip.domains}
        if self.config.sip.listen not in ("0.0.0.0", "::"):
            domains.add(self.config.sip.listen)
        for interface in natprobe.lan_interfaces():
            domains.update(str(a.ip) for a in interface.ipv4)
            domains.update(str(a.ip).split("%")[0] for a in interface.ipv6)
        return domains

    def status(self, info: MirrorInfo | None = None) -> dict[str, Any]:
        """Call in the trio thread (it reads live state only that thread changes); without
        `info`, reads the mirror's sqlite itself (blocking)."""
        info = info or self.mirror.info()
        uplink = asdict(self.uplink.state)
        return {
            "running": True,
            "software": SOFTWARE,
            "office": self.config.office,
            "main_host": f"{self.config.trunk.main_host}:{self.config.trunk.port}",
            "uptime": time.time() - self.started,
            "boot_id": self.boot_id,
            "trunk": uplink,
            "online": uplink["state"] == "online",
            "public_address": uplink["public_ip"],
            "nat_type": uplink["nat_type"],
            "lan": uplink["lan"],
            "directory": {
                "version": info.version,
                "extensions": info.entries,
                "realm": info.realm,
                "range": f"{info.ext_first}-{info.ext_last}" if info.ext_last else None,
            },
            "sip_address": f"{self.sip.address[0]}:{self.sip.address[1]}"
            if self.sip.address
            else None,
            "registrations": [
                registration_entry(b, time.time())
                for b in sorted(self.location.all(), key=lambda b: (b.ext, b.contact))
            ],
            "sip": self.sip.statistics(),
            "calls": self.calls.status(),
            "call_records": self.records.status(),
        }

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        info = await trio.to_thread.run_sync(self.mirror.info)
        log.info(
            "office %s: directory mirror version %d with %d extension(s)",
            self.config.office,
            info.version,
            info.entries,
        )
        sip = self.config.sip
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(self.sip.serve, sip.listen, sip.port)
                except OSError as exc:
                    raise CliError(
                        f"SIP for phones: {sip.listen} port {sip.port}/udp+tcp:"
                        f" {exc.strerror or exc} (sip.port in {self.data / CONFIG_NAME})"
                    ) from None
                await nursery.start(self.anchor.serve)
                await nursery.start(self.legs.serve)
                await nursery.start(self.calls.serve)
                await nursery.start(serve_control, self.data, {"status": self._status})
                nursery.start_soon(self.announcer.run)
                nursery.start_soon(self.uplink.run)
                nursery.start_soon(self.uplink.watch_public_address)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.sip.flush()
            self.mirror.close()
            self.location_store.close()
            self.announcer.store.close()
            self.records.store.close()

    async def _status(self, request: dict[str, Any]) -> Any:
        return self.status(await trio.to_thread.run_sync(self.mirror.info))
