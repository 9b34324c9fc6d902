"""The SIP message layer: pure, sans-I/O parsing and serializing (RFC 3261, RFC 4475).

Re-exports the names most callers need; the modules say what each owns. A transport reads a
datagram like this::

    try:
        msg = parse_message_untrusted(data)
        if isinstance(msg, SipRequest):
            validate_request_untrusted(msg, supported_extensions=SUPPORTED)
        else:
            validate_response_untrusted(msg)
    except SipParseError as exc:
        reply = error_response(exc, to_tag=generate_tag())  # None: drop silently
        ...

and a stream through `SipStreamFramer`, whose `next_message()` yields message bytes (for
`parse_message_untrusted`) or keepalive events (answer a `KeepAlivePing` with a CRLF).
"""

from shared.sip.errors import SipParseError
from shared.sip.framing import (
    KeepAlivePing,
    KeepAlivePong,
    SipStreamFramer,
    is_datagram_keepalive,
)
from shared.sip.headers import (
    Address,
    CSeq,
    Via,
    canonical_name,
    parse_address_untrusted,
    parse_via_untrusted,
)
from shared.sip.message import (
    DEFAULT_LIMITS,
    Headers,
    SipLimits,
    SipMessage,
    SipRequest,
    SipResponse,
    error_response,
    generate_branch,
    generate_tag,
    make_response,
    parse_message_untrusted,
    validate_request_untrusted,
    validate_response_untrusted,
)
from shared.sip.uri import AbsoluteUri, SipUri, TelUri, Uri, parse_uri_untrusted

__all__ = [
    "DEFAULT_LIMITS",
    "AbsoluteUri",
    "Address",
    "CSeq",
    "Headers",
    "KeepAlivePing",
    "KeepAlivePong",
    "SipLimits",
    "SipMessage",
    "SipParseError",
    "SipRequest",
    "SipResponse",
    "SipStreamFramer",
    "SipUri",
    "TelUri",
    "Uri",
    "Via",
    "canonical_name",
    "error_response",
    "generate_branch",
    "generate_tag",
    "is_datagram_keepalive",
    "make_response",
    "parse_address_untrusted",
    "parse_message_untrusted",
    "parse_uri_untrusted",
    "parse_via_untrusted",
    "validate_request_untrusted",
    "validate_response_untrusted",
]
