"""The remote host's SIP service (remotehost/sipservice.py) in-process, on loopback with port 0.

A `SipService` with a mirror-like credential lookup runs in a nursery; the tests are phones made
of a raw trio UDP socket or a TCP stream, speaking bytes built by tests/siphelpers.py. Time
limits are hang guards only: every wait is for an event (an answer, a counter, a state).
"""

from __future__ import annotations

import json
import random
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from remotehost.legs import Legs
from remotehost.location import DB_NAME, Binding, Location, SqliteLocationStore
from remotehost.registrar import RegistrarPolicy
from remotehost.sipservice import SERVER_NAME, SipService
from shared.aio.sip_transport import Source
from shared.sip.digest import answer_challenge, parse_challenge_untrusted
from shared.sip.framing import SipStreamFramer
from shared.sip.message import SipMessage, SipRequest, SipResponse, parse_message_untrusted
from shared.sip.transaction import State, TransactionKey, make_ack_for_failure, server_key
from tests.siphelpers import (
    DOMAIN,
    REALM,
    Phone,
    challenges_of,
    contact_expiries,
    directory,
    options_answer,
    register_bytes,
    request_bytes,
)

LOOPBACK = "127.0.0.1"
GUARD = 10.0  # seconds; a hang guard, never a timing assertion
NOW = 1_700_000_000.0


class WallClock:
    """The service's wall clock (registration expiry, nonces), moved by the test."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Running:
    service: SipService
    address: tuple[str, int]
    clock: WallClock
    db: Path

    @property
    def location(self) -> Location:
        return self.service.location

    def stored(self) -> list[Binding]:
        """The bindings on disk, read by a second store instance."""
        reader = SqliteLocationStore(self.db)
        try:
            return reader.load(self.clock.now)
        finally:
            reader.close()


@asynccontextmanager
async def running_service(tmp_path: Path, **options: Any) -> AsyncIterator[Running]:
    db = tmp_path / DB_NAME
    store = SqliteLocationStore(db)
    clock = WallClock()
    realm = options.pop("realm", lambda: REALM)
    domains = options.pop("domains", {DOMAIN})
    service = SipService(
        lookup_ha1=directory(),
        realm=realm,
        domains=lambda: domains,
        location=Location(),
        store=store,
        wall_clock=clock,
        **options,
    )
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(GUARD):
                address = await nursery.start(service.serve, LOOPBACK, 0)
            assert address[0] == LOOPBACK and address[1] != 0
            yield Running(service, address, clock, db)
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def wait_until(predicate: Callable[[], bool], guard: float = GUARD) -> None:
    """Poll `predicate` until true; fail (TooSlowError) after `guard` seconds."""
    with trio.fail_after(guard):
        while True:
            if predicate():
                return
            await trio.sleep(0.01)


# -- phones made of sockets -----------------------------------------------------------------------


class UdpClient:
    """A UDP socket talking to the service. `raw` is the stdlib socket, for non-blocking
    checks that nothing arrived."""

    def __init__(self, raw: socket.socket, server: tuple[str, int]) -> None:
        self.raw = raw
        self.sock = trio.socket.from_stdlib_socket(raw)
        self.server = server
        self.host, self.port = raw.getsockname()[:2]

    @classmethod
    def open(cls, server: tuple[str, int], host: str = LOOPBACK) -> UdpClient:
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.bind((host, 0))
        return cls(raw, server)

    def close(self) -> None:
        self.sock.close()

    def phone(self, ext: str, **kwargs: Any) -> Phone:
        return Phone(ext, host=self.host, port=self.port, transport="UDP", **kwargs)

    async def send(self, data: bytes) -> None:
        await self.sock.sendto(data, self.server)

    async def receive(self) -> SipMessage:
        with trio.fail_after(GUARD):
            data, sender = await self.sock.recvfrom(65536)
        assert sender[:2] == self.server
        return parse_message_untrusted(data)

    async def receive_bytes(self) -> bytes:
        with trio.fail_after(GUARD):
            data, _ = await self.sock.recvfrom(65536)
        return bytes(data)

    def nothing_waiting(self) -> bool:
        try:
            self.raw.recv(65536, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except BlockingIOError:
            return True
        return False

    async def request(self, data: bytes) -> SipResponse:
        """Send a request; return its final response (provisional ones, responses to other
        requests and requests from the service are skipped)."""
        branch = parse_message_untrusted(data).branch
        await self.send(data)
        while True:
            response = await self.receive()  # keepalive pings (requests) are skipped too
            if (
                isinstance(response, SipResponse)
                and response.branch == branch
                and response.status >= 200
            ):
                return response


class TcpClient:
    """A TCP connection to the service, framing what comes back."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.framer = SipStreamFramer(client=True)
        self.host, self.port = stream.socket.getsockname()[:2]

    @classmethod
    async def open(cls, server: tuple[str, int]) -> TcpClient:
        with trio.fail_after(GUARD):
            return cls(await trio.open_tcp_stream(*server))

    def phone(self, ext: str, **kwargs: Any) -> Phone:
        return Phone(ext, host=self.host, port=self.port, transport="TCP", **kwargs)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> SipMessage:
        with trio.fail_after(GUARD):
            while True:
                event = self.framer.next_message()
                if isinstance(event, bytes):
                    return parse_message_untrusted(event)
                if event is None:
                    data = await self.stream.receive_some(65536)
                    assert data, "the service closed the connection"
                    self.framer.receive_data(data)

    async def request(self, data: bytes) -> SipResponse:
        """Send a request; return its final response (provisional ones, responses to other
        requests and requests from the service are skipped)."""
        branch = parse_message_untrusted(data).branch
        await self.send(data)
        while True:
            response = await self.receive()  # keepalive pings (requests) are skipped too
            if (
                isinstance(response, SipResponse)
                and response.branch == branch
                and response.status >= 200
            ):
                return response


