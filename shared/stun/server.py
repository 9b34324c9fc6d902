"""The STUN server's decisions, without sockets: one datagram in, at most one reply out.

This module owns what the main host's STUN service answers (RFC 5389 §7.3, RFC 5780 §6.1, and
the RFC 3489 §8 behaviour classic NAT-type probes such as pystun3 rely on), from which of the
server's local addresses each reply leaves, and the service's counters.

It does not own sockets or the receive loops (`mainhost.stun`), the codec
(`shared.stun.message`), or authentication: the service has no credentials, so USERNAME and
MESSAGE-INTEGRITY are understood and ignored (RFC 5389 §10 applies only to a server that uses a
credential mechanism).

The server may have up to four local transport addresses: the primary IP and the optional
alternate IP (RFC 5780 §6: they need two IPs to tell cone NATs apart), each with the primary
and the alternate port.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from shared.stun.message import (
    BINDING,
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
    StunHeader,
    StunMessage,
    StunParseError,
    TransportAddress,
    UnknownAttributes,
    XorMappedAddress,
    is_comprehension_required,
    parse_message_untrusted,
)

# Comprehension-required attributes that we understand but have no use for: the credential
# attributes of RFC 5389 §15.3-15.8 (this server has no credentials to check them against).
_UNDERSTOOD_AND_IGNORED = frozenset({0x0006, 0x0008, 0x0014, 0x0015})

# RFC 3489 §11.2.2 RESPONSE-ADDRESS (0x0002) is deliberately not understood: honouring it would
# let anyone aim our replies at a third party, which is why RFC 5389 dropped it. Such requests
# get 420.


@dataclass(frozen=True)
class ServerAddresses:
    """Where the STUN service listens.

    `alternate_port` gives two ports on each IP; `alternate_ip` a second IP (RFC 5780 §6 needs
    both for NAT-type discovery). With neither, CHANGE-REQUEST is refused with 420.
    """

    primary_ip: str
    primary_port: int
    alternate_port: int | None = None
    alternate_ip: str | None = None

    def __post_init__(self) -> None:
        primary = ipaddress.ip_address(self.primary_ip)
        object.__setattr__(self, "primary_ip", str(primary))
        if self.alternate_ip is not None:
            alternate = ipaddress.ip_address(self.alternate_ip)
            object.__setattr__(self, "alternate_ip", str(alternate))
            if alternate.version != primary.version or alternate == primary:
                raise ValueError("the alternate IP must be another address of the same family")
            if primary.is_unspecified or alternate.is_unspecified:
                raise ValueError("with an alternate IP both IPs must be specific addresses")
        if self.alternate_port is not None and self.alternate_port == self.primary_port:
            raise ValueError("the alternate port must differ from the primary port")

    def local_addresses(self) -> tuple[TransportAddress, ...]:
        """Every (ip, port) the service must have a socket on, primary first."""
        ips = [self.primary_ip] + ([self.alternate_ip] if self.alternate_ip else [])
        ports = [self.primary_port] + (
            [self.alternate_port] if self.alternate_port is not None else []
        )
        return tuple(TransportAddress(ip, port) for ip in ips for port in ports)

    def other_ip(self, ip: str) -> str | None:
        if self.alternate_ip is None:
            return None
        return self.alternate_ip if ip == self.primary_ip else self.primary_ip

    def other_port(self, port: int) -> int | None:
        if self.alternate_port is None:
            return None
        return self.alternate_port if port == self.primary_port else self.primary_port

    def shows(self, ip: str) -> bool:
        # A wildcard bind has no address worth telling the client.
        return not ipaddress.ip_address(ip).is_unspecified


@dataclass(frozen=True)
class StunReply:
    """A datagram to send: `data` from our `local` address to the client's `remote` address."""

    data: bytes
    local: TransportAddress
    remote: TransportAddress


@dataclass(frozen=True)
class StunServerStatistics:
    received: int = 0
    answered: int = 0
    """Replies produced, success and error alike."""
    errors: int = 0
    """Of `answered`, how many were error responses (400, 420)."""
    dropped: int = 0
    """Malformed datagrams, non-requests, datagrams for an address we do not serve."""


