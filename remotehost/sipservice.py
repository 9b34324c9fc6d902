"""The office's SIP service: transports, transactions, and what the remote host answers.

This module wires the layers (STYLE.md: each consumes the events of the one below): the SIP
transports (UDP and TCP on one port) hand validated messages to the transaction layer, whose
events reach the dispatcher here: REGISTER to the registrar, OPTIONS answered, the requests of
calls (INVITE, authenticated with a 407 challenge, and ACK, BYE, CANCEL, INFO, UPDATE, MESSAGE
inside a call) to the back-to-back user agent's legs (`legs.py`) once attached, methods we know
but do not serve get 405 with Allow, unknown ones 501, ACK never answered. It also runs what a
registrar must do over time: expire bindings, save them to disk in batches, and ping UDP contacts
with OPTIONS often enough to keep their NAT bindings open, marking those that stop answering.

Sources that keep failing authentication are dropped before any parsing beyond the transport's,
so a password-guessing flood costs us as little as possible.
"""

from __future__ import annotations

import logging
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

import trio

from remotehost.location import Binding, Location, SqliteLocationStore
from remotehost.registrar import DEFAULT_POLICY, Origin, Registrar, RegistrarPolicy
from shared.aio.sip_transport import (
    Destination,
    SipTransport,
    SipTransportError,
    Source,
    serve_sip_transports,
)
from shared.sip.digest import DigestVerifier
from shared.sip.errors import SipParseError
from shared.sip.message import Headers, SipMessage, SipRequest, SipResponse, make_response
from shared.sip.transaction import (
    AckReceived,
    Event,
    RequestReceived,
    ResponseReceived,
    SendMessage,
    TransactionError,
    TransactionKey,
    TransactionLayer,
    TransactionTimeout,
    TransportFailure,
)
from shared.sip.uri import SipUri

if TYPE_CHECKING:
    from remotehost.legs import Legs

log = logging.getLogger("remotehost.sip")
SERVER_NAME = "branchpbx-remotehost/0.1"
ALLOWED = ("REGISTER", "OPTIONS")
# With call control attached (`attach_calls`): what the back-to-back user agent serves.
CALL_METHODS = frozenset({"INVITE", "ACK", "BYE", "CANCEL", "INFO", "UPDATE", "MESSAGE"})
CALL_ALLOWED = (*ALLOWED, "INVITE", "ACK", "BYE", "CANCEL", "INFO", "UPDATE", "MESSAGE")
# Methods of RFC 3261 and its extensions that we know, but this remote host does not serve yet:
# 405 with Allow (RFC 3261 §21.4.6). Anything else is 501 (§21.5.2).
KNOWN_METHODS = frozenset(
    {"INVITE", "ACK", "BYE", "CANCEL", "INFO", "MESSAGE", "NOTIFY", "PRACK", "PUBLISH", "REFER",
     "SUBSCRIBE", "UPDATE"}
)  # fmt: skip


@dataclass
class Ping:
    key: TransactionKey
    ext: str
    contact: str
    answered: bool = False


@dataclass
class SipServiceStatistics:
    requests: int = 0
    blocked_drops: int = 0
    options_answered: int = 0
    not_allowed: int = 0
    not_implemented: int = 0
    invites_challenged: int = 0
    pings_sent: int = 0
    pings_answered: int = 0
    send_failures: int = 0
    save_failures: int = 0
    registrar: dict[str, int] = field(default_factory=dict)