Client = UdpClient | TcpClient


async def register(client: Client, phone: Phone, **kwargs: Any) -> SipResponse:
    """REGISTER as a phone does: answer the 401 and send again."""
    response = await client.request(phone.register(**kwargs).encode())
    if response.status == 401:
        phone.learn(response)
        response = await client.request(phone.register(**kwargs).encode())
    return response


async def fail_password(client: UdpClient) -> None:
    guesser = client.phone("201", password="guess")
    guesser.learn(await client.request(guesser.register().encode()))
    assert (await client.request(guesser.register().encode())).status == 401


@pytest.fixture
async def running(tmp_path):
    async with running_service(tmp_path) as running:
        yield running


@pytest.fixture
def udp(running):
    client = UdpClient.open(running.address)
    yield client
    client.close()


# -- registration ---------------------------------------------------------------------------------


async def test_register_over_udp(running, udp):
    phone = udp.phone("201")
    first = await udp.request(phone.register().encode())
    assert first.status == 401
    [challenge] = challenges_of(first)
    assert challenge.realm == REALM and challenge.algorithm == "MD5"
    assert first.headers.get("Server") == SERVER_NAME
    phone.learn(first)
    response = await udp.request(phone.register().encode())
    assert response.status == 200
    assert contact_expiries(response) == {phone.contact: 3600}
    [binding] = running.location.get("201")
    assert (binding.transport, binding.source_ip, binding.source_port) == (
        "udp",
        LOOPBACK,
        udp.port,
    )
    assert binding.expires_at == NOW + 3600
    stats = running.service.statistics()
    assert stats["service"]["registrar"]["accepted"] == 1
    assert stats["service"]["requests"] == 2


async def test_register_over_tcp(running):
    client = await TcpClient.open(running.address)
    async with client.stream:
        phone = client.phone("202")
        first = await client.request(phone.register().encode())
        assert first.status == 401
        phone.learn(first)
        response = await client.request(phone.register().encode())
        assert response.status == 200
        assert contact_expiries(response) == {phone.contact: 3600}
        [binding] = running.location.get("202")
        assert (binding.transport, binding.source_port) == ("tcp", client.port)
        # The same connection carries the next request too.
        assert (await register(client, phone, expires=0)).status == 200
        assert running.location.get("202") == []


