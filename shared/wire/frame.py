"""Trunk framing: length-prefixed frames carrying a type code and a channel.

This module owns the byte layout of one frame and the incremental decoder that cuts a TCP (TLS)
byte stream into frames. It does not know what a type code means (see `messages.py`) nor any
connection state (see `session.py`).

A frame (all integers big-endian, see docs/wire-protocol.md)::

    +----------------+--------+--------+----------------+------------------+
    | length (u32)   | type   | flags  | channel (u32)  | body (length B)  |
    |                | (u16)  | (u16)  |                | msgpack          |
    +----------------+--------+--------+----------------+------------------+

`channel` 0 is the control channel; every call gets its own channel number so that many calls'
signalling can share the one connection without parsing each other's bodies. The type code sits
outside the msgpack body so that a frame of an unknown type can be skipped without decoding it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

HEADER = struct.Struct(">IHHI")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: a whole office directory fits; anything bigger is abuse
CONTROL_CHANNEL = 0


class ErrorCode:
    """Wire error codes, sent in a Close message before the connection is dropped."""

    NORMAL = 0
    BAD_FRAME = 1
    TOO_LARGE = 2
    BAD_MESSAGE = 3
    UNSUPPORTED_VERSION = 4
    PROTOCOL = 5
    AUTH_FAILED = 6
    REPLACED = 7
    TIMEOUT = 8
    SHUTDOWN = 9

    NAMES = {
        0: "normal",
        1: "bad frame",
        2: "frame too large",
        3: "bad message",
        4: "unsupported version",
        5: "protocol violation",
        6: "authentication failed",
        7: "replaced by a newer login",
        8: "timeout",
        9: "shutdown",
    }


class WireError(Exception):
    """The peer sent something that breaks the trunk protocol; `code` is the ErrorCode."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{ErrorCode.NAMES.get(self.code, 'error')}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    channel: int
    body: bytes
    flags: int = 0


def encode_frame(type_code: int, body: bytes, *, channel: int = 0, flags: int = 0) -> bytes:
    return HEADER.pack(len(body), type_code, flags, channel) + body


class FrameDecoder:
    """Cuts a byte stream into frames; holds at most one frame's worth of unread bytes.

    Two ways to read: `next_frame_untrusted()` returns one `Frame` at a time, and
    `frames_untrusted()` yields every complete frame in the buffer as a plain tuple. The second
    is the session's hot path: one header unpack and one body slice per frame, and no object
    built that the caller would take apart at once.
    """

    def __init__(self, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.max_body = max_body
        self._buffer = bytearray()
        self._offset = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._offset

    def next_frame_untrusted(self) -> Frame | None:
        """Return the next complete frame, None if more bytes are needed; raise WireError."""
        for type_code, flags, channel, body in self.frames_untrusted():
            return Frame(type_code, channel, bytes(body), flags)
        return None

    def frames_untrusted(self) -> Iterator[tuple[int, int, int, bytearray]]:
        """Yield (type, flags, channel, body) for each complete frame; raise WireError.

        A frame is consumed when it is yielded, so a caller may stop at any frame (a Close,
        say) and the rest stays buffered. The body is a copy: the caller may keep it. When no
        complete frame is left, the consumed bytes are dropped from the buffer.
        """
        buffer = self._buffer
        unpack_from = HEADER.unpack_from
        max_body = self.max_body
        end = len(buffer)
        while True:
            offset = self._offset
            if end - offset < HEADER_SIZE:
                break
            length, type_code, flags, channel = unpack_from(buffer, offset)
            if length > max_body:
                # Checked before buffering the body, so a peer cannot make us hold a huge frame.
                raise WireError(
                    ErrorCode.TOO_LARGE, f"frame body of {length} bytes exceeds {max_body}"
                )
            start = offset + HEADER_SIZE
            stop = start + length
            if stop > end:
                break
            self._offset = stop
            yield type_code, flags, channel, buffer[start:stop]
        self._compact()

    def _compact(self) -> None:
        if self._offset:
            del self._buffer[: self._offset]
            self._offset = 0
