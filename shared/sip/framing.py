"""Cutting a TCP/TLS byte stream into SIP messages (RFC 3261 §18.3) and spotting keepalives.

This module owns `SipStreamFramer`, a sans-I/O buffer in the style of h11: the transport feeds
it bytes with `receive_data` and pulls `next_message()` until it returns None. A message is its
header section plus exactly Content-Length octets of body; on a stream the Content-Length is
mandatory (RFC 3261 §18.3, §20.14). CRLFs between messages are not silently skipped but reported,
because RFC 5626 §4.4.1 makes them a keepalive: a CRLFCRLF "ping" must be answered with a single
CRLF "pong", so the transport needs to see both. It also owns `is_datagram_keepalive` for the
CRLF and NUL keepalives phones send over UDP.

It does not parse the messages it cuts (`parse_message_untrusted` does) and does not own the
socket: answering a ping, closing the connection after an error and reading timeouts are the
transport's business. Every buffer is bounded by `SipLimits`.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.sip.errors import SipParseError, bad_request
from shared.sip.message import (
    DEFAULT_LIMITS,
    SipLimits,
    SipRequest,
    content_length_of_head,
    parse_message_untrusted,
)

KEEPALIVE_PING = b"\r\n\r\n"
"""RFC 5626 §4.4.1: what a client sends to probe a flow."""
KEEPALIVE_PONG = b"\r\n"
"""RFC 5626 §4.4.1: what a server answers to a ping."""


@dataclass(frozen=True, slots=True)
class KeepAlivePing:
    """The peer sent a CRLFCRLF ping: send `KEEPALIVE_PONG` back (RFC 5626 §4.4.1)."""


@dataclass(frozen=True, slots=True)
class KeepAlivePong:
    """The peer sent a single CRLF: the pong to our ping, or a stray CRLF before a message
    (RFC 3261 §7.5), which needs no answer either way."""


FramerEvent = bytes | KeepAlivePing | KeepAlivePong


class SipStreamFramer:
    """Frames one direction of one stream connection.

    `client=True` is for our side of a flow we opened: there a lone CRLF is a pong and is
    reported at once. On the server side (the default) a lone CRLF at the end of the buffer is
    held until the next bytes show whether it is half of a ping split across two segments.

    After an error the stream cannot be resynchronised: `next_message()` raises the same
    `SipParseError` again, and the transport should answer (see `error_response`) and close.
    """

    def __init__(self, limits: SipLimits = DEFAULT_LIMITS, *, client: bool = False) -> None:
        self._limits = limits
        self._client = client
        self._buffer = bytearray()
        self._scanned = 0  # how far the search for the end of the header section got
        self._needed: int | None = None  # total length of the message being received
        self._error: SipParseError | None = None
        self._eof = False
        self.pings_received = 0
        self.messages_received = 0

    @property
    def buffered(self) -> int:
        """Octets received and not yet returned."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the stream; `b""` means the peer closed its side.

        Call `next_message()` until it returns None after each call: then at most one partial
        message stays buffered, below `max_message_size`. A caller that does not drain gets a
        `SipParseError` (513) here instead of an unbounded buffer.
        """
        if self._error is not None:
            return  # the stream is dead; next_message() says why
        if len(self._buffer) > self._limits.max_message_size:
            self._error = SipParseError(513, "Message Too Large")
            raise self._error
        if not data:
            self._eof = True
            return
        self._buffer += data

    def next_message(self) -> FramerEvent | None:
        """The next complete message (bytes) or keepalive, or None if more data is needed.

        Raises `SipParseError`: 400 for a missing or malformed Content-Length, 413 for a body
        above `max_body_size`, 513 for a message above `max_message_size`, 400 when the peer
        closed the stream in the middle of a message.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except SipParseError as exc:
            self._error = exc
            raise

    def _next(self) -> FramerEvent | None:
        buffer = self._buffer
        if self._needed is None and buffer.startswith(KEEPALIVE_PONG):
            if buffer.startswith(KEEPALIVE_PING):
                del buffer[:4]
                self.pings_received += 1
                return KeepAlivePing()
            third = buffer[2:3]
            # A CRLF then CR may be the first half of a ping split across segments; on the
            # server side so may a CRLF alone. Wait for the next octets unless none will come.
            maybe_ping = (third == b"\r" and len(buffer) < 4) or (not third and not self._client)
            if maybe_ping and not self._eof:
                return None
            del buffer[:2]
            return KeepAlivePong()
        if self._needed is None:
            end = buffer.find(b"\r\n\r\n", self._scanned)
            if end < 0:
                if len(buffer) > self._limits.max_message_size:
                    raise SipParseError(513, "Message Too Large")
                self._scanned = max(0, len(buffer) - 3)
                self._check_eof()
                return None
            self._needed = self._frame(bytes(buffer[:end]), end + 4)
        needed = self._needed
        if len(buffer) < needed:
            self._check_eof()
            return None
        message = bytes(buffer[:needed])
        del buffer[:needed]
        self._needed = None
        self._scanned = 0
        self.messages_received += 1
        return message

    def _frame(self, head: bytes, body_start: int) -> int:
        limits = self._limits
        try:
            length = content_length_of_head(head)
            if length is None:
                raise bad_request("Missing Content-Length on a stream transport")
            if length > limits.max_body_size:
                raise SipParseError(413, "Body Too Large")
            if body_start + length > limits.max_message_size:
                raise SipParseError(513, "Message Too Large")
        except SipParseError as exc:
            exc.request = _request_of(head)
            raise
        return body_start + length

    def _check_eof(self) -> None:
        if self._eof and self._buffer:
            raise bad_request("Connection closed in the middle of a message")


def _request_of(head: bytes) -> SipRequest | None:
    """The request a framing error is about, if its header section can be read, so that the
    transport can answer before closing (RFC 3261 §18.3 asks for a 400)."""
    try:
        message = parse_message_untrusted(head + b"\r\n\r\n")
    except SipParseError:
        return None
    return message if isinstance(message, SipRequest) else None


def is_datagram_keepalive(data: bytes) -> bool:
    """True for a UDP datagram that is only a keepalive: CRLFs (the RFC 5626 ping sent over
    UDP by many phones) or NULs (some phones' NAT keepalive). Never a SIP message."""
    return bool(data) and not data.strip(b"\r\n\x00 \t")