async def test_sha256_and_md5_challenges(tmp_path):
    async with running_service(tmp_path, digest_algorithms=("MD5", "SHA-256")) as running:
        udp = UdpClient.open(running.address)
        try:
            phone = udp.phone("201")
            first = await udp.request(phone.register().encode())
            # RFC 8760 §2.4: one challenge per algorithm, the strongest first.
            assert [c.algorithm for c in challenges_of(first)] == ["SHA-256", "MD5"]
            phone.learn(first)
            assert phone.challenge is not None and phone.challenge.algorithm == "SHA-256"
            assert (await udp.request(phone.register().encode())).status == 200
        finally:
            udp.close()


async def test_a_refresh_over_a_new_connection_moves_the_binding(running):
    first = await TcpClient.open(running.address)
    second = await TcpClient.open(running.address)
    async with first.stream, second.stream:
        phone = first.phone("201")
        assert (await register(first, phone)).status == 200
        # The phone reconnects (NAT rebinding, a restart of its TCP stack): same contact, same
        # Call-ID, next CSeq, from the new connection. Requests go where it is now.
        assert (await second.request(phone.register().encode())).status == 200
        [binding] = running.location.get("201")
        assert (binding.transport, binding.source_port) == ("tcp", second.port)
        assert binding.cseq == phone.cseq


async def test_statistics_are_plain_data(running, udp):
    assert (await register(udp, udp.phone("201"))).status == 200
    stats = running.service.statistics()
    assert json.loads(json.dumps(stats)) == stats
    assert stats["service"]["registrar"]["registers"] == 2
    assert stats["transport"]["received"] == 2
    assert stats["transactions"]["server_created"] == 2


async def test_unknown_extension_and_wrong_password_look_alike_on_the_wire(running, udp):
    answers = []
    for phone in (udp.phone("299", password="guess"), udp.phone("201", password="wrong")):
        phone.learn(await udp.request(phone.register().encode()))
        answers.append(await udp.request(phone.register().encode()))
    unknown, wrong = answers
    assert (unknown.status, unknown.reason) == (wrong.status, wrong.reason) == (401, "Unauthorized")
    assert [n for n, _ in unknown.headers] == [n for n, _ in wrong.headers]
    assert len(running.location) == 0


async def test_wrong_domain_is_403(running, udp):
    data = register_bytes(
        ext="201", request_uri="sip:paris.example.com", via=f"SIP/2.0/UDP {LOOPBACK}:{udp.port}"
    )
    assert (await udp.request(data)).status == 403


async def test_domain_names_compare_case_insensitively(running, udp):
    # RFC 3261 §19.1.4: the host part of a SIP URI compares case-insensitively.
    phone = udp.phone("201", domain=DOMAIN.upper())
    response = await register(udp, phone)
    assert response.status == 200
    assert [b.contact for b in running.location.get("201")] == [phone.contact]


@pytest.mark.parametrize(
    ("request_uri", "status"),
    [
        ("sip:127.0.0.1", 401),
        ("sip:[::1]:5060", 401),
        ("sip:office.example.net", 401),
        ("sip:OFFICE.example.NET", 401),
        (f"sip:{REALM}", 401),  # the realm is always one of our domains
        ("sip:127.0.0.2", 403),
        ("sip:example.net", 403),
    ],
)
async def test_served_domains(tmp_path, request_uri, status):
    domains = {"127.0.0.1", "::1", "office.example.net"}
    async with running_service(tmp_path, domains=domains) as running:
        udp = UdpClient.open(running.address)
        try:
            phone = udp.phone("201")
            response = await udp.request(phone.register(request_uri=request_uri).encode())
            assert response.status == status
        finally:
            udp.close()


async def test_retransmitted_register_is_answered_from_the_transaction(running, udp):
    service = running.service
    phone = udp.phone("201")
    data = phone.register().encode()
    first = await udp.request(data)
    assert first.status == 401
    again = await udp.request(data)  # the same branch: a retransmission
    assert again.encode() == first.encode()
    assert service.registrar.stats.registers == 1
    phone.learn(first)
    data = phone.register().encode()
    accepted = await udp.request(data)
    assert accepted.status == 200
    assert (await udp.request(data)).encode() == accepted.encode()
    assert service.registrar.stats.registers == 2
    assert service.registrar.stats.accepted == 1
    assert service.layer.statistics().retransmissions_absorbed == 2


