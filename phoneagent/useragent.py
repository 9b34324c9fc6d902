"""The phone agent's SIP user agent core: registration and calls as a pure state machine.

This module owns what a softphone does in SIP (RFC 3261): registering with digest
authentication (§10, §22; 401 and 407 answered, refreshed before expiry, removed with
Expires: 0), placing calls (INVITE with an offer, 1xx/2xx handling, the ACK for a 2xx
§13.2.2.4, re-sent for every retransmitted 2xx, CANCEL §9.1 only after a provisional response,
a 407 answered by resending the INVITE with credentials §22.3), answering calls (100, 180,
200 retransmitted until the ACK arrives §13.3.1.4), BYE either way (§15), re-INVITEs both ways
for hold and resume, answering OPTIONS (§11) and taking MESSAGE requests (RFC 3428).

It is sans-I/O (STYLE.md): messages and the time come in as arguments, and every method
returns a list of outputs: `Transmit` for the adapter to send and events for the application.
It owns one `TransactionLayer` (the layer below) and the dialogs. It does not build or read
SDP bodies (the adapter's media code does; bodies pass through as bytes), resolve names, or
open sockets: destinations are `(ip, port)` tuples, or the opaque source of a request.

It is long (about 1000 lines) because the UAC and UAS halves of a call share the call table,
the dialog handling and the timers; split apart they would each need the other's internals.
"""

from __future__ import annotations

import enum
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.sip.dialog import Dialog, DialogError, response_in_dialog
from shared.sip.digest import (
    Challenge,
    DigestError,
    answer_challenge,
    parse_challenge_untrusted,
    select_challenge,
)
from shared.sip.errors import SipParseError
from shared.sip.message import (
    Headers,
    SipMessage,
    SipRequest,
    SipResponse,
    generate_tag,
    make_response,
)
from shared.sip.transaction import (
    DEFAULT_TIMERS,
    AckReceived,
    Event,
    RequestReceived,
    ResponseReceived,
    SendMessage,
    TimerConfig,
    TransactionError,
    TransactionKey,
    TransactionLayer,
    TransactionTimeout,
    TransportFailure,
    make_cancel,
)
from shared.sip.uri import SipUri, parse_uri_untrusted

Address = tuple[str, int]
USER_AGENT = "branchpbx-phoneagent/0.1"
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE"
DEFAULT_SIP_PORT = 5060
_MAX_AUTH_TRIES = 3  # challenges answered per request at most (stale nonces included)


# --- configuration and outputs ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentConfig:
    ext: str
    """Our user part: the extension in From, Contact and the digest user name."""
    local_ip: str
    """The address we put in Via, Contact and SDP (an IP literal)."""
    local_port: int
    password: str | None = None
    domain: str | None = None
    """The registrar's domain (From/To host, Request-URI of REGISTER); default `local_ip`."""
    proxy: Address | None = None
    """Where REGISTER and calls to plain numbers go (the office's remote host)."""
    register_expires: int = 300
    timers: TimerConfig = DEFAULT_TIMERS


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send `message` to `destination`: an `(ip, port)` or the opaque source of a request."""

    message: SipMessage
    destination: object


@dataclass(frozen=True, slots=True)
class Registered:
    expires: int


@dataclass(frozen=True, slots=True)
class Unregistered:
    pass


@dataclass(frozen=True, slots=True)
class RegistrationFailed:
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class IncomingCall:
    call_id: str
    caller: str
    """The From URI."""
    offer: bytes


@dataclass(frozen=True, slots=True)
class CallProgress:
    call_id: str
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class CallAnswered:
    call_id: str
    answer: bytes
    """The SDP answer of an outgoing call (ours to an incoming one: b"")."""


@dataclass(frozen=True, slots=True)
class CallFailed:
    """An outgoing call ended without being answered (its final status), or an incoming one
    was cancelled (487) before we answered."""

    call_id: str
    status: int
    reason: str
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class CallEnded:
    call_id: str
    by_remote: bool
    status: int | None = None
    """The status that ended it when it was not a BYE (408 for a lost ACK or BYE)."""


@dataclass(frozen=True, slots=True)
class OfferReceived:
    """The peer sent a re-INVITE with `offer`: answer it with `answer_reinvite`."""

    call_id: str
    offer: bytes


@dataclass(frozen=True, slots=True)
class ReinviteDone:
    """Our re-INVITE got its final response (`answer` is the SDP of a 2xx, else b"")."""

    call_id: str
    status: int
    answer: bytes


@dataclass(frozen=True, slots=True)
class MessageReceived:
    sender: str
    content_type: str
    text: str


@dataclass(frozen=True, slots=True)
class MessageDelivered:
    key: TransactionKey
    status: int
    reason: str


Output = (
    Transmit
    | Registered
    | Unregistered
    | RegistrationFailed
    | IncomingCall
    | CallProgress
    | CallAnswered
    | CallFailed
    | CallEnded
    | OfferReceived
    | ReinviteDone
    | MessageReceived
    | MessageDelivered
)


class UserAgentError(Exception):
    """The application asked for something the call's state does not allow."""


