"""Header names and header-value grammar of RFC 3261 §7.3 and §25.1.

This module owns: canonical header names and compact forms (RFC 3261 §7.3.3 and the later RFCs
that define one), splitting comma-separated values without breaking quoted strings or `<...>`,
generic parameters, quoted strings, and the structured values every SIP layer reads: name-addr /
addr-spec (From, To, Contact, Route, Record-Route), Via and CSeq.

It does not own the message (`message.py` keeps headers as raw text and calls these parsers
lazily, on access) nor any policy about what values a server accepts.

It is over 600 lines mostly because of the header-name table; the value parsers share the
quoted-string and parameter scanners, which is why they live together.

Parsed parameter dicts map lower-cased names to the value exactly as written (a quoted-string
value keeps its quotes; `unquote` removes them), or to `None` for a parameter without `=`.
Values are frozen dataclasses; their `params` dicts must not be changed in place either, since
messages cache parsed values: build a new value (`with_tag`, `with_params`, `dataclasses.replace`).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from shared.sip.errors import bad_request
from shared.sip.uri import (
    SipUri,
    Uri,
    format_host_port,
    parse_host_port_untrusted,
    parse_uri_untrusted,
)

# RFC 3261 §25.1: token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
# A parameter value that is not a quoted string. RFC 3261 §25.1 allows a token or a host
# (IPv6 references included); phones send a little more (`/`, `@`, non-ASCII), which is harmless
# since values are kept verbatim. What would change the parse is refused: whitespace, controls,
# and the delimiters `;` `,` `=` `"` `<` `>`.
_PARAM_VALUE_RE = re.compile(r'[^\x00-\x20\x7f;,="<>]+')
_WS = " \t"

# (canonical name, compact form or "") for every header name we spell canonically.
_KNOWN_NAMES: tuple[tuple[str, str], ...] = (
    ("Accept", ""),
    ("Accept-Contact", "a"),  # RFC 3841
    ("Accept-Encoding", ""),
    ("Accept-Language", ""),
    ("Alert-Info", ""),
    ("Allow", ""),
    ("Allow-Events", "u"),  # RFC 6665
    ("Authentication-Info", ""),
    ("Authorization", ""),
    ("Call-ID", "i"),
    ("Call-Info", ""),
    ("Contact", "m"),
    ("Content-Disposition", ""),
    ("Content-Encoding", "e"),
    ("Content-Language", ""),
    ("Content-Length", "l"),
    ("Content-Type", "c"),
    ("CSeq", ""),
    ("Date", ""),
    ("Error-Info", ""),
    ("Event", "o"),  # RFC 6665
    ("Expires", ""),
    ("Flow-Timer", ""),  # RFC 5626
    ("From", "f"),
    ("Identity", "y"),  # RFC 8224
    ("Identity-Info", "n"),  # RFC 4474
    ("In-Reply-To", ""),
    ("Max-Forwards", ""),
    ("MIME-Version", ""),
    ("Min-Expires", ""),
    ("Min-SE", ""),
    ("Organization", ""),
    ("P-Asserted-Identity", ""),
    ("P-Preferred-Identity", ""),
    ("Path", ""),
    ("Priority", ""),
    ("Privacy", ""),
    ("Proxy-Authenticate", ""),
    ("Proxy-Authorization", ""),
    ("Proxy-Require", ""),
    ("RAck", ""),
    ("Reason", ""),
    ("Record-Route", ""),
    ("Refer-To", "r"),  # RFC 3515
    ("Referred-By", "b"),  # RFC 3892
    ("Reject-Contact", "j"),  # RFC 3841
    ("Replaces", ""),
    ("Reply-To", ""),
    ("Request-Disposition", "d"),  # RFC 3841
    ("Require", ""),
    ("Retry-After", ""),
    ("Route", ""),
    ("RSeq", ""),
    ("Security-Client", ""),
    ("Security-Server", ""),
    ("Security-Verify", ""),
    ("Server", ""),
    ("Service-Route", ""),
    ("Session-Expires", "x"),  # RFC 4028
    ("SIP-ETag", ""),
    ("SIP-If-Match", ""),
    ("Subject", "s"),
    ("Subscription-State", ""),
    ("Supported", "k"),
    ("Timestamp", ""),
    ("To", "t"),
    ("Unsupported", ""),
    ("User-Agent", ""),
    ("Via", "v"),
    ("Warning", ""),
    ("WWW-Authenticate", ""),
)

CANONICAL_NAMES: dict[str, str] = {}
for _name, _compact in _KNOWN_NAMES:
    CANONICAL_NAMES[_name.lower()] = _name
    if _compact:
        CANONICAL_NAMES[_compact] = _name

# Headers whose grammar is a comma-separated list (RFC 3261 §7.3.1), so that several header
# lines and one line with commas mean the same. Authorization and friends are not: their
# values contain commas of their own.
LIST_HEADERS = frozenset(
    {
        "Accept",
        "Accept-Contact",
        "Accept-Encoding",
        "Accept-Language",
        "Alert-Info",
        "Allow",
        "Allow-Events",
        "Call-Info",
        "Contact",
        "Content-Encoding",
        "Content-Language",
        "Error-Info",
        "In-Reply-To",
        "P-Asserted-Identity",
        "P-Preferred-Identity",
        "Path",
        "Proxy-Require",
        "Reason",
        "Record-Route",
        "Reject-Contact",
        "Request-Disposition",
        "Require",
        "Route",
        "Security-Client",
        "Security-Server",
        "Security-Verify",
        "Service-Route",
        "Supported",
        "Unsupported",
        "Via",
        "Warning",
    }
)


def canonical_name(name: str) -> str:
    """The canonical spelling of a header name; compact forms are expanded (`v` -> `Via`).
    Unknown names are returned unchanged (they compare case-insensitively)."""
    return CANONICAL_NAMES.get(name.lower(), name)


def header_key(name: str) -> str:
    """The case-insensitive lookup key of a header name, compact forms included."""
    key = _KEY_MEMO.get(name)
    if key is not None:
        return key
    lower = name.lower()
    canonical = CANONICAL_NAMES.get(lower)
    key = canonical.lower() if canonical is not None else lower
    if len(_KEY_MEMO) < 4096:  # names come from our code, but stay bounded anyway
        _KEY_MEMO[name] = key
    return key


_KEY_MEMO: dict[str, str] = {}


def is_token(text: str) -> bool:
    return TOKEN_RE.fullmatch(text) is not None


def _scan_quoted(text: str, start: int) -> tuple[str, int]:
    """Read the quoted-string opening at `text[start]`; return (unescaped, index after it)."""
    out: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\\":
            # RFC 3261 §25.1: quoted-pair = "\" (%x00-09 / %x0B-0C / %x0E-7F)
            if i + 1 >= n or text[i + 1] in "\r\n":
                break
            out.append(text[i + 1])
            i += 2
            continue
        out.append(ch)
        i += 1
    raise bad_request("Unterminated quoted string")


def unquote(value: str) -> str:
    """The content of a quoted-string parameter value, or `value` itself if not quoted."""
    if value.startswith('"'):
        text, end = _scan_quoted(value, 0)
        if end != len(value):
            raise bad_request("Junk after quoted string")
        return text
    return value


def quote(text: str) -> str:
    """Make a quoted-string: backslash-escape `"`, `\\` and control characters; CR and LF
    cannot be escaped at all (RFC 3261 §25.1) and become spaces."""
    out = ['"']
    for ch in text:
        if ch in "\r\n":
            out.append(" ")
        elif ch in '"\\' or (ord(ch) < 0x20 and ch != "\t") or ch == "\x7f":
            out.append("\\" + ch)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def split_comma_untrusted(value: str) -> list[str]:
    """Split a header value at commas outside quoted strings and `<...>` (RFC 3261 §7.3.1).

    Items are stripped of surrounding whitespace; empty items are kept, so callers whose
    grammar forbids them can refuse them.
    """
    if '"' not in value and "<" not in value:
        return [item.strip(_WS) for item in value.split(",")]
    items: list[str] = []
    start = 0
    i = 0
    n = len(value)
    in_angle = False
    while i < n:
        ch = value[i]
        if ch == '"' and not in_angle:
            _, i = _scan_quoted(value, i)
            continue
        if ch == "<":
            in_angle = True
        elif ch == ">":
            in_angle = False
        elif ch == "," and not in_angle:
            items.append(value[start:i].strip(_WS))
            start = i + 1
        i += 1
    items.append(value[start:].strip(_WS))
    return items


def _split_semicolons(text: str) -> list[str]:
    if '"' not in text:
        return text.split(";")
    parts: list[str] = []
    start = 0
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            _, i = _scan_quoted(text, i)
            continue
        if ch == ";":
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def parse_params_untrusted(text: str, what: str = "header") -> dict[str, str | None]:
    """Parse `*( SEMI generic-param )` (RFC 3261 §25.1), with LWS allowed around `;` and `=`.

    `text` is what follows the main value: empty, or starting with `;`.
    """
    text = text.strip(_WS)
    if not text:
        return {}
    if text[0] != ";":
        raise bad_request(f"Junk before {what} parameters")
    params: dict[str, str | None] = {}
    for part in _split_semicolons(text)[1:]:
        name, eq, value = part.partition("=")
        name = name.strip(_WS)
        if not name:
            raise bad_request(f"Empty {what} parameter")
        if TOKEN_RE.fullmatch(name) is None:
            raise bad_request(f"Bad {what} parameter name")
        key = name.lower()
        if key in params:
            raise bad_request(f"Duplicate {what} parameter {key!r}")
        if not eq:
            params[key] = None
            continue
        value = value.strip(_WS)
        if value.startswith('"'):
            _, end = _scan_quoted(value, 0)
            if end != len(value):
                raise bad_request(f"Junk after quoted {what} parameter")
        elif _PARAM_VALUE_RE.fullmatch(value) is None:
            raise bad_request(f"Bad {what} parameter value")
        params[key] = value
    return params


def format_params(params: dict[str, str | None]) -> str:
    """`;name=value;flag` for a dict from `parse_params_untrusted`."""
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def _delta_seconds(text: str, what: str) -> int:
    """RFC 3261 §25.1 delta-seconds, at most 2**32-1 (§20.19)."""
    if not (0 < len(text) <= 10 and text.isascii() and text.isdigit()):
        raise bad_request(f"Bad {what}")
    value = int(text)
    if value > 0xFFFFFFFF:
        raise bad_request(f"{what} out of range")
    return value


@dataclass(frozen=True, slots=True)
class Address:
    """A name-addr or addr-spec with its header parameters: From, To, Contact, Route, ...

    `display_name` is the unquoted display name or None; `params` are the header parameters
    after the address (`tag`, `expires`, `q`, ...), not the URI's own parameters.
    """

    uri: Uri
    display_name: str | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    def __str__(self) -> str:
        # Always the name-addr form: an addr-spec would give URI parameters and header
        # parameters the same syntax (RFC 3261 §20.10).
        name = "" if self.display_name is None else quote(self.display_name) + " "
        return f"{name}<{self.uri}>{format_params(self.params)}"

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @property
    def expires(self) -> int | None:
        """The Contact `expires` parameter (RFC 3261 §10.2.1.1), or None; `SipParseError` (400)
        if it is no number below 2**32 (a validated message's contacts have been checked)."""
        if "expires" not in self.params:
            return None
        return _delta_seconds(self.params["expires"] or "", "Contact expires")

    @property
    def q(self) -> float | None:
        """The Contact `q` parameter (RFC 3261 §20.10 qvalue), or None; `SipParseError` (400)
        if malformed (a validated message's contacts have been checked)."""
        if "q" not in self.params:
            return None
        text = self.params["q"] or ""
        head, _, frac = text.partition(".")
        ok = (
            head in ("0", "1")
            and len(frac) <= 3
            and (not frac or (frac.isascii() and frac.isdigit()))
            and not (head == "1" and frac.strip("0"))
        )
        if not ok:
            raise bad_request("Bad Contact q value")
        return float(text)

    def with_tag(self, tag: str) -> Address:
        params = dict(self.params)
        params["tag"] = tag
        return Address(self.uri, self.display_name, params)


def _check_uri_text(text: str, what: str) -> None:
    if not text:
        raise bad_request(f"Empty URI in {what}")
    if " " in text or "\t" in text:
        raise bad_request(f"Whitespace inside the URI of {what}")


def parse_address_untrusted(value: str, what: str = "address") -> Address:
    """Parse `( name-addr / addr-spec ) *( SEMI param )` (RFC 3261 §20.10, §25.1)."""
    text = value.strip(_WS)
    display: str | None = None
    if text.startswith('"'):
        display, end = _scan_quoted(text, 0)
        rest = text[end:].lstrip(_WS)
        if not rest.startswith("<"):
            raise bad_request(f"Display name without <URI> in {what}")
        return _finish_name_addr(rest, display, what)
    lt = text.find("<")
    first_semi = text.find(";")
    # An unquoted display name is tokens, so a '<' after the first ';' is inside a parameter.
    if lt >= 0 and (first_semi < 0 or lt < first_semi):
        before = text[:lt].strip(_WS)
        if before:
            words = before.split()
            for word in words:
                if TOKEN_RE.fullmatch(word) is None:
                    # RFC 4475 §3.1.2.15: an unquoted display name is tokens only.
                    raise bad_request(f"Non-token characters in display name of {what}")
            display = " ".join(words)
        return _finish_name_addr(text[lt:], display, what)
    # addr-spec: RFC 3261 §20.10: a URI with ',', ';' or '?' must be in <>, so the first ';'
    # starts the header parameters.
    uri_text, semi, params_text = text.partition(";")
    uri_text = uri_text.rstrip(_WS)
    _check_uri_text(uri_text, what)
    if "?" in uri_text or "," in uri_text:
        # RFC 4475 §3.1.2.13
        raise bad_request(f"URI with '?' or ',' not enclosed in <> in {what}")
    uri = parse_uri_untrusted(uri_text)
    params = parse_params_untrusted(semi + params_text, what) if semi else {}
    return Address(uri, None, params)


def _finish_name_addr(text: str, display: str | None, what: str) -> Address:
    gt = text.find(">")
    if gt < 0:
        raise bad_request(f"Unterminated <URI> in {what}")
    uri_text = text[1:gt]
    # RFC 4475 §3.1.2.14: no spaces inside the angle brackets.
    _check_uri_text(uri_text, what)
    uri = parse_uri_untrusted(uri_text)
    params = parse_params_untrusted(text[gt + 1 :], what)
    return Address(uri, display, params)


def parse_address_list_untrusted(values: list[str], what: str) -> list[Address]:
    """Every address of a list header (Contact, Route, Record-Route, Path, ...) in order."""
    out: list[Address] = []
    for value in values:
        for item in split_comma_untrusted(value):
            if not item:
                raise bad_request(f"Empty element in {what}")
            out.append(parse_address_untrusted(item, what))
    return out


@dataclass(frozen=True, slots=True)
class Via:
    """One Via element (RFC 3261 §20.42): transport, sent-by and parameters."""

    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    protocol: str = "SIP/2.0"

    def __str__(self) -> str:
        return f"{self.protocol}/{self.transport} {format_host_port(self.host, self.port)}" + (
            format_params(self.params)
        )

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def has_rport(self) -> bool:
        """True when the client asked for symmetric response routing (RFC 3581 §3)."""
        return "rport" in self.params

    @property
    def rport(self) -> int | None:
        """The rport value filled in by a server (RFC 3581 §4), None when absent or empty."""
        value = self.params.get("rport")
        return int(value) if value else None

    @property
    def sent_by(self) -> str:
        return format_host_port(self.host, self.port)

    def with_params(self, **params: str | None) -> Via:
        """A copy with parameters set (`received=...`, `rport=...`)."""
        merged = dict(self.params)
        merged.update(params)
        return Via(self.transport, self.host, self.port, merged, self.protocol)


def parse_via_untrusted(value: str) -> Via:
    """Parse one via-parm: `SIP / 2.0 / UDP host[:port] *( ; param )` (LWS around '/')."""
    name, slash1, rest = value.partition("/")
    version, slash2, rest = rest.partition("/")
    if not slash1 or not slash2:
        raise bad_request("Malformed Via sent-protocol")
    name = name.strip(_WS)
    version = version.strip(_WS)
    rest = rest.lstrip(_WS)
    # transport token ends at LWS; sent-by follows after LWS.
    i = 0
    n = len(rest)
    while i < n and rest[i] not in " \t;":
        i += 1
    transport = rest[:i]
    rest = rest[i:].lstrip(_WS)
    j = 0
    n = len(rest)
    while j < n and rest[j] not in " \t;":
        j += 1
    sent_by = rest[:j]
    params_text = rest[j:]
    for part, label in ((name, "protocol name"), (version, "version"), (transport, "transport")):
        if TOKEN_RE.fullmatch(part) is None:
            raise bad_request(f"Bad Via {label}")
    if not sent_by:
        raise bad_request("Via without sent-by")
    host, port = parse_host_port_untrusted(sent_by, "Via sent-by")
    params = parse_params_untrusted(params_text, "Via")
    _check_via_params(params)
    return Via(transport.upper(), host, port, params, f"{name.upper()}/{version}")


def _is_ip_address(text: str) -> bool:
    """Whether `text` is an IP address (IPv6 perhaps in brackets). Remembered for short texts:
    every response we route carries the `received` we stamped, and the same few addresses come
    back; a long text (no address is longer than 64 characters) is never kept."""
    if len(text) > 64:
        return False
    return _is_short_ip_address(text)


@functools.lru_cache(maxsize=4096)
def _is_short_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def _check_via_params(params: dict[str, str | None]) -> None:
    if "branch" in params and not params["branch"]:
        raise bad_request("Empty Via branch")
    received = params.get("received")
    if received is not None and not _is_ip_address(received):
        raise bad_request("Via received is not an IP address")
    rport = params.get("rport")
    if rport is not None and not (rport.isascii() and rport.isdigit() and int(rport) <= 65535):
        raise bad_request("Bad Via rport")
    ttl = params.get("ttl")
    if ttl is not None and not (ttl.isascii() and ttl.isdigit() and int(ttl) <= 255):
        raise bad_request("Bad Via ttl")


def parse_via_list_untrusted(values: list[str]) -> list[Via]:
    out: list[Via] = []
    for value in values:
        for item in split_comma_untrusted(value):
            if not item:
                # RFC 4475 §3.1.2.1: `Via: ...;;,;,,` has empty elements.
                raise bad_request("Empty Via element")
            out.append(parse_via_untrusted(item))
    return out


class CSeq(NamedTuple):
    """RFC 3261 §20.16: a sequence number and the request method."""

    seq: int
    method: str

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"


def parse_cseq_untrusted(value: str) -> CSeq:
    parts = value.split()
    if len(parts) != 2:
        raise bad_request("Malformed CSeq")
    number, method = parts
    # RFC 3261 §8.1.1.5: a 32-bit unsigned integer less than 2**31.
    if not (0 < len(number) <= 10 and number.isascii() and number.isdigit()):
        raise bad_request("Bad CSeq number")
    seq = int(number)
    if seq >= 2**31:
        raise bad_request("CSeq number out of range")
    if TOKEN_RE.fullmatch(method) is None:
        raise bad_request("Bad CSeq method")
    return CSeq(seq, method)


def parse_delta_seconds_untrusted(value: str, what: str) -> int:
    """An Expires / Min-Expires value (RFC 3261 §20.19): 0 .. 2**32-1."""
    return _delta_seconds(value.strip(_WS), what)


def parse_max_forwards_untrusted(value: str) -> int:
    """RFC 3261 §20.22: 1*DIGIT; RFC 4475 §3.1.2.4 treats values above 255 as invalid."""
    text = value.strip(_WS)
    if not (0 < len(text) <= 10 and text.isascii() and text.isdigit()):
        raise bad_request("Bad Max-Forwards")
    hops = int(text)
    if hops > 255:
        raise bad_request("Max-Forwards out of range")
    return hops


def parse_token_list_untrusted(values: list[str], what: str) -> list[str]:
    """Option tags and methods (Require, Supported, Allow, ...); empty items are skipped."""
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip(_WS)
            if not item:
                continue
            if TOKEN_RE.fullmatch(item) is None:
                raise bad_request(f"Bad token in {what}")
            out.append(item)
    return out


def sip_uri_of(address: Address) -> SipUri | None:
    """The address's URI if it is a sip:/sips: URI."""
    return address.uri if isinstance(address.uri, SipUri) else None
