"""The STUN message codec: bytes to `StunMessage` and back (RFC 5389, RFC 3489, RFC 5780).

This module owns the wire format only: the 20-byte header, the attribute TLVs with their
padding, the typed values of the attributes the branchpbx STUN service and NAT probe use, and
the FINGERPRINT check. It accepts both generations of the protocol, because the NAT-type probe
(pystun3) speaks RFC 3489, where the 32 bits after the length are part of a 128-bit transaction
id instead of the RFC 5389 magic cookie.

It does not own: what a server answers (`shared.stun.server`), sockets, retransmission timers
(the adapters), and authentication (USERNAME, MESSAGE-INTEGRITY, REALM, NONCE are kept as raw
attributes; nothing here checks them).

Parsing never trusts its input: `parse_message_untrusted` raises only `StunParseError`. When the
header and the attribute framing were sound but an attribute's value was not, the error carries
the header, so that a server can still answer a request with 400 (RFC 5389 §15.6).

It is longer than most modules (about 500 lines) because the attribute classes, their encoders
and their decoders form one table that reads best in one place.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
import zlib
from dataclasses import dataclass
from typing import ClassVar, TypeAlias, TypeVar

MAGIC_COOKIE = 0x2112A442
HEADER_SIZE = 20
# RFC 5389 §15.5: the CRC-32 is XOR'ed with this so that FINGERPRINT differs from a CRC that
# another protocol multiplexed on the same port might carry.
FINGERPRINT_XOR = 0x5354554E
# RFC 5389 §15.6 and §15.10: reason phrases and SOFTWARE are under 128 characters, which is at
# most 763 bytes of UTF-8.
MAX_TEXT_BYTES = 763

BINDING = 0x001

# Attribute type codes. RFC 5389 §15: 0x0000-0x7FFF are comprehension-required.
TYPE_MAPPED_ADDRESS = 0x0001
TYPE_CHANGE_REQUEST = 0x0003  # RFC 3489 §11.2.4, RFC 5780 §7.2
TYPE_SOURCE_ADDRESS = 0x0004  # RFC 3489 §11.2.5
TYPE_CHANGED_ADDRESS = 0x0005  # RFC 3489 §11.2.3
TYPE_ERROR_CODE = 0x0009
TYPE_UNKNOWN_ATTRIBUTES = 0x000A
TYPE_XOR_MAPPED_ADDRESS = 0x0020
TYPE_SOFTWARE = 0x8022
TYPE_FINGERPRINT = 0x8028
TYPE_RESPONSE_ORIGIN = 0x802B  # RFC 5780 §7.3
TYPE_OTHER_ADDRESS = 0x802C  # RFC 5780 §7.4

_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02

# RFC 3489 §11.2.4: "A" (0x04) asks for another IP, "B" (0x02) for another port.
_CHANGE_IP_FLAG = 0x04
_CHANGE_PORT_FLAG = 0x02


def is_comprehension_required(attribute_type: int) -> bool:
    """RFC 5389 §15: types below 0x8000 must be understood or the request refused (420)."""
    return attribute_type < 0x8000


class StunClass(enum.IntEnum):
    """RFC 5389 §6: the two class bits of the message type."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


@dataclass(frozen=True)
class StunHeader:
    """What the 20-byte header says; enough to address an error response."""

    method: int
    cls: StunClass
    transaction_id: bytes


