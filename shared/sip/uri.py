"""SIP, SIPS and tel URIs: parsing, serializing and comparing (RFC 3261 §19.1, §25.1; RFC 3966).

This module owns the URI value types (`SipUri`, `TelUri`, `AbsoluteUri`) and the escaping rules
of RFC 3261 §19.1.2: parsed components hold *unescaped* text, and `str()` escapes exactly what
the grammar requires, so `%75ser` and `user` parse to the same value (§19.1.4). Host names keep
their case and IPv6 references keep their brackets (`[2001:db8::1]`), as they appear on the wire.

It does not resolve hosts (RFC 3263 belongs to the transport layer) and it does not know which
schemes a server accepts: `validate_request_untrusted` in `message.py` answers 416 for those.
Values are frozen; their `params` dicts are not to be mutated (build a new URI with
`dataclasses.replace`).
"""

from __future__ import annotations

import ipaddress
import re
import string
from dataclasses import dataclass, field

from shared.sip.errors import SipParseError, bad_request

_ALNUM = frozenset(string.ascii_letters + string.digits)
# RFC 3261 §25.1: unreserved = alphanum / mark
_UNRESERVED = _ALNUM | frozenset("-_.!~*'()")
_USER_SAFE = _UNRESERVED | frozenset("&=+$,;?/")
_PASSWORD_SAFE = _UNRESERVED | frozenset("&=+$,")
_PARAM_SAFE = _UNRESERVED | frozenset("[]/:&+$")
_HEADER_SAFE = _UNRESERVED | frozenset("[]/?:+$")
_SCHEME_CHARS = _ALNUM | frozenset("+-.")
_TEL_CHARS = frozenset(string.digits + "+-.()*#abcdefABCDEF")
_HEX = frozenset(string.hexdigits)
# Characters never allowed raw anywhere in a URI: whitespace, controls, and the delimiters that
# would end the URI inside a header (RFC 3261 §25.1 has no rule admitting them).
_FORBIDDEN_RE = re.compile(r'[\x00-\x20\x7f<>"{}|\\^`]')


def _charset_re(safe: frozenset[str]) -> re.Pattern[str]:
    """A regex matching any character outside `safe` and '%' (escapes are checked apart)."""
    return re.compile("[^" + "".join(re.escape(ch) for ch in sorted(safe | {"%"})) + "]")


# Per-component character checks run in C: these are on the path of every message.
_BAD_USER = _charset_re(_USER_SAFE)
_BAD_PASSWORD = _charset_re(_PASSWORD_SAFE)
_BAD_PARAM = _charset_re(_PARAM_SAFE)
_BAD_HEADER = _charset_re(_HEADER_SAFE)
_BAD_HOST = re.compile(r"[^A-Za-z0-9\-._]")


def _unescape(text: str, what: str) -> str:
    """Undo %HH escapes (RFC 3261 §19.1.2); malformed escapes are the sender's error."""
    if "%" not in text:
        return text
    out = bytearray()
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "%":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or not (pair[0] in _HEX and pair[1] in _HEX):
                raise bad_request(f"Bad escape in URI {what}")
            out.append(int(pair, 16))
            i += 3
        else:
            out += ch.encode("utf-8")
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"Escaped URI {what} is not UTF-8") from None


def _escape(text: str, safe: frozenset[str]) -> str:
    """Escape every character outside `safe` as %HH of its UTF-8 octets (RFC 3261 §19.1.2)."""
    if all(ch in safe for ch in text):
        return text
    parts: list[str] = []
    for ch in text:
        if ch in safe:
            parts.append(ch)
        else:
            parts.extend(f"%{octet:02X}" for octet in ch.encode("utf-8"))
    return "".join(parts)


def _check_chars(text: str, bad: re.Pattern[str], what: str) -> None:
    if bad.search(text) is not None:
        raise bad_request(f"Invalid character in URI {what}")