async def test_a_new_realm_gets_new_challenges(tmp_path):
    realm = [REALM]
    async with running_service(tmp_path, realm=lambda: realm[0]) as running:
        client = UdpClient.open(running.address)
        try:
            phone = client.phone("201")
            assert (await register(client, phone)).status == 200
            realm[0] = "renamed.example.com"
            response = await client.request(phone.register().encode())
            assert response.status == 401
            assert [c.realm for c in challenges_of(response)] == ["renamed.example.com"]
        finally:
            client.close()


class TerribleLink:
    """A phone's UDP path that drops, duplicates and delays (reorders) what it carries, with a
    seed; the phone retransmits as RFC 3261 §17.1.2.2 says (Timer E, here short)."""

    def __init__(self, client: UdpClient, seed: int) -> None:
        self.client = client
        self.rng = random.Random(seed)
        self.delivered: set[str] = set()  # branches of which at least one copy arrived
        self.late: list[bytes] = []  # copies held back, sent after a later request

    async def transact(self, data: bytes) -> SipResponse:
        request = parse_message_untrusted(data)
        assert isinstance(request, SipRequest)
        with trio.fail_after(GUARD):
            while True:
                for _ in range(self.rng.choice([0, 1, 1, 2])):
                    if self.rng.random() < 0.2:
                        self.late.append(data)
                    else:
                        self.delivered.add(request.branch or "")
                        await self.client.send(data)
                with trio.move_on_after(0.05):  # the retransmission interval, not a limit
                    while True:
                        response = await self.client.receive()
                        assert isinstance(response, SipResponse)
                        if (
                            response.branch == request.branch
                            and response.status >= 200
                            and self.rng.random() > 0.3  # the answer may be lost too
                        ):
                            await self.release_late()
                            return response

    async def release_late(self) -> None:
        for data in self.late:
            parsed = parse_message_untrusted(data)
            self.delivered.add(parsed.branch or "")
            await self.client.send(data)
        self.late.clear()

    async def register(self, phone: Phone, **kwargs: Any) -> SipResponse:
        response = await self.transact(phone.register(**kwargs).encode())
        if response.status == 401:
            phone.learn(response)
            response = await self.transact(phone.register(**kwargs).encode())
        return response


@pytest.mark.parametrize("seed", range(6))
async def test_registration_over_a_terrible_network(running, udp, seed):
    link = TerribleLink(udp, seed)
    phone = udp.phone("201")
    response = await link.register(phone, expires=600)
    assert response.status == 200
    assert contact_expiries(response) == {phone.contact: 600}
    for _ in range(3):
        running.clock.now += 100
        response = await link.register(phone, expires=600)
        assert (response.status, contact_expiries(response)) == (200, {phone.contact: 600})
        [binding] = running.location.get("201")
        assert binding.expires_at == running.clock.now + 600
    response = await link.register(phone, expires=0)
    assert (response.status, response.contacts) == (200, [])
    await link.release_late()
    # Late copies of old requests are absorbed by their transactions (handled in order, so
    # when this OPTIONS is answered they were): nothing changed, and the registrar ran once
    # per request that arrived, however many copies of it did.
    options = await udp.request(request_bytes("OPTIONS", via=via_of(udp)))
    assert options.status == 200
    assert running.location.get("201") == []
    assert running.service.registrar.stats.registers == len(link.delivered)


# -- other methods --------------------------------------------------------------------------------


def via_of(client: UdpClient) -> str:
    return f"SIP/2.0/UDP {client.host}:{client.port}"


async def test_options_is_200_with_allow(running, udp):
    response = await udp.request(request_bytes("OPTIONS", via=via_of(udp)))
    assert response.status == 200
    assert set(response.option_tags("Allow")) == {"REGISTER", "OPTIONS"}
    assert response.to_tag is not None
    assert running.service.stats.options_answered == 1


@pytest.mark.parametrize("method", ["INVITE", "BYE", "SUBSCRIBE", "MESSAGE"])
async def test_known_methods_we_do_not_serve_are_405_with_allow(running, udp, method):
    data = request_bytes(method, via=via_of(udp))
    response = await udp.request(data)
    assert response.status == 405
    assert set(response.option_tags("Allow")) == {"REGISTER", "OPTIONS"}
    assert running.service.stats.not_allowed == 1
    if method == "INVITE":
        # RFC 3261 §17.1.1.3: the failure is acknowledged, which ends its retransmissions.
        invite = parse_message_untrusted(data)
        assert isinstance(invite, SipRequest)
        transaction = running.service.layer.get(server_key(invite))
        assert transaction is not None and transaction.state is State.COMPLETED
        await udp.send(make_ack_for_failure(invite, response).encode())
        await wait_until(lambda: transaction.state is not State.COMPLETED)


