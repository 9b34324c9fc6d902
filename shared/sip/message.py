"""SIP requests and responses: parsing a datagram, serializing, validating, building responses.

This module owns the message value (`SipRequest` / `SipResponse`: start line, an ordered list of
headers, body bytes), `parse_message_untrusted` for one whole message (RFC 3261 §7, §18.3 for
datagrams), `encode()`, the request and response checks of RFC 3261 §8.2 / §16.3 that RFC 4475
exercises (`validate_request_untrusted`, `validate_response_untrusted`), and `make_response`
(RFC 3261 §8.2.6).

Parsing is split in two on purpose. `parse_message_untrusted` only frames: start line, header
lines (folding undone, compact names expanded), Content-Length and body. Header values stay raw
text; the typed accessors (`vias`, `cseq`, `to`, ...) parse them on first access and cache the
result, so a REGISTER pays only for what the registrar reads. The validators then read every
header a SIP layer relies on, so after validation the accessors no longer raise. The received
bytes are kept: an unchanged message encodes to exactly those bytes without re-serializing.

It does not frame TCP streams (`framing.py`), match transactions or dialogs, or decide policy
beyond the RFC's syntax rules (which schemes and extensions are supported are arguments).

The module is long because the message, its header container, the accessors and the checks
share private state (the raw bytes, the parsed-value cache); splitting them would expose it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from shared.sip.errors import SipParseError, bad_request
from shared.sip.headers import (
    CANONICAL_NAMES,
    TOKEN_RE,
    Address,
    CSeq,
    Via,
    canonical_name,
    header_key,
    parse_address_list_untrusted,
    parse_address_untrusted,
    parse_cseq_untrusted,
    parse_delta_seconds_untrusted,
    parse_max_forwards_untrusted,
    parse_token_list_untrusted,
    parse_via_list_untrusted,
    parse_via_untrusted,
    split_comma_untrusted,
)
from shared.sip.uri import SipUri, Uri, parse_uri_untrusted

T = TypeVar("T")

SIP_VERSION = "SIP/2.0"

# RFC 3261 §21 and the later RFCs' reason phrases, for responses we build.
REASON_PHRASES: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    423: "Interval Too Brief",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    485: "Ambiguous",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    489: "Bad Event",
    491: "Request Pending",
    493: "Undecipherable",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}


@dataclass(frozen=True, slots=True)
class SipLimits:
    """Bounds on what we read from the network; beyond them a message is refused, not read."""

    max_message_size: int = 65535
    """Largest whole message in octets (a UDP datagram's maximum); larger -> 513."""
    max_body_size: int = 65535
    """Largest body in octets; a larger Content-Length -> 413."""
    max_header_count: int = 256
    """Most header lines (after unfolding); more -> 400."""
    max_line_length: int = 8192
    """Longest start line or header line in characters; longer -> 400."""
    max_uri_length: int = 4096
    """Longest Request-URI in characters; longer -> 414 (RFC 3261 §21.4.12)."""


DEFAULT_LIMITS = SipLimits()

# Headers that may appear at most once (RFC 3261 §7.3.1: only list headers may repeat).
_SINGLETONS = ("Call-ID", "CSeq", "From", "To", "Max-Forwards", "Content-Type", "Expires")


def _check_header_text(name: str, value: str) -> None:
    # Local programming errors, not remote ones: a CR or LF would inject headers.
    if TOKEN_RE.fullmatch(name) is None:
        raise ValueError(f"invalid SIP header name {name!r}")
    if "\r" in value or "\n" in value:
        raise ValueError(f"CR/LF in value of SIP header {name!r}")


class Headers:
    """An ordered list of `(name, value)` with case-insensitive, compact-form-aware lookup.

    Names are stored canonically (`v` and `VIA` become `Via`; unknown names as written).
    Values are raw text, unfolded. Every mutation clears the parsed-value cache and bumps
    `generation`, which is how a message knows its received bytes are stale.
    """

    __slots__ = ("_cache", "_index", "_items", "_keys", "generation")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = []
        self._keys: list[str] = []
        self._cache: dict[str, object] = {}
        self._index: dict[str, list[str]] | None = None
        self.generation = 0
        for name, value in items:
            self.add(name, value)

    @classmethod
    def _trusted(cls, items: list[tuple[str, str]], keys: list[str]) -> Headers:
        headers = cls.__new__(cls)
        headers._items = items
        headers._keys = keys
        headers._cache = {}
        headers._index = None
        headers.generation = 0
        return headers

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return self._keys == other._keys and [v for _, v in self._items] == [
            v for _, v in other._items
        ]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def _lookup(self, name: str) -> list[str] | None:
        index = self._index
        if index is None:
            # Built on the first look-up after a change: one pass instead of one per look-up.
            index = {}
            for key, (_, value) in zip(self._keys, self._items, strict=True):
                found = index.get(key)
                if found is None:
                    index[key] = [value]
                else:
                    found.append(value)
            self._index = index
        return index.get(header_key(name))

    def get(self, name: str) -> str | None:
        """The value of the first header called `name`, or None."""
        found = self._lookup(name)
        return None if found is None else found[0]

    def get_all(self, name: str) -> list[str]:
        """The value of every header line called `name`, in order."""
        found = self._lookup(name)
        return [] if found is None else list(found)

    def values(self, name: str) -> list[str]:
        """Every comma-separated element of every header line called `name` (RFC 3261 §7.3.1).
        Only meaningful for list headers; empty elements are dropped."""
        out: list[str] = []
        for value in self.get_all(name):
            out.extend(item for item in split_comma_untrusted(value) if item)
        return out

    def add(self, name: str, value: str) -> None:
        """Append a header line."""
        _check_header_text(name, value)
        key = header_key(name)
        self._touch(key)
        self._items.append((canonical_name(name), value))
        self._keys.append(key)

    def add_first(self, name: str, value: str) -> None:
        """Insert a header line above every other line of that name (a new top Via, a
        Record-Route), or at the top of the message if there is none."""
        _check_header_text(name, value)
        key = header_key(name)
        self._touch(key)
        index = self._keys.index(key) if key in self._keys else 0
        self._items.insert(index, (canonical_name(name), value))
        self._keys.insert(index, key)

    def set(self, name: str, value: str) -> None:
        """Replace every line called `name` by one line, where the first one was."""
        _check_header_text(name, value)
        key = header_key(name)
        self._touch(key)
        if key not in self._keys:
            self._items.append((canonical_name(name), value))
            self._keys.append(key)
            return
        index = self._keys.index(key)
        self.remove(name)
        self._items.insert(index, (canonical_name(name), value))
        self._keys.insert(index, key)

    def replace_first(self, name: str, value: str) -> None:
        """Replace the value of the first line called `name` where it stands (a top Via
        stamped with `received`), or insert a line at the top if there is none."""
        _check_header_text(name, value)
        key = header_key(name)
        if key not in self._keys:
            self.add_first(name, value)
            return
        self._touch(key)
        index = self._keys.index(key)
        self._items[index] = (canonical_name(name), value)

    def remove(self, name: str) -> int:
        """Remove every line called `name`; return how many there were."""
        key = header_key(name)
        keep = [i for i, k in enumerate(self._keys) if k != key]
        removed = len(self._keys) - len(keep)
        if removed:
            self._touch(key)
            self._items = [self._items[i] for i in keep]
            self._keys = [self._keys[i] for i in keep]
        return removed

    def remove_first(self, name: str) -> str | None:
        """Remove the first line called `name` (the top Via, the first Route); return it."""
        key = header_key(name)
        if key not in self._keys:
            return None
        self._touch(key)
        index = self._keys.index(key)
        del self._keys[index]
        return self._items.pop(index)[1]

    def copy(self) -> Headers:
        return Headers._trusted(list(self._items), list(self._keys))

    def cached(self, slot: str, parse: Callable[[], T]) -> T:
        """`parse()` once until the header it reads changes: the lazy parsing behind the
        accessors. `slot` is the header's lookup key (`header_key`), or that key, a colon and
        a name for a second view of the same header (`via:top`): a change to a header drops
        only the slots named after it, so stamping the top Via keeps From, To, Contact and
        the rest parsed."""
        value = self._cache.get(slot, _UNSET)
        if value is _UNSET:
            value = parse()
            self._cache[slot] = value
        return value  # type: ignore[return-value]

    def _touch(self, key: str) -> None:
        cache = self._cache
        if cache:
            prefix = key + ":"
            for slot in [s for s in cache if s == key or s.startswith(prefix)]:
                del cache[slot]
        self._index = None
        self.generation += 1


_UNSET = object()


class _Accessors:
    """Typed, lazily parsed views of the headers, shared by requests and responses.

    Accessors raise `SipParseError` (400) when the header is missing (if mandatory), repeated
    (if single-valued) or malformed; after `validate_*_untrusted` they do not raise.
    """

    __slots__ = ()
    headers: Headers
    body: bytes
    _raw: bytes | None
    _raw_stamp: tuple[object, ...] | None

    def _stamp(self) -> tuple[object, ...]:
        raise NotImplementedError

    @property
    def start_line(self) -> str:
        raise NotImplementedError

    @property
    def raw(self) -> bytes | None:
        """The exact bytes this message was parsed from, while it is unchanged."""
        return self._raw if _stamp_matches(self._raw_stamp, self._stamp()) else None

    def encode(self) -> bytes:
        """Serialize with a correct Content-Length; unchanged messages return their bytes."""
        raw = self.raw
        if raw is not None:
            return raw
        data = _encode(self.start_line, self.headers, self.body)
        # The slots are the dataclasses' (SipRequest, SipResponse), not this mixin's.
        self._raw = data  # type: ignore[misc]
        self._raw_stamp = self._stamp()  # type: ignore[misc]
        return data

    def _single(self, name: str) -> str | None:
        values = self.headers._lookup(name) or ()
        if len(values) > 1:
            # RFC 4475 §3.3.8
            raise bad_request(f"Multiple {name} header fields")
        return values[0] if values else None

    def _required(self, name: str) -> str:
        value = self._single(name)
        if value is None:
            raise bad_request(f"Missing {name} header field")
        return value

    @property
    def call_id(self) -> str:
        def parse() -> str:
            value = self._required("Call-ID")
            # RFC 3261 §25.1: callid = word [ "@" word ]; no whitespace.
            if not value or " " in value or "\t" in value:
                raise bad_request("Malformed Call-ID")
            return value

        return self.headers.cached("call-id", parse)

    @property
    def cseq(self) -> CSeq:
        return self.headers.cached("cseq", lambda: parse_cseq_untrusted(self._required("CSeq")))

    @property
    def vias(self) -> list[Via]:
        """Every Via element, top first (RFC 3261 §20.42)."""
        # A fresh list each time: the cached one must not be changed by a caller.
        return list(self.headers.cached("via", lambda: parse_via_list_untrusted(self._vias_raw())))

    def _vias_raw(self) -> list[str]:
        values = self.headers.get_all("Via")
        if not values:
            raise bad_request("Missing Via header field")
        return values

    @property
    def top_via(self) -> Via:
        """The top Via alone: parsed without the others, so that a reply can be routed even
        when a lower Via is broken (RFC 3261 §18.2.2), and cheaply."""

        def parse() -> Via:
            every = self.headers._cache.get("via")
            if every:  # validation parsed them all already
                return every[0]  # type: ignore[index,no-any-return]
            first = split_comma_untrusted(self._vias_raw()[0])[0]
            if not first:
                raise bad_request("Empty Via element")
            return parse_via_untrusted(first)

        return self.headers.cached("via:top", parse)

    @property
    def branch(self) -> str | None:
        """The branch of the top Via: the transaction key of RFC 3261 §17.2.3."""
        return self.top_via.branch

    @property
    def from_(self) -> Address:
        return self.headers.cached(
            "from", lambda: parse_address_untrusted(self._required("From"), "From")
        )

    @property
    def to(self) -> Address:
        return self.headers.cached(
            "to", lambda: parse_address_untrusted(self._required("To"), "To")
        )

    @property
    def from_tag(self) -> str | None:
        return self.from_.tag

    @property
    def to_tag(self) -> str | None:
        return self.to.tag

    @property
    def contact_is_star(self) -> bool:
        """True for `Contact: *` (RFC 3261 §10.2.2, remove all bindings)."""
        return self.headers.cached("contact:star", self._parse_star)

    def _parse_star(self) -> bool:
        values = self.headers.get_all("Contact")
        stars = sum(1 for v in values if v.strip() == "*")
        if stars == 0:
            return False
        if stars != 1 or len(values) != 1:
            raise bad_request("Contact '*' must stand alone")
        return True

    @property
    def contacts(self) -> list[Address]:
        """Every Contact address; empty for no Contact and for `Contact: *`."""

        def parse() -> list[Address]:
            if self.contact_is_star:
                return []
            contacts = parse_address_list_untrusted(self.headers.get_all("Contact"), "Contact")
            for contact in contacts:
                # Read them now so that a malformed value is refused at validation time.
                _ = contact.expires, contact.q
            return contacts

        return list(self.headers.cached("contact", parse))

    @property
    def routes(self) -> list[Address]:
        return list(
            self.headers.cached(
                "route",
                lambda: parse_address_list_untrusted(self.headers.get_all("Route"), "Route"),
            )
        )

    @property
    def record_routes(self) -> list[Address]:
        return list(
            self.headers.cached(
                "record-route",
                lambda: parse_address_list_untrusted(
                    self.headers.get_all("Record-Route"), "Record-Route"
                ),
            )
        )

    @property
    def max_forwards(self) -> int | None:
        def parse() -> int | None:
            value = self._single("Max-Forwards")
            return None if value is None else parse_max_forwards_untrusted(value)

        return self.headers.cached("max-forwards", parse)

    @property
    def expires(self) -> int | None:
        """The Expires header (RFC 3261 §20.19), or None."""

        def parse() -> int | None:
            value = self._single("Expires")
            return None if value is None else parse_delta_seconds_untrusted(value, "Expires")

        return self.headers.cached("expires", parse)

    @property
    def content_length(self) -> int | None:
        """The Content-Length header as sent, or None (the parser has checked it)."""
        value = self.headers.get("Content-Length")
        return None if value is None else _parse_content_length(value)

    @property
    def content_type(self) -> str | None:
        return self._single("Content-Type")

    def option_tags(self, name: str) -> list[str]:
        """The tokens of Require, Proxy-Require, Supported, Unsupported, Allow, ..."""
        return list(
            self.headers.cached(
                header_key(name) + ":tokens",
                lambda: parse_token_list_untrusted(self.headers.get_all(name), name),
            )
        )


def _stamp_matches(stamp: tuple[object, ...] | None, current: tuple[object, ...]) -> bool:
    # Identity for the headers object and the body, equality for the short start-line strings.
    if stamp is None:
        return False
    return all(
        a is b or (type(a) in (str, int) and a == b) for a, b in zip(stamp, current, strict=True)
    )


@dataclass(slots=True, eq=True)
class SipRequest(_Accessors):
    """A SIP request. `uri` is the Request-URI text; `request_uri` is it parsed."""

    method: str
    uri: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    version: str = SIP_VERSION
    _raw: bytes | None = field(default=None, repr=False, compare=False)
    _raw_stamp: tuple[object, ...] | None = field(default=None, repr=False, compare=False)
    _uri_cache: tuple[str, Uri] | None = field(default=None, repr=False, compare=False)

    def _stamp(self) -> tuple[object, ...]:
        return (self.method, self.uri, self.version, self.headers, self.headers.generation,
                self.body)  # fmt: skip

    def copy(self) -> SipRequest:
        """An independent copy (its own headers) that still re-sends the received bytes."""
        twin = SipRequest(self.method, self.uri, self.headers.copy(), self.body, self.version)
        _copy_raw(self, twin)
        return twin

    @property
    def request_uri(self) -> Uri:
        """The Request-URI parsed (cached while `uri` is unchanged)."""
        cache = self._uri_cache
        if cache is not None and cache[0] == self.uri:
            return cache[1]
        parsed = parse_uri_untrusted(self.uri)
        self._uri_cache = (self.uri, parsed)
        return parsed

    @property
    def start_line(self) -> str:
        return f"{self.method} {self.uri} {self.version}"


@dataclass(slots=True, eq=True)
class SipResponse(_Accessors):
    """A SIP response."""

    status: int
    reason: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    version: str = SIP_VERSION
    _raw: bytes | None = field(default=None, repr=False, compare=False)
    _raw_stamp: tuple[object, ...] | None = field(default=None, repr=False, compare=False)

    def _stamp(self) -> tuple[object, ...]:
        return (str(self.status), self.reason, self.version, self.headers,
                self.headers.generation, self.body)  # fmt: skip

    def copy(self) -> SipResponse:
        """An independent copy (its own headers) that still re-sends the received bytes."""
        twin = SipResponse(self.status, self.reason, self.headers.copy(), self.body, self.version)
        _copy_raw(self, twin)
        return twin

    @property
    def start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"


SipMessage = SipRequest | SipResponse


def _copy_raw(original: SipMessage, twin: SipMessage) -> None:
    raw = original.raw
    if raw is not None:
        twin._raw = raw
        twin._raw_stamp = twin._stamp()


def _encode(start_line: str, headers: Headers, body: bytes) -> bytes:
    if "\r" in start_line or "\n" in start_line:
        # A local programming error (a reason phrase or URI with a line break), not a remote one.
        raise ValueError(f"CR/LF in SIP start line {start_line!r}")
    lines = [start_line]
    length_written = False
    for (name, value), key in zip(headers._items, headers._keys, strict=True):
        if key == "content-length":
            # RFC 3261 §18.3 / §20.14: always one, always right.
            if not length_written:
                lines.append(f"Content-Length: {len(body)}")
                length_written = True
            continue
        lines.append(f"{name}: {value}")
    if not length_written:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8") + body


def _parse_content_length(value: str) -> int:
    text = value.strip(" \t")
    if not (0 < len(text) <= 10 and text.isascii() and text.isdigit()):
        # RFC 4475 §3.1.2.3: a negative (or otherwise non-numeric) Content-Length.
        raise bad_request("Bad Content-Length")
    return int(text)


def _name_info(name: str) -> tuple[str, str]:
    """(canonical name, lookup key) of a header name as written; refuses non-tokens."""
    canonical = CANONICAL_NAMES.get(name.lower())
    if canonical is not None:
        return canonical, canonical.lower()
    if TOKEN_RE.fullmatch(name) is None:
        raise bad_request("Bad header name")
    return name, name.lower()


# The spellings phones actually send, looked up without lower-casing.
_NAME_INFO: dict[str, tuple[str, str]] = {}
for _lower, _canonical in CANONICAL_NAMES.items():
    for _spelling in (_lower, _canonical, _lower.upper()):
        _NAME_INFO[_spelling] = (_canonical, _canonical.lower())


def split_head_untrusted(
    head: bytes, limits: SipLimits = DEFAULT_LIMITS
) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Split a header section (without the final empty line) into the start line and the
    unfolded `(canonical name, value)` pairs with their lookup keys (RFC 3261 §7.3.1)."""
    # RFC 3261 §7: lines end in CRLF; a bare CR or LF would let a value smuggle a line.
    if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
        raise bad_request("Bare CR or LF in header section")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("Header section is not UTF-8") from None
    lines = text.split("\r\n")
    max_line = limits.max_line_length
    # Only a header section longer than the line limit can hold a line that is too long.
    check_lines = len(head) > max_line
    start_line = lines[0]
    if check_lines and len(start_line) > max_line:
        raise bad_request("Start line too long")
    items: list[tuple[str, str]] = []
    keys: list[str] = []
    folded = False
    known_names = _NAME_INFO
    for line in lines[1:]:
        if check_lines and len(line) > max_line:
            raise bad_request("Header line too long")
        if line[:1] in (" ", "\t"):
            # RFC 3261 §7.3.1: a line starting with whitespace continues the previous value.
            if not items:
                raise bad_request("Continuation line before the first header")
            name, value = items[-1]
            items[-1] = (name, value + " " + line.strip(" \t"))
            folded = True
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise bad_request("Header line without a colon")
        # RFC 3261 §7.3.1 / §25.1 HCOLON: whitespace may precede the colon.
        info = known_names.get(name)
        if info is None:
            name = name.rstrip(" \t")
            info = _name_info(name)
        items.append((info[0], value.strip(" \t")))
        keys.append(info[1])
        if len(keys) > limits.max_header_count:
            raise bad_request("Too many header fields")
    if folded:
        items = [(name, value.strip(" \t")) for name, value in items]
    return start_line, items, keys


def parse_message_untrusted(
    data: bytes, limits: SipLimits = DEFAULT_LIMITS
) -> SipRequest | SipResponse:
    """Parse one whole message: a UDP datagram, or what `SipStreamFramer` cut from a stream.

    The Content-Length governs the body (RFC 3261 §18.3): octets beyond it are discarded
    (RFC 4475 §3.1.2.8 leaves them to be dropped), fewer octets than it announces is an error,
    and without it the body is the rest of the datagram. Raises only `SipParseError`; when the
    request line and headers were read, the error carries the request so that a reply can be
    built, see `error_response`.
    """
    if len(data) > limits.max_message_size:
        raise SipParseError(513, "Message Too Large")
    start = 0
    # RFC 3261 §7.5: CRLFs before the start line are ignored.
    while data.startswith(b"\r\n", start):
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        raise bad_request("No empty line after the header section")
    start_line, items, keys = split_head_untrusted(data[start:end], limits)
    headers = Headers._trusted(items, keys)
    body_start = end + 4
    available = len(data) - body_start
    message: SipRequest | SipResponse
    if start_line.startswith("SIP/"):
        version, _, rest = start_line.partition(" ")
        code, _, reason = rest.partition(" ")
        # RFC 3261 §7.2: Status-Code = 3DIGIT; RFC 4475 §3.1.2.19 overlarge codes.
        if not (len(code) == 3 and code.isascii() and code.isdigit() and "1" <= code[0] <= "6"):
            raise bad_request("Bad status code")
        message = SipResponse(int(code), reason, headers, b"", version)
        request: SipRequest | None = None
    else:
        method, sp, rest = start_line.partition(" ")
        uri, sp2, version = rest.rpartition(" ")
        if not method or not sp or not sp2:
            raise bad_request("Malformed request line")
        # Semantic checks of the request line (URI, version) wait for validation, so that the
        # error can carry the request and be answered.
        request = message = SipRequest(method, uri, headers, b"", version)
    lengths = [v for v, k in zip(items, keys, strict=True) if k == "content-length"]
    try:
        if len(lengths) > 1:
            # RFC 4475 §3.3.9: no way to know which one is right.
            raise bad_request("Multiple Content-Length header fields")
        if lengths:
            length = _parse_content_length(lengths[0][1])
            if length > limits.max_body_size:
                raise SipParseError(413, "Body Too Large")
            if length > available:
                # RFC 3261 §18.3 / RFC 4475 §3.1.2.2
                raise bad_request("Content-Length larger than the message")
            body = data[body_start : body_start + length]
            end_of_message = body_start + length
        else:
            body = data[body_start:]
            end_of_message = len(data)
    except SipParseError as exc:
        exc.request = request
        raise
    message.body = body
    if lengths:
        # Keep the received bytes so an unchanged message is re-sent as it came; only when
        # it carried a Content-Length, which a stream transport needs.
        raw = data if start == 0 and end_of_message == len(data) else data[start:end_of_message]
        message._raw = raw
        message._raw_stamp = message._stamp()
    return message


def _version_error(version: str) -> SipParseError | None:
    if version == SIP_VERSION:
        return None
    name, slash, number = version.partition("/")
    major, dot, minor = number.partition(".")
    if (
        name.upper() == "SIP"
        and slash
        and dot
        and major.isascii()
        and major.isdigit()
        and minor.isascii()
        and minor.isdigit()
    ):
        # RFC 3261 §8.2.2 (via §21.5.6) / RFC 4475 §3.1.2.16
        if version.upper() == SIP_VERSION:
            return None
        return SipParseError(505, "Version Not Supported")
    return bad_request("Malformed SIP version")


def _check_common(msg: SipRequest | SipResponse) -> None:
    """The checks shared by requests and responses: every header a SIP layer reads."""
    for name in _SINGLETONS:
        msg._single(name)
    _ = msg.call_id, msg.cseq, msg.vias, msg.from_, msg.to
    _ = msg.max_forwards, msg.expires, msg.contacts, msg.routes, msg.record_routes
    date = msg.headers.get("Date")
    if date is not None and not date.rstrip(" \t").endswith(" GMT"):
        # RFC 3261 §20.17: rfc1123-date, always "GMT"; RFC 4475 §3.1.2.12.
        raise bad_request("Date is not in GMT")


def validate_request_untrusted(
    msg: SipRequest,
    *,
    limits: SipLimits = DEFAULT_LIMITS,
    supported_schemes: Sequence[str] = ("sip", "sips", "tel"),
    supported_extensions: Iterable[str] = (),
    proxy: bool = False,
) -> None:
    """The checks of RFC 3261 §8.2 (a UAS) or §16.3 (a proxy, `proxy=True`) that need no state.

    Raises `SipParseError` carrying `msg` and the status to answer: 400 for syntax (RFC 4475
    §3.1.2), 414 for an overlong Request-URI, 416 for a Request-URI scheme not in
    `supported_schemes`, 420 (with an Unsupported header) for a Require (a proxy: a
    Proxy-Require) option tag not in `supported_extensions`, 505 for another SIP version.
    Content type, authorization and Max-Forwards of zero are left to the layer above.
    """
    try:
        _validate_request(msg, limits, supported_schemes, supported_extensions, proxy)
    except SipParseError as exc:
        exc.request = msg
        raise


def _validate_request(
    msg: SipRequest,
    limits: SipLimits,
    supported_schemes: Sequence[str],
    supported_extensions: Iterable[str],
    proxy: bool,
) -> None:
    uri = msg.uri
    if len(uri) > limits.max_uri_length:
        raise SipParseError(414, "Request-URI Too Long")
    # RFC 3261 §7.1: Method SP Request-URI SP SIP-Version, single spaces, no <> (RFC 4475
    # §3.1.2.7 to §3.1.2.10). The parser split at the first and the last space, so any other
    # whitespace in the line ended up in the URI.
    if not uri:
        raise bad_request("Empty Request-URI")
    if uri[0] in " \t" or uri[-1] in " \t" or not msg.version:
        raise bad_request("Extra whitespace in the request line around the Request-URI")
    if " " in uri or "\t" in uri:
        raise bad_request("Whitespace inside the Request-URI")
    if "<" in uri or ">" in uri:
        raise bad_request("Request-URI enclosed in <>")
    version_error = _version_error(msg.version)
    if version_error is not None:
        raise version_error
    if TOKEN_RE.fullmatch(msg.method) is None:
        raise bad_request("Malformed method")
    _check_common(msg)
    if msg.cseq.method != msg.method:
        # RFC 3261 §8.1.1.5 / RFC 4475 §3.1.2.17, §3.1.2.18
        raise bad_request("CSeq method does not match the request method")
    if msg.contact_is_star and msg.method != "REGISTER":
        raise bad_request("Contact '*' outside REGISTER")
    # The scheme decides 416 before we try to understand the rest (RFC 3261 §8.2.2.1).
    scheme = uri.partition(":")[0].lower()
    if scheme not in supported_schemes:
        raise SipParseError(416, "Unsupported URI Scheme")
    request_uri = msg.request_uri
    if isinstance(request_uri, SipUri) and request_uri.headers:
        # RFC 3261 §19.1.1 table: headers are not allowed in a Request-URI (RFC 4475 §3.1.2.11).
        raise bad_request("Headers in the Request-URI")
    if msg.method in ("ACK", "CANCEL"):
        # RFC 3261 §8.2.2.3: Require is not checked for ACK and CANCEL.
        return
    wanted = msg.option_tags("Proxy-Require" if proxy else "Require")
    supported = {tag.lower() for tag in supported_extensions}
    unsupported = [tag for tag in wanted if tag.lower() not in supported]
    if unsupported:
        raise SipParseError(420, "Bad Extension", headers=[("Unsupported", ", ".join(unsupported))])


def validate_response_untrusted(msg: SipResponse) -> None:
    """The checks a response must pass before a client transaction sees it (RFC 3261 §8.1.3.1,
    §18.1.2). A response that fails is dropped: the error never carries a request."""
    version_error = _version_error(msg.version)
    if version_error is not None:
        raise bad_request(f"Response with {version_error.reason}")
    _check_common(msg)


def make_response(
    request: SipRequest,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> SipResponse:
    """A response to `request` per RFC 3261 §8.2.6.2: Via (all, in order), From, To, Call-ID and
    CSeq copied; `to_tag` added to To when it has none (not for 100, §8.2.6.2); Timestamp
    copied into a 100 (§8.2.6.1). Works on a request that failed validation, copying whatever
    is there, so that a 400 can be sent for it."""
    source = request.headers
    # The request's values are already CR/LF-free; copy them without re-checking.
    items = [("Via", value) for value in source.get_all("Via")]
    keys = ["via"] * len(items)
    for name, key in _COPIED_TO_RESPONSES:
        copied = source.get(name)
        if copied is None:
            continue
        if key == "to" and to_tag is not None and status != 100:
            copied = _add_tag(request, copied, to_tag)
        items.append((name, copied))
        keys.append(key)
    if status == 100:
        timestamp = source.get("Timestamp")
        if timestamp is not None:
            items.append(("Timestamp", timestamp))
            keys.append("timestamp")
    out = Headers._trusted(items, keys)
    # What the request has parsed of the copied headers holds for the copies too: a response
    # is routed by its top Via (RFC 3261 §18.2.2), which need not be parsed again.
    parsed = source._cache
    for slot in _SEEDED_IN_RESPONSES:
        value = parsed.get(slot, _UNSET)
        if value is not _UNSET:
            out._cache[slot] = value
    for name, value in headers:
        out.add(name, value)
    return SipResponse(status, reason or REASON_PHRASES.get(status, "Unknown"), out, body)


# Views of the headers make_response copies verbatim (To may get a tag, so it is not here).
_SEEDED_IN_RESPONSES = ("via", "via:top", "from", "call-id", "cseq")


_COPIED_TO_RESPONSES = (("From", "from"), ("To", "to"), ("Call-ID", "call-id"), ("CSeq", "cseq"))


def _add_tag(request: SipRequest, to_value: str, tag: str) -> str:
    try:
        if request.to.tag is not None:
            return to_value
    except SipParseError:
        return to_value  # a broken To is answered as it came
    return f"{to_value};tag={tag}"


def error_response(exc: SipParseError, *, to_tag: str | None = None) -> SipResponse | None:
    """The reply to send for a parse or validation error, or None when the message must be
    dropped (a malformed response, or a request too broken to answer)."""
    if exc.request is None or exc.request.method == "ACK":
        # RFC 3261 §17.2.1: an ACK is never answered.
        return None
    return make_response(exc.request, exc.status, exc.reason, to_tag=to_tag, headers=exc.headers)


def generate_tag() -> str:
    """A From/To tag with at least 32 bits of randomness (RFC 3261 §19.3)."""
    return secrets.token_hex(8)


def generate_branch() -> str:
    """A Via branch with the RFC 3261 magic cookie (§8.1.1.7)."""
    return "z9hG4bK" + secrets.token_hex(10)


def content_length_of_head(head: bytes) -> int | None:
    """The Content-Length of a raw header section, for stream framing (RFC 3261 §18.3).

    Reads only what it needs: lines whose name is `Content-Length` or `l`. Raises
    `SipParseError` for several or a malformed one.
    """
    found: bytes | None = None
    lines = head.split(b"\r\n")
    count = len(lines)
    for i, line in enumerate(lines):
        if line[:1] not in (b"C", b"c", b"L", b"l"):
            continue
        name, colon, value = line.partition(b":")
        if not colon or name.rstrip(b" \t").lower() not in (b"content-length", b"l"):
            continue
        if found is not None:
            raise bad_request("Multiple Content-Length header fields")
        # A folded Content-Length would be odd, but is legal (RFC 3261 §7.3.1).
        j = i + 1
        while j < count and lines[j][:1] in (b" ", b"\t"):
            value += b" " + lines[j]
            j += 1
        found = value
    if found is None:
        return None
    return _parse_content_length(found.decode("latin-1"))