def _parse_params(parts: list[str], what: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for part in parts:
        name, eq, value = part.partition("=")
        if not name:
            raise bad_request(f"Empty {what} parameter")
        _check_chars(name, _BAD_PARAM, f"{what} parameter")
        key = _unescape(name, f"{what} parameter").lower()
        if key in params:
            raise bad_request(f"Duplicate {what} parameter {key!r}")
        if eq:
            _check_chars(value, _BAD_PARAM, f"{what} parameter")
            params[key] = _unescape(value, f"{what} parameter")
        else:
            params[key] = None
    return params


def _format_params(params: dict[str, str | None]) -> str:
    out: list[str] = []
    for name, value in params.items():
        if value is None:
            out.append(";" + _escape(name, _PARAM_SAFE))
        else:
            out.append(";" + _escape(name, _PARAM_SAFE) + "=" + _escape(value, _PARAM_SAFE))
    return "".join(out)


def parse_host_port_untrusted(text: str, what: str = "host") -> tuple[str, int | None]:
    """Split `host[:port]` (RFC 3261 §25.1 hostport); IPv6 references keep their brackets."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise bad_request(f"Unterminated IPv6 reference in {what}")
        host = text[: end + 1]
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise bad_request(f"Bad IPv6 address in {what}") from None
        rest = text[end + 1 :]
        if not rest:
            return host, None
        if rest[0] != ":":
            raise bad_request(f"Junk after IPv6 reference in {what}")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.partition(":")
        if not host:
            raise bad_request(f"Empty {what}")
        if _BAD_HOST.search(host) is not None:
            raise bad_request(f"Invalid character in {what}")
        if not colon:
            return host, None
    return host, parse_port_untrusted(port_text, what)


def parse_port_untrusted(text: str, what: str = "host") -> int:
    """A port is 1 to 5 ASCII digits no larger than 65535."""
    if not (0 < len(text) <= 5 and text.isascii() and text.isdigit()):
        raise bad_request(f"Bad port in {what}")
    port = int(text)
    if port > 65535:
        raise bad_request(f"Port out of range in {what}")
    return port


def format_host_port(host: str, port: int | None) -> str:
    """`host` or `host:port`; a bare IPv6 address gets its brackets back."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class SipUri:
    """A sip: or sips: URI (RFC 3261 §19.1.1). Components are unescaped text.

    `params` maps lower-cased uri-parameter names to their value, or `None` for a parameter
    without a value (`;lr`). `headers` keeps the `?name=value&...` pairs in order. Not hashable.
    """

    host: str
    user: str | None = None
    password: str | None = None
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()
    scheme: str = "sip"

    def __str__(self) -> str:
        parts = [self.scheme, ":"]
        if self.user is not None:
            parts.append(_escape(self.user, _USER_SAFE))
            if self.password is not None:
                parts.append(":" + _escape(self.password, _PASSWORD_SAFE))
            parts.append("@")
        parts.append(format_host_port(self.host, self.port))
        if self.params:
            parts.append(_format_params(self.params))
        if self.headers:
            parts.append("?")
            parts.append(
                "&".join(
                    _escape(n, _HEADER_SAFE) + "=" + _escape(v, _HEADER_SAFE)
                    for n, v in self.headers
                )
            )
        return "".join(parts)

    @property
    def transport(self) -> str | None:
        """The `transport` parameter, lower-cased (RFC 3261 §19.1.1), or None."""
        value = self.params.get("transport")
        return value.lower() if value else None

    @property
    def lr(self) -> bool:
        """True for a loose-routing URI (RFC 3261 §16.12.1.1)."""
        return "lr" in self.params

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def aor(self) -> str:
        """The address-of-record key: `scheme:user@host` without port, params or headers,
        host lower-cased (RFC 3261 §10.3 step 5 canonicalisation)."""
        user = "" if self.user is None else _escape(self.user, _USER_SAFE) + "@"
        return f"{self.scheme}:{user}{self.host.lower()}"

    def equivalent(self, other: Uri) -> bool:
        """URI comparison of RFC 3261 §19.1.4."""
        if not isinstance(other, SipUri):
            return False
        if (
            self.scheme != other.scheme
            or self.user != other.user
            or self.password != other.password
            or self.host.lower() != other.host.lower()
            or self.port != other.port
        ):
            return False
        # §19.1.4: user, ttl, method, maddr, transport must match when present in either URI;
        # any other parameter is compared only when present in both.
        for name in self.params.keys() | other.params.keys():
            if name not in self.params or name not in other.params:
                if name in _SIGNIFICANT_PARAMS:
                    return False
                continue
            if (self.params[name] or "").lower() != (other.params[name] or "").lower():
                return False
        # §19.1.4: headers are never ignored; names compare case-insensitively.
        return sorted((n.lower(), v) for n, v in self.headers) == sorted(
            (n.lower(), v) for n, v in other.headers
        )


_SIGNIFICANT_PARAMS = frozenset({"user", "ttl", "method", "maddr", "transport"})


@dataclass(frozen=True, slots=True)
class TelUri:
    """A tel: URI (RFC 3966): a global (`+...`) or local number and its parameters."""

    number: str
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return "tel"

    def __str__(self) -> str:
        return "tel:" + self.number + _format_params(self.params)

    @property
    def digits(self) -> str:
        """The number without visual separators (RFC 3966 §5.1.1), for comparison."""
        return "".join(ch for ch in self.number if ch not in "-.()")

    def equivalent(self, other: Uri) -> bool:
        """RFC 3966 §4: numbers compare without visual separators, parameters as sets."""
        if not isinstance(other, TelUri):
            return False
        return self.digits.lower() == other.digits.lower() and {
            k: (v or "").lower() for k, v in self.params.items()
        } == {k: (v or "").lower() for k, v in other.params.items()}


@dataclass(frozen=True, slots=True)
class AbsoluteUri:
    """Any other scheme (RFC 3261 §25.1 absoluteURI), kept as opaque text: `isbn:...`,
    `http://...`, `urn:...`. RFC 4475 §3.3.4: an unknown scheme in To/From/Contact is no
    reason to reject a request."""

    scheme: str
    opaque: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.opaque}"

    def equivalent(self, other: Uri) -> bool:
        return (
            isinstance(other, AbsoluteUri)
            and self.scheme == other.scheme
            and self.opaque == other.opaque
        )