async def test_unknown_method_is_501(running, udp):
    response = await udp.request(request_bytes("FOO", via=via_of(udp)))
    assert response.status == 501
    assert response.cseq.method == "FOO"
    assert running.service.stats.not_implemented == 1


async def test_ack_is_never_answered(running, udp):
    await udp.send(request_bytes("ACK", via=via_of(udp)))
    # Requests are handled in order: when the OPTIONS is answered, the ACK was handled.
    response = await udp.request(request_bytes("OPTIONS", via=via_of(udp), call_id="after-ack"))
    assert (response.status, response.call_id) == (200, "after-ack")
    assert udp.nothing_waiting()
    assert running.service.stats.requests == 2
    assert running.service.layer.statistics().stray_acks == 1


async def test_register_over_tcp_and_options_on_one_connection(running):
    client = await TcpClient.open(running.address)
    async with client.stream:
        via = f"SIP/2.0/TCP {client.host}:{client.port}"
        assert (await client.request(request_bytes("OPTIONS", via=via))).status == 200
        assert (await client.request(request_bytes("FOO", via=via))).status == 501
        assert (await register(client, client.phone("203"))).status == 200


# -- brute force ----------------------------------------------------------------------------------


async def test_a_blocked_source_gets_nothing_while_another_is_served(running):
    attacker = UdpClient.open(running.address, "127.0.0.2")
    phone_client = UdpClient.open(running.address, "127.0.0.3")
    try:
        for _ in range(5):
            await fail_password(attacker)
        assert running.service.registrar.blocked("127.0.0.2", running.clock.now)
        # Anything from the attacker's address is dropped now: REGISTER (even with a right
        # password), OPTIONS, from any port.
        right = attacker.phone("201")
        await attacker.send(right.register().encode())
        await attacker.send(request_bytes("OPTIONS", via=via_of(attacker)))
        other_port = UdpClient.open(running.address, "127.0.0.2")
        try:
            await other_port.send(request_bytes("OPTIONS", via=via_of(other_port)))
            # The service handles requests in order: once the phone is answered, the
            # attacker's requests were handled, and an answer would be waiting already.
            phone = phone_client.phone("201")
            assert (await register(phone_client, phone)).status == 200
            assert attacker.nothing_waiting() and other_port.nothing_waiting()
        finally:
            other_port.close()
        assert running.service.stats.blocked_drops == 3
        assert [b.source_ip for b in running.location.get("201")] == ["127.0.0.3"]
        # The block lifts after block_seconds (on the service's wall clock).
        running.clock.now += RegistrarPolicy().block_seconds + 1
        response = await attacker.request(request_bytes("OPTIONS", via=via_of(attacker)))
        assert response.status == 200
    finally:
        attacker.close()
        phone_client.close()


class FakeCalls:
    """Stands in for the office's call legs: records the authenticated INVITEs."""

    def __init__(self) -> None:
        self.callers: list[str] = []

    async def on_invite(
        self, key: TransactionKey, request: SipRequest, source: Source, caller: str
    ) -> None:
        self.callers.append(caller)

    async def on_request(
        self, key: TransactionKey, request: SipRequest, cancels: TransactionKey | None
    ) -> SipResponse | None:
        return None

    def on_ack(self, request: SipRequest) -> None:
        pass

    async def on_response(self, key: TransactionKey, response: SipResponse) -> None:
        pass

    async def on_timeout(self, key: TransactionKey, response: SipResponse | None) -> None:
        pass


