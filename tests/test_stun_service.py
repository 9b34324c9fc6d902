"""mainhost.stun over real loopback sockets, with the remote host's probes as clients.

The service runs on 127.0.0.1 with 127.0.0.2 as its alternate IP (both are on `lo` in Linux
without any setup), on kernel-chosen ports.
"""

from __future__ import annotations

import functools
import socket
from typing import Any

import pytest
import trio

from mainhost.stun import StunService, serve_stun
from remotehost.natprobe import probe_nat_type, stun_binding
from shared.stun.message import (
    BINDING,
    ChangedAddress,
    ChangeRequest,
    ErrorCode,
    MappedAddress,
    OtherAddress,
    ResponseOrigin,
    SourceAddress,
    StunClass,
    StunMessage,
    TransportAddress,
    UnknownAttributes,
    XorMappedAddress,
    parse_message_untrusted,
)

TID = bytes(range(12))
TID_3489 = bytes(range(100, 116))


async def start_service(nursery: trio.Nursery, **kwargs: Any) -> StunService:
    service: StunService = await nursery.start(
        functools.partial(serve_stun, "127.0.0.1", 0, **kwargs)
    )
    return service


@pytest.fixture
async def service(nursery: trio.Nursery) -> StunService:
    return await start_service(nursery, alternate_ip="127.0.0.2")


@pytest.fixture
async def client():
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        yield sock


async def exchange(
    client: trio.socket.SocketType, data: bytes, to: TransportAddress
) -> tuple[StunMessage, TransportAddress]:
    await client.sendto(data, (to.ip, to.port))
    with trio.fail_after(5):
        reply, source = await client.recvfrom(2048)
    return parse_message_untrusted(reply), TransportAddress(source[0], source[1])


def binding(*attributes, tid: bytes = TID) -> bytes:
    return StunMessage(BINDING, StunClass.REQUEST, tid, tuple(attributes)).encode()


def own_address(sock: trio.socket.SocketType) -> TransportAddress:
    ip, port = sock.getsockname()
    return TransportAddress(ip, port)


async def test_binds_four_addresses_on_real_ports(service):
    p, pa, a, aa = service.local_addresses
    assert (p.ip, pa.ip, a.ip, aa.ip) == ("127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2")
    assert p.port != 0 and pa.port != 0
    assert p.port != pa.port
    assert (a.port, aa.port) == (p.port, pa.port)
    assert service.server_addresses.primary_port == p.port
    assert service.addresses == tuple((a.ip, a.port) for a in service.local_addresses)


async def test_binding_request_gets_xor_mapped_address(service, client):
    p, _, _, aa = service.local_addresses
    response, source = await exchange(client, binding(), p)
    assert source == p
    assert response.cls is StunClass.SUCCESS
    assert response.transaction_id == TID
    assert response.get(XorMappedAddress) == XorMappedAddress(own_address(client))
    assert response.get(ResponseOrigin) == ResponseOrigin(p)
    assert response.get(OtherAddress) == OtherAddress(aa)


@pytest.mark.parametrize(
    ("to", "change_ip", "change_port", "expected"),
    [
        (0, True, False, 2),
        (0, False, True, 1),
        (0, True, True, 3),
        (3, True, True, 0),
        (1, True, False, 3),
        (2, False, True, 3),
    ],
)
async def test_change_request_reply_comes_from_the_right_socket(
    service, client, to, change_ip, change_port, expected
):
    addresses = service.local_addresses
    response, source = await exchange(
        client, binding(ChangeRequest(change_ip, change_port)), addresses[to]
    )
    assert source == addresses[expected]
    assert response.get(ResponseOrigin) == ResponseOrigin(addresses[expected])
    assert response.get(XorMappedAddress) == XorMappedAddress(own_address(client))


async def test_rfc3489_client(service, client):
    p, _, _, aa = service.local_addresses
    response, source = await exchange(client, binding(ChangeRequest(True, True), tid=TID_3489), p)
    assert source == aa
    assert response.transaction_id == TID_3489
    assert response.get(MappedAddress) == MappedAddress(own_address(client))
    assert response.get(SourceAddress) == SourceAddress(aa)
    assert response.get(ChangedAddress) == ChangedAddress(aa)


