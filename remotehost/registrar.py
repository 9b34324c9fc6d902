"""The office registrar: RFC 3261 §10.3 REGISTER processing, digest auth, brute-force blocking.

Pure policy: a `Registrar` takes a parsed REGISTER, where it came from and the time, and returns
the response to send (or None to drop it). Credentials come from the directory mirrored from the
main host (HA1 hashes only); bindings are kept by `location.Location`. It never touches a socket.

Security from day one:
- an unknown extension and a wrong password get the same 401 (the digest verifier guarantees it),
  so nobody can list the extensions;
- repeated failed authentications from one source address block that address for a while (its
  requests are dropped and counted), without locking out the real phone at another address;
- a request for another domain is refused before any credential is looked at.
"""

from __future__ import annotations

import email.utils
import logging
from collections.abc import Callable
from dataclasses import dataclass

from remotehost.location import Binding, Location
from shared.ratelimit import FailureThrottle
from shared.sip.digest import DigestResult, DigestVerifier
from shared.sip.errors import SipParseError
from shared.sip.message import SipRequest, SipResponse, make_response
from shared.sip.uri import SipUri

log = logging.getLogger("remotehost.registrar")
# No SIP extensions are claimed: Path (RFC 3327) and outbound (RFC 5626 flows) would need the
# registrar to store and use them, which it does not; a REGISTER requiring one gets 420.
SUPPORTED_OPTIONS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a request came from, after NAT: replies and later requests go back here."""

    transport: str
    ip: str
    port: int


@dataclass(frozen=True)
class RegistrarPolicy:
    min_expires: int = 60
    max_expires: int = 3600
    default_expires: int = 3600
    failures_before_block: int = 5
    block_seconds: float = 300.0


DEFAULT_POLICY = RegistrarPolicy()


@dataclass
class RegistrarStatistics:
    registers: int = 0
    accepted: int = 0
    challenged: int = 0
    auth_failures: int = 0
    blocked_drops: int = 0
    refused: int = 0
    blocked_sources: int = 0


class Registrar:
    def __init__(
        self,
        *,
        verifier: DigestVerifier,
        lookup_ha1: Callable[[str, str], str | None],
        serves_domain: Callable[[str], bool],
        location: Location,
        policy: RegistrarPolicy = DEFAULT_POLICY,
        server_name: str = "branchpbx",
    ) -> None:
        self.verifier = verifier
        self.lookup_ha1 = lookup_ha1
        self.serves_domain = serves_domain
        self.location = location
        self.policy = policy
        self.server_name = server_name
        self.throttle = FailureThrottle(
            free_failures=policy.failures_before_block,
            block_after=policy.failures_before_block,
            block_for=policy.block_seconds,
            forget_after=policy.block_seconds,
        )
        self.stats = RegistrarStatistics()

    def blocked(self, ip: str, now: float) -> bool:
        return self.throttle.blocked(ip, now)

    def check_credentials(
        self,
        credentials: str | None,
        *,
        method: str,
        uri: str,
        ip: str,
        now: float,
        who: str | None,
    ) -> DigestResult:
        """Verify a request's digest credentials and count a wrong one against the source.

        One place for REGISTER (401) and INVITE (407), so that guessing through either path
        blocks the address alike. A success does not wipe the address's failures (they are
        forgotten `block_seconds` after the last one): else a phone with one good account could
        guess the others' passwords forever, authenticating itself between guesses.
        """
        result = self.verifier.verify(
            credentials, method=method, uri=uri, now=now, lookup_ha1=self.lookup_ha1
        )
        if result.status == "bad":
            self.stats.auth_failures += 1
            failures = self.throttle.failure(ip, now)
            if self.throttle.blocked(ip, now):
                self.stats.blocked_sources += 1
                log.warning(
                    "blocking %s for %.0f s after %d failed authentications (last: %s for %r)",
                    ip,
                    self.policy.block_seconds,
                    failures,
                    method,
                    who,
                )
        return result

    def handle_register(
        self, request: SipRequest, origin: Origin, now: float
    ) -> SipResponse | None:
        """Process one REGISTER; None means drop it (a blocked source)."""
        self.stats.registers += 1
        if self.throttle.blocked(origin.ip, now):
            self.stats.blocked_drops += 1
            return None
        try:
            return self._register(request, origin, now)
        except SipParseError as exc:
            # A header we needed was malformed: the request's fault, answered as such.
            self.stats.refused += 1
            return self._reply(request, exc.status, exc.reason)

    def _reply(
        self,
        request: SipRequest,
        status: int,
        reason: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> SipResponse:
        extra = [("Server", self.server_name), *(headers or [])]
        return make_response(request, status, reason, to_tag=_to_tag(request), headers=extra)

    def _register(self, request: SipRequest, origin: Origin, now: float) -> SipResponse:
        uri = request.request_uri
        # RFC 3261 §10.3 step 1: is this registrar responsible for the Request-URI's domain?
        if not isinstance(uri, SipUri) or not self.serves_domain(uri.host):
            self.stats.refused += 1
            return self._reply(request, 403, "Forbidden (not this registrar's domain)")
        # Step 2: Require (RFC 3261 §8.2.2.3).
        unsupported = [t for t in request.option_tags("Require") if t not in SUPPORTED_OPTIONS]
        if unsupported:
            self.stats.refused += 1
            return self._reply(
                request, 420, "Bad Extension", [("Unsupported", ", ".join(unsupported))]
            )
        # Step 3: authentication (RFC 3261 §22, RFC 7616 / RFC 8760).
        result = self.check_credentials(
            request.headers.get("Authorization"),
            method="REGISTER",
            uri=request.uri,
            ip=origin.ip,
            now=now,
            who=_user(request),
        )
        if not result.ok:
            self.stats.challenged += 1
            return self._reply(
                request,
                401,
                "Unauthorized",
                [("WWW-Authenticate", c) for c in result.challenges],
            )
        # Step 6: the authenticated user may change only its own extension's bindings.
        aor = _user(request)
        if aor is None or aor != result.username:
            self.stats.refused += 1
            return self._reply(request, 403, "Forbidden (you may register only your own extension)")
        return self._update_bindings(request, origin, aor, now)

    def _update_bindings(
        self, request: SipRequest, origin: Origin, ext: str, now: float
    ) -> SipResponse:
        policy = self.policy
        call_id = request.call_id
        cseq = request.cseq.seq
        header_expires = request.expires
        current = {b.contact: b for b in self.location.get(ext)}
        if request.contact_is_star:
            # RFC 3261 §10.3 step 6: '*' only alone and only with Expires: 0.
            if header_expires != 0 or len(request.headers.values("Contact")) != 1:
                return self._refuse(request, 400, "Bad Request (Contact '*' needs Expires: 0)")
            for binding in current.values():
                if binding.call_id == call_id and cseq <= binding.cseq:
                    return self._refuse(request, 500, "Server Internal Error (CSeq out of order)")
            self.location.replace(ext, {})
            log.info("%s: all contacts removed", ext)
            self.stats.accepted += 1
            return self._ok(request, ext, now)
        updated = dict(current)
        user_agent = request.headers.get("User-Agent") or ""
        for contact in request.contacts:
            param = contact.expires  # raises SipParseError (400) if it is no number
            if param is not None:
                expires = param
            elif header_expires is not None:
                expires = header_expires
            else:
                expires = policy.default_expires
            key = str(contact.uri)
            existing = updated.get(key)
            # Step 7: an older request of the same Call-ID must not undo a newer one.
            if existing is not None and existing.call_id == call_id and cseq <= existing.cseq:
                return self._refuse(request, 500, "Server Internal Error (CSeq out of order)")
            if expires == 0:
                updated.pop(key, None)
                continue
            if expires < policy.min_expires:
                return self._refuse(
                    request,
                    423,
                    "Interval Too Brief",
                    [("Min-Expires", str(policy.min_expires))],
                )
            updated[key] = Binding(
                ext=ext,
                contact=key,
                expires_at=now + min(expires, policy.max_expires),
                call_id=call_id,
                cseq=cseq,
                transport=origin.transport,
                source_ip=origin.ip,
                source_port=origin.port,
                user_agent=user_agent,
                q=_q(contact.params.get("q")),
            )
        if len(updated) > self.location.max_contacts:
            return self._refuse(
                request,
                403,
                f"Forbidden (at most {self.location.max_contacts} contacts per extension)",
            )
        if updated != current:
            added = set(updated) - set(current)
            removed = set(current) - set(updated)
            if added or removed:
                log.info(
                    "%s: registered %s%s",
                    ext,
                    ", ".join(sorted(added)) or "-",
                    f"; removed {', '.join(sorted(removed))}" if removed else "",
                )
            self.location.replace(ext, updated)
        self.stats.accepted += 1
        return self._ok(request, ext, now)

    def _refuse(
        self,
        request: SipRequest,
        status: int,
        reason: str,
        headers: list[tuple[str, str]] | None = None,
    ) -> SipResponse:
        """An authenticated REGISTER the bindings cannot take; counted in `refused`."""
        self.stats.refused += 1
        return self._reply(request, status, reason, headers)

    def _ok(self, request: SipRequest, ext: str, now: float) -> SipResponse:
        headers = [
            ("Contact", f"<{b.contact}>;expires={b.remaining(now)}") for b in self.location.get(ext)
        ]
        headers.append(("Date", _http_date(now)))
        return self._reply(request, 200, "OK", headers)


_last_date: tuple[int, str] = (-1, "")


def _http_date(now: float) -> str:
    """RFC 3261 §20.17 Date (rfc1123, GMT) of `now`, formatted once per second."""
    global _last_date
    second = int(now)
    if _last_date[0] != second:
        _last_date = (second, email.utils.formatdate(second, usegmt=True))
    return _last_date[1]


def _to_tag(request: SipRequest) -> str:
    # A stable tag per request makes retransmitted responses identical.
    return f"r{abs(hash((request.call_id, request.headers.get('CSeq')))) % 10**10}"


def _user(request: SipRequest) -> str | None:
    uri = request.to.uri
    return uri.user if isinstance(uri, SipUri) else None


def _q(text: str | None) -> float:
    try:
        value = float(text) if text is not None else 1.0
    except ValueError:
        return 1.0
    return value if 0.0 <= value <= 1.0 else 1.0