async def invite_as(client: UdpClient, calls: FakeCalls, ext: str, password: str) -> None:
    """An authenticated INVITE (RFC 3261 §22.3: 407, then Proxy-Authorization)."""
    uri = f"sip:299@{DOMAIN}"
    first = await client.request(request_bytes("INVITE", uri=uri, via=via_of(client)))
    assert first.status == 407
    challenge = parse_challenge_untrusted(first.headers.get("Proxy-Authenticate") or "")
    authorization = answer_challenge(
        challenge, method="INVITE", uri=uri, username=ext, password=password, cnonce="c", nc=1
    )
    before = len(calls.callers)
    await client.send(
        request_bytes(
            "INVITE", uri=uri, via=via_of(client), extra=[("Proxy-Authorization", authorization)]
        )
    )
    await wait_until(lambda: len(calls.callers) > before)


async def test_successes_do_not_wipe_the_failures_of_an_address(running):
    """An insider with one account must not guess the others' passwords forever by
    authenticating as itself (REGISTER or INVITE) between guesses."""
    calls = FakeCalls()
    running.service.attach_calls(cast(Legs, calls))
    insider = UdpClient.open(running.address, "127.0.0.2")
    try:
        for _ in range(2):
            for _ in range(2):
                await fail_password(insider)
            await invite_as(insider, calls, "201", "secret-201")
            assert (await register(insider, insider.phone("201"))).status == 200
        assert calls.callers == ["201", "201"]
        await fail_password(insider)  # the fifth failure
        assert running.service.registrar.blocked("127.0.0.2", running.clock.now)
    finally:
        insider.close()


# -- keepalive pings ------------------------------------------------------------------------------


@dataclass
class PingAnswerer:
    """The phone's side of the OPTIONS pings: answers them while `answering` is set. Owns the
    socket while it runs; `request` sends through it and gets the answer."""

    client: UdpClient
    answering: bool = True
    pings: list[SipRequest] = field(default_factory=list)  # one per ping, not per copy
    unanswered: set[str] = field(default_factory=set)  # Call-IDs
    responses: list[SipResponse] = field(default_factory=list)

    async def run(self) -> None:
        seen: set[str] = set()
        while True:
            data = await self.client.sock.recv(65536)
            message = parse_message_untrusted(data)
            if isinstance(message, SipResponse):
                self.responses.append(message)
                continue
            assert message.method == "OPTIONS"
            if message.call_id not in seen:
                seen.add(message.call_id)
                self.pings.append(message)
            if self.answering:
                await self.client.send(options_answer(data))
            else:
                self.unanswered.add(message.call_id)

    async def request(self, data: bytes) -> SipResponse:
        branch = parse_message_untrusted(data).branch
        await self.client.send(data)
        found: list[SipResponse] = []

        def answered() -> bool:
            found.extend(r for r in self.responses if r.branch == branch and r.status >= 200)
            return bool(found)

        await wait_until(answered)
        return found[0]


async def test_keepalive_pings_mark_silent_contacts_unreachable(tmp_path):
    async with running_service(
        tmp_path, keepalive_interval=0.2, missed_pings_unreachable=3
    ) as running:
        service = running.service
        udp = UdpClient.open(running.address)
        tcp = await TcpClient.open(running.address)
        try:
            phone = udp.phone("201")
            assert (await register(udp, phone)).status == 200
            tcp_phone = tcp.phone("202")
            assert (await register(tcp, tcp_phone)).status == 200
            answerer = PingAnswerer(udp)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answerer.run)

                def binding() -> Binding:
                    found = running.location.find("201", phone.contact or "")
                    assert found is not None
                    return found

                def stored_reachable() -> bool | None:
                    found = [b for b in running.stored() if b.ext == "201"]
                    return found[0].reachable if found else None

                # Answered pings: the contact stays reachable, round after round.
                await wait_until(lambda: service.stats.pings_answered >= 4)
                assert binding().reachable is True
                # Each ping went where the REGISTER came from, to the registered contact.
                ping = answerer.pings[0]
                assert ping.uri == phone.contact and str(ping.to.uri) == phone.contact
                assert ping.max_forwards == 70 and ping.top_via.branch

                # The phone goes silent: unreachable after the configured missed rounds, and
                # not before (the pings it ignored were received, so they were sent).
                answerer.answering = False
                await wait_until(lambda: not binding().reachable)
                assert len(answerer.unanswered) >= 3
                await wait_until(lambda: stored_reachable() is False)
                # TCP contacts are not pinged over UDP, so they stay reachable.
                tcp_binding = running.location.find("202", tcp_phone.contact or "")
                assert tcp_binding is not None and tcp_binding.reachable is True

                # It answers again: reachable again, in memory and on disk.
                answerer.answering = True
                await wait_until(lambda: binding().reachable)
                await wait_until(lambda: stored_reachable() is True)
                nursery.cancel_scope.cancel()
        finally:
            udp.close()
            await tcp.stream.aclose()