class StunParseError(Exception):
    """The datagram is not a STUN message we can read; the remote peer's fault.

    `header` is set when the header and attribute framing were valid and only an attribute's
    value was bad: a request like that deserves a 400 rather than silence.
    """

    def __init__(self, reason: str, *, header: StunHeader | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.header = header


@dataclass(frozen=True)
class TransportAddress:
    """An IP address (IPv4 or IPv6, canonical text form) and a UDP port."""

    ip: str
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port out of range: {self.port}")
        # Canonical text, so that equal addresses compare equal after a round trip.
        object.__setattr__(self, "ip", str(ipaddress.ip_address(self.ip)))


@dataclass(frozen=True)
class _AddressAttribute:
    address: TransportAddress
    TYPE: ClassVar[int]
    XORED: ClassVar[bool] = False


@dataclass(frozen=True)
class MappedAddress(_AddressAttribute):
    """RFC 5389 §15.1: the reflexive address, in the clear (what RFC 3489 clients read)."""

    TYPE = TYPE_MAPPED_ADDRESS


@dataclass(frozen=True)
class XorMappedAddress(_AddressAttribute):
    """RFC 5389 §15.2: the reflexive address XOR'ed so that ALGs do not rewrite it."""

    TYPE = TYPE_XOR_MAPPED_ADDRESS
    XORED = True


@dataclass(frozen=True)
class SourceAddress(_AddressAttribute):
    """RFC 3489 §11.2.5: the address the response was sent from."""

    TYPE = TYPE_SOURCE_ADDRESS


@dataclass(frozen=True)
class ChangedAddress(_AddressAttribute):
    """RFC 3489 §11.2.3: where a response with both change flags set would come from."""

    TYPE = TYPE_CHANGED_ADDRESS


@dataclass(frozen=True)
class ResponseOrigin(_AddressAttribute):
    """RFC 5780 §7.3: the RFC 5389 spelling of SOURCE-ADDRESS."""

    TYPE = TYPE_RESPONSE_ORIGIN


@dataclass(frozen=True)
class OtherAddress(_AddressAttribute):
    """RFC 5780 §7.4: the RFC 5389 spelling of CHANGED-ADDRESS."""

    TYPE = TYPE_OTHER_ADDRESS


@dataclass(frozen=True)
class ChangeRequest:
    """RFC 5780 §7.2: ask the server to answer from another IP and/or port."""

    change_ip: bool
    change_port: bool
    TYPE: ClassVar[int] = TYPE_CHANGE_REQUEST


@dataclass(frozen=True)
class Software:
    """RFC 5389 §15.10: a description of the agent, for diagnostics only."""

    text: str
    TYPE: ClassVar[int] = TYPE_SOFTWARE

    def __post_init__(self) -> None:
        if len(self.text.encode("utf-8")) > MAX_TEXT_BYTES:
            raise ValueError("SOFTWARE is longer than 763 bytes")


@dataclass(frozen=True)
class ErrorCode:
    """RFC 5389 §15.6: a status code 300-699 and a reason phrase."""

    code: int
    reason: str
    TYPE: ClassVar[int] = TYPE_ERROR_CODE

    def __post_init__(self) -> None:
        if not 300 <= self.code <= 699:
            raise ValueError(f"error code out of range: {self.code}")
        if len(self.reason.encode("utf-8")) > MAX_TEXT_BYTES:
            raise ValueError("reason phrase is longer than 763 bytes")


@dataclass(frozen=True)
class UnknownAttributes:
    """RFC 5389 §15.9: the comprehension-required types a 420 response refuses."""

    types: tuple[int, ...]
    TYPE: ClassVar[int] = TYPE_UNKNOWN_ATTRIBUTES

    def __post_init__(self) -> None:
        if any(not 0 <= t <= 0xFFFF for t in self.types):
            raise ValueError("attribute types are 16-bit")


@dataclass(frozen=True)
class RawAttribute:
    """Any attribute this codec has no type for, kept as bytes (the server needs its type)."""

    type: int
    value: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.type <= 0xFFFF:
            raise ValueError("attribute types are 16-bit")
        if self.type in _DECODERS or self.type == TYPE_FINGERPRINT:
            raise ValueError(f"attribute type {self.type:#06x} has its own class")


Attribute: TypeAlias = (
    MappedAddress
    | XorMappedAddress
    | SourceAddress
    | ChangedAddress
    | ResponseOrigin
    | OtherAddress
    | ChangeRequest
    | Software
    | ErrorCode
    | UnknownAttributes
    | RawAttribute
)
_A = TypeVar("_A", bound=Attribute)


@dataclass(frozen=True)
class StunMessage:
    """One STUN message.

    `transaction_id` is 12 bytes for RFC 5389 (the magic cookie is implied) or 16 bytes for an
    RFC 3489 message, whose whole 128-bit id is kept as sent. `fingerprint` asks `encode` to
    append FINGERPRINT, and is True after parsing a message that carried a valid one.
    """

    method: int
    cls: StunClass
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()
    fingerprint: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.method <= 0xFFF:
            raise ValueError(f"method is 12 bits: {self.method:#x}")
        if len(self.transaction_id) == 16:
            # Such an id would read back as an RFC 5389 message with a 12-byte id.
            if int.from_bytes(self.transaction_id[:4], "big") == MAGIC_COOKIE:
                raise ValueError("an RFC 3489 transaction id may not start with the cookie")
        elif len(self.transaction_id) != 12:
            raise ValueError("transaction id is 12 (RFC 5389) or 16 (RFC 3489) bytes")

    @property
    def is_rfc3489(self) -> bool:
        """True for a classic STUN message (no magic cookie): RFC 5389 §12."""
        return len(self.transaction_id) == 16

    @property
    def header(self) -> StunHeader:
        return StunHeader(self.method, self.cls, self.transaction_id)

    def get(self, kind: type[_A]) -> _A | None:
        """The first attribute of this class. RFC 5389 §15: later duplicates are ignored."""
        for attribute in self.attributes:
            if isinstance(attribute, kind):
                return attribute
        return None

    def encode(self) -> bytes:
        cookie_and_id = _cookie_and_id(self.transaction_id)
        body = bytearray()
        for attribute in self.attributes:
            attribute_type, value = _encode_value(attribute, cookie_and_id)
            body += struct.pack("!HH", attribute_type, len(value)) + value
            body += bytes(-len(value) % 4)  # RFC 5389 §15: pad to a multiple of 4 bytes
        length = len(body) + (8 if self.fingerprint else 0)
        if length > 0xFFFF:
            raise ValueError("STUN message too long")
        message_type = _encode_type(self.method, self.cls)
        data = struct.pack("!HH", message_type, length) + cookie_and_id + bytes(body)
        if self.fingerprint:
            # RFC 5389 §15.5: the CRC covers everything before FINGERPRINT, with the length
            # field already counting FINGERPRINT itself.
            crc = (zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            data += struct.pack("!HHI", TYPE_FINGERPRINT, 4, crc)
        return data


def parse_message_untrusted(data: bytes) -> StunMessage:
    """Read one STUN message, which must fill the datagram exactly.

    Raises only `StunParseError`.
    """
    header = _parse_header_untrusted(data)
    raw_attributes, fingerprint = _split_attributes_untrusted(data)
    cookie_and_id = data[4:20]
    attributes: list[Attribute] = []
    for attribute_type, value in raw_attributes:
        decoder = _DECODERS.get(attribute_type)
        if decoder is None:
            attributes.append(RawAttribute(attribute_type, value))
            continue
        try:
            attributes.append(decoder(attribute_type, value, cookie_and_id))
        except (ValueError, UnicodeDecodeError, struct.error) as exc:
            # Framing was fine, so the sender of a request can be told: 400.
            raise StunParseError(
                f"bad attribute {attribute_type:#06x}: {exc}", header=header
            ) from None
    return StunMessage(
        method=header.method,
        cls=header.cls,
        transaction_id=header.transaction_id,
        attributes=tuple(attributes),
        fingerprint=fingerprint,
    )


def _cookie_and_id(transaction_id: bytes) -> bytes:
    if len(transaction_id) == 16:
        return transaction_id
    return MAGIC_COOKIE.to_bytes(4, "big") + transaction_id


def _encode_type(method: int, cls: StunClass) -> int:
    # RFC 5389 §6: M11-M7 C1 M6-M4 C0 M3-M0.
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def _decode_type(message_type: int) -> tuple[int, StunClass]:
    method = (
        (message_type & 0x000F) | ((message_type >> 1) & 0x0070) | ((message_type >> 2) & 0x0F80)
    )
    cls = StunClass(((message_type >> 4) & 0b01) | ((message_type >> 7) & 0b10))
    return method, cls


def _parse_header_untrusted(data: bytes) -> StunHeader:
    if len(data) < HEADER_SIZE:
        raise StunParseError("shorter than a STUN header")
    message_type, length = struct.unpack_from("!HH", data)
    # RFC 5389 §6: the two most significant bits are zero; this is how STUN is told apart from
    # RTP and other protocols on the same port.
    if message_type & 0xC000:
        raise StunParseError("top bits of the message type are not zero")
    if length != len(data) - HEADER_SIZE:
        raise StunParseError("length field does not match the datagram")
    if length % 4:
        raise StunParseError("length is not a multiple of 4")
    method, cls = _decode_type(message_type)
    # RFC 5389 §12.2: without the cookie the peer speaks RFC 3489 and the id is 128 bits.
    has_cookie = int.from_bytes(data[4:8], "big") == MAGIC_COOKIE
    transaction_id = data[8:20] if has_cookie else data[4:20]
    return StunHeader(method, cls, transaction_id)


def _split_attributes_untrusted(data: bytes) -> tuple[list[tuple[int, bytes]], bool]:
    attributes: list[tuple[int, bytes]] = []
    offset = HEADER_SIZE
    while offset < len(data):
        if len(data) - offset < 4:
            raise StunParseError("truncated attribute header")
        attribute_type, value_length = struct.unpack_from("!HH", data, offset)
        start = offset + 4
        end = start + value_length
        if start + value_length + (-value_length % 4) > len(data):
            raise StunParseError(f"attribute {attribute_type:#06x} runs past the message")
        if attribute_type == TYPE_FINGERPRINT:
            # RFC 5389 §15.5: FINGERPRINT is last, and a message whose CRC is wrong is not STUN.
            if value_length != 4 or end != len(data):
                raise StunParseError("FINGERPRINT is not a last 4-byte attribute")
            (received,) = struct.unpack_from("!I", data, start)
            expected = (zlib.crc32(data[:offset]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            if received != expected:
                raise StunParseError("FINGERPRINT does not match")
            return attributes, True
        attributes.append((attribute_type, data[start:end]))
        offset = end + (-value_length % 4)
    return attributes, False


def _encode_value(attribute: Attribute, cookie_and_id: bytes) -> tuple[int, bytes]:
    if isinstance(attribute, _AddressAttribute):
        return attribute.TYPE, _encode_address(attribute.address, attribute.XORED, cookie_and_id)
    if isinstance(attribute, ChangeRequest):
        flags = (_CHANGE_IP_FLAG if attribute.change_ip else 0) | (
            _CHANGE_PORT_FLAG if attribute.change_port else 0
        )
        return attribute.TYPE, struct.pack("!I", flags)
    if isinstance(attribute, Software):
        return attribute.TYPE, attribute.text.encode("utf-8")
    if isinstance(attribute, ErrorCode):
        # RFC 5389 §15.6: 21 reserved bits, a 3-bit class (hundreds), an 8-bit number.
        reason = attribute.reason.encode("utf-8")
        return attribute.TYPE, struct.pack(
            "!HBB", 0, attribute.code // 100, attribute.code % 100
        ) + reason
    if isinstance(attribute, UnknownAttributes):
        return attribute.TYPE, b"".join(struct.pack("!H", t) for t in attribute.types)
    return attribute.type, attribute.value


def _encode_address(address: TransportAddress, xored: bool, cookie_and_id: bytes) -> bytes:
    packed = ipaddress.ip_address(address.ip).packed
    port = address.port
    if xored:
        # RFC 5389 §15.2: the port with the cookie's top 16 bits, IPv4 with the cookie, IPv6
        # with cookie and transaction id. Using the header bytes 4..20 covers both, and gives
        # an RFC 3489 message a consistent meaning too.
        port ^= int.from_bytes(cookie_and_id[:2], "big")
        packed = bytes(a ^ b for a, b in zip(packed, cookie_and_id, strict=False))
    family = _FAMILY_IPV4 if len(packed) == 4 else _FAMILY_IPV6
    return struct.pack("!BBH", 0, family, port) + packed


def _decode_address(attribute_type: int, value: bytes, cookie_and_id: bytes) -> Attribute:
    if len(value) < 4:
        raise ValueError("address attribute too short")
    # RFC 5389 §15.1: the first byte is reserved and ignored.
    _, family, port = struct.unpack_from("!BBH", value)
    packed = value[4:]
    if (family, len(packed)) not in ((_FAMILY_IPV4, 4), (_FAMILY_IPV6, 16)):
        raise ValueError(f"bad address family {family} or length {len(value)}")
    kind = _ADDRESS_KINDS[attribute_type]
    if kind.XORED:
        port ^= int.from_bytes(cookie_and_id[:2], "big")
        packed = bytes(a ^ b for a, b in zip(packed, cookie_and_id, strict=False))
    ip = str(ipaddress.ip_address(packed))
    return kind(TransportAddress(ip, port))


def _decode_change_request(attribute_type: int, value: bytes, cookie_and_id: bytes) -> Attribute:
    (flags,) = struct.unpack("!I", value)  # struct.error unless exactly 4 bytes
    # RFC 5780 §7.2: the other bits are unused and ignored.
    return ChangeRequest(bool(flags & _CHANGE_IP_FLAG), bool(flags & _CHANGE_PORT_FLAG))


def _decode_software(attribute_type: int, value: bytes, cookie_and_id: bytes) -> Attribute:
    return Software(value.decode("utf-8"))


def _decode_error_code(attribute_type: int, value: bytes, cookie_and_id: bytes) -> Attribute:
    if len(value) < 4:
        raise ValueError("ERROR-CODE too short")
    error_class = value[2] & 0x07
    number = value[3]
    if not 3 <= error_class <= 6 or number > 99:
        raise ValueError(f"bad error code class {error_class} number {number}")
    return ErrorCode(error_class * 100 + number, value[4:].decode("utf-8"))


def _decode_unknown_attributes(
    attribute_type: int, value: bytes, cookie_and_id: bytes
) -> Attribute:
    if len(value) % 2:
        raise ValueError("UNKNOWN-ATTRIBUTES has an odd length")
    return UnknownAttributes(tuple(t for (t,) in struct.iter_unpack("!H", value)))


AddressAttribute: TypeAlias = (
    MappedAddress
    | XorMappedAddress
    | SourceAddress
    | ChangedAddress
    | ResponseOrigin
    | OtherAddress
)

_ADDRESS_KINDS: dict[int, type[AddressAttribute]] = {
    kind.TYPE: kind
    for kind in (
        MappedAddress,
        XorMappedAddress,
        SourceAddress,
        ChangedAddress,
        ResponseOrigin,
        OtherAddress,
    )
}

_DECODERS = {
    **{attribute_type: _decode_address for attribute_type in _ADDRESS_KINDS},
    TYPE_CHANGE_REQUEST: _decode_change_request,
    TYPE_SOFTWARE: _decode_software,
    TYPE_ERROR_CODE: _decode_error_code,
    TYPE_UNKNOWN_ATTRIBUTES: _decode_unknown_attributes,
}

# The attribute types this codec gives a class to: what a server "understands".
KNOWN_ATTRIBUTE_TYPES = frozenset(_DECODERS)
