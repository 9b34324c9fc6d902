"""The trunk session: version exchange, challenge-response login, heartbeats, close.

This module owns the state of one trunk connection, for either side, as a sans-I/O object in the
shape of h11 and aioquic: feed it bytes with `receive_data(data, now)`, take events with
`next_event()`, send messages with `send(msg)`, and write out whatever `data_to_send()` returns.
Time is an input: `get_timer()` says when `handle_timer(now)` must be called next. It never reads
the clock, sleeps or touches a socket; TLS and TCP are the adapter's business.

It does not know what an office, a directory or a call is: once logged in, messages are handed up
as `Received` events.

The handshake (docs/wire-protocol.md has the details)::

    remote host (client)                            main host (server)
    START ---- Hello(version, min_version) ----->   START
    HELLO_SENT                                       |  version chosen
              <--- Challenge(version, nonce, CA) --  CHALLENGED
    |  CA checked against the pinned fingerprint
    LOGIN_SENT ---- Login(office, cnonce, proof) -->  |  LoginAttempt event;
                                                      VERIFYING  adapter looks up the secret,
                                                      |          calls complete_login()
              <--- LoginOk(server_proof, address) -- ESTABLISHED
    ESTABLISHED        (or LoginRefused, then CLOSED on both sides)

    proof        = HMAC-SHA256(secret, "bpx-login-v1" | office | nonce | cnonce)
    server_proof = HMAC-SHA256(secret, "bpx-server-v1" | office | nonce | cnonce)

Both nonces are fresh per connection, so a captured proof cannot be replayed, and the server
proves it knows the secret too. In ESTABLISHED both sides send a Heartbeat every
`heartbeat_interval` seconds; a side that has received nothing for `dead_after` seconds declares
the connection dead. Anything not in the table below is a protocol error: a Close frame with the
reason is queued and the session ends.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from shared.wire.frame import DEFAULT_MAX_BODY, ErrorCode, FrameDecoder, WireError
from shared.wire.messages import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Challenge,
    Close,
    Heartbeat,
    Hello,
    Login,
    LoginOk,
    LoginRefused,
    Message,
    UnknownMessage,
    append_message,
    decode_body_untrusted,
    new_packer,
)

HANDSHAKE_TIMEOUT = 10.0
MIN_HEARTBEAT_INTERVAL = 0.05
NONCE_SIZE = 32


class LocalProtocolError(Exception):
    """Our own code used the session wrongly (a bug here, not the peer's fault)."""


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    START = "start"
    HELLO_SENT = "hello-sent"
    CHALLENGED = "challenged"
    LOGIN_SENT = "login-sent"
    VERIFYING = "verifying"
    ESTABLISHED = "established"
    CLOSED = "closed"


# (role, state, message type) -> handler name. Anything else received is a protocol error.
_TRANSITIONS: dict[tuple[Role, State, type[Message]], str] = {
    (Role.SERVER, State.START, Hello): "_on_hello",
    (Role.CLIENT, State.HELLO_SENT, Challenge): "_on_challenge",
    (Role.SERVER, State.CHALLENGED, Login): "_on_login",
    (Role.CLIENT, State.LOGIN_SENT, LoginOk): "_on_login_ok",
    (Role.CLIENT, State.LOGIN_SENT, LoginRefused): "_on_login_refused",
    (Role.CLIENT, State.ESTABLISHED, Heartbeat): "_on_heartbeat",
    (Role.SERVER, State.ESTABLISHED, Heartbeat): "_on_heartbeat",
}


# --- Events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """Server: a remote host asks to log in as `office`; call `complete_login`."""

    office: str
    directory_version: int
    boot_id: str


@dataclass(frozen=True, slots=True)
class LoggedIn:
    """Both sides: the session is established."""

    office: str
    session: str
    public_ip: str
    public_port: int
    directory_version: int = 0
    boot_id: str = ""


@dataclass(frozen=True, slots=True)
class LoginRejected:
    reason: str
    retry_after: float = 0.0


@dataclass(frozen=True, slots=True)
class Received:
    message: Message
    channel: int


@dataclass(frozen=True, slots=True)
class Ignored:
    """A frame of a type this version does not know; kept for the log, otherwise ignored."""

    unknown: UnknownMessage


@dataclass(frozen=True, slots=True)
class Closed:
    """The session is over. `by_peer` is False when we closed it (timeout, protocol error)."""

    code: int
    reason: str
    by_peer: bool


Event = LoginAttempt | LoggedIn | LoginRejected | Received | Ignored | Closed


def media_key(secret: bytes, office: str, nonce: bytes, client_nonce: bytes) -> bytes:
    """The 32-byte key for this login's WAN media (AES-256-GCM), known to both ends only.

    Derived like the proofs (HMAC-SHA256 with its own label), from both fresh nonces, so every
    login has its own key and a recorded session's key is useless for the next one.
    """
    return hmac.digest(
        secret, b"bpx-media-v1|" + office.encode() + b"|" + nonce + client_nonce, "sha256"
    )


def login_proof(secret: bytes, office: str, nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.digest(
        secret, b"bpx-login-v1|" + office.encode() + b"|" + nonce + client_nonce, "sha256"
    )


def server_proof(secret: bytes, office: str, nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.digest(
        secret, b"bpx-server-v1|" + office.encode() + b"|" + nonce + client_nonce, "sha256"
    )


class TrunkSession:
    """One side of one trunk connection. Use `client()` or `server()` to make one."""

    def __init__(self, role: Role, now: float, *, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.role = role
        self.state = State.START
        self.version = PROTOCOL_VERSION
        self.office = ""
        self.heartbeat_interval = 1.0
        self.dead_after = 4.0
        self.peer_software = ""
        self.media_key = b""  # set at login: see media_key()
        self._decoder = FrameDecoder(max_body)
        self._events: deque[Event] = deque()
        self._out = bytearray()
        self._packer = new_packer()
        self._last_received = now
        self._next_heartbeat: float | None = None
        self._handshake_deadline: float | None = now + HANDSHAKE_TIMEOUT
        self._heartbeat_seq = 0
        # Client-side login material.
        self._secret = b""
        self._client_nonce = b""
        self._nonce = b""
        self._ca_sha256: bytes | None = None
        self._check_ca: Callable[[bytes], str | None] | None = None
        self._directory_version = 0
        self._boot_id = ""
        self._software = ""
        # Server-side.
        self._ca_cert = b""
        self._attempt: Login | None = None
        self.ca_cert = b""

    # -- construction --

    @classmethod
    def client(
        cls,
        now: float,
        *,
        office: str,
        secret: bytes,
        client_nonce: bytes,
        software: str,
        ca_sha256: bytes | None = None,
        check_ca: Callable[[bytes], str | None] | None = None,
        directory_version: int = 0,
        boot_id: str = "",
    ) -> TrunkSession:
        """A remote host's session; the Hello is queued at once.

        `check_ca(ca_der)` (pure computation, no I/O) returns why the CA the server sent is not
        acceptable, or None: `join` uses it to check that the TLS certificate was issued by the
        pinned CA before any Login is sent, so a relay in the middle learns nothing.
        """
        self = cls(Role.CLIENT, now)
        self.office = office
        self._secret = secret
        self._client_nonce = client_nonce
        self._ca_sha256 = ca_sha256
        self._check_ca = check_ca
        self._directory_version = directory_version
        self._boot_id = boot_id
        self._software = software
        self._queue(Hello(PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, software))
        self.state = State.HELLO_SENT
        return self

    @classmethod
    def server(
        cls,
        now: float,
        *,
        nonce: bytes,
        software: str,
        ca_cert: bytes = b"",
        heartbeat_interval: float = 1.0,
        dead_after: float = 4.0,
    ) -> TrunkSession:
        self = cls(Role.SERVER, now)
        self._nonce = nonce
        self._software = software
        self._ca_cert = ca_cert
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        return self

    # -- the adapter's interface --

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes from the stream; b"" means the peer closed it."""
        if self.state is State.CLOSED:
            return
        if not data:
            self._finish(ErrorCode.NORMAL, "connection closed by the peer", by_peer=True)
            return
        self._last_received = now
        self._decoder.feed(data)
        events = self._events
        try:
            for type_code, _flags, channel, body in self._decoder.frames_untrusted():
                if self.state is State.ESTABLISHED and type_code not in _SESSION_CODES:
                    # The hot path: any message but the session's own, once logged in. What
                    # _handle() would do with it, without its table look-up.
                    msg = decode_body_untrusted(type_code, channel, body)
                    if isinstance(msg, UnknownMessage):
                        events.append(Ignored(msg))
                    else:
                        events.append(Received(msg, channel))
                    continue
                self._handle(decode_body_untrusted(type_code, channel, body), channel, now)
                if self.closed:
                    break  # whatever follows a Close (or a refusal) is not read
        except WireError as exc:
            self.close(exc.code, exc.reason)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def pending_events(self) -> int:
        """How many events `next_event()` would return before None."""
        return len(self._events)

    @property
    def pending_output(self) -> int:
        """How many bytes `data_to_send()` would return now."""
        return len(self._out)

    def data_to_send(self) -> bytes:
        """Every frame queued since the last call, as one piece for one write."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def send(self, msg: Message, *, channel: int = 0) -> None:
        if self.state is not State.ESTABLISHED:
            raise LocalProtocolError(f"cannot send {type(msg).__name__} in state {self.state}")
        if msg.TYPE in _SESSION_ONLY_CODES:
            # The session's own vocabulary: sent by hand, the peer would take it as a protocol
            # violation (or a goodbye) while our state still says ESTABLISHED. Use close().
            raise LocalProtocolError(f"{type(msg).__name__} is sent by the session itself")
        self._queue(msg, channel)

    def close(self, code: int, reason: str) -> None:
        """Queue a Close frame (the adapter still writes it) and end the session."""
        if self.state is State.CLOSED:
            return
        self._queue(Close(code, reason))
        self._finish(code, reason, by_peer=False)

    def complete_login(
        self, secret: bytes | None, *, now: float, public_ip: str, public_port: int, session: str
    ) -> bool:
        """Server: check the pending Login against the office's secret (None: no such office).

        An unknown office and a wrong proof get the same answer, so nobody learns office names.
        """
        if self.role is not Role.SERVER or self.state is not State.VERIFYING:
            raise LocalProtocolError("complete_login() without a pending login attempt")
        attempt = self._attempt
        assert attempt is not None
        expected = login_proof(
            secret or b"\0" * 32, attempt.office, self._nonce, attempt.client_nonce
        )
        if secret is None or not hmac.compare_digest(expected, attempt.proof):
            self._queue(LoginRefused("wrong office name or secret", retry_after=1.0))
            self._events.append(LoginRejected("wrong office name or secret"))
            self._finish(ErrorCode.AUTH_FAILED, "login refused", by_peer=False)
            return False
        self.office = attempt.office
        self._secret = secret
        self._client_nonce = attempt.client_nonce
        proof = server_proof(secret, attempt.office, self._nonce, attempt.client_nonce)
        self._queue(
            LoginOk(
                session=session,
                server_proof=proof,
                public_ip=public_ip,
                public_port=public_port,
                heartbeat_interval=self.heartbeat_interval,
                dead_after=self.dead_after,
            )
        )
        self._established(now)
        self._events.append(
            LoggedIn(
                attempt.office,
                session,
                public_ip,
                public_port,
                attempt.directory_version,
                attempt.boot_id,
            )
        )
        return True

    def get_timer(self) -> float | None:
        if self.state is State.CLOSED:
            return None
        if self.state is not State.ESTABLISHED:
            return self._handshake_deadline
        assert self._next_heartbeat is not None
        return min(self._next_heartbeat, self._last_received + self.dead_after)

    def handle_timer(self, now: float) -> None:
        if self.state is State.CLOSED:
            return
        if self.state is not State.ESTABLISHED:
            if self._handshake_deadline is not None and now >= self._handshake_deadline:
                self.close(ErrorCode.TIMEOUT, "login did not complete in time")
            return
        if now >= self._last_received + self.dead_after:
            # RFC-style liveness: silence longer than dead_after means the path is gone. No Close
            # is sent: nobody would hear it.
            self._finish(
                ErrorCode.TIMEOUT,
                f"nothing heard for {now - self._last_received:.1f} s",
                by_peer=False,
            )
            return
        assert self._next_heartbeat is not None
        if now >= self._next_heartbeat:
            self._heartbeat_seq += 1
            self._queue(Heartbeat(self._heartbeat_seq))
            self._next_heartbeat = now + self.heartbeat_interval

    # -- internals --

    def _queue(self, msg: Message, channel: int = 0) -> None:
        append_message(self._out, msg, self._packer, channel=channel)

    def _finish(self, code: int, reason: str, *, by_peer: bool) -> None:
        self.state = State.CLOSED
        self._events.append(Closed(code, reason, by_peer))

    def _established(self, now: float) -> None:
        self.media_key = media_key(self._secret, self.office, self._nonce, self._client_nonce)
        self.state = State.ESTABLISHED
        self._handshake_deadline = None
        # The peer cannot speak while it waits for our verdict (the server may be slow to look
        # up the secret, or throttle guessers): its silence until now is not a dead path.
        self._last_received = max(self._last_received, now)
        self._next_heartbeat = now + self.heartbeat_interval

    def _handle(self, msg: Message | UnknownMessage, channel: int, now: float) -> None:
        if isinstance(msg, UnknownMessage):
            self._events.append(Ignored(msg))
            return
        if isinstance(msg, Close):
            self._finish(msg.code, msg.reason or ErrorCode.NAMES.get(msg.code, ""), by_peer=True)
            return
        handler = _TRANSITIONS.get((self.role, self.state, type(msg)))
        if handler is not None:
            getattr(self, handler)(msg, now)
            return
        if self.state is State.ESTABLISHED and not _is_handshake(msg):
            self._events.append(Received(msg, channel))
            return
        raise WireError(
            ErrorCode.PROTOCOL, f"{type(msg).__name__} not allowed in state {self.state.value}"
        )

    def _on_hello(self, msg: Hello, now: float) -> None:
        version = min(msg.version, PROTOCOL_VERSION)
        if version < max(msg.min_version, MIN_PROTOCOL_VERSION):
            raise WireError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"peer speaks versions {msg.min_version}-{msg.version}, we speak"
                f" {MIN_PROTOCOL_VERSION}-{PROTOCOL_VERSION}",
            )
        self.version = version
        self.peer_software = msg.software
        self._queue(Challenge(version, self._nonce, self._software, self._ca_cert))
        self.state = State.CHALLENGED

    def _on_challenge(self, msg: Challenge, now: float) -> None:
        if not MIN_PROTOCOL_VERSION <= msg.version <= PROTOCOL_VERSION:
            raise WireError(ErrorCode.UNSUPPORTED_VERSION, f"server chose version {msg.version}")
        if len(msg.nonce) < 16:
            raise WireError(ErrorCode.PROTOCOL, "server nonce shorter than 16 bytes")
        if self._ca_sha256 is not None and not hmac.compare_digest(
            hashlib.sha256(msg.ca_cert).digest(), self._ca_sha256
        ):
            self._events.append(
                LoginRejected("the main host's CA does not match the pinned fingerprint")
            )
            self.close(ErrorCode.AUTH_FAILED, "CA fingerprint mismatch")
            return
        problem = self._check_ca(msg.ca_cert) if self._check_ca is not None else None
        if problem is not None:
            self._events.append(LoginRejected(f"the main host's certificate: {problem}"))
            self.close(ErrorCode.AUTH_FAILED, "certificate not issued by the pinned CA")
            return
        self.version = msg.version
        self.peer_software = msg.software
        self.ca_cert = msg.ca_cert
        self._nonce = msg.nonce
        proof = login_proof(self._secret, self.office, msg.nonce, self._client_nonce)
        self._queue(
            Login(self.office, self._client_nonce, proof, self._directory_version, self._boot_id)
        )
        self.state = State.LOGIN_SENT

    def _on_login(self, msg: Login, now: float) -> None:
        if len(msg.client_nonce) < 16:
            raise WireError(ErrorCode.PROTOCOL, "client nonce shorter than 16 bytes")
        self._attempt = msg
        self.state = State.VERIFYING
        self._events.append(LoginAttempt(msg.office, msg.directory_version, msg.boot_id))

    def _on_login_ok(self, msg: LoginOk, now: float) -> None:
        expected = server_proof(self._secret, self.office, self._nonce, self._client_nonce)
        if not hmac.compare_digest(expected, msg.server_proof):
            # The server does not know our secret: not our main host.
            self._events.append(LoginRejected("the main host could not prove it knows the secret"))
            self.close(ErrorCode.AUTH_FAILED, "server proof invalid")
            return
        # Written so that NaN fails it too, and an infinite dead_after (never notice a dead
        # main host) is refused: either would leave get_timer() meaningless.
        # A floor on the interval too: a tiny one would have us send heartbeats in a busy loop.
        if not MIN_HEARTBEAT_INTERVAL <= msg.heartbeat_interval < msg.dead_after < math.inf:
            raise WireError(ErrorCode.PROTOCOL, "nonsense heartbeat settings in LoginOk")
        self.heartbeat_interval = msg.heartbeat_interval
        self.dead_after = msg.dead_after
        self._established(now)
        self._events.append(LoggedIn(self.office, msg.session, msg.public_ip, msg.public_port))

    def _on_login_refused(self, msg: LoginRefused, now: float) -> None:
        self._events.append(LoginRejected(msg.reason, msg.retry_after))
        self._finish(ErrorCode.AUTH_FAILED, msg.reason, by_peer=True)

    def _on_heartbeat(self, msg: Heartbeat, now: float) -> None:
        pass  # receive_data already noted that the peer is alive


def _is_handshake(msg: Message) -> bool:
    return isinstance(msg, Hello | Challenge | Login | LoginOk | LoginRefused)


_HANDSHAKE_CODES = frozenset(cls.TYPE for cls in (Hello, Challenge, Login, LoginOk, LoginRefused))
# Sent only by the session itself: its handshake and Close (send() refuses them).
_SESSION_ONLY_CODES = _HANDSHAKE_CODES | {Close.TYPE}
# Handled by the session, never handed up as Received: the above and Heartbeat.
_SESSION_CODES = _SESSION_ONLY_CODES | {Heartbeat.TYPE}