async def test_a_contact_registered_again_starts_with_no_missed_pings(tmp_path):
    async with running_service(
        tmp_path, keepalive_interval=0.2, missed_pings_unreachable=3
    ) as running:
        udp = UdpClient.open(running.address)
        try:
            phone = udp.phone("201")
            assert (await register(udp, phone)).status == 200
            answerer = PingAnswerer(udp, answering=False)

            def reachable() -> bool:
                found = running.location.find("201", phone.contact or "")
                assert found is not None
                return found.reachable

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answerer.run)
                await wait_until(lambda: not reachable())
                # The phone unregisters and registers again (it rebooted, say).
                response = await answerer.request(phone.register(expires=0).encode())
                assert response.status == 200
                response = await answerer.request(phone.register().encode())
                assert response.status == 200 and reachable()
                # Two more pings go unanswered: counting the one sent before the phone
                # unregistered, at most two misses count against the new binding, fewer than
                # the three it takes; the old binding's misses are forgotten.
                seen = len(answerer.pings)
                await wait_until(lambda: len(answerer.pings) >= seen + 2)
                assert reachable()
                # The third miss does count.
                await wait_until(lambda: not reachable())
                nursery.cancel_scope.cancel()
        finally:
            udp.close()


async def test_no_pings_for_removed_contacts(tmp_path):
    async with running_service(tmp_path, keepalive_interval=0.1) as running:
        udp = UdpClient.open(running.address)
        other = UdpClient.open(running.address)
        try:
            phone = udp.phone("201")
            assert (await register(udp, phone)).status == 200
            first_ping = await udp.receive_bytes()
            await udp.send(options_answer(first_ping))
            # Unregister. Pings sent before the 200 arrive before it (one socket, in order).
            await udp.send(phone.register(expires=0).encode())
            before: set[str] = set()
            while True:
                message = await udp.receive()
                if isinstance(message, SipRequest):
                    before.add(message.call_id)
                elif isinstance(message, SipResponse) and message.cseq.method == "REGISTER":
                    assert message.status == 200
                    break
            # Two more rounds pass (another phone receives their pings)...
            assert (await register(other, other.phone("202"))).status == 200
            for _ in range(2):
                await other.send(options_answer(await other.receive_bytes()))
            # ... and nothing new came to the removed contact: at most retransmissions of
            # the pings sent before.
            late = [parse_message_untrusted(data) for data in drain(udp.raw)]
            assert all(isinstance(m, SipRequest) and m.call_id in before for m in late)
        finally:
            udp.close()
            other.close()


