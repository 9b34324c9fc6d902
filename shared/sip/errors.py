"""The one exception the SIP message layer raises about bytes it was given.

This module owns `SipParseError`: what was wrong with a remote peer's SIP message, and the reply
to send for it (RFC 3261 §8.2, §21.4; RFC 4475 says which status each torture message earns).
It does not send anything and does not know transports: the transport decides, from the error,
whether a reply can be built (`request` is set) or the datagram is dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.sip.message import SipRequest


class SipParseError(Exception):
    """A remote peer sent a malformed or unacceptable SIP message: the remote's fault.

    `status` and `reason` are the status line of the reply to send (400, 413, 414, 416, 420,
    505, 513, ...); `reason` names what was wrong, so it is also fit for a Warning header or a
    log line. `headers` are extra headers the reply must carry (for example `Unsupported` with
    a 420, RFC 3261 §8.2.2.3). `request` is the request as far as it could be read, set when
    enough of it was understood to build a reply with `make_response`; when it is `None` the
    message cannot be answered and is dropped (always so for malformed responses, RFC 3261
    §18.1.2 / RFC 4475 §3.1.2.19).
    """

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        request: SipRequest | None = None,
    ) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers: tuple[tuple[str, str], ...] = tuple(headers)
        self.request = request

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


def bad_request(reason: str) -> SipParseError:
    """Shorthand for the common case: `400 <reason>`."""
    return SipParseError(400, reason)