class StunServer:
    """Answers Binding requests. One instance serves all of the service's sockets."""

    def __init__(
        self,
        addresses: ServerAddresses,
        *,
        software: str | None = "branchpbx",
        logger: logging.Logger | None = None,
    ) -> None:
        self.addresses = addresses
        self._software = Software(software) if software else None
        self._logger = logger or logging.getLogger(__name__)
        self._local = frozenset(addresses.local_addresses())
        self._received = 0
        self._answered = 0
        self._errors = 0
        self._dropped = 0

    def statistics(self) -> StunServerStatistics:
        return StunServerStatistics(self._received, self._answered, self._errors, self._dropped)

    def handle_datagram_untrusted(
        self, data: bytes, local: TransportAddress, remote: TransportAddress
    ) -> StunReply | None:
        """Decide the reply to one datagram that arrived on `local` from `remote`.

        Never raises on bad input: whatever cannot be answered is dropped and counted.
        """
        self._received += 1
        if local not in self._local or remote.port == 0:
            self._drop("datagram for %s from %s is not ours to answer", local, remote)
            return None
        try:
            request = parse_message_untrusted(data)
        except StunParseError as exc:
            if exc.header is not None and exc.header.cls is StunClass.REQUEST:
                # RFC 5389 §15.6: the request was malformed.
                return self._error(exc.header, False, 400, "Bad Request", local, remote)
            self._drop("unparsable datagram from %s: %s", remote, exc.reason)
            return None
        if request.cls is not StunClass.REQUEST:
            # RFC 5389 §7.3.2: indications (keepalives) get no answer; nor do stray responses.
            self._drop("%s from %s needs no answer", request.cls.name, remote)
            return None
        if request.method != BINDING:
            return self._error(
                request.header, request.fingerprint, 400, "Unsupported method", local, remote
            )

        change = request.get(ChangeRequest) or ChangeRequest(False, False)
        source_ip = self.addresses.other_ip(local.ip) if change.change_ip else local.ip
        source_port = self.addresses.other_port(local.port) if change.change_port else local.port
        unknown = [
            attribute.type
            for attribute in request.attributes
            if isinstance(attribute, RawAttribute)
            and is_comprehension_required(attribute.type)
            and attribute.type not in _UNDERSTOOD_AND_IGNORED
        ]
        if source_ip is None or source_port is None:
            if request.is_rfc3489:
                # RFC 3489 §8.1 has no error for this (its servers always had two addresses),
                # so a classic client takes silence as "the reply was filtered". It takes an
                # error response as a reason to retransmit: pystun3 would loop for ever.
                self._drop("unhonourable CHANGE-REQUEST from RFC 3489 client %s", remote)
                return None
            # RFC 5780 §6.1: a CHANGE-REQUEST we cannot honour is answered with 420, listing
            # CHANGE-REQUEST as the attribute not understood.
            unknown.append(TYPE_CHANGE_REQUEST)
        if unknown or source_ip is None or source_port is None:
            # RFC 5389 §7.3.1: unknown comprehension-required attributes get 420.
            unique = tuple(dict.fromkeys(unknown))
            return self._error(
                request.header,
                request.fingerprint,
                420,
                "Unknown Attribute",
                local,
                remote,
                UnknownAttributes(unique),
            )
        source = TransportAddress(source_ip, source_port)
        attributes = self._success_attributes(request, local, source, remote)
        response = StunMessage(
            BINDING, StunClass.SUCCESS, request.transaction_id, attributes, request.fingerprint
        )
        self._answered += 1
        return StunReply(response.encode(), source, remote)

    def _success_attributes(
        self,
        request: StunMessage,
        local: TransportAddress,
        source: TransportAddress,
        remote: TransportAddress,
    ) -> tuple[Attribute, ...]:
        addresses = self.addresses
        other_ip = addresses.other_ip(local.ip)
        other_port = addresses.other_port(local.port)
        # RFC 3489 §11.2.3 / RFC 5780 §7.4: where a reply with both change flags set would come
        # from, relative to the address the request reached.
        other = (
            TransportAddress(other_ip, other_port)
            if other_ip is not None and other_port is not None
            else None
        )
        shows_source = addresses.shows(source.ip)
        if request.is_rfc3489:
            # RFC 3489 §8.1: MAPPED-ADDRESS, SOURCE-ADDRESS, CHANGED-ADDRESS. No SOFTWARE: it
            # postdates RFC 3489, and pystun3 cannot walk past attribute padding.
            classic: list[Attribute] = [MappedAddress(remote)]
            if shows_source:
                classic.append(SourceAddress(source))
            if other is not None:
                classic.append(ChangedAddress(other))
            return tuple(classic)
        # RFC 5389 §7.3.1 XOR-MAPPED-ADDRESS; RFC 5780 §6.1 asks for MAPPED-ADDRESS too, and
        # RESPONSE-ORIGIN, and OTHER-ADDRESS when there is an alternate address.
        modern: list[Attribute] = [XorMappedAddress(remote), MappedAddress(remote)]
        if shows_source:
            modern.append(ResponseOrigin(source))
        if other is not None:
            modern.append(OtherAddress(other))
        if self._software is not None:
            modern.append(self._software)
        return tuple(modern)

    def _error(
        self,
        header: StunHeader,
        fingerprint: bool,
        code: int,
        reason: str,
        local: TransportAddress,
        remote: TransportAddress,
        *extra: Attribute,
    ) -> StunReply:
        attributes: list[Attribute] = [ErrorCode(code, reason), *extra]
        if self._software is not None and len(header.transaction_id) == 12:
            attributes.append(self._software)
        response = StunMessage(
            header.method, StunClass.ERROR, header.transaction_id, tuple(attributes), fingerprint
        )
        self._answered += 1
        self._errors += 1
        self._logger.debug("STUN %d %s to %s", code, reason, remote)
        return StunReply(response.encode(), local, remote)

    def _drop(self, message: str, *args: object) -> None:
        self._dropped += 1
        self._logger.debug("STUN drop: " + message, *args)