def drain(raw: socket.socket) -> list[bytes]:
    """Every datagram already waiting on `raw`, without blocking."""
    datagrams = []
    while True:
        try:
            datagrams.append(raw.recv(65536, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return datagrams


# -- saving and expiring --------------------------------------------------------------------------


async def test_bindings_are_flushed_to_the_store(running, udp):
    phone = udp.phone("201")
    assert (await register(udp, phone)).status == 200
    await wait_until(lambda: len(running.stored()) == 1)
    [stored] = running.stored()
    assert stored == running.location.get("201")[0]
    assert (stored.contact, stored.source_port) == (phone.contact, udp.port)
    # Unregistering is saved too.
    assert (await register(udp, phone, expires=0)).status == 200
    await wait_until(lambda: running.stored() == [])


async def test_flush_writes_only_changed_extensions(running, udp):
    assert (await register(udp, udp.phone("201"))).status == 200
    await running.service.flush()
    assert [b.ext for b in running.stored()] == ["201"]
    assert running.service._dirty == {}
    # A second store sees a change only once it is flushed; a flush with nothing to do is fine.
    await running.service.flush()
    assert [b.ext for b in running.stored()] == ["201"]


async def test_bindings_expire_in_memory_and_on_disk(running, udp):
    phone = udp.phone("201")
    assert (await register(udp, phone, expires=60)).status == 200
    await wait_until(lambda: len(running.stored()) == 1)
    running.clock.now += 61
    await wait_until(lambda: len(running.location) == 0)
    reader = SqliteLocationStore(running.db)
    try:
        # Read at a time before the expiry, so that only a real deletion makes it empty.
        await wait_until(lambda: reader.load(NOW) == [])
    finally:
        reader.close()


async def test_bindings_from_the_store_are_served_after_a_restart(tmp_path):
    async with running_service(tmp_path) as running:
        udp = UdpClient.open(running.address)
        try:
            phone = udp.phone("201")
            assert (await register(udp, phone)).status == 200
            await running.service.flush()
        finally:
            udp.close()
    # What the remote host does at start: load the store into the location table.
    store = SqliteLocationStore(tmp_path / DB_NAME)
    try:
        location = Location()
        location.load(store.load(NOW + 10))
        assert [b.contact for b in location.get("201")] == [phone.contact]
    finally:
        store.close()


class FlakyStore(SqliteLocationStore):
    """A store whose first `failures` saves fail as a locked database does, after calling
    `meanwhile` (which runs while the service awaits the save)."""

    def __init__(
        self, path: Path, failures: int, meanwhile: Callable[[], None] = lambda: None
    ) -> None:
        super().__init__(path)
        self.failures = failures
        self.meanwhile = meanwhile
        self.saved: list[dict[str, list[Binding]]] = []

    def save(self, changes: dict[str, list[Binding]]) -> None:
        if self.failures > 0:
            self.failures -= 1
            self.meanwhile()
            raise sqlite3.OperationalError("database is locked")
        self.saved.append(changes)
        super().save(changes)


def bindings_of(ext: str, *contacts: str) -> dict[str, Binding]:
    return {c: Binding(ext, c, NOW + 3600, "call", 1, "udp", "192.0.2.10", 5062) for c in contacts}


async def test_flush_keeps_failed_changes_and_newer_ones_win(tmp_path):
    location = Location()
    store = FlakyStore(
        tmp_path / DB_NAME,
        failures=1,
        meanwhile=lambda: location.replace("201", bindings_of("201", "sip:new@x")),
    )
    try:
        service = SipService(
            lookup_ha1=directory(),
            realm=lambda: REALM,
            domains=lambda: {DOMAIN},
            location=location,
            store=store,
            wall_clock=WallClock(),
        )
        location.replace("201", bindings_of("201", "sip:old@x"))
        location.replace("202", bindings_of("202", "sip:c@x"))
        await service.flush()  # fails; 201 changes while it is being tried
        assert service.stats.save_failures == 1 and store.saved == []
        await service.flush()
        assert store.saved == [
            {"201": list(bindings_of("201", "sip:new@x").values()),
             "202": list(bindings_of("202", "sip:c@x").values())}
        ]  # fmt: skip
        await service.flush()  # nothing left to save
        assert len(store.saved) == 1
    finally:
        store.close()


async def test_a_failed_save_is_retried_and_does_not_stop_the_service(tmp_path):
    store = FlakyStore(tmp_path / DB_NAME, failures=2)
    service = SipService(
        lookup_ha1=directory(),
        realm=lambda: REALM,
        domains=lambda: {DOMAIN},
        location=Location(),
        store=store,
        wall_clock=WallClock(),
    )
    running = Running(service, (LOOPBACK, 0), WallClock(), tmp_path / DB_NAME)
    try:
        async with trio.open_nursery() as nursery:
            running.address = await nursery.start(service.serve, LOOPBACK, 0)
            udp = UdpClient.open(running.address)
            try:
                phone = udp.phone("201")
                assert (await register(udp, phone)).status == 200
                await wait_until(lambda: service.stats.save_failures == 2)
                # Still serving, and the binding reaches the disk at a later round.
                response = await udp.request(request_bytes("OPTIONS", via=via_of(udp)))
                assert response.status == 200
                await wait_until(lambda: len(running.stored()) == 1)
                assert running.stored() == running.location.get("201")
            finally:
                udp.close()
            nursery.cancel_scope.cancel()
    finally:
        store.close()