Uri = SipUri | TelUri | AbsoluteUri


def parse_uri_untrusted(text: str) -> Uri:
    """Parse a URI from a Request-URI or a name-addr/addr-spec (RFC 3261 §19.1, §25.1).

    Raises only `SipParseError` (status 400). The same text gives the same (frozen) object:
    a phone sends the same few URIs in every request (Request-URI, its AOR in From and To,
    its Contact), so parses are remembered, up to `_URI_MEMO_SIZE` texts of at most
    `_URI_MEMO_MAX_TEXT` characters. Never mutate a parsed URI's `params` dict (nothing does;
    `with_params`-style helpers build new ones).
    """
    found = _URI_MEMO.get(text)
    if found is not None:
        return found
    uri = _parse_uri(text)
    if len(text) > _URI_MEMO_MAX_TEXT:
        # Phones' URIs are short; a long one is rare or hostile, and remembering 4,096 texts
        # of up to a header line (8 KB) each would pin some 60 MB.
        return uri
    if len(_URI_MEMO) >= _URI_MEMO_SIZE:
        _URI_MEMO.clear()  # texts come from the network: bounded, and cheap to start over
    _URI_MEMO[text] = uri
    return uri


_URI_MEMO: dict[str, Uri] = {}
_URI_MEMO_SIZE = 4096
_URI_MEMO_MAX_TEXT = 256


def _parse_uri(text: str) -> Uri:
    try:
        scheme, colon, rest = text.partition(":")
        if not colon or not scheme or not scheme[0].isascii() or not scheme[0].isalpha():
            raise bad_request("URI has no scheme")
        for ch in scheme:
            if ch not in _SCHEME_CHARS:
                raise bad_request("Invalid character in URI scheme")
        if _FORBIDDEN_RE.search(rest) is not None:
            raise bad_request("Invalid character in URI")
        if not rest:
            raise bad_request("Empty URI")
        scheme = scheme.lower()
        if scheme in ("sip", "sips"):
            return _parse_sip(scheme, rest)
        if scheme == "tel":
            return _parse_tel(rest)
        return AbsoluteUri(scheme, rest)
    except SipParseError:
        raise
    except (ValueError, IndexError, UnicodeError) as exc:  # pragma: no cover - defence in depth
        raise bad_request(f"Malformed URI ({type(exc).__name__})") from None


def _parse_sip(scheme: str, rest: str) -> SipUri:
    user: str | None = None
    password: str | None = None
    # RFC 3261 §25.1: '@' may not appear unescaped in user, password, params or headers, so
    # the first one ends the userinfo even when the user part holds ';' or '?' (RFC 4475
    # §3.1.1.2 and §3.1.1.9 put both there).
    at = rest.find("@")
    if at >= 0:
        userinfo = rest[:at]
        rest = rest[at + 1 :]
        user_text, colon, password_text = userinfo.partition(":")
        if not user_text:
            raise bad_request("Empty user in SIP URI")
        _check_chars(user_text, _BAD_USER, "user")
        user = _unescape(user_text, "user")
        if colon:
            _check_chars(password_text, _BAD_PASSWORD, "password")
            password = _unescape(password_text, "password")
    hostport, qmark, header_text = rest.partition("?")
    hostport, *param_parts = hostport.split(";")
    host, port = parse_host_port_untrusted(hostport, "SIP URI host")
    params = _parse_params(param_parts, "URI") if param_parts else {}
    headers: tuple[tuple[str, str], ...] = ()
    if qmark:
        pairs: list[tuple[str, str]] = []
        for item in header_text.split("&"):
            name, eq, value = item.partition("=")
            if not name or not eq:
                raise bad_request("Malformed URI header")
            _check_chars(name, _BAD_HEADER, "header")
            _check_chars(value, _BAD_HEADER, "header")
            pairs.append((_unescape(name, "header"), _unescape(value, "header")))
        headers = tuple(pairs)
    return SipUri(
        host=host,
        user=user,
        password=password,
        port=port,
        params=params,
        headers=headers,
        scheme=scheme,
    )


def _parse_tel(rest: str) -> TelUri:
    number, *param_parts = rest.split(";")
    if not number or not all(ch in _TEL_CHARS for ch in number):
        raise bad_request("Bad tel URI number")
    if number.startswith("+") and not any(ch.isdigit() for ch in number):
        raise bad_request("Bad tel URI number")
    return TelUri(number, _parse_params(param_parts, "tel URI") if param_parts else {})