class SipService:
    def __init__(
        self,
        *,
        lookup_ha1: Callable[[str, str], str | None],
        realm: Callable[[], str],
        domains: Callable[[], set[str]],
        location: Location,
        store: SqliteLocationStore,
        policy: RegistrarPolicy = DEFAULT_POLICY,
        keepalive_interval: float = 20.0,
        missed_pings_unreachable: int = 2,
        digest_algorithms: tuple[str, ...] = ("MD5",),
        wall_clock: Callable[[], float] = time.time,
        nonce_secret: bytes | None = None,
    ) -> None:
        self.location = location
        self.store = store
        self.keepalive_interval = keepalive_interval
        self.missed_pings_unreachable = missed_pings_unreachable
        self._realm = realm
        self._domains = domains
        self._lookup_ha1 = lookup_ha1
        self._policy = policy
        self._wall = wall_clock
        # The nonce key must outlive the process: a phone that refreshes with the credentials
        # of its last challenge after we restarted must get stale=true (RFC 7616 §3.3), not a
        # wrong-password 401 that counts toward blocking it. A random key is for tests only.
        self._secret = nonce_secret or secrets.token_bytes(32)
        self._algorithms = digest_algorithms
        self.registrar = self._make_registrar(realm())
        self.layer = TransactionLayer()
        self.transport: SipTransport | None = None
        self.address: tuple[str, int] | None = None
        self.stats = SipServiceStatistics()
        self._pings: dict[TransactionKey, Ping] = {}
        self._missed: dict[tuple[str, str], int] = {}
        self._dirty: dict[str, list[Binding]] = {}
        self._timer_changed = trio.Event()
        self._timer_wake = float("inf")  # when _run_timers wakes up unless told otherwise
        self.calls: Legs | None = None
        self._texts: dict[TransactionKey, trio.MemorySendChannel[str | None]] = {}
        location.add_listener(self._on_location_change)

    def _make_registrar(self, realm: str) -> Registrar:
        verifier = DigestVerifier(secret=self._secret, realm=realm, algorithms=self._algorithms)
        return Registrar(
            verifier=verifier,
            lookup_ha1=self._lookup_ha1,
            serves_domain=lambda host: _serves_domain(host, self._domains(), realm),
            location=self.location,
            policy=self._policy,
            server_name=SERVER_NAME,
        )

    def _on_location_change(self, ext: str, bindings: list[Binding]) -> None:
        self._dirty[ext] = bindings
        # Missed pings count against a binding: once it is gone, a new registration of the
        # same contact starts afresh, and the counts of contacts that left do not pile up.
        if self._missed:
            bound = {b.contact for b in bindings}
            for key in [k for k in self._missed if k[0] == ext and k[1] not in bound]:
                del self._missed[key]

    def attach_calls(self, legs: Legs) -> None:
        """Hand INVITE and the requests of calls to the office's back-to-back user agent."""
        self.calls = legs

    @property
    def allowed(self) -> tuple[str, ...]:
        return CALL_ALLOWED if self.calls is not None else ALLOWED

    # --- what the call legs use (legs.SipPort) ---

    def local_address(self, peer_ip: str) -> tuple[str, int]:
        """Our SIP address as a phone at `peer_ip` reaches it: for Via, Contact and SDP."""
        assert self.address is not None
        return _local_ip_towards(peer_ip, self.address[0]), self.address[1]

    def new_branch(self) -> str:
        return self.layer.new_branch()

    async def respond(self, key: TransactionKey, response: SipResponse) -> None:
        try:
            events = self.layer.send_response(key, response, trio.current_time())
        except TransactionError as exc:  # the transaction ended meanwhile (Timer L, H)
            log.debug("response %d not sent: %s", response.status, exc)
            return
        await self._process(events)
        self._timers_moved()

    async def request(self, request: SipRequest, destination: Destination) -> TransactionKey:
        key, events = self.layer.send_request(
            request, trio.current_time(), destination, reliable=destination.transport == "tcp"
        )
        await self._process(events)
        self._timers_moved()
        return key

    async def send_direct(self, message: SipMessage, destination: Destination) -> None:
        await self._send(SendMessage(None, message, destination, destination.transport == "tcp"))

    # --- serving ---

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            address, transport = await nursery.start(
                lambda task_status: serve_sip_transports(
                    host, port, self.handle, log=log, task_status=task_status
                )
            )
            self.transport, self.address = transport, address
            nursery.start_soon(self._run_timers)
            nursery.start_soon(self._maintain)
            nursery.start_soon(self._ping_contacts)
            log.info("SIP service for the office's phones on %s:%d (udp, tcp)", *address)
            task_status.started(address)

    async def handle(self, message: SipMessage, source: Source) -> None:
        if isinstance(message, SipRequest):
            self.stats.requests += 1
            if self.registrar.blocked(source.remote[0], self._wall()):
                # Answering a blocked password guesser would only help it.
                self.stats.blocked_drops += 1
                return
        now = trio.current_time()
        events = self.layer.receive(message, now, source, reliable=source.transport == "tcp")
        await self._process(events)
        self._timers_moved()

    async def _process(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, SendMessage):
                await self._send(event)
            elif isinstance(event, RequestReceived):
                if self.calls is not None and event.request.method in CALL_METHODS:
                    response = await self._call_request(event)
                else:
                    response = self._dispatch(event.request, event.source)
                if response is not None:
                    more = self.layer.send_response(event.key, response, trio.current_time())
                    await self._process(more)
            elif isinstance(event, ResponseReceived | TransactionTimeout | TransportFailure) and (
                event.key in self._texts
            ):
                self._text_outcome(event)
            elif isinstance(event, ResponseReceived):
                ping = self._pings.get(event.key)
                if ping is not None and event.response.status >= 200:
                    self._pong(ping)
                elif ping is None and self.calls is not None:
                    await self.calls.on_response(event.key, event.response)
            elif isinstance(event, TransactionTimeout | TransportFailure):
                if self.calls is not None and event.key not in self._pings:
                    await self.calls.on_timeout(event.key, event.response)
            elif isinstance(event, AckReceived) and self.calls is not None:
                self.calls.on_ack(event.request)

    async def _call_request(self, event: RequestReceived) -> SipResponse | None:
        """A request for the calls: a new INVITE is authenticated first (RFC 3261 §22.3: 407
        with Proxy-Authenticate), with the registrar's nonces and brute-force throttle."""
        assert self.calls is not None
        request = event.request
        if request.method == "ACK":
            return None  # an ACK of a non-2xx is absorbed by its transaction
        if request.method == "MESSAGE" and request.to_tag is None:
            return self._dispatch(request, event.source)  # only inside a call
        if request.method != "INVITE" or request.to_tag is not None:
            return await self.calls.on_request(event.key, request, event.cancels)
        assert isinstance(event.source, Source)
        caller = self._authenticate(request, event.source)
        if isinstance(caller, SipResponse):
            return caller
        await self.calls.on_invite(event.key, request, event.source, caller)
        return None

    def _authenticate(self, request: SipRequest, source: Source) -> SipResponse | str:
        now = self._wall()
        ip = source.remote[0]
        result = self.registrar.check_credentials(
            request.headers.get("Proxy-Authorization"),
            method="INVITE",
            uri=request.uri,
            ip=ip,
            now=now,
            who=request.headers.get("From"),
        )
        if not result.ok:
            self.stats.invites_challenged += 1
            return self._reply(
                request,
                407,
                "Proxy Authentication Required",
                [("Proxy-Authenticate", c) for c in result.challenges],
            )
        # As for REGISTER, a success does not wipe the address's failures (check_credentials).
        try:
            uri = request.from_.uri
        except SipParseError:
            return self._reply(request, 400, "Bad Request (From)")
        caller = uri.user if isinstance(uri, SipUri) else None
        if caller != result.username:
            return self._reply(request, 403, "Forbidden (you may call only as your own extension)")
        assert result.username is not None
        return result.username

    async def _send(self, event: SendMessage) -> None:
        transport = self.transport
        if transport is None:
            return
        destination = event.destination
        try:
            if isinstance(destination, Source):
                if isinstance(event.message, SipResponse):
                    await transport.send_response(event.message, destination)
                else:
                    await transport.send_message(event.message, destination.destination)
            elif isinstance(destination, Destination):
                await transport.send_message(event.message, destination)
        except SipTransportError as exc:
            self.stats.send_failures += 1
            log.debug("SIP send failed: %s", exc)
            if event.key is not None:
                await self._process(self.layer.transport_error(event.key, trio.current_time()))

    def _dispatch(self, request: SipRequest, source: Any) -> SipResponse | None:
        method = request.method
        now = self._wall()
        if method == "REGISTER":
            assert isinstance(source, Source)
            realm = self._realm()
            if realm != self.registrar.verifier.realm:
                # The directory's realm arrived or changed: new nonces for the new realm.
                self.registrar = self._make_registrar(realm)
            origin = Origin(source.transport, source.remote[0], source.remote[1])
            return self.registrar.handle_register(request, origin, now)
        if method == "OPTIONS":
            self.stats.options_answered += 1
            return self._reply(
                request,
                200,
                headers=[
                    ("Allow", ", ".join(self.allowed)),
                    ("Accept", "application/sdp"),
                ],
            )
        if method in KNOWN_METHODS:
            self.stats.not_allowed += 1
            return self._reply(request, 405, headers=[("Allow", ", ".join(self.allowed))])
        self.stats.not_implemented += 1
        return self._reply(request, 501, f"Not Implemented ({method})")

    def _reply(
        self,
        request: SipRequest,
        status: int,
        reason: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> SipResponse:
        return make_response(
            request,
            status,
            reason,
            to_tag=secrets.token_hex(6),
            headers=[("Server", SERVER_NAME), *(headers or [])],
        )

    # --- over time ---

    def _timers_moved(self) -> None:
        """Wake `_run_timers` if the layer's earliest timer is now before the one it sleeps
        until. Most messages only add later timers: waking it for each would cost a task
        switch per message for nothing."""
        when = self.layer.get_timer()
        if when is not None and when < self._timer_wake:
            self._timer_changed.set()

    async def _run_timers(self) -> None:
        while True:
            deadline = self.layer.get_timer()
            self._timer_changed = trio.Event()
            self._timer_wake = deadline if deadline is not None else float("inf")
            with trio.move_on_at(self._timer_wake):
                await self._timer_changed.wait()
                continue
            await self._process(self.layer.handle_timer(trio.current_time()))

    async def _maintain(self, interval: float = 0.2) -> None:
        """Expire bindings and save changed ones, in batches."""
        while True:
            await trio.sleep(interval)
            for binding in self.location.expire(self._wall()):
                log.info("%s: %s expired", binding.ext, binding.contact)
            await self.flush()

    async def flush(self) -> None:
        if self._dirty:
            changes, self._dirty = self._dirty, {}
            try:
                await trio.to_thread.run_sync(self.store.save, changes)
            except sqlite3.Error as exc:
                # A locked or full disk must not stop the phones' service: keep the changes
                # (newer ones made meanwhile win) and try again at the next round.
                for ext, bindings in changes.items():
                    self._dirty.setdefault(ext, bindings)
                self.stats.save_failures += 1
                log.warning("could not save the location table, will retry: %s", exc)

    async def _ping_contacts(self) -> None:
        """OPTIONS to every UDP contact: keeps its NAT binding open, tells us it is alive."""
        while True:
            await trio.sleep(self.keepalive_interval)
            # The previous round's pings that got no answer count as missed.
            for ping in self._pings.values():
                if not ping.answered:
                    self._missed_ping(ping)
            self._pings.clear()
            for binding in self.location.all():
                if binding.transport == "udp":
                    await self._ping(binding)

    async def _ping(self, binding: Binding) -> None:
        transport, address = self.transport, self.address
        if transport is None or address is None:
            return
        local_ip = _local_ip_towards(binding.source_ip, address[0])
        headers = Headers()
        branch = self.layer.new_branch()
        headers.add("Via", f"SIP/2.0/UDP {local_ip}:{address[1]};branch={branch};rport")
        headers.add("Max-Forwards", "70")
        headers.add("From", f"<sip:keepalive@{local_ip}>;tag={secrets.token_hex(6)}")
        headers.add("To", f"<{binding.contact}>")
        headers.add("Call-ID", secrets.token_hex(12))
        headers.add("CSeq", "1 OPTIONS")
        headers.add("User-Agent", SERVER_NAME)
        request = SipRequest("OPTIONS", binding.contact, headers)
        destination = Destination("udp", (binding.source_ip, binding.source_port))
        try:
            key, events = self.layer.send_request(
                request, trio.current_time(), destination, reliable=False
            )
        except Exception as exc:  # overload or a contact URI we cannot use: skip this round
            log.debug("not pinging %s: %s", binding.contact, exc)
            return
        self._pings[key] = Ping(key, binding.ext, binding.contact)
        self.stats.pings_sent += 1
        await self._process(events)
        self._timers_moved()

    async def send_text(
        self, binding: Binding, text: str, *, sender: str, now: float, timeout: float = 40.0
    ) -> str | None:
        """Send `text` to one binding as a SIP MESSAGE (RFC 3428, text/plain, with a Date at
        wall time `now`); None when the phone answered 2xx, else why not ("480 Temporarily
        Unavailable", "timeout", "transport failure"). Over TCP it goes on the connection the
        phone registered on (its NAT lets nothing else in)."""
        transport, address = self.transport, self.address
        if transport is None or address is None:
            return "not serving"
        peer = (binding.source_ip, binding.source_port)
        tcp = binding.transport == "tcp"
        local_ip = _local_ip_towards(binding.source_ip, address[0])
        display = sender.replace("\\", "").replace('"', "").replace("\r", "").replace("\n", "")
        headers = Headers()
        headers.add(
            "Via",
            f"SIP/2.0/{'TCP' if tcp else 'UDP'} {local_ip}:{address[1]}"
            f";branch={self.layer.new_branch()};rport",
        )
        headers.add("Max-Forwards", "70")
        headers.add(
            "From", f'"{display}" <sip:announcements@{local_ip}>;tag={secrets.token_hex(6)}'
        )
        headers.add("To", f"<sip:{binding.ext}@{self._realm()}>")
        headers.add("Call-ID", secrets.token_hex(12))
        headers.add("CSeq", "1 MESSAGE")
        # RFC 3428 §9: a Date tells the phone when it was sent (it may be shown much later).
        headers.add("Date", formatdate(now, usegmt=True))
        headers.add("User-Agent", SERVER_NAME)
        headers.add("Content-Type", "text/plain;charset=UTF-8")
        request = SipRequest("MESSAGE", binding.contact, headers, text.encode("utf-8"))
        connection = transport.connection_to(peer) if tcp else None
        destination = Destination("tcp" if tcp else "udp", peer, connection)
        try:
            key, events = self.layer.send_request(
                request, trio.current_time(), destination, reliable=tcp
            )
        except Exception as exc:  # overload, or a contact URI we cannot use
            return f"not sent: {exc}"
        send, receive = trio.open_memory_channel[str | None](1)
        self._texts[key] = send
        try:
            await self._process(events)
            self._timers_moved()
            with trio.move_on_after(timeout):
                return await receive.receive()
            return "timeout"
        finally:
            self._texts.pop(key, None)

    def _text_outcome(
        self, event: ResponseReceived | TransactionTimeout | TransportFailure
    ) -> None:
        if isinstance(event, ResponseReceived):
            if event.response.status < 200:
                return
            status = event.response.status
            outcome = None if status < 300 else f"{status} {event.response.reason}"
        else:
            outcome = "timeout" if isinstance(event, TransactionTimeout) else "transport failure"
        waiting = self._texts.pop(event.key)
        waiting.send_nowait(outcome)

    def _pong(self, ping: Ping) -> None:
        ping.answered = True
        self.stats.pings_answered += 1
        self._missed.pop((ping.ext, ping.contact), None)
        binding = self.location.find(ping.ext, ping.contact)
        if binding is not None and not binding.reachable:
            log.info("%s: %s answers again", ping.ext, ping.contact)
            self.location.set_reachable(ping.ext, ping.contact, True)

    def _missed_ping(self, ping: Ping) -> None:
        key = (ping.ext, ping.contact)
        binding = self.location.find(ping.ext, ping.contact)
        if binding is None:
            return  # unregistered meanwhile: nothing to count against
        missed = self._missed.get(key, 0) + 1
        self._missed[key] = missed
        if binding.reachable and missed >= self.missed_pings_unreachable:
            log.warning(
                "%s: %s does not answer (%d pings missed): unreachable",
                ping.ext,
                ping.contact,
                missed,
            )
            self.location.set_reachable(ping.ext, ping.contact, False)

    def statistics(self) -> dict[str, Any]:
        stats = self.stats
        stats.registrar = asdict(self.registrar.stats)
        transport = self.transport.statistics() if self.transport else None
        return {
            "service": asdict(stats),
            "transport": asdict(transport) if transport else None,
            "transactions": asdict(self.layer.statistics()),
        }


def _serves_domain(host: str, domains: set[str], realm: str) -> bool:
    # RFC 3261 §19.1.4: hosts compare case-insensitively (phones are configured by hand).
    name = host.strip("[]").lower()
    return name == realm.lower() or name in {d.strip("[]").lower() for d in domains}


def _local_ip_towards(remote_ip: str, bound_ip: str) -> str:
    """Our address as `remote_ip` sees it: the bound one, or the route's source address."""
    if bound_ip not in ("0.0.0.0", "::"):
        return bound_ip
    family = socket.AF_INET6 if ":" in remote_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((remote_ip, 9))  # no packet is sent: this only asks the routing table
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1" if family == socket.AF_INET else "::1"
