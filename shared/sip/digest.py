"""HTTP Digest authentication for SIP (RFC 3261 §22, RFC 7616, RFC 8760).

This module owns the digest arithmetic, the auth-param grammar of the header values, the
self-validating nonces and the nonce-count replay table. It works on header VALUE strings: it does
not parse SIP messages, pick headers, send 401/407 responses or store credentials (callers hand in
a ``lookup_ha1`` function over stored HA1 hashes, never plain passwords).

Server side: :class:`DigestVerifier`. Client side: :func:`parse_challenge_untrusted` and
:func:`answer_challenge`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ALGORITHMS",
    "Challenge",
    "Credentials",
    "DigestError",
    "DigestParseError",
    "DigestResult",
    "DigestVerifier",
    "UnsupportedChallengeError",
    "answer_challenge",
    "ha1",
    "parse_authorization_untrusted",
    "parse_challenge_untrusted",
    "select_challenge",
]


class DigestError(Exception):
    """Base of this module's errors."""


class DigestParseError(DigestError):
    """A header value does not follow the auth-param grammar (the peer's fault)."""


class UnsupportedChallengeError(DigestError):
    """A well-formed challenge we cannot answer (unknown algorithm, only qop=auth-int)."""


# RFC 7616 §6.1 / RFC 8760 §2: SHA-512-256 exists too; SIP phones offer MD5 and SHA-256 only.
_HASHES: dict[str, Callable[[bytes], hashlib._Hash]] = {
    "MD5": hashlib.md5,
    "SHA-256": hashlib.sha256,
}
_HEX_LEN = {"MD5": 32, "SHA-256": 64}
ALGORITHMS: tuple[str, ...] = ("SHA-256", "SHA-256-sess", "MD5", "MD5-sess")
_CANONICAL = {name.upper(): name for name in ALGORITHMS}

# Header values longer than this are refused before any work (a REGISTER's is ~300 chars).
_MAX_VALUE_LEN = 4096

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# RFC 3261 §25.1: quoted-string with qdtext and quoted-pair (no CR/LF inside).
_QUOTED = r'"((?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x0a\x0d])*)"'
# Unquoted values: a token, plus the '/', ':', '=' ... some clients leave in nonces unquoted.
_BARE = r'([^\s,"]+)'
_SCHEME_RE = re.compile(r"[ \t]*(" + _TOKEN + r")(?:[ \t]+|$)")
_PARAM_RE = re.compile(
    r"[ \t]*(" + _TOKEN + r")[ \t]*=[ \t]*(?:" + _QUOTED + "|" + _BARE + ")[ \t]*"
)
_UNESCAPE_RE = re.compile(r"\\(.)")


def _parse_params(value: str) -> tuple[str, dict[str, str]]:
    """Split ``Scheme p1=v1, p2="v 2"`` into the scheme and lower-cased parameter names.

    RFC 7235 §2.1: parameters are a comma list, empty list elements are allowed, each name at
    most once; quoted values are unescaped. Raises only DigestParseError.
    """
    if not isinstance(value, str):
        raise DigestParseError("header value is not a string")
    if len(value) > _MAX_VALUE_LEN:
        raise DigestParseError("header value too long")
    match = _SCHEME_RE.match(value)
    if match is None:
        raise DigestParseError("missing auth scheme")
    scheme = match.group(1)
    params: dict[str, str] = {}
    pos = match.end()
    end = len(value)
    while True:
        while pos < end and value[pos] in " \t,":
            pos += 1
        if pos >= end:
            break
        match = _PARAM_RE.match(value, pos)
        if match is None:
            raise DigestParseError(f"bad auth-param at offset {pos}")
        name = match.group(1).lower()
        quoted = match.group(2)
        if quoted is None:
            param = match.group(3)
        elif "\\" in quoted:
            param = _UNESCAPE_RE.sub(r"\1", quoted)
        else:
            param = quoted
        if name in params:
            # RFC 7235 §2.1: each parameter name MUST only occur once per challenge.
            raise DigestParseError(f"duplicate parameter {name!r}")
        params[name] = param
        pos = match.end()
        if pos < end and value[pos] != ",":
            raise DigestParseError(f"expected ',' at offset {pos}")
    return scheme, params


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _h(algorithm: str, text: str) -> str:
    return _HASHES[algorithm](text.encode("utf-8")).hexdigest()