# --- calls -----------------------------------------------------------------------------------


class CallState(enum.Enum):
    CALLING = "calling"  # INVITE sent, nothing or 100 back
    EARLY = "early"  # a 101-199 came back (CANCEL may be sent now)
    INCOMING = "incoming"  # INVITE received, not answered yet
    ANSWERED = "answered"  # our 200 sent, waiting for the ACK
    ESTABLISHED = "established"
    ENDING = "ending"  # our BYE or CANCEL sent
    ENDED = "ended"


@dataclass(slots=True)
class _Leg:
    call_id: str
    outgoing: bool
    state: CallState
    invite: SipRequest
    peer: object
    """Where requests of this call go: the proxy or target for ours, the INVITE's source."""
    invite_key: TransactionKey | None = None
    dialog: Dialog | None = None
    local_tag: str = ""
    auth_tries: int = 0
    cancel_wanted: bool = False
    ack: SipRequest | None = None
    # UAS: the 2xx retransmitted until the ACK (RFC 3261 §13.3.1.4)
    ok: SipResponse | None = None
    ok_next: float | None = None
    ok_interval: float = 0.0
    ok_give_up: float = 0.0
    # re-INVITEs
    reinvite_key: TransactionKey | None = None
    """Our pending re-INVITE (client) or theirs waiting for our answer (server)."""
    reinvite_request: SipRequest | None = None
    reinvite_acked: tuple[TransactionKey, SipRequest] | None = None
    """Our last answered re-INVITE and its ACK, re-sent for a retransmitted 2xx."""
    bye_key: TransactionKey | None = None
    bye_after_ack: bool = False
    """We hung up while our 2xx waited for its ACK: the BYE goes once it comes (§15)."""
    cancel_give_up: float | None = None
    """When to stop waiting for the final response to an INVITE we cancelled."""


@dataclass(slots=True)
class _Registration:
    call_id: str = field(default_factory=lambda: secrets.token_hex(12))
    from_tag: str = field(default_factory=generate_tag)
    cseq: int = 0
    key: TransactionKey | None = None
    expires: int = 0
    """What we asked for in the pending REGISTER (0: unregister)."""
    auth_tries: int = 0
    refresh_at: float | None = None
    registered: bool = False


def warning_text(response: SipResponse) -> str | None:
    """The text of the first Warning (RFC 3261 §20.43: code agent "text"), or None."""
    value = response.headers.get("Warning")
    if not value:
        return None
    start = value.find('"')
    end = value.rfind('"')
    if start == -1 or end <= start:
        return value.strip()
    return value[start + 1 : end].replace('\\"', '"')


def _challenges(response: SipResponse) -> list[Challenge]:
    name = "Proxy-Authenticate" if response.status == 407 else "WWW-Authenticate"
    found = []
    for value in response.headers.get_all(name):
        try:
            found.append(parse_challenge_untrusted(value))
        except DigestError:
            continue
    return found


