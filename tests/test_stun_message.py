"""Tests for shared.stun.message: RFC 5769 vectors, hand-built edge cases, round trips, fuzz."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from shared.stun.message import (
    BINDING,
    FINGERPRINT_XOR,
    MAGIC_COOKIE,
    TYPE_CHANGE_REQUEST,
    TYPE_ERROR_CODE,
    TYPE_FINGERPRINT,
    TYPE_MAPPED_ADDRESS,
    TYPE_SOFTWARE,
    TYPE_UNKNOWN_ATTRIBUTES,
    TYPE_XOR_MAPPED_ADDRESS,
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
    StunParseError,
    TransportAddress,
    UnknownAttributes,
    XorMappedAddress,
    is_comprehension_required,
    parse_message_untrusted,
)

TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")

# RFC 5769 §2.1: sample request (SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
# MESSAGE-INTEGRITY, FINGERPRINT), with spaces as padding after USERNAME.
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"
    "002400046e0001ff"
    "80290008932ff9b151263b36"
    "000600096576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)
# RFC 5769 §2.2: IPv4 success response, XOR-MAPPED-ADDRESS 192.0.2.1:32853.
RFC5769_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
# RFC 5769 §2.3: IPv6 success response, [2001:db8:1234:5678:11:2233:4455:6677]:32853.
RFC5769_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)


def binding_request(*attributes: Attribute, tid: bytes = TID, fingerprint: bool = False):
    return StunMessage(BINDING, StunClass.REQUEST, tid, tuple(attributes), fingerprint)


# --- RFC 5769 vectors -------------------------------------------------------------------------


def test_rfc5769_request_parses_with_fingerprint_and_raw_attributes():
    message = parse_message_untrusted(RFC5769_REQUEST)
    assert message.method == BINDING
    assert message.cls is StunClass.REQUEST
    assert message.transaction_id == TID
    assert not message.is_rfc3489
    assert message.fingerprint
    assert message.get(Software) == Software("STUN test client")
    raw = [a for a in message.attributes if isinstance(a, RawAttribute)]
    assert [a.type for a in raw] == [0x0024, 0x8029, 0x0006, 0x0008]
    # The USERNAME value is the 9 bytes without the padding.
    assert raw[2].value == b"evtj:h6vY"


def test_rfc5769_ipv4_response():
    message = parse_message_untrusted(RFC5769_IPV4_RESPONSE)
    assert message.cls is StunClass.SUCCESS
    assert message.fingerprint
    assert message.get(Software) == Software("test vector")
    assert message.get(XorMappedAddress) == XorMappedAddress(TransportAddress("192.0.2.1", 32853))


def test_rfc5769_ipv6_response():
    message = parse_message_untrusted(RFC5769_IPV6_RESPONSE)
    mapped = message.get(XorMappedAddress)
    assert mapped is not None
    assert mapped.address == TransportAddress("2001:db8:1234:5678:11:2233:4455:6677", 32853)


@pytest.mark.parametrize("vector", [RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE])
def test_rfc5769_vectors_reencode_to_an_equal_message(vector):
    message = parse_message_untrusted(vector)
    again = message.encode()
    assert parse_message_untrusted(again) == message
    # Same length: our padding is zeros where the vectors used spaces, nothing else differs.
    assert len(again) == len(vector)


def test_xor_mapped_address_bytes_match_rfc5769():
    ipv4 = binding_request(XorMappedAddress(TransportAddress("192.0.2.1", 32853))).encode()
    assert ipv4[20:] == bytes.fromhex("002000080001a147e112a643")
    ipv6 = binding_request(
        XorMappedAddress(TransportAddress("2001:db8:1234:5678:11:2233:4455:6677", 32853))
    ).encode()
    assert ipv6[20:] == bytes.fromhex("002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9")


def test_fingerprint_of_rfc5769_ipv4_response_is_reproduced():
    message = StunMessage(
        BINDING,
        StunClass.SUCCESS,
        TID,
        (
            Software("test vector"),
            XorMappedAddress(TransportAddress("192.0.2.1", 32853)),
            RawAttribute(0x0008, bytes.fromhex("2b91f599fd9e90c38c7489f92af9ba53f06be7d7")),
        ),
        fingerprint=True,
    )
    data = message.encode()
    # The vector pads SOFTWARE with a space; put it back and the CRC must equal the vector's.
    patched = data[:35] + b" " + data[36:-8]
    crc = (zlib.crc32(patched) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
    assert patched + data[-8:-4] + struct.pack("!I", crc) == RFC5769_IPV4_RESPONSE
    assert parse_message_untrusted(data) == message


# --- header -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "message_type"),
    [
        (StunClass.REQUEST, 0x0001),
        (StunClass.INDICATION, 0x0011),
        (StunClass.SUCCESS, 0x0101),
        (StunClass.ERROR, 0x0111),
    ],
)
def test_binding_message_types(cls, message_type):
    data = StunMessage(BINDING, cls, TID).encode()
    assert data == struct.pack("!HHI", message_type, 0, MAGIC_COOKIE) + TID
    assert parse_message_untrusted(data).cls is cls


def test_method_bits_are_interleaved_around_the_class_bits():
    # RFC 5389 §6: M11-M7 C1 M6-M4 C0 M3-M0, so method 0xFFF as an error has all 14 bits set.
    data = StunMessage(0xFFF, StunClass.ERROR, TID).encode()
    assert data[:2] == b"\x3f\xff"
    data = StunMessage(0x0F0, StunClass.REQUEST, TID).encode()
    # M4-M6 move up one bit (past C0), M7 two bits (past C1).
    assert data[:2] == struct.pack("!H", 0x02E0)
    assert parse_message_untrusted(data).method == 0x0F0


def test_rfc3489_request_as_pystun3_sends_it():
    tid = bytes.fromhex("0123456789ABCDEF0123456789ABCDEF")
    data = bytes.fromhex("00010008") + tid + bytes.fromhex("0003000400000006")
    message = parse_message_untrusted(data)
    assert message.is_rfc3489
    assert message.transaction_id == tid
    assert message.get(ChangeRequest) == ChangeRequest(change_ip=True, change_port=True)
    assert message.encode() == data


def test_rfc3489_response_carries_the_whole_128_bit_id():
    tid = bytes(range(1, 17))
    response = StunMessage(
        BINDING, StunClass.SUCCESS, tid, (MappedAddress(TransportAddress("198.51.100.7", 4000)),)
    )
    data = response.encode()
    assert data[4:20] == tid
    # MAPPED-ADDRESS in the clear, as RFC 3489 §11.2.1 has it.
    assert data[20:] == bytes.fromhex("0001000800010fa0c6336407")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter"),
        (b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x42" + b"\x00" * 11, "shorter"),
        (b"\x80\x01\x00\x00\x21\x12\xa4\x42" + TID, "top bits"),
        (b"\x40\x01\x00\x00\x21\x12\xa4\x42" + TID, "top bits"),
        (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + TID, "length field"),
        (b"\x00\x01\x00\x00\x21\x12\xa4\x42" + TID + b"\x00", "length field"),
        (b"\x00\x01\x00\x02\x21\x12\xa4\x42" + TID + b"\x00\x00", "multiple of 4"),
        (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + TID + b"\x80\x22\x00\x01", "runs past"),
        (b"\x00\x01\x00\x08\x21\x12\xa4\x42" + TID + b"\x80\x22\x00\x05abcd", "runs past"),
    ],
)
def test_bad_headers_and_framing_are_parse_errors_without_header(data, reason):
    with pytest.raises(StunParseError, match=reason) as info:
        parse_message_untrusted(data)
    assert info.value.header is None


def test_attributes_may_be_padded_with_anything():
    data = bytes.fromhex("000100082112a442") + TID + bytes.fromhex("80220001") + b"xABC"
    assert parse_message_untrusted(data).get(Software) == Software("x")


# --- FINGERPRINT ------------------------------------------------------------------------------


def test_fingerprint_round_trip_and_crc():
    data = binding_request(Software("branchpbx"), fingerprint=True).encode()
    assert data[-8:-4] == struct.pack("!HH", TYPE_FINGERPRINT, 4)
    expected = (zlib.crc32(data[:-8]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
    assert data[-4:] == struct.pack("!I", expected)
    assert parse_message_untrusted(data).fingerprint


def test_wrong_fingerprint_is_not_stun():
    data = bytearray(binding_request(fingerprint=True).encode())
    data[-1] ^= 0x01
    with pytest.raises(StunParseError, match="does not match"):
        parse_message_untrusted(bytes(data))


def test_fingerprint_must_be_last():
    data = binding_request(fingerprint=True).encode()
    extra = struct.pack("!HH", TYPE_SOFTWARE, 4) + b"abcd"
    # Fix the length so only the order is wrong.
    broken = data[:2] + struct.pack("!H", len(data) - 20 + 8) + data[4:] + extra
    with pytest.raises(StunParseError, match="last"):
        parse_message_untrusted(broken)


def test_fingerprint_with_wrong_length():
    body = struct.pack("!HH", TYPE_FINGERPRINT, 8) + bytes(8)
    data = struct.pack("!HHI", 0x0001, len(body), MAGIC_COOKIE) + TID + body
    with pytest.raises(StunParseError):
        parse_message_untrusted(data)


# --- attribute values -------------------------------------------------------------------------


def _with_attribute(attribute_type: int, value: bytes) -> bytes:
    body = struct.pack("!HH", attribute_type, len(value)) + value + bytes(-len(value) % 4)
    return struct.pack("!HHI", 0x0001, len(body), MAGIC_COOKIE) + TID + body


@pytest.mark.parametrize(
    ("attribute_type", "value"),
    [
        (TYPE_MAPPED_ADDRESS, b"\x00\x01\x00"),
        (TYPE_MAPPED_ADDRESS, b"\x00\x03\x00\x50" + bytes(4)),  # no such family
        (TYPE_MAPPED_ADDRESS, b"\x00\x01\x00\x50" + bytes(16)),  # IPv4 with 16 bytes
        (TYPE_XOR_MAPPED_ADDRESS, b"\x00\x02\x00\x50" + bytes(4)),  # IPv6 with 4 bytes
        (TYPE_CHANGE_REQUEST, b"\x00\x00\x06"),
        (TYPE_CHANGE_REQUEST, b"\x00\x00\x00\x06\x00"),
        (TYPE_SOFTWARE, b"\xff\xfe"),
        (TYPE_SOFTWARE, b"a" * 764),
        (TYPE_ERROR_CODE, b"\x00\x00\x04"),
        (TYPE_ERROR_CODE, b"\x00\x00\x07\x00"),  # class 7
        (TYPE_ERROR_CODE, b"\x00\x00\x02\x00"),  # class 2
        (TYPE_ERROR_CODE, b"\x00\x00\x04\x64"),  # number 100
        (TYPE_ERROR_CODE, b"\x00\x00\x04\x14\xc3"),  # truncated UTF-8
        (TYPE_UNKNOWN_ATTRIBUTES, b"\x00\x01\x00"),
    ],
)
def test_bad_attribute_values_carry_the_header(attribute_type, value):
    with pytest.raises(StunParseError) as info:
        parse_message_untrusted(_with_attribute(attribute_type, value))
    assert info.value.header is not None
    assert info.value.header.transaction_id == TID
    assert info.value.header.cls is StunClass.REQUEST


def test_change_request_flags():
    for flags, expected in [
        (0, ChangeRequest(False, False)),
        (4, ChangeRequest(True, False)),
        (2, ChangeRequest(False, True)),
        (6, ChangeRequest(True, True)),
        (0xFFFFFFF9, ChangeRequest(False, False)),  # RFC 5780 §7.2: other bits ignored
    ]:
        message = parse_message_untrusted(
            _with_attribute(TYPE_CHANGE_REQUEST, struct.pack("!I", flags))
        )
        assert message.get(ChangeRequest) == expected


def test_error_code_encoding():
    data = StunMessage(
        BINDING, StunClass.ERROR, TID, (ErrorCode(420, "Unknown Attribute"),)
    ).encode()
    assert data[20:28] == struct.pack("!HHHBB", TYPE_ERROR_CODE, 21, 0, 4, 20)
    assert data[28:45] == b"Unknown Attribute"
    assert data[45:] == bytes(3)


def test_unknown_attributes_encoding_and_padding():
    data = StunMessage(
        BINDING, StunClass.ERROR, TID, (UnknownAttributes((0x0024, 0x0007, 0x0099)),)
    ).encode()
    assert data[20:] == bytes.fromhex("000a0006002400070099") + bytes(2)
    assert parse_message_untrusted(data).get(UnknownAttributes) == UnknownAttributes(
        (0x0024, 0x0007, 0x0099)
    )


def test_address_reserved_byte_is_ignored():
    value = b"\xff\x01\x0f\xa0" + bytes([198, 51, 100, 7])
    message = parse_message_untrusted(_with_attribute(TYPE_MAPPED_ADDRESS, value))
    assert message.get(MappedAddress) == MappedAddress(TransportAddress("198.51.100.7", 4000))


def test_get_returns_the_first_occurrence():
    first = MappedAddress(TransportAddress("192.0.2.1", 1))
    second = MappedAddress(TransportAddress("192.0.2.2", 2))
    message = parse_message_untrusted(binding_request(first, second).encode())
    assert message.get(MappedAddress) == first
    assert message.get(XorMappedAddress) is None


def test_comprehension_required_ranges():
    assert is_comprehension_required(0x0000)
    assert is_comprehension_required(0x7FFF)
    assert not is_comprehension_required(0x8000)
    assert not is_comprehension_required(0xFFFF)


# --- local validation -------------------------------------------------------------------------


def test_transport_address_is_canonical():
    assert TransportAddress("2001:DB8:0:0::1", 5).ip == "2001:db8::1"
    assert TransportAddress("2001:DB8:0:0::1", 5) == TransportAddress("2001:db8::1", 5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TransportAddress("192.0.2.1", 70000),
        lambda: TransportAddress("192.0.2.1", -1),
        lambda: TransportAddress("not an ip", 1),
        lambda: RawAttribute(TYPE_MAPPED_ADDRESS, b""),
        lambda: RawAttribute(TYPE_FINGERPRINT, b""),
        lambda: RawAttribute(0x10000, b""),
        lambda: ErrorCode(299, "x"),
        lambda: ErrorCode(700, "x"),
        lambda: ErrorCode(400, "é" * 400),
        lambda: Software("x" * 764),
        lambda: Software("\udc80"),
        lambda: UnknownAttributes((0x10000,)),
        lambda: StunMessage(BINDING, StunClass.REQUEST, b"short"),
        lambda: StunMessage(0x1000, StunClass.REQUEST, TID),
        lambda: StunMessage(BINDING, StunClass.REQUEST, MAGIC_COOKIE.to_bytes(4, "big") + TID),
    ],
)
def test_invalid_values_are_refused_locally(make):
    with pytest.raises(ValueError):
        make()


def test_too_long_message_is_refused():
    message = binding_request(*(RawAttribute(0x7000, bytes(1000)) for _ in range(70)))
    with pytest.raises(ValueError, match="too long"):
        message.encode()


# --- properties -------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
addresses = st.builds(TransportAddress, st.one_of(ipv4, ipv6), st.integers(0, 0xFFFF))
text = st.text(max_size=40)
known_types = {
    0x0001,
    0x0003,
    0x0004,
    0x0005,
    0x0009,
    0x000A,
    0x0020,
    0x8022,
    0x8028,
    0x802B,
    0x802C,
}
raw_types = st.integers(0, 0xFFFF).filter(lambda t: t not in known_types)

attributes = st.one_of(
    st.builds(MappedAddress, addresses),
    st.builds(XorMappedAddress, addresses),
    st.builds(SourceAddress, addresses),
    st.builds(ChangedAddress, addresses),
    st.builds(ResponseOrigin, addresses),
    st.builds(OtherAddress, addresses),
    st.builds(ChangeRequest, st.booleans(), st.booleans()),
    st.builds(Software, text),
    st.builds(ErrorCode, st.integers(300, 699), text),
    st.builds(UnknownAttributes, st.lists(st.integers(0, 0xFFFF), max_size=6).map(tuple)),
    st.builds(RawAttribute, raw_types, st.binary(max_size=30)),
)
rfc3489_ids = st.binary(min_size=16, max_size=16).filter(
    lambda b: int.from_bytes(b[:4], "big") != MAGIC_COOKIE
)
messages = st.builds(
    StunMessage,
    method=st.integers(0, 0xFFF),
    cls=st.sampled_from(StunClass),
    transaction_id=st.one_of(st.binary(min_size=12, max_size=12), rfc3489_ids),
    attributes=st.lists(attributes, max_size=8).map(tuple),
    fingerprint=st.booleans(),
)


@given(messages)
def test_round_trip(message):
    data = message.encode()
    assert len(data) % 4 == 0
    assert parse_message_untrusted(data) == message


@given(messages)
def test_encoding_is_stable(message):
    data = message.encode()
    assert parse_message_untrusted(data).encode() == data


@given(st.builds(XorMappedAddress, addresses), st.binary(min_size=12, max_size=12))
def test_xor_address_never_shows_the_address_in_the_clear_for_ipv4_port(attribute, tid):
    data = StunMessage(BINDING, StunClass.SUCCESS, tid, (attribute,)).encode()
    x_port = struct.unpack_from("!H", data, 26)[0]
    assert x_port == attribute.address.port ^ (MAGIC_COOKIE >> 16)


@given(st.binary(max_size=200))
@example(b"")
@example(bytes.fromhex("000100002112a442") + TID)
def test_fuzz_random_bytes(data):
    try:
        parse_message_untrusted(data)
    except StunParseError:
        pass


@given(st.binary(max_size=120))
def test_fuzz_bytes_behind_a_valid_header(body):
    # The header is right, so every byte of the body reaches the attribute code.
    body = body[: len(body) - len(body) % 4]
    data = struct.pack("!HHI", 0x0001, len(body), MAGIC_COOKIE) + TID + body
    try:
        parse_message_untrusted(data)
    except StunParseError:
        pass


@given(messages, st.data())
def test_fuzz_mutated_messages(message, data):
    encoded = bytearray(message.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(encoded) - 1))
        encoded[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    try:
        parse_message_untrusted(bytes(encoded[:cut]))
    except StunParseError:
        pass


@given(
    st.sampled_from(sorted(known_types - {TYPE_FINGERPRINT})),
    st.binary(max_size=40),
)
def test_fuzz_known_attribute_values(attribute_type, value):
    try:
        parse_message_untrusted(_with_attribute(attribute_type, value))
    except StunParseError as exc:
        assert exc.header is not None