def _base(algorithm: str) -> str:
    return algorithm[:-5] if algorithm.endswith("-sess") else algorithm


def _canonical_algorithm(name: str | None) -> str | None:
    # RFC 7616 §3.3: absent algorithm means MD5; names compare case-insensitively.
    if name is None:
        return "MD5"
    return _CANONICAL.get(name.upper())


def ha1(algorithm: str, username: str, realm: str, password: str) -> str:
    """The stored secret H(username:realm:password) (RFC 7616 §3.4.2) for ``algorithm``.

    For the -sess variants this is the same stored value; the session part is mixed in per nonce.
    """
    canonical = _canonical_algorithm(algorithm)
    if canonical is None:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    return _h(_base(canonical), f"{username}:{realm}:{password}")


def _response(
    algorithm: str,
    stored_ha1: str,
    *,
    nonce: str,
    method: str,
    uri: str,
    qop: str | None,
    nc: str,
    cnonce: str,
) -> str:
    """RFC 7616 §3.4.1 (qop=auth) and RFC 2617 §3.2.2.1 (no qop, RFC 2069 compatible)."""
    base = _base(algorithm)
    key = stored_ha1
    if algorithm.endswith("-sess"):
        # RFC 7616 §3.4.2: the -sess HA1 binds the stored hash to this nonce and cnonce.
        key = _h(base, f"{stored_ha1}:{nonce}:{cnonce}")
    ha2 = _h(base, f"{method}:{uri}")
    if qop is None:
        return _h(base, f"{key}:{nonce}:{ha2}")
    return _h(base, f"{key}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


# ---------------------------------------------------------------------------------------------
# Client side


@dataclass(frozen=True, slots=True)
class Challenge:
    """One parsed ``WWW-Authenticate`` / ``Proxy-Authenticate`` value."""

    realm: str
    nonce: str
    algorithm: str = "MD5"
    """As the server spelled it (upper-cased canonical form if we know it)."""
    qop: tuple[str, ...] = ()
    """The qop options offered, lower-cased; empty for an RFC 2069 style challenge."""
    opaque: str | None = None
    stale: bool = False


def parse_challenge_untrusted(value: str) -> Challenge:
    """Parse a Digest challenge value; raises only DigestParseError."""
    scheme, params = _parse_params(value)
    if scheme.lower() != "digest":
        raise DigestParseError(f"not a Digest challenge: {scheme!r}")
    realm = params.get("realm")
    nonce = params.get("nonce")
    if realm is None or nonce is None:
        raise DigestParseError("challenge without realm or nonce")
    algorithm = params.get("algorithm", "MD5")
    qop = tuple(
        option.strip().lower() for option in params.get("qop", "").split(",") if option.strip()
    )
    return Challenge(
        realm=realm,
        nonce=nonce,
        algorithm=_canonical_algorithm(algorithm) or algorithm,
        qop=qop,
        opaque=params.get("opaque"),
        # RFC 7616 §3.3: stale is "true" case-insensitively; anything else is false.
        stale=params.get("stale", "").lower() == "true",
    )


def _answerable(challenge: Challenge) -> bool:
    algorithm = _canonical_algorithm(challenge.algorithm)
    if algorithm is None:
        return False
    if challenge.qop:
        return "auth" in challenge.qop
    return not algorithm.endswith("-sess")


def select_challenge(challenges: Sequence[Challenge]) -> Challenge | None:
    """The challenge to answer among those of one response (one per algorithm, RFC 8760 §2.4).

    The strongest we can answer wins (SHA-256 before MD5); None if we can answer none.
    """
    usable = [c for c in challenges if _answerable(c)]
    if not usable:
        return None
    return min(usable, key=lambda c: ALGORITHMS.index(_canonical_algorithm(c.algorithm) or "MD5"))


def answer_challenge(
    challenge: Challenge,
    *,
    method: str,
    uri: str,
    username: str,
    password: str,
    cnonce: str,
    nc: int,
) -> str:
    """Build the ``Authorization`` / ``Proxy-Authorization`` value answering ``challenge``.

    ``nc`` is the count of requests this client has sent with this nonce (1 for the first);
    ``cnonce`` should be fresh random text per nonce. Raises UnsupportedChallengeError for an
    algorithm or qop we cannot do.
    """
    algorithm = _canonical_algorithm(challenge.algorithm)
    if algorithm is None:
        raise UnsupportedChallengeError(f"unsupported algorithm {challenge.algorithm!r}")
    if not 0 < nc <= 0xFFFFFFFF:
        raise ValueError("nc must be in 1..2**32-1")
    qop: str | None
    if "auth" in challenge.qop:
        qop = "auth"
    elif challenge.qop:
        raise UnsupportedChallengeError(f"no supported qop in {challenge.qop!r}")
    elif algorithm.endswith("-sess"):
        raise UnsupportedChallengeError("-sess algorithm without qop")
    else:
        qop = None
    nc_text = f"{nc:08x}"
    response = _response(
        algorithm,
        ha1(algorithm, username, challenge.realm, password),
        nonce=challenge.nonce,
        method=method,
        uri=uri,
        qop=qop,
        nc=nc_text,
        cnonce=cnonce,
    )
    parts = [
        f"Digest username={_quote(username)}",
        f"realm={_quote(challenge.realm)}",
        f"nonce={_quote(challenge.nonce)}",
        f"uri={_quote(uri)}",
        f"response={_quote(response)}",
        f"algorithm={algorithm}",
    ]
    if qop is not None:
        # RFC 3261 §25.1 / RFC 7616 §3.4: qop and nc are tokens, cnonce is quoted.
        parts += [f"cnonce={_quote(cnonce)}", f"qop={qop}", f"nc={nc_text}"]
    if challenge.opaque is not None:
        parts.append(f"opaque={_quote(challenge.opaque)}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Server side


@dataclass(frozen=True, slots=True)
class Credentials:
    """One parsed ``Authorization`` / ``Proxy-Authorization`` Digest value."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str | None = None
    """Canonical name, or the raw text if unknown; None when the client omitted it (= MD5)."""
    qop: str | None = None
    nc: int | None = None
    cnonce: str | None = None
    opaque: str | None = None


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def parse_authorization_untrusted(value: str) -> Credentials:
    """Parse a Digest credentials value; raises only DigestParseError."""
    scheme, params = _parse_params(value)
    if scheme.lower() != "digest":
        raise DigestParseError(f"not Digest credentials: {scheme!r}")
    try:
        username = params["username"]
        realm = params["realm"]
        nonce = params["nonce"]
        uri = params["uri"]
        response = params["response"]
    except KeyError as exc:
        raise DigestParseError(f"credentials without {exc.args[0]}") from None
    nc: int | None = None
    nc_text = params.get("nc")
    if nc_text is not None:
        # RFC 7616 §3.4: nc is exactly 8 hex digits.
        if len(nc_text) != 8 or not _HEX_DIGITS.issuperset(nc_text):
            raise DigestParseError("nc is not 8 hex digits")
        nc = int(nc_text, 16)
    algorithm = params.get("algorithm")
    qop = params.get("qop")
    return Credentials(
        username=username,
        realm=realm,
        nonce=nonce,
        uri=uri,
        response=response.lower(),
        algorithm=None if algorithm is None else (_canonical_algorithm(algorithm) or algorithm),
        qop=None if qop is None else qop.lower(),
        nc=nc,
        cnonce=params.get("cnonce"),
        opaque=params.get("opaque"),
    )


DigestStatus = Literal["ok", "missing", "stale", "bad"]


@dataclass(frozen=True, slots=True)
class DigestResult:
    """What :meth:`DigestVerifier.verify` decided.

    ``challenges`` holds the header values to send with the 401/407 (empty when ok). An unknown
    user and a wrong password give equal results (status "bad", the same reason) so extensions
    cannot be enumerated.
    """

    status: DigestStatus
    challenges: tuple[str, ...]
    reason: str
    username: str | None = None
    """The authenticated user, set only when status is "ok"."""
    algorithm: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# Nonce layout (before base64url): issue time in ms, instance tag, issue counter, HMAC tag.
_NONCE = struct.Struct("!Q4sQ")
_MAC_LEN = 16
_NONCE_RAW_LEN = _NONCE.size + _MAC_LEN
_NONCE_TEXT_LEN = len(base64.urlsafe_b64encode(bytes(_NONCE_RAW_LEN)))

_BAD_CREDENTIALS = "wrong user name or password"


class DigestVerifier:
    """Issues challenges and verifies Digest credentials for one realm (RFC 3261 §22.4).

    Nonces are self-validating: ``time | instance | counter | HMAC(secret)``, so a forged nonce
    is refused without state and an old one expires after ``nonce_lifetime`` seconds. Replays are
    refused with a bounded table of the highest nonce count seen per nonce (RFC 7616 §3.4, nc): a
    nonce that has fallen out of the table, or was issued by an earlier instance (before a
    restart), is answered with ``stale=true`` so an honest client simply retries with a fresh one.

    ``now`` is seconds on any clock, the same for all calls to one verifier (wall-clock time if
    the secret outlives the process). Clients without qop (RFC 2069) have no nonce count, so each
    of their nonces is good for one request; ``allow_no_qop=False`` refuses them entirely.
    """

    def __init__(
        self,
        *,
        secret: bytes,
        realm: str,
        nonce_lifetime: float = 300.0,
        algorithms: tuple[str, ...] = ("SHA-256", "MD5"),
        allow_no_qop: bool = True,
        max_tracked_nonces: int = 65536,
        instance: bytes | None = None,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("secret must be at least 16 bytes")
        canonical = tuple(_canonical_algorithm(name) for name in algorithms)
        if not canonical or None in canonical:
            raise ValueError(f"unsupported algorithms {algorithms!r}")
        if max_tracked_nonces < 1:
            raise ValueError("max_tracked_nonces must be positive")
        self._secret = secret
        self.realm = realm
        self.nonce_lifetime = nonce_lifetime
        # RFC 8760 §2.4: challenges in order of preference, the strongest (SHA-256) first.
        self.algorithms: tuple[str, ...] = tuple(
            sorted({name for name in canonical if name is not None}, key=ALGORITHMS.index)
        )
        self.allow_no_qop = allow_no_qop
        self._max_tracked = max_tracked_nonces
        # The instance tag tells this verifier's nonces from an earlier one's with the same
        # secret, whose replay table is gone.
        self._instance = secrets.token_bytes(4) if instance is None else instance
        if len(self._instance) != 4:
            raise ValueError("instance must be 4 bytes")
        self._issued = 0
        # nonce -> (highest nc accepted, issue time, issue counter); insertion order is first
        # use, the order of eviction.
        self._counts: OrderedDict[str, tuple[int, float, int]] = OrderedDict()
        # Highest issue counter of a nonce evicted from the table before it expired.
        self._evicted_upto = 0
        self._dummy_key = hmac.new(secret, b"unknown-user", hashlib.sha256).digest()

    # -- nonces ------------------------------------------------------------------------------

    def _mac(self, body: bytes) -> bytes:
        # hmac.digest is the one-shot C path: a third of the cost of hmac.new().digest().
        return hmac.digest(self._secret, body + self.realm.encode(), "sha256")[:_MAC_LEN]

    def make_nonce(self, now: float) -> str:
        self._issued += 1
        body = _NONCE.pack(max(0, int(now * 1000)), self._instance, self._issued)
        return base64.urlsafe_b64encode(body + self._mac(body)).decode("ascii")

    def _check_nonce(self, nonce: str, now: float) -> tuple[str, float, int]:
        """Return (verdict, issue time, counter): verdict is "fresh", "stale" or "forged"."""
        if len(nonce) != _NONCE_TEXT_LEN:
            return "forged", 0.0, 0
        try:
            raw = base64.urlsafe_b64decode(nonce.encode("ascii"))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return "forged", 0.0, 0
        body, mac = raw[: _NONCE.size], raw[_NONCE.size :]
        if not hmac.compare_digest(mac, self._mac(body)):
            return "forged", 0.0, 0
        issued_ms, instance, counter = _NONCE.unpack(body)
        issued = issued_ms / 1000
        if instance != self._instance or counter > self._issued:
            return "stale", issued, counter
        if not issued - 1.0 <= now < issued + self.nonce_lifetime:
            return "stale", issued, counter
        return "fresh", issued, counter

    def challenges(self, now: float, *, stale: bool = False) -> tuple[str, ...]:
        """Header values for a 401/407: one per algorithm, SHA-256 first (RFC 8760 §2.4)."""
        nonce = self.make_nonce(now)
        suffix = ", stale=TRUE" if stale else ""
        return tuple(
            f'Digest realm={_quote(self.realm)}, nonce="{nonce}", algorithm={algorithm}, '
            f'qop="auth"{suffix}'
            for algorithm in self.algorithms
        )

    def _result(
        self, status: DigestStatus, reason: str, now: float, *, stale: bool = False
    ) -> DigestResult:
        return DigestResult(status, self.challenges(now, stale=stale), reason)

    # -- the replay table ---------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        counts = self._counts
        while counts:
            nonce, (_, issued, counter) = next(iter(counts.items()))
            if issued + self.nonce_lifetime <= now:
                # Expired: the time check refuses it from now on, no need to remember it.
                del counts[nonce]
            elif len(counts) > self._max_tracked:
                del counts[nonce]
                self._evicted_upto = max(self._evicted_upto, counter)
            else:
                break

    def _count_ok(self, nonce: str, nc: int, issued: float, counter: int, now: float) -> bool:
        """Record ``nc`` for ``nonce`` if it is higher than any before (RFC 7616 §3.4 nc)."""
        seen = self._counts.get(nonce)
        if seen is None:
            # Missing: never used, or used and evicted early. Every evicted nonce has a
            # counter <= _evicted_upto, so only those need refusing (stale=true, and an
            # honest client retries with a fresh nonce).
            if counter <= self._evicted_upto:
                return False
        elif nc <= seen[0]:
            return False
        self._counts[nonce] = (nc, issued, counter)
        if seen is None:
            self._prune(now)
        return True

    # -- verification -------------------------------------------------------------------------

    def verify(
        self,
        authorization_value_untrusted: str | None,
        *,
        method: str,
        uri: str | None,
        now: float,
        lookup_ha1: Callable[[str, str], str | None],
    ) -> DigestResult:
        """Check one request's credentials.

        ``uri`` is the request's Request-URI as text; when given, the digest-uri must equal it
        (RFC 2617 §3.2.2.5). ``lookup_ha1(username, algorithm)`` returns the stored HA1 for
        "MD5" or "SHA-256", or None for an unknown user.
        """
        if not authorization_value_untrusted:
            return self._result("missing", "no credentials", now)
        try:
            creds = parse_authorization_untrusted(authorization_value_untrusted)
        except DigestParseError as exc:
            return self._result("bad", f"malformed credentials: {exc}", now)
        if creds.realm != self.realm:
            # RFC 3261 §22.1: credentials for another realm are no credentials for ours.
            return self._result("missing", "credentials for another realm", now)
        algorithm = "MD5" if creds.algorithm is None else creds.algorithm
        if algorithm not in self.algorithms:
            return self._result("bad", f"algorithm {algorithm} not offered", now)
        if creds.qop is None:
            if not self.allow_no_qop or algorithm.endswith("-sess"):
                return self._result("bad", "qop=auth required", now)
            nc = 1
        elif creds.qop != "auth" or creds.nc is None or creds.cnonce is None:
            return self._result("bad", "unsupported qop or missing nc/cnonce", now)
        else:
            nc = creds.nc
        if uri is not None and creds.uri != uri:
            return self._result("bad", "digest uri does not match the request", now)
        verdict, issued, counter = self._check_nonce(creds.nonce, now)
        if verdict == "forged":
            return self._result("bad", "nonce not issued by us", now)

        # The same hash work whether or not the user exists: an unknown user is checked
        # against a per-user dummy HA1 that no password produces.
        base = _base(algorithm)
        dummy = hmac.new(self._dummy_key, creds.username.encode(), hashlib.sha256).hexdigest()
        stored = lookup_ha1(creds.username, base)
        known = stored is not None
        if stored is None:
            stored = dummy[: _HEX_LEN[base]]
        expected = _response(
            algorithm,
            stored.lower(),
            nonce=creds.nonce,
            method=method,
            uri=creds.uri,
            qop=creds.qop,
            nc=f"{nc:08x}",
            cnonce=creds.cnonce or "",
        )
        # Bytes, not str: compare_digest refuses non-ASCII text, and the response is untrusted.
        matches = hmac.compare_digest(expected.encode(), creds.response.encode())
        if not (known and matches):
            return self._result("bad", _BAD_CREDENTIALS, now)
        if verdict == "stale":
            # RFC 7616 §3.3: right password, old nonce: stale=true lets the client retry
            # without asking its user again.
            return self._result("stale", "nonce expired", now, stale=True)
        if not self._count_ok(creds.nonce, nc, issued, counter, now):
            return self._result("stale", "nonce count not increasing (replay)", now, stale=True)
        return DigestResult("ok", (), "ok", username=creds.username, algorithm=algorithm)