async def test_probe_nat_type_sees_open_internet_on_loopback(service):
    p = service.local_addresses[0]
    with trio.fail_after(30):
        result = await probe_nat_type(p.ip, p.port, timeout=10)
    assert result.nat_type == "Open Internet"
    assert result.error is None
    assert result.external_ip == "127.0.0.1"
    assert result.external_port is not None and 0 < result.external_port < 65536
    # Test 1 and the change-IP-and-port test, each answered once.
    assert service.statistics().answered == 2


async def test_probe_without_alternate_ip_sees_a_firewall(nursery):
    service = await start_service(nursery)
    assert len(service.local_addresses) == 2
    p = service.local_addresses[0]
    with trio.fail_after(30):
        result = await probe_nat_type(p.ip, p.port, timeout=2)
    assert result.nat_type == "Symmetric UDP Firewall"
    assert result.external_ip == "127.0.0.1"
    assert service.statistics().errors == 0


async def test_stun_binding_on_an_ephemeral_socket(service):
    p = service.local_addresses[0]
    with trio.fail_after(10):
        mapped = await stun_binding((p.ip, p.port), timeout=5)
    assert mapped is not None
    assert mapped[0] == "127.0.0.1"
    assert mapped[1] > 0


async def test_stun_binding_over_a_given_socket(service, client):
    p = service.local_addresses[0]
    with trio.fail_after(10):
        mapped = await stun_binding((p.ip, p.port), timeout=5, sock=client)
        again = await stun_binding((p.ip, p.port), timeout=5, sock=client)
    assert mapped == client.getsockname()
    assert again == mapped
    assert service.statistics().answered == 2


async def test_garbage_is_dropped_and_counted_and_service_keeps_answering(service, client):
    p, pa, _, _ = service.local_addresses
    garbage = [b"", b"x", b"\x80" * 40, b"\x00\x01\x00\x00" + bytes(16) + b"junk", bytes(3000)]
    for data in garbage:
        await client.sendto(data, (p.ip, p.port))
    # A response and an indication are not requests: dropped too.
    await client.sendto(StunMessage(BINDING, StunClass.INDICATION, TID).encode(), (p.ip, p.port))
    # Datagrams on one socket are handled in order, so once this is answered the rest is done.
    response, _ = await exchange(client, binding(), p)
    assert response.get(XorMappedAddress) == XorMappedAddress(own_address(client))
    stats = service.statistics()
    assert stats.dropped == len(garbage) + 1
    assert stats.received == len(garbage) + 2
    assert stats.answered == 1
    # Every socket keeps working.
    response, source = await exchange(client, binding(), pa)
    assert source == pa
    assert response.cls is StunClass.SUCCESS


async def test_change_request_without_alternate_ip_is_420(nursery, client):
    service = await start_service(nursery)
    p, pa = service.local_addresses
    response, source = await exchange(client, binding(ChangeRequest(True, False)), p)
    assert source == p
    assert response.get(ErrorCode) == ErrorCode(420, "Unknown Attribute")
    assert response.get(UnknownAttributes) == UnknownAttributes((0x0003,))
    # Changing only the port is possible.
    response, source = await exchange(client, binding(ChangeRequest(False, True)), p)
    assert source == pa
    assert service.statistics().errors == 1


async def test_explicit_alternate_port_zero(nursery):
    service = await start_service(nursery, alternate_port=0)
    p, pa = service.local_addresses
    assert pa.port not in (0, p.port)


async def test_port_in_use_is_an_error(nursery):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            await serve_stun("127.0.0.1", port, alternate_port=0)


async def test_sockets_are_closed_when_cancelled():
    async with trio.open_nursery() as nursery:
        service = await start_service(nursery, alternate_ip="127.0.0.2")
        nursery.cancel_scope.cancel()
    for address in service.local_addresses:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind((address.ip, address.port))


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_service(nursery):
    service: StunService = await nursery.start(functools.partial(serve_stun, "::1", 0))
    p = service.local_addresses[0]
    with trio.socket.socket(trio.socket.AF_INET6, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("::1", 0))
        with trio.fail_after(10):
            mapped = await stun_binding((p.ip, p.port), timeout=5, sock=sock)
        assert mapped == ("::1", sock.getsockname()[1])