class UserAgent:
    """One phone: its registration and its calls. See the module docstring."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        layer: TransactionLayer | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.config = config
        self.layer = layer or TransactionLayer(timers=config.timers)
        self._log = logger or logging.getLogger("phoneagent.sip")
        self._legs: dict[str, _Leg] = {}
        self._by_key: dict[TransactionKey, str] = {}
        self._registration = _Registration()
        self._nonce_counts: dict[str, int] = {}
        self._messages: set[TransactionKey] = set()
        self._ended_at: dict[str, float] = {}

    # -- identity --

    @property
    def domain(self) -> str:
        host = self.config.domain or self.config.local_ip
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    @property
    def aor(self) -> str:
        return f"sip:{self.config.ext}@{self.domain}"

    @property
    def contact(self) -> str:
        host = self.config.local_ip
        host = f"[{host}]" if ":" in host else host
        return f"<sip:{self.config.ext}@{host}:{self.config.local_port}>"

    def _via(self) -> str:
        host = self.config.local_ip
        host = f"[{host}]" if ":" in host else host
        branch = self.layer.new_branch()
        return f"SIP/2.0/UDP {host}:{self.config.local_port};branch={branch};rport"

    @property
    def registered(self) -> bool:
        return self._registration.registered

    def call_state(self, call_id: str) -> CallState | None:
        leg = self._legs.get(call_id)
        return leg.state if leg is not None else None

    def target_uri(self, number: str) -> tuple[str, Address]:
        """The Request-URI and first hop for `number`: a SIP URI (or `user@host:port`) goes
        straight to its host; a plain number goes to the proxy at our domain."""
        text = number if number.startswith(("sip:", "sips:")) else None
        if text is None and "@" in number:
            text = "sip:" + number
        if text is not None:
            try:
                uri = parse_uri_untrusted(text)
            except SipParseError as exc:
                raise UserAgentError(f"not a SIP address: {number!r} ({exc.reason})") from None
            if not isinstance(uri, SipUri):
                raise UserAgentError(f"not a SIP address: {number!r}")
            return str(uri), (uri.host.strip("[]"), uri.port or DEFAULT_SIP_PORT)
        if self.config.proxy is None:
            raise UserAgentError(
                f"calling {number!r} needs a server (--server), or give sip:{number}@HOST:PORT"
            )
        return f"sip:{number}@{self.domain}", self.config.proxy

    # -- the layer below --

    def _run(self, events: Iterable[Event], now: float) -> list[Output]:
        out: list[Output] = []
        for event in events:
            if isinstance(event, SendMessage):
                out.append(Transmit(event.message, event.destination))
            elif isinstance(event, RequestReceived):
                out += self._on_request(event, now)
            elif isinstance(event, ResponseReceived):
                out += self._on_response(event.key, event.response, now)
            elif isinstance(event, AckReceived):
                out += self._on_ack(event.request, now)
            elif (
                isinstance(event, (TransactionTimeout, TransportFailure))
                and event.response is not None
            ):
                # §8.1.3.1: a timeout or transport failure is handled like a 408 / 503. (Without
                # a response it is Timer H: our 3xx-6xx was never acknowledged; nothing to do.)
                out += self._on_response(event.key, event.response, now)
        return out

    def _send(
        self, request: SipRequest, destination: object, now: float
    ) -> tuple[TransactionKey, list[Output]]:
        key, events = self.layer.send_request(request, now, destination, reliable=False)
        return key, self._run(events, now)

    def receive(self, message: SipMessage, source: object, now: float) -> list[Output]:
        """A validated message from the network (`source` is where replies go)."""
        return self._run(self.layer.receive(message, now, source, reliable=False), now)

    def _headers(self, method: str, cseq: int, to: str, from_tag: str, call_id: str) -> Headers:
        headers = Headers()
        headers.add("Via", self._via())
        headers.add("Max-Forwards", "70")
        headers.add("From", f"<{self.aor}>;tag={from_tag}")
        headers.add("To", to)
        headers.add("Call-ID", call_id)
        headers.add("CSeq", f"{cseq} {method}")
        headers.add("User-Agent", USER_AGENT)
        return headers

    def _authorize(self, response: SipResponse, request: SipRequest) -> tuple[str, str] | None:
        """The Authorization / Proxy-Authorization header answering a 401 / 407, or None
        when we cannot (no password, no usable challenge)."""
        if self.config.password is None:
            return None
        challenge = select_challenge(_challenges(response))
        if challenge is None:
            return None
        count = self._nonce_counts.get(challenge.nonce, 0) + 1
        self._nonce_counts = {challenge.nonce: count}  # one nonce at a time is enough for us
        try:
            value = answer_challenge(
                challenge,
                method=request.method,
                uri=request.uri,
                username=self.config.ext,
                password=self.config.password,
                cnonce=secrets.token_hex(8),
                nc=count,
            )
        except (DigestError, ValueError):
            return None
        name = "Proxy-Authorization" if response.status == 407 else "Authorization"
        return name, value

    def _may_retry_auth(self, response: SipResponse, tries: int) -> bool:
        """Answer a challenge once; again only when the server says our nonce was merely
        stale (RFC 7616 §3.3): a second plain challenge means the password is wrong."""
        if tries == 0:
            return True
        if tries >= _MAX_AUTH_TRIES:
            return False
        return any(challenge.stale for challenge in _challenges(response))

    # -- registration (RFC 3261 §10.2) --

    def register(self, now: float, expires: int | None = None) -> list[Output]:
        """Send a REGISTER (`expires` 0 unregisters); refreshed by the timer until then."""
        if self.config.proxy is None:
            raise UserAgentError("registering needs a server")
        reg = self._registration
        reg.expires = self.config.register_expires if expires is None else expires
        reg.auth_tries = 0
        reg.refresh_at = None
        return self._send_register(now, None)

    def unregister(self, now: float) -> list[Output]:
        return self.register(now, 0)

    def _send_register(self, now: float, auth: tuple[str, str] | None) -> list[Output]:
        assert self.config.proxy is not None
        reg = self._registration
        reg.cseq += 1
        headers = self._headers("REGISTER", reg.cseq, f"<{self.aor}>", reg.from_tag, reg.call_id)
        headers.add("Contact", self.contact)
        headers.add("Expires", str(reg.expires))
        if auth is not None:
            headers.add(*auth)
        request = SipRequest("REGISTER", f"sip:{self.domain}", headers)
        reg.key, out = self._send(request, self.config.proxy, now)
        self._by_key[reg.key] = ""
        return out

    def _on_register_response(
        self, key: TransactionKey, response: SipResponse, now: float
    ) -> list[Output]:
        reg = self._registration
        if key != reg.key or response.status < 200:
            return []
        reg.key = None
        status = response.status
        if status in (401, 407) and self._may_retry_auth(response, reg.auth_tries):
            # The digest covers the method and Request-URI only (RFC 2617 §3.2.2.2).
            auth = self._authorize(response, SipRequest("REGISTER", f"sip:{self.domain}"))
            if auth is not None:
                reg.auth_tries += 1
                return self._send_register(now, auth)
        if 200 <= status < 300:
            reg.auth_tries = 0
            if reg.expires == 0:
                reg.registered = False
                reg.refresh_at = None
                return [Unregistered()]
            granted = self._granted(response)
            reg.registered = granted > 0
            # Refresh at half the granted time: plenty of room for a lost REGISTER's retries.
            reg.refresh_at = now + max(1.0, granted / 2)
            return [Registered(granted)]
        reg.registered = False
        if reg.expires:
            # Try again later; the application decides whether a failure is fatal.
            reg.refresh_at = now + 30.0
        return [RegistrationFailed(status, response.reason)]

    def _granted(self, response: SipResponse) -> int:
        """§10.2.4: our Contact's expires in the 200, else its Expires header, else ours."""
        ours = f"{self.config.local_ip}:{self.config.local_port}"
        try:
            for contact in response.contacts:
                uri = contact.uri
                address = f"{uri.host.strip('[]')}:{uri.port}" if isinstance(uri, SipUri) else ""
                if address == ours and contact.expires is not None:
                    return contact.expires
            if response.expires is not None:
                return response.expires
        except SipParseError:
            pass
        return self._registration.expires

    # -- outgoing calls --

    def invite(self, number: str, offer: bytes, now: float) -> tuple[str, list[Output]]:
        """Call `number` with SDP `offer`; returns the new call's id."""
        uri, destination = self.target_uri(number)
        call_id = secrets.token_hex(12)
        local_tag = generate_tag()
        headers = self._headers("INVITE", 1, f"<{uri}>", local_tag, call_id)
        headers.add("Contact", self.contact)
        headers.add("Allow", ALLOW)
        headers.add("Content-Type", "application/sdp")
        request = SipRequest("INVITE", uri, headers, offer)
        leg = _Leg(call_id, True, CallState.CALLING, request, destination, local_tag=local_tag)
        self._legs[call_id] = leg
        return call_id, self._send_invite(leg, now)

    def _send_invite(self, leg: _Leg, now: float) -> list[Output]:
        key, out = self._send(leg.invite, leg.peer, now)
        leg.invite_key = key
        self._by_key[key] = leg.call_id
        return out

    def _on_invite_response(self, leg: _Leg, response: SipResponse, now: float) -> list[Output]:
        status = response.status
        if status < 200:
            if leg.state is CallState.CALLING:
                leg.state = CallState.EARLY
                if leg.cancel_wanted:
                    # §9.1: the CANCEL waited for a provisional response (a 100 will do).
                    return self._cancel(leg, now)
            if status == 100:
                return []
            return [CallProgress(leg.call_id, status, response.reason)]
        if status < 300:
            return self._on_invite_ok(leg, response, now)
        retry = self._may_retry_auth(response, leg.auth_tries)
        if status in (401, 407) and retry and not leg.cancel_wanted:
            auth = self._authorize(response, leg.invite)
            if auth is not None:
                # §22.2/§22.3: the same INVITE again (same Call-ID, From tag, next CSeq) with
                # credentials. The layer already ACKed the 4xx.
                leg.auth_tries += 1
                self._by_key.pop(leg.invite_key or _NO_KEY, None)
                headers = leg.invite.headers.copy()
                headers.remove("Proxy-Authorization")
                headers.remove("Authorization")
                headers.replace_first("Via", self._via())
                headers.set("CSeq", f"{leg.invite.cseq.seq + 1} INVITE")
                headers.add(*auth)
                leg.invite = SipRequest("INVITE", leg.invite.uri, headers, leg.invite.body)
                leg.state = CallState.CALLING
                return self._send_invite(leg, now)
        return self._end_failed(leg, status, response.reason, warning_text(response))

    def _on_invite_ok(self, leg: _Leg, response: SipResponse, now: float) -> list[Output]:
        if leg.state is CallState.ENDED:
            return []
        dialog = leg.dialog
        same_dialog = dialog is not None and dialog.remote_tag == (response.to_tag or "")
        if same_dialog and leg.ack is not None:
            # §13.2.2.4: a retransmitted 2xx gets the same ACK again.
            return [Transmit(leg.ack, leg.peer)]
        try:
            dialog = Dialog.as_uac(leg.invite, response)
        except (DialogError, SipParseError) as exc:
            self._log.debug("unusable 2xx for %s: %s", leg.call_id, exc)
            return []
        leg.dialog = dialog
        leg.ack = dialog.create_ack(via=self._via(), invite=leg.invite)
        out: list[Output] = [Transmit(leg.ack, leg.peer)]
        if leg.cancel_wanted or leg.state is CallState.ENDING:
            # The 200 crossed our CANCEL (§9.1): the call exists now, so end it with a BYE.
            leg.state = CallState.ESTABLISHED
            out += self._bye(leg, now)
            return out
        leg.state = CallState.ESTABLISHED
        out.append(CallAnswered(leg.call_id, response.body))
        return out

    def _end_failed(
        self, leg: _Leg, status: int, reason: str, warning: str | None = None
    ) -> list[Output]:
        if leg.state is CallState.ENDED:
            return []
        leg.state = CallState.ENDED
        self._forget(leg)
        return [CallFailed(leg.call_id, status, reason, warning)]

    def _forget(self, leg: _Leg) -> None:
        for key in (leg.invite_key, leg.reinvite_key, leg.bye_key):
            if key is not None:
                self._by_key.pop(key, None)
        leg.ok_next = None
        leg.cancel_give_up = None

    # -- incoming calls --

    def _on_invite(self, event: RequestReceived, now: float) -> list[Output]:
        request = event.request
        if request.to_tag is not None:
            return self._on_reinvite(event, now)
        call_id = request.call_id
        if call_id in self._legs:
            # A new INVITE with a Call-ID we know but no To tag: a loop or a forked copy.
            return self._respond(event.key, make_response(request, 482), now)
        peer = event.source
        leg = _Leg(call_id, False, CallState.INCOMING, request, peer, local_tag=generate_tag())
        leg.invite_key = event.key
        self._legs[call_id] = leg
        self._by_key[event.key] = call_id
        out: list[Output] = []  # the transaction layer sent 100 Trying already (§17.2.1)
        try:
            caller = str(request.from_.uri)
        except SipParseError:
            caller = ""
        out.append(IncomingCall(call_id, caller, request.body))
        return out

    def _respond(self, key: TransactionKey, response: SipResponse, now: float) -> list[Output]:
        try:
            return self._run(self.layer.send_response(key, response, now), now)
        except TransactionError as exc:
            self._log.debug("cannot respond on %s: %s", key, exc)
            return []

    def _incoming(self, call_id: str) -> _Leg:
        leg = self._legs.get(call_id)
        if leg is None or leg.outgoing or leg.state is not CallState.INCOMING:
            raise UserAgentError(f"no unanswered incoming call {call_id}")
        return leg

    def ring(self, call_id: str, now: float) -> list[Output]:
        """Send 180 Ringing for an incoming call."""
        leg = self._incoming(call_id)
        response = self._uas_response(leg, 180)
        assert leg.invite_key is not None
        return self._respond(leg.invite_key, response, now)

    def _uas_response(
        self, leg: _Leg, status: int, body: bytes = b"", reason: str | None = None
    ) -> SipResponse:
        headers = [("Contact", self.contact), ("User-Agent", USER_AGENT)]
        if 200 <= status < 300:
            headers.append(("Allow", ALLOW))
        if body:
            headers.append(("Content-Type", "application/sdp"))
        return make_response(
            leg.invite, status, reason, to_tag=leg.local_tag, headers=headers, body=body
        )

    def answer(self, call_id: str, answer: bytes, now: float) -> list[Output]:
        """Answer an incoming call with SDP `answer` (200, retransmitted until the ACK)."""
        leg = self._incoming(call_id)
        response = self._uas_response(leg, 200, answer)
        leg.dialog = Dialog.as_uas(leg.invite, response)
        leg.state = CallState.ANSWERED
        self._start_ok(leg, response, now)
        assert leg.invite_key is not None
        return self._respond(leg.invite_key, response, now)

    def _start_ok(self, leg: _Leg, response: SipResponse, now: float) -> None:
        timers = self.config.timers
        leg.ok = response
        leg.ok_interval = timers.t1
        leg.ok_next = now + timers.t1
        leg.ok_give_up = now + 64 * timers.t1

    def reject(
        self, call_id: str, status: int, now: float, reason: str | None = None
    ) -> list[Output]:
        """Refuse an incoming call (486 busy, 603 decline, ...)."""
        if not 300 <= status <= 699:
            raise UserAgentError("a rejection is a 3xx-6xx status")
        leg = self._incoming(call_id)
        response = self._uas_response(leg, status, reason=reason)
        leg.state = CallState.ENDED
        self._forget(leg)
        assert leg.invite_key is not None
        out = self._respond(leg.invite_key, response, now)
        out.append(CallFailed(call_id, status, response.reason))
        return out

    def _on_ack(self, request: SipRequest, now: float) -> list[Output]:
        leg = self._legs.get(request.call_id)
        if leg is None or leg.ok is None:
            return []
        if request.cseq.seq != leg.ok.cseq.seq:
            return []
        leg.ok = None
        leg.ok_next = None
        if leg.bye_after_ack:
            leg.bye_after_ack = False
            leg.state = CallState.ESTABLISHED
            return self._bye(leg, now)
        if leg.reinvite_key is not None:
            leg.reinvite_key = None
            return []
        if leg.state is CallState.ANSWERED:
            leg.state = CallState.ESTABLISHED
            return [CallAnswered(leg.call_id, request.body)]
        return []

    # -- hanging up --

    def hangup(self, call_id: str, now: float) -> list[Output]:
        """End a call whatever its state: CANCEL, reject (603), or BYE."""
        leg = self._legs.get(call_id)
        if leg is None or leg.state in (CallState.ENDED, CallState.ENDING):
            return []
        if leg.state is CallState.INCOMING:
            return self.reject(call_id, 603, now)
        if leg.state is CallState.CALLING:
            # §9.1: no CANCEL before a provisional response; send it when one arrives.
            leg.cancel_wanted = True
            return []
        if leg.state is CallState.EARLY:
            leg.cancel_wanted = True
            return self._cancel(leg, now)
        return self._bye(leg, now)

    def _cancel(self, leg: _Leg, now: float) -> list[Output]:
        leg.state = CallState.ENDING
        leg.cancel_give_up = now + 64 * self.config.timers.t1
        cancel = make_cancel(leg.invite)
        try:
            _, out = self._send(cancel, leg.peer, now)
        except TransactionError as exc:
            self._log.debug("no CANCEL for %s: %s", leg.call_id, exc)
            return []
        # The 487 for the INVITE ends the call (_on_invite_response).
        return out

    def _end_pending_reinvite(self, leg: _Leg, now: float) -> list[Output]:
        """§15.1.2: a re-INVITE of the peer still unanswered when the call ends gets 487."""
        key, request = leg.reinvite_key, leg.reinvite_request
        if key is None or not key.server or request is None or leg.ok is not None:
            return []
        leg.reinvite_key = None
        return self._respond(key, make_response(request, 487, to_tag=leg.local_tag), now)

    def _bye(self, leg: _Leg, now: float) -> list[Output]:
        if leg.state is CallState.ANSWERED and leg.ok is not None:
            # §15: the callee may not send BYE before the ACK for its 2xx (or its timeout);
            # the 2xx keeps going out until then, so the caller learns of the call and of
            # its end.
            leg.bye_after_ack = True
            leg.state = CallState.ENDING
            return []
        out = self._end_pending_reinvite(leg, now)
        dialog = leg.dialog
        if dialog is None or dialog.terminated:
            leg.state = CallState.ENDED
            self._forget(leg)
            out.append(CallEnded(leg.call_id, False))
            return out
        leg.state = CallState.ENDING
        leg.ok_next = None
        bye = dialog.create_bye(via=self._via(), headers=[("User-Agent", USER_AGENT)])
        key, sent = self._send(bye, leg.peer, now)
        out += sent
        leg.bye_key = key
        self._by_key[key] = leg.call_id
        return out

    def _on_bye(self, event: RequestReceived, now: float) -> list[Output]:
        request = event.request
        leg = self._legs.get(request.call_id)
        if (
            leg is None
            or leg.dialog is None
            or leg.dialog.id.remote_tag != (request.from_tag or "")
        ):
            return self._respond(event.key, make_response(request, 481), now)
        refusal = leg.dialog.receive_request(request)
        if refusal is not None:
            return self._respond(event.key, refusal, now)
        out = self._end_pending_reinvite(leg, now)
        out += self._respond(event.key, response_in_dialog(leg.dialog, request, 200), now)
        if leg.state is not CallState.ENDED:
            leg.state = CallState.ENDED
            self._forget(leg)
            out.append(CallEnded(leg.call_id, True))
        return out

    def _on_cancel(self, event: RequestReceived, now: float) -> list[Output]:
        request = event.request
        leg = None
        if event.cancels is not None:
            call_id = self._by_key.get(event.cancels)
            leg = self._legs.get(call_id) if call_id else None
        if leg is None:
            return self._respond(event.key, make_response(request, 481), now)
        out = self._respond(event.key, make_response(request, 200, to_tag=leg.local_tag), now)
        if leg.state is CallState.INCOMING:
            # §9.2: the INVITE is answered 487 and the call never happened.
            assert leg.invite_key is not None
            out += self._respond(leg.invite_key, self._uas_response(leg, 487), now)
            leg.state = CallState.ENDED
            self._forget(leg)
            out.append(CallFailed(leg.call_id, 487, "Request Terminated"))
        return out

    # -- re-INVITE (hold and resume) --

    def reinvite(self, call_id: str, offer: bytes, now: float) -> list[Output]:
        """Send a new offer in the call (RFC 3264 §8): hold, resume."""
        leg = self._legs.get(call_id)
        if leg is None or leg.state is not CallState.ESTABLISHED or leg.dialog is None:
            raise UserAgentError(f"call {call_id} is not established")
        if leg.reinvite_key is not None or leg.ok is not None:
            raise UserAgentError("an offer is already pending in this call")
        request = leg.dialog.create_request(
            "INVITE",
            via=self._via(),
            headers=[("Content-Type", "application/sdp"), ("User-Agent", USER_AGENT)],
            body=offer,
        )
        key, out = self._send(request, leg.peer, now)
        leg.reinvite_key = key
        leg.reinvite_request = request
        self._by_key[key] = call_id
        return out

    def _on_reinvite_response(self, leg: _Leg, response: SipResponse, now: float) -> list[Output]:
        if response.status < 200:
            return []
        request = leg.reinvite_request
        assert request is not None and leg.dialog is not None
        if response.status >= 300:
            self._by_key.pop(leg.reinvite_key or _NO_KEY, None)
            leg.reinvite_key = None
            out: list[Output] = [ReinviteDone(leg.call_id, response.status, b"")]
            if response.status in (408, 481):
                # §12.2.1.2: the dialog is gone.
                out += self._bye(leg, now)
            return out
        try:
            leg.dialog.receive_response("INVITE", response)
        except DialogError:
            return []
        ack = leg.dialog.create_ack(via=self._via(), invite=request)
        key = leg.reinvite_key
        assert key is not None
        leg.reinvite_key = None
        leg.reinvite_acked = (key, ack)
        return [Transmit(ack, leg.peer), ReinviteDone(leg.call_id, response.status, response.body)]

    def _on_reinvite(self, event: RequestReceived, now: float) -> list[Output]:
        request = event.request
        leg = self._legs.get(request.call_id)
        if (
            leg is None
            or leg.dialog is None
            or leg.dialog.id.local_tag != request.to_tag
            or leg.state in (CallState.ENDING, CallState.ENDED)
        ):
            # Also while our BYE is on its way: the call is going, no new offer for it.
            return self._respond(event.key, make_response(request, 481), now)
        if leg.reinvite_key is not None or leg.ok is not None:
            # RFC 3261 §14.2: an offer while ours is pending earns 491.
            return self._respond(event.key, make_response(request, 491), now)
        refusal = leg.dialog.receive_request(request)
        if refusal is not None:
            return self._respond(event.key, refusal, now)
        leg.reinvite_key = event.key
        leg.reinvite_request = request
        self._by_key[event.key] = leg.call_id
        return [OfferReceived(leg.call_id, request.body)]

    def answer_reinvite(self, call_id: str, answer: bytes, now: float) -> list[Output]:
        leg = self._legs.get(call_id)
        if leg is None or leg.dialog is None or leg.reinvite_request is None:
            raise UserAgentError(f"no re-INVITE to answer in {call_id}")
        key = leg.reinvite_key
        if key is None or not key.server:
            raise UserAgentError(f"no re-INVITE to answer in {call_id}")
        response = response_in_dialog(leg.dialog, leg.reinvite_request, 200)
        response.headers.add("Content-Type", "application/sdp")
        response = SipResponse(response.status, response.reason, response.headers, answer)
        self._start_ok(leg, response, now)
        return self._respond(key, response, now)

    def refuse_reinvite(self, call_id: str, status: int, now: float) -> list[Output]:
        leg = self._legs.get(call_id)
        if leg is None or leg.dialog is None or leg.reinvite_request is None:
            raise UserAgentError(f"no re-INVITE to answer in {call_id}")
        key = leg.reinvite_key
        leg.reinvite_key = None
        if key is None or not key.server:
            raise UserAgentError(f"no re-INVITE to answer in {call_id}")
        return self._respond(key, response_in_dialog(leg.dialog, leg.reinvite_request, status), now)

    # -- MESSAGE and OPTIONS --

    def send_text(self, number: str, text: str, now: float) -> tuple[TransactionKey, list[Output]]:
        """Send a SIP MESSAGE (RFC 3428) with `text`; `MessageDelivered` tells the outcome."""
        uri, destination = self.target_uri(number)
        headers = self._headers("MESSAGE", 1, f"<{uri}>", generate_tag(), secrets.token_hex(12))
        headers.add("Content-Type", "text/plain;charset=utf-8")
        request = SipRequest("MESSAGE", uri, headers, text.encode("utf-8"))
        key, out = self._send(request, destination, now)
        self._messages.add(key)
        return key, out

    def _on_request(self, event: RequestReceived, now: float) -> list[Output]:
        request = event.request
        method = request.method
        if method == "INVITE":
            return self._on_invite(event, now)
        if method == "BYE":
            return self._on_bye(event, now)
        if method == "CANCEL":
            return self._on_cancel(event, now)
        if method == "OPTIONS":
            response = make_response(
                request,
                200,
                to_tag=generate_tag(),
                headers=[
                    ("Allow", ALLOW),
                    ("Accept", "application/sdp"),
                    ("User-Agent", USER_AGENT),
                ],
            )
            return self._respond(event.key, response, now)
        if method == "MESSAGE":
            out = self._respond(event.key, make_response(request, 200, to_tag=generate_tag()), now)
            try:
                sender = str(request.from_.uri)
            except SipParseError:
                sender = ""
            text = request.body.decode("utf-8", errors="replace")
            out.append(MessageReceived(sender, request.content_type or "text/plain", text))
            return out
        if method in ("REGISTER", "PRACK", "UPDATE", "INFO", "SUBSCRIBE", "NOTIFY", "REFER"):
            return self._respond(
                event.key, make_response(request, 405, headers=[("Allow", ALLOW)]), now
            )
        return self._respond(event.key, make_response(request, 501), now)

    def _on_response(self, key: TransactionKey, response: SipResponse, now: float) -> list[Output]:
        if key in self._messages:
            if response.status < 200:
                return []
            self._messages.discard(key)
            return [MessageDelivered(key, response.status, response.reason)]
        if key.method == "REGISTER":
            return self._on_register_response(key, response, now)
        call_id = self._by_key.get(key)
        leg = self._legs.get(call_id) if call_id else None
        if leg is None:
            return []
        if key.method == "INVITE" and key == leg.invite_key:
            return self._on_invite_response(leg, response, now)
        if key.method == "INVITE" and key == leg.reinvite_key:
            return self._on_reinvite_response(leg, response, now)
        acked = leg.reinvite_acked
        if acked is not None and key == acked[0] and 200 <= response.status < 300:
            # §13.2.2.4: a retransmitted 2xx to our re-INVITE: the same ACK again.
            return [Transmit(acked[1], leg.peer)]
        if key.method == "BYE" and key == leg.bye_key and response.status >= 200:
            out = self._end_pending_reinvite(leg, now)
            leg.state = CallState.ENDED
            if leg.dialog is not None:
                leg.dialog.terminate()
            self._forget(leg)
            status = None if response.status < 300 else response.status
            out.append(CallEnded(leg.call_id, False, status))
            return out
        return []

    # -- timers --

    def get_timer(self) -> float | None:
        """The next time `handle_timer` must run: transactions, 2xx retransmission,
        registration refresh."""
        candidates = [self.layer.get_timer(), self._registration.refresh_at]
        candidates += [leg.ok_next for leg in self._legs.values()]
        candidates += [leg.cancel_give_up for leg in self._legs.values()]
        if self._ended_at:
            candidates.append(min(self._ended_at.values()) + 64 * self.config.timers.t1)
        present = [c for c in candidates if c is not None]
        return min(present) if present else None

    def handle_timer(self, now: float) -> list[Output]:
        out = self._run(self.layer.handle_timer(now), now)
        reg = self._registration
        if reg.refresh_at is not None and now >= reg.refresh_at and reg.key is None:
            reg.refresh_at = None
            reg.auth_tries = 0
            reg.expires = self.config.register_expires
            out += self._send_register(now, None)
        for leg in list(self._legs.values()):
            if leg.ok_next is not None and now >= leg.ok_next:
                out += self._retransmit_ok(leg, now)
            if leg.cancel_give_up is not None and now >= leg.cancel_give_up:
                out += self._abandon_invite(leg, now)
        self._sweep(now)
        return out

    def _abandon_invite(self, leg: _Leg, now: float) -> list[Output]:
        """§9.1: no final response 64*T1 after our CANCEL: consider the INVITE cancelled.

        The call ends here. Its INVITE client transaction stays in the layer (in Proceeding
        it has no timer, and `TransactionLayer` offers no way to drop one): a known leak of
        one transaction per such call, until shared/sip grows an `abandon`.
        """
        leg.cancel_give_up = None
        if leg.state is CallState.ENDED:
            return []
        return self._end_failed(leg, 408, "No Answer To CANCEL")

    def _retransmit_ok(self, leg: _Leg, now: float) -> list[Output]:
        assert leg.ok is not None
        if now >= leg.ok_give_up:
            # §13.3.1.4: no ACK within 64*T1: confirm and end the call at once with a BYE.
            leg.ok = None
            leg.ok_next = None
            if leg.reinvite_key is not None:
                leg.reinvite_key = None
            leg.state = CallState.ESTABLISHED
            leg.bye_after_ack = False
            out = self._bye(leg, now)
            out.append(CallEnded(leg.call_id, False, 408))
            return out
        leg.ok_interval = min(2 * leg.ok_interval, self.config.timers.t2)
        leg.ok_next = now + leg.ok_interval
        return [Transmit(leg.ok, leg.peer)]

    def _sweep(self, now: float) -> None:
        """Forget calls 64*T1 after they ended, when no retransmission of theirs can still
        arrive: a long-running agent (a load test) must not keep every call it ever had."""
        linger = 64 * self.config.timers.t1
        for call_id, leg in list(self._legs.items()):
            if leg.state is not CallState.ENDED:
                continue
            since = self._ended_at.setdefault(call_id, now)
            if now - since >= linger:
                del self._legs[call_id]
                del self._ended_at[call_id]
                for key in [k for k, c in self._by_key.items() if c == call_id]:
                    del self._by_key[key]


_NO_KEY = TransactionKey(False, "", "")
