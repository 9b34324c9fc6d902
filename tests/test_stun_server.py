"""Tests for shared.stun.server: the pure server, alone and in conversation with pystun3.

The pystun3 conversations run over a fake network (no sockets): a fake UDP socket hands each
datagram to the server through a simulated NAT, so every RFC 3489 NAT type can be produced and
pystun3's classification checked against it.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

import pytest
import stun as pystun3
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.stun.message import (
    BINDING,
    MAGIC_COOKIE,
    TYPE_CHANGE_REQUEST,
    Attribute,
    ChangedAddress,
    ChangeRequest,
    ErrorCode,
    MappedAddress,
    OtherAddress,
    RawAttribute,
    ResponseOrigin,
    Software,
    SourceAddress,
    StunClass,
    StunMessage,
    TransportAddress,
    UnknownAttributes,
    XorMappedAddress,
    parse_message_untrusted,
)
from shared.stun.server import ServerAddresses, StunReply, StunServer

PRIMARY = "198.51.100.1"
ALTERNATE = "198.51.100.2"
PORT = 3478
ALT_PORT = 3479
FULL = ServerAddresses(PRIMARY, PORT, alternate_port=ALT_PORT, alternate_ip=ALTERNATE)
CLIENT = TransportAddress("203.0.113.9", 40000)
TID = bytes(range(12))
TID_3489 = bytes(range(100, 116))

P = TransportAddress(PRIMARY, PORT)
PA = TransportAddress(PRIMARY, ALT_PORT)
A = TransportAddress(ALTERNATE, PORT)
AA = TransportAddress(ALTERNATE, ALT_PORT)


def request(
    *attributes: Attribute,
    tid: bytes = TID,
    fingerprint: bool = False,
    cls: StunClass = StunClass.REQUEST,
    method: int = BINDING,
) -> bytes:
    return StunMessage(method, cls, tid, tuple(attributes), fingerprint).encode()


def ask(server: StunServer, data: bytes, local=P, remote=CLIENT) -> tuple[StunReply, StunMessage]:
    reply = server.handle_datagram_untrusted(data, local, remote)
    assert reply is not None
    assert reply.remote == remote
    return reply, parse_message_untrusted(reply.data)


# --- success ----------------------------------------------------------------------------------


def test_rfc5389_binding_success():
    server = StunServer(FULL)
    reply, response = ask(server, request())
    assert reply.local == P
    assert response.cls is StunClass.SUCCESS
    assert response.method == BINDING
    assert response.transaction_id == TID
    assert response.get(XorMappedAddress) == XorMappedAddress(CLIENT)
    assert response.get(MappedAddress) == MappedAddress(CLIENT)
    assert response.get(ResponseOrigin) == ResponseOrigin(P)
    assert response.get(OtherAddress) == OtherAddress(AA)
    assert response.get(Software) == Software("branchpbx")
    assert response.get(SourceAddress) is None
    assert not response.fingerprint
    assert server.statistics().answered == 1


def test_fingerprint_is_mirrored():
    _, response = ask(StunServer(FULL), request(fingerprint=True))
    assert response.fingerprint


def test_ipv6_client_and_server():
    addresses = ServerAddresses(
        "2001:db8::1", PORT, alternate_port=ALT_PORT, alternate_ip="2001:db8::2"
    )
    client = TransportAddress("2001:db8:ffff::9", 5060)
    _, response = ask(
        StunServer(addresses), request(), local=TransportAddress("2001:db8::1", PORT), remote=client
    )
    assert response.get(XorMappedAddress) == XorMappedAddress(client)
    assert response.get(OtherAddress) == OtherAddress(TransportAddress("2001:db8::2", ALT_PORT))


def test_rfc3489_client_gets_the_classic_attributes_only():
    reply, response = ask(StunServer(FULL), request(tid=TID_3489))
    assert response.transaction_id == TID_3489
    assert reply.data[4:20] == TID_3489
    assert [type(a) for a in response.attributes] == [MappedAddress, SourceAddress, ChangedAddress]
    assert response.get(MappedAddress) == MappedAddress(CLIENT)
    assert response.get(SourceAddress) == SourceAddress(P)
    assert response.get(ChangedAddress) == ChangedAddress(AA)


def test_software_can_be_left_out():
    _, response = ask(StunServer(FULL, software=None), request())
    assert response.get(Software) is None


def test_no_alternates_no_other_address():
    server = StunServer(ServerAddresses(PRIMARY, PORT))
    _, response = ask(server, request())
    assert response.get(OtherAddress) is None
    _, classic = ask(server, request(tid=TID_3489))
    assert classic.get(ChangedAddress) is None


def test_wildcard_primary_does_not_advertise_itself():
    addresses = ServerAddresses("0.0.0.0", PORT)
    local = TransportAddress("0.0.0.0", PORT)
    _, response = ask(StunServer(addresses), request(), local=local)
    assert response.get(ResponseOrigin) is None
    assert response.get(XorMappedAddress) == XorMappedAddress(CLIENT)


def test_credentials_and_optional_unknowns_are_ignored():
    _, response = ask(
        StunServer(FULL),
        request(
            RawAttribute(0x0006, b"user"),  # USERNAME
            RawAttribute(0x0008, bytes(20)),  # MESSAGE-INTEGRITY
            RawAttribute(0x8029, bytes(8)),  # ICE-CONTROLLED: comprehension-optional
        ),
    )
    assert response.cls is StunClass.SUCCESS


# --- CHANGE-REQUEST ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "change_ip", "change_port", "source", "other"),
    [
        (P, False, False, P, AA),
        (P, True, False, A, AA),
        (P, False, True, PA, AA),
        (P, True, True, AA, AA),
        (AA, True, True, P, P),
        (AA, True, False, PA, P),
        (A, False, True, AA, PA),
        (PA, True, False, AA, A),
    ],
)
def test_change_request_picks_the_source(local, change_ip, change_port, source, other):
    reply, response = ask(
        StunServer(FULL), request(ChangeRequest(change_ip, change_port)), local=local
    )
    assert reply.local == source
    assert response.get(ResponseOrigin) == ResponseOrigin(source)
    # RFC 5780 §7.4: OTHER-ADDRESS is relative to where the request arrived, not where it left.
    assert response.get(OtherAddress) == OtherAddress(other)


def test_rfc3489_change_request_source_address():
    reply, response = ask(StunServer(FULL), request(ChangeRequest(True, True), tid=TID_3489))
    assert reply.local == AA
    assert response.get(SourceAddress) == SourceAddress(AA)
    assert response.get(ChangedAddress) == ChangedAddress(AA)


def test_change_port_without_alternate_ip_is_honoured():
    server = StunServer(ServerAddresses(PRIMARY, PORT, alternate_port=ALT_PORT))
    reply, response = ask(server, request(ChangeRequest(False, True)))
    assert reply.local == PA
    assert response.cls is StunClass.SUCCESS


@pytest.mark.parametrize(
    ("addresses", "change"),
    [
        (ServerAddresses(PRIMARY, PORT, alternate_port=ALT_PORT), ChangeRequest(True, False)),
        (ServerAddresses(PRIMARY, PORT, alternate_port=ALT_PORT), ChangeRequest(True, True)),
        (ServerAddresses(PRIMARY, PORT), ChangeRequest(False, True)),
        (ServerAddresses(PRIMARY, PORT, alternate_ip=ALTERNATE), ChangeRequest(True, True)),
    ],
)
def test_change_request_that_cannot_be_honoured_is_420(addresses, change):
    reply, response = ask(StunServer(addresses), request(change))
    assert reply.local == P  # an error never changes address
    assert response.cls is StunClass.ERROR
    assert response.transaction_id == TID
    assert response.get(ErrorCode) == ErrorCode(420, "Unknown Attribute")
    assert response.get(UnknownAttributes) == UnknownAttributes((TYPE_CHANGE_REQUEST,))


def test_rfc3489_change_request_that_cannot_be_honoured_is_dropped():
    server = StunServer(ServerAddresses(PRIMARY, PORT, alternate_port=ALT_PORT))
    data = request(ChangeRequest(True, True), tid=TID_3489)
    assert server.handle_datagram_untrusted(data, P, CLIENT) is None
    assert server.statistics().dropped == 1
    # The same client without CHANGE-REQUEST is answered.
    _, response = ask(server, request(tid=TID_3489))
    assert response.cls is StunClass.SUCCESS


def test_empty_change_request_needs_no_alternate():
    _, response = ask(
        StunServer(ServerAddresses(PRIMARY, PORT)), request(ChangeRequest(False, False))
    )
    assert response.cls is StunClass.SUCCESS


# --- errors -----------------------------------------------------------------------------------


def test_unknown_comprehension_required_attributes_are_420():
    server = StunServer(FULL)
    _, response = ask(
        server,
        request(
            RawAttribute(0x0024, bytes(4)),
            RawAttribute(0x8029, bytes(8)),
            RawAttribute(0x0002, bytes(8)),  # RFC 3489 RESPONSE-ADDRESS: refused on purpose
            RawAttribute(0x0024, bytes(4)),
            ChangeRequest(True, False),
            fingerprint=True,
        ),
    )
    assert response.cls is StunClass.ERROR
    assert response.get(ErrorCode) == ErrorCode(420, "Unknown Attribute")
    assert response.get(UnknownAttributes) == UnknownAttributes((0x0024, 0x0002))
    assert response.fingerprint
    assert response.get(Software) == Software("branchpbx")
    assert server.statistics().errors == 1


def test_rfc3489_error_has_no_software():
    _, response = ask(StunServer(FULL), request(RawAttribute(0x0002, bytes(8)), tid=TID_3489))
    assert response.cls is StunClass.ERROR
    assert response.transaction_id == TID_3489
    assert response.get(Software) is None


def test_malformed_attribute_in_a_request_is_400():
    body = struct.pack("!HH", TYPE_CHANGE_REQUEST, 3) + b"\x00\x00\x06\x00"
    data = struct.pack("!HHI", 0x0001, len(body), MAGIC_COOKIE) + TID + body
    server = StunServer(FULL)
    reply, response = ask(server, data)
    assert reply.local == P
    assert response.cls is StunClass.ERROR
    assert response.transaction_id == TID
    assert response.get(ErrorCode) == ErrorCode(400, "Bad Request")
    assert server.statistics().errors == 1


def test_unknown_method_is_400():
    _, response = ask(StunServer(FULL), request(method=0x003))
    assert response.method == 0x003
    assert response.cls is StunClass.ERROR
    assert response.get(ErrorCode) == ErrorCode(400, "Unsupported method")


# --- drops ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage" * 5,
        b"\x80" + bytes(19),  # RTP-looking
        request(cls=StunClass.INDICATION),  # RFC 5389 §7.3.2: keepalive, no answer
        request(cls=StunClass.SUCCESS),
        request(cls=StunClass.ERROR),
        # A malformed attribute in a response is not worth an answer either.
        struct.pack("!HHI", 0x0101, 8, MAGIC_COOKIE) + TID + struct.pack("!HH", 3, 3) + bytes(4),
    ],
)
def test_dropped_and_counted(data):
    server = StunServer(FULL)
    assert server.handle_datagram_untrusted(data, P, CLIENT) is None
    assert server.statistics().received == 1
    assert server.statistics().dropped == 1
    assert server.statistics().answered == 0


def test_datagram_on_a_foreign_address_is_dropped():
    server = StunServer(ServerAddresses(PRIMARY, PORT))
    assert server.handle_datagram_untrusted(request(), PA, CLIENT) is None
    assert server.handle_datagram_untrusted(request(), A, CLIENT) is None
    assert server.statistics().dropped == 2


def test_source_port_zero_is_dropped():
    server = StunServer(FULL)
    assert (
        server.handle_datagram_untrusted(request(), P, TransportAddress("203.0.113.9", 0)) is None
    )
    assert server.statistics().dropped == 1


def test_drops_are_logged_through_the_injected_logger(caplog):
    logger = logging.getLogger("test.stun.server")
    server = StunServer(FULL, logger=logger)
    with caplog.at_level(logging.DEBUG, logger="test.stun.server"):
        server.handle_datagram_untrusted(b"junk", P, CLIENT)
    assert any("drop" in record.getMessage() for record in caplog.records)


# --- addresses --------------------------------------------------------------------------------


def test_local_addresses():
    assert FULL.local_addresses() == (P, PA, A, AA)
    assert ServerAddresses(PRIMARY, PORT).local_addresses() == (P,)
    assert ServerAddresses(PRIMARY, PORT, alternate_port=ALT_PORT).local_addresses() == (P, PA)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ServerAddresses(PRIMARY, PORT, alternate_ip="2001:db8::1"),
        lambda: ServerAddresses(PRIMARY, PORT, alternate_ip=PRIMARY),
        lambda: ServerAddresses("0.0.0.0", PORT, alternate_ip=ALTERNATE),
        lambda: ServerAddresses(PRIMARY, PORT, alternate_port=PORT),
        lambda: ServerAddresses("nonsense", PORT),
    ],
)
def test_bad_server_addresses(make):
    with pytest.raises(ValueError):
        make()


# --- properties -------------------------------------------------------------------------------

clients = st.builds(TransportAddress, st.ip_addresses(v=4).map(str), st.integers(1, 0xFFFF))
locals_ = st.sampled_from([P, PA, A, AA, TransportAddress("192.0.2.1", PORT)])
valid_requests = st.builds(
    lambda change, tid, fp: request(*change, tid=tid, fingerprint=fp),
    st.lists(st.builds(ChangeRequest, st.booleans(), st.booleans()), max_size=1),
    st.one_of(st.just(TID), st.just(TID_3489), st.binary(min_size=12, max_size=12)),
    st.booleans(),
)
datagrams = st.one_of(valid_requests, st.binary(max_size=64), valid_requests.map(lambda d: d[:-1]))
server_addresses = st.sampled_from(
    [
        FULL,
        ServerAddresses(PRIMARY, PORT),
        ServerAddresses(PRIMARY, PORT, alternate_port=ALT_PORT),
        ServerAddresses(PRIMARY, PORT, alternate_ip=ALTERNATE),
    ]
)


@settings(max_examples=200)
@given(server_addresses, st.lists(st.tuples(datagrams, locals_, clients), max_size=20))
def test_any_traffic_keeps_the_counters_and_replies_sane(addresses, traffic):
    server = StunServer(addresses)
    for data, local, remote in traffic:
        reply = server.handle_datagram_untrusted(data, local, remote)
        if reply is None:
            continue
        assert reply.remote == remote
        assert reply.local in addresses.local_addresses()
        response = parse_message_untrusted(reply.data)
        assert response.cls in (StunClass.SUCCESS, StunClass.ERROR)
        if response.cls is StunClass.SUCCESS:
            assert response.get(MappedAddress) == MappedAddress(remote)
    stats = server.statistics()
    assert stats.received == len(traffic)
    assert stats.received == stats.answered + stats.dropped
    assert stats.errors <= stats.answered


# --- pystun3 over a simulated NAT -------------------------------------------------------------

PRIVATE = TransportAddress("192.0.2.50", 54320)
PUBLIC_IP = "203.0.113.77"


@dataclass
class FakeNat:
    """RFC 4787 mapping and filtering, small enough to read."""

    symmetric: bool = False  # address-and-port-dependent mapping
    filtering: str = "none"  # "none" (full cone), "address", "address-and-port", "all"
    mappings: dict[TransportAddress, int] = field(default_factory=dict)
    sent_to: set[TransportAddress] = field(default_factory=set)

    def outbound(self, destination: TransportAddress) -> TransportAddress:
        key = destination if self.symmetric else TransportAddress("0.0.0.0", 0)
        port = self.mappings.setdefault(key, 61000 + len(self.mappings))
        self.sent_to.add(destination)
        return TransportAddress(PUBLIC_IP, port)

    def allows(self, source: TransportAddress) -> bool:
        if self.filtering == "none":
            return True
        if self.filtering == "address":
            return any(d.ip == source.ip for d in self.sent_to)
        if self.filtering == "address-and-port":
            return source in self.sent_to
        return False


class FakeSocket:
    """Just enough of a UDP socket for pystun3, wired to a StunServer through an optional NAT."""

    def __init__(self, server: StunServer, nat: FakeNat | None, *, blocked: bool = False) -> None:
        self.server = server
        self.nat = nat
        self.blocked = blocked
        self.inbox: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        destination = TransportAddress(*address)
        if self.blocked:
            return
        remote = self.nat.outbound(destination) if self.nat else PRIVATE
        reply = self.server.handle_datagram_untrusted(data, destination, remote)
        if reply is None:
            return
        if self.nat is None or self.nat.allows(reply.local):
            self.inbox.append((reply.data, (reply.local.ip, reply.local.port)))

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        if not self.inbox:
            raise TimeoutError
        return self.inbox.pop(0)


def classify(nat: FakeNat | None, addresses: ServerAddresses = FULL, **kwargs):
    server = StunServer(addresses)
    sock = FakeSocket(server, nat, **kwargs)
    nat_type, result = pystun3.get_nat_type(
        sock,
        PRIVATE.ip,
        PRIVATE.port,
        stun_host=addresses.primary_ip,
        stun_port=addresses.primary_port,
    )
    return nat_type, result, server


def test_pystun3_open_internet():
    nat_type, result, server = classify(None)
    assert result["ExternalIP"] == PRIVATE.ip
    assert nat_type == pystun3.OpenInternet
    assert server.statistics().dropped == 0


@pytest.mark.parametrize(
    ("nat", "expected"),
    [
        (FakeNat(filtering="none"), pystun3.FullCone),
        (FakeNat(filtering="address"), pystun3.RestricNAT),
        (FakeNat(filtering="address-and-port"), pystun3.RestricPortNAT),
        (FakeNat(symmetric=True, filtering="address-and-port"), pystun3.SymmetricNAT),
    ],
)
def test_pystun3_classifies_each_nat(nat, expected):
    nat_type, _, server = classify(nat)
    assert nat_type == expected
    assert server.statistics().errors == 0


def test_pystun3_full_cone_reports_the_mapping():
    nat = FakeNat()
    server = StunServer(FULL)
    sock = FakeSocket(server, nat)
    nat_type, ext_ip, ext_port = _get_ip_info(sock)
    assert (nat_type, ext_ip, ext_port) == (pystun3.FullCone, PUBLIC_IP, 61000)


def _get_ip_info(sock: FakeSocket) -> tuple[str, str | None, int | None]:
    nat_type, result = pystun3.get_nat_type(
        sock, PRIVATE.ip, PRIVATE.port, stun_host=PRIMARY, stun_port=PORT
    )
    return nat_type, result["ExternalIP"], result["ExternalPort"]


def test_pystun3_without_alternate_ip_sees_a_firewall():
    # Without a second IP the server must refuse "change IP and port"; pystun3 then cannot tell
    # open internet from a symmetric firewall. This is why the main host wants a second IP.
    nat_type, _, server = classify(None, ServerAddresses(PRIMARY, PORT, alternate_port=ALT_PORT))
    assert nat_type == pystun3.SymmetricUDPFirewall
    # Silence, not 420: pystun3 retransmits for ever on an error response.
    assert server.statistics().errors == 0
    assert server.statistics().dropped == 4


def test_pystun3_blocked():
    nat_type, _, server = classify(None, blocked=True)
    assert nat_type == pystun3.Blocked
    assert server.statistics().received == 0
