"""The phone agent's Python API: `open_phone`, `Phone` and `Call`, on trio.

This module wires the layers as the remote host does (STYLE.md): `serve_sip_transports` hands
validated SIP messages to the pure `UserAgent` (which owns the transaction layer), its outputs
are sent through the transport or become call and phone events here, and each call's media runs
in a `MediaStream`. Many phones can live in one process: each has its own port, user agent and
tasks, and nothing here is global.

    async with open_phone(server="127.0.0.1:5060", ext="2001", password="pw") as phone:
        call = await phone.call("2002", tone=440)
        await call.wait_answered()
        await trio.sleep(5)
        stats = await call.hangup()

    incoming = await phone.next_call()
    await incoming.answer(record="heard.wav")
    stats = await incoming.wait_ended()

A phone owns a nursery (opened by `open_phone`, closed when it exits) because calls start
media tasks that outlive the method that started them; nothing else gets that nursery.
It does not parse SDP (`negotiation.py`), do RTP (`media.py`) or print: the CLI does.

It is long (about 750 lines) because `Call` and `Phone` are two halves of one adapter: the
phone turns user agent events into call state, and each call method goes back through the
phone's single send path; split apart, each would reach into the other's internals.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from phoneagent.audio import WavRecorder, open_source
from phoneagent.media import MediaStream, open_media_stream
from phoneagent.negotiation import (
    MediaNegotiationError,
    MediaPlan,
    SdpSession,
    offer_is_hold,
    plan_from_answer,
)
from phoneagent.useragent import (
    AgentConfig,
    CallAnswered,
    CallEnded,
    CallFailed,
    CallProgress,
    IncomingCall,
    MessageDelivered,
    MessageReceived,
    OfferReceived,
    Output,
    Registered,
    RegistrationFailed,
    ReinviteDone,
    Transmit,
    Unregistered,
    UserAgent,
    UserAgentError,
)
from shared.aio.sip_transport import (
    Destination,
    SipTransport,
    SipTransportError,
    Source,
    serve_sip_transports,
)
from shared.sip.errors import SipParseError
from shared.sip.message import SipMessage, SipResponse
from shared.sip.transaction import TransactionKey
from shared.sip.uri import parse_host_port_untrusted

log = logging.getLogger("phoneagent")
Address = tuple[str, int]
GUARD = 32.0  # seconds: longest a SIP transaction can take (64*T1); waits give up after it
MAX_MESSAGES = 1000  # MESSAGEs a phone keeps
BYE_WAIT = 5.0  # seconds to wait for the answer to our BYE (its retransmissions go on)


class PhoneError(Exception):
    """Something the phone could not do; the message is one line for an operator."""


class RegistrationError(PhoneError):
    def __init__(self, status: int, reason: str) -> None:
        hint = {401: " (wrong extension or password?)", 403: " (not allowed to register)"}
        super().__init__(f"registration failed: {status} {reason}{hint.get(status, '')}")
        self.status = status
        self.reason = reason


class CallFailedError(PhoneError):
    """The call ended without being answered: `status` is the final SIP status."""

    def __init__(self, status: int, reason: str, warning: str | None = None) -> None:
        text = f"{status} {reason}" + (f" (Warning: {warning})" if warning else "")
        super().__init__(text)
        self.status = status
        self.reason = reason
        self.warning = warning


def parse_server(text: str) -> Address:
    """`HOST[:PORT]` (an IP literal, port 5060 by default) for `--server`."""
    try:
        host, port = parse_host_port_untrusted(text, "server")
    except SipParseError as exc:
        raise PhoneError(f"bad server {text!r}: {exc.reason}") from None
    if not host or not all(c.isdigit() or c in ".:abcdefABCDEF" for c in host.strip("[]")):
        raise PhoneError(f"bad server {text!r}: give an IP address, e.g. 192.0.2.10:5060")
    return host.strip("[]"), port or 5060


@dataclass
class CallStats:
    """What `--json` prints for a call."""

    call_id: str
    direction: str
    remote: str
    answered: bool = False
    status: int | None = None
    reason: str = ""
    warning: str | None = None
    ended_by: str | None = None
    duration: float = 0.0
    """Seconds from answer to end."""
    codec: str | None = None
    packets_sent: int = 0
    packets_received: int = 0
    packets_lost: int = 0
    duplicates: int = 0
    jitter_ms: float = 0.0
    late: int = 0
    concealed: int = 0
    dtmf_sent: str = ""
    dtmf_received: str = ""
    messages: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Call:
    """One call of a phone, outgoing or incoming. Methods raise `PhoneError` on misuse."""

    def __init__(self, phone: Phone, call_id: str, direction: str, remote: str) -> None:
        self.phone = phone
        self.call_id = call_id
        self.direction = direction
        self.remote = remote
        self.offer = b""
        self.media: MediaStream | None = None
        self.sdp: SdpSession | None = None
        self.plan: MediaPlan | None = None
        self.local_hold = False
        self.remote_hold = False
        self.progress: list[int] = []
        self._answered = trio.Event()
        self._ringing = trio.Event()
        self._ended = trio.Event()
        self._reinvite_done = trio.Event()
        self._reinvite_status = 0
        self._pending_hold = False
        self._answered_at: float | None = None
        self._ended_at: float | None = None
        self._failure: CallFailedError | None = None
        self._ended_by: str | None = None
        self._end_status: int | None = None
        self._cancel_media: trio.CancelScope | None = None
        self._messages_at = phone.messages_received

    # -- state --

    @property
    def answered(self) -> bool:
        return self._answered.is_set() and self._failure is None

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    @property
    def dtmf_received(self) -> str:
        session = self.media.session if self.media else None
        return session.dtmf_received if session else ""

    async def wait_answered(self) -> None:
        """Until the call is answered; `CallFailedError` if it ends unanswered."""
        await self._answered.wait()
        if self._failure is not None:
            raise self._failure

    async def wait_ringing(self) -> None:
        """Until the other side rings (a 180/183), answers, or the call ends."""
        await self._ringing.wait()

    async def wait_ended(self) -> CallStats:
        await self._ended.wait()
        return self.stats()

    def stats(self) -> CallStats:
        media_stats = self.media.statistics() if self.media else None
        end = self._ended_at if self._ended_at is not None else trio.current_time()
        stats = CallStats(
            call_id=self.call_id,
            direction=self.direction,
            remote=self.remote,
            answered=self._answered_at is not None,
            status=self._failure.status if self._failure else self._end_status,
            reason=self._failure.reason if self._failure else "",
            warning=self._failure.warning if self._failure else None,
            ended_by=self._ended_by,
            duration=round(end - self._answered_at, 3) if self._answered_at is not None else 0.0,
            messages=self.phone._texts_since(self._messages_at),
        )
        if media_stats is not None:
            stats.codec = media_stats.codec
            stats.packets_sent = media_stats.packets_sent
            stats.packets_received = media_stats.packets_received
            stats.packets_lost = media_stats.packets_lost
            stats.duplicates = media_stats.duplicates
            stats.jitter_ms = media_stats.jitter_ms
            stats.late = media_stats.late
            stats.concealed = media_stats.concealed
            stats.dtmf_sent = media_stats.dtmf_sent
            stats.dtmf_received = media_stats.dtmf_received
        return stats

    # -- media --

    async def _open_media(
        self, *, tone: float | None, play: str | Path | None, record: str | Path | None
    ) -> None:
        try:
            source = open_source(play=play, tone=tone)
        except ValueError as exc:
            raise PhoneError(str(exc)) from None
        recorder = WavRecorder(record) if record is not None else None
        try:
            media = await open_media_stream(self.phone.local_ip)
        except BaseException:
            if recorder is not None:
                recorder.close()
            raise
        media.source = source
        media.recorder = recorder
        self.media = media
        self.sdp = SdpSession(self.phone.local_ip, media.address[1])

    def _apply(self, plan: MediaPlan) -> None:
        assert self.media is not None
        self.plan = plan
        self.media.local_hold = self.local_hold
        self.media.configure(plan)
        if self._cancel_media is None:
            self.phone._start_media(self)

    def _finish_media(self) -> None:
        if self._cancel_media is not None:
            self._cancel_media.cancel()
        if self.media is not None:
            self.media.close()

    # -- actions --

    async def ring(self) -> None:
        await self.phone._do(lambda now: self.phone.ua.ring(self.call_id, now))

    async def answer(
        self,
        *,
        tone: float | None = None,
        play: str | Path | None = None,
        record: str | Path | None = None,
    ) -> None:
        """Answer an incoming call (200 with our SDP answer); returns once it is confirmed."""
        if self.direction != "incoming":
            raise PhoneError("only an incoming call can be answered")
        if self.media is not None or self.ended:
            raise PhoneError("the call was answered already, or is over")
        await self._open_media(tone=tone, play=play, record=record)
        assert self.sdp is not None
        try:
            answer, plan = self.sdp.answer(self.offer)
        except MediaNegotiationError as exc:
            self._finish_media()
            await self.reject(488)
            raise PhoneError(f"cannot answer: {exc}") from None
        self._apply(plan)
        try:
            await self.phone._do(lambda now: self.phone.ua.answer(self.call_id, answer, now))
        except PhoneError:
            self._finish_media()  # cancelled meanwhile: the call ended without us
            raise
        with trio.move_on_after(GUARD):
            await self.wait_answered()

    async def reject(self, status: int = 486, reason: str | None = None) -> None:
        await self.phone._do(lambda now: self.phone.ua.reject(self.call_id, status, now, reason))

    async def hangup(self) -> CallStats:
        """End the call (CANCEL before answer, BYE after) and return its statistics."""
        if not self._ended.is_set():
            answered = self._answered_at is not None
            await self.phone._do(lambda now: self.phone.ua.hangup(self.call_id, now))
            # A BYE's answer is only politeness: a peer that has vanished must not hold the
            # caller for 32 s. A CANCEL's 487 tells how the call ended: wait for it.
            with trio.move_on_after(BYE_WAIT if answered else GUARD):
                await self._ended.wait()
            if not self._ended.is_set():
                self._end(None, "local")
        return self.stats()

    async def send_dtmf(self, digits: str) -> None:
        """Send RFC 4733 DTMF digits in the RTP stream; returns when they are sent."""
        if self.media is None or not self.answered:
            raise PhoneError("DTMF needs an answered call")
        try:
            await self.media.send_digits(digits)
        except ValueError as exc:
            raise PhoneError(str(exc)) from None

    async def hold(self) -> None:
        """Put the call on hold: re-INVITE with a=sendonly; we stop sending audio."""
        await self._reoffer(hold=True)

    async def resume(self) -> None:
        await self._reoffer(hold=False)

    async def _reoffer(self, *, hold: bool) -> None:
        if self.sdp is None or not self.answered or self.ended:
            raise PhoneError("the call is not established")
        direction = "sendonly" if hold else "sendrecv"
        offer = self.sdp.offer(direction)
        self._reinvite_done = trio.Event()
        self._pending_hold = hold
        try:
            await self.phone._do(lambda now: self.phone.ua.reinvite(self.call_id, offer, now))
        except UserAgentError as exc:
            raise PhoneError(str(exc)) from None
        with trio.fail_after(GUARD):
            await self._reinvite_done.wait()
        if not 200 <= self._reinvite_status < 300:
            raise PhoneError(f"the re-INVITE was refused: {self._reinvite_status}")

    # -- events from the phone --

    def _on_answered(self, body: bytes) -> None:
        if self.direction == "outgoing":
            try:
                plan = plan_from_answer(body)
            except MediaNegotiationError as exc:
                log.warning("call %s: %s; hanging up", self.call_id, exc)
                self.phone._soon_hangup(self)
                return
            self._apply(plan)
        self._answered_at = trio.current_time()
        self._answered.set()
        self._ringing.set()

    def _on_reinvite_done(self, status: int, answer: bytes) -> None:
        self._reinvite_status = status
        if 200 <= status < 300 and self.media is not None:
            hold = self._pending_hold
            try:
                plan = plan_from_answer(answer, "sendonly" if hold else "sendrecv")
            except MediaNegotiationError:
                plan = None
            if plan is not None:
                # The holder sends nothing either: this agent plays no music on hold.
                self.local_hold = hold
                self.plan = plan
                self.media.local_hold = hold
                self.media.configure(plan)
        self._reinvite_done.set()

    def _fail(self, status: int, reason: str, warning: str | None) -> None:
        self._failure = CallFailedError(status, reason, warning)
        self._end(status, "remote")

    def _end(self, status: int | None, by: str) -> None:
        if self._ended.is_set():
            return
        self._end_status = status
        self._ended_by = by
        self._ended_at = trio.current_time()
        self._finish_media()
        self._answered.set()  # wake wait_answered: it sees the failure (or the end)
        self._ringing.set()
        self._ended.set()
        self.phone._calls.pop(self.call_id, None)


@dataclass(frozen=True, slots=True)
class TextMessage:
    sender: str
    content_type: str
    text: str


class Phone:
    """One softphone: a SIP port, a user agent, its calls. Made by `open_phone`."""

    def __init__(
        self,
        *,
        ext: str,
        password: str | None,
        server: Address | None,
        local_ip: str,
        register_expires: int,
        register_timeout: float = GUARD,
    ) -> None:
        self.register_timeout = register_timeout
        self.ext = ext
        self.password = password
        self.server = server
        self.local_ip = local_ip
        self.register_expires = register_expires
        self.messages: deque[TextMessage] = deque(maxlen=MAX_MESSAGES)
        """The latest MESSAGEs received (bounded: a flood must not grow the agent)."""
        self.messages_received = 0
        self.address: Address | None = None
        self._ua: UserAgent | None = None
        self._transport: SipTransport | None = None
        self._nursery: trio.Nursery | None = None
        self._calls: dict[str, Call] = {}
        self._incoming_send, self._incoming = trio.open_memory_channel[Call](16)
        self._timer_changed = trio.Event()
        self._registration = trio.Event()
        self._registration_result: Output | None = None
        self._message_event = trio.Event()
        self._delivered: dict[TransactionKey, MessageDelivered] = {}
        self._delivery = trio.Event()

    @property
    def ua(self) -> UserAgent:
        if self._ua is None:
            raise PhoneError("the phone is not running")
        return self._ua

    @property
    def port(self) -> int:
        assert self.address is not None
        return self.address[1]

    @property
    def uri(self) -> str:
        """What another agent calls to reach this one directly."""
        return f"sip:{self.ext}@{self.local_ip}:{self.port}"

    # -- running --

    async def _serve(
        self, port: int, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            address, transport = await nursery.start(
                lambda task_status: serve_sip_transports(
                    self.local_ip, port, self._handle, log=log, task_status=task_status
                )
            )
            self.address, self._transport = address, transport
            config = AgentConfig(
                ext=self.ext,
                local_ip=self.local_ip,
                local_port=address[1],
                password=self.password,
                domain=self.server[0] if self.server else None,
                proxy=self.server,
                register_expires=self.register_expires,
            )
            self._ua = UserAgent(config, logger=logging.getLogger("phoneagent.sip"))
            nursery.start_soon(self._run_timers)
            task_status.started(address)

    async def _handle(self, message: SipMessage, source: Source) -> None:
        if self._ua is None:
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("<- %s:%d %s", *source.remote, message.start_line)
        await self._process(self._ua.receive(message, source, trio.current_time()))

    async def _do(self, action: Callable[[float], list[Output]]) -> None:
        """Run a user agent method `action(now)` and process what it produced."""
        try:
            outputs = action(trio.current_time())
        except UserAgentError as exc:
            raise PhoneError(str(exc)) from None
        await self._process(outputs)

    async def _process(self, outputs: list[Output]) -> None:
        for output in outputs:
            if isinstance(output, Transmit):
                await self._send(output)
            else:
                self._dispatch(output)
        self._timer_changed.set()

    async def _send(self, output: Transmit) -> None:
        transport = self._transport
        if transport is None:
            return
        destination = output.destination
        message = output.message
        if log.isEnabledFor(logging.DEBUG):
            where = destination.remote if isinstance(destination, Source) else destination
            log.debug("-> %s %s", where, message.start_line)
        try:
            if isinstance(destination, Source):
                if isinstance(message, SipResponse):
                    await transport.send_response(message, destination)
                else:
                    await transport.send_message(message, destination.destination)
            elif isinstance(destination, tuple):
                await transport.send_message(message, Destination("udp", destination))
        except SipTransportError as exc:
            log.debug("SIP send failed: %s", exc)

    async def _run_timers(self) -> None:
        while True:
            deadline = self.ua.get_timer()
            self._timer_changed = trio.Event()
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                await self._timer_changed.wait()
                continue
            await self._process(self.ua.handle_timer(trio.current_time()))

    def _dispatch(self, event: Output) -> None:
        if isinstance(event, (Registered, RegistrationFailed, Unregistered)):
            if isinstance(event, Registered):
                log.info("registered as %s for %d s", self.ext, event.expires)
            elif isinstance(event, RegistrationFailed):
                log.warning("registration failed: %d %s", event.status, event.reason)
            self._registration_result = event
            self._registration.set()
            self._registration = trio.Event()
            return
        if isinstance(event, IncomingCall):
            incoming = Call(self, event.call_id, "incoming", event.caller)
            incoming.offer = event.offer
            self._calls[event.call_id] = incoming
            try:
                self._incoming_send.send_nowait(incoming)
            except trio.WouldBlock:
                # Nobody is taking calls fast enough: busy, like a phone with all lines in use.
                self._soon(lambda now: self.ua.reject(event.call_id, 486, now))
            return
        if isinstance(event, MessageReceived):
            log.info("MESSAGE from %s: %s", event.sender, event.text)
            self.messages.append(TextMessage(event.sender, event.content_type, event.text))
            self.messages_received += 1
            self._message_event.set()
            self._message_event = trio.Event()
            return
        if isinstance(event, MessageDelivered):
            self._delivered[event.key] = event
            self._delivery.set()
            self._delivery = trio.Event()
            return
        call_id = getattr(event, "call_id", None)
        call = self._calls.get(call_id) if isinstance(call_id, str) else None
        if call is None:
            return
        log.info("%s", event)
        if isinstance(event, CallProgress):
            call.progress.append(event.status)
            call._ringing.set()
        elif isinstance(event, CallAnswered):
            call._on_answered(event.answer)
        elif isinstance(event, CallFailed):
            call._fail(event.status, event.reason, event.warning)
        elif isinstance(event, CallEnded):
            call._end(event.status, "remote" if event.by_remote else "local")
        elif isinstance(event, OfferReceived):
            self._answer_reoffer(call, event.offer)
        elif isinstance(event, ReinviteDone):
            call._on_reinvite_done(event.status, event.answer)

    def _answer_reoffer(self, call: Call, offer: bytes) -> None:
        if call.sdp is None or call.media is None:
            self._soon(lambda now: self.ua.refuse_reinvite(call.call_id, 488, now))
            return
        try:
            answer, plan = call.sdp.answer(offer)
        except MediaNegotiationError:
            self._soon(lambda now: self.ua.refuse_reinvite(call.call_id, 488, now))
            return
        call.remote_hold = offer_is_hold(offer)
        call._apply(plan)
        self._soon(lambda now: self.ua.answer_reinvite(call.call_id, answer, now))

    def _soon(self, action: Callable[[float], list[Output]]) -> None:
        """Run a user agent action from an event handler (which cannot await)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._do, action)

    def _soon_hangup(self, call: Call) -> None:
        self._soon(lambda now: self.ua.hangup(call.call_id, now))

    def _start_media(self, call: Call) -> None:
        assert self._nursery is not None and call.media is not None
        scope = trio.CancelScope()
        call._cancel_media = scope
        media = call.media

        async def run() -> None:
            with scope:
                await media.run()

        self._nursery.start_soon(run)

    # -- the API --

    async def register(self, expires: int | None = None) -> int:
        """Register (digest auth answered); returns the granted seconds. `RegistrationError`."""
        if self.server is None:
            raise PhoneError("no server to register with")
        waiter = self._registration
        await self._do(lambda now: self.ua.register(now, expires))
        with trio.move_on_after(self.register_timeout) as scope:
            await waiter.wait()
        if scope.cancelled_caught:
            raise PhoneError(
                f"registration failed: no answer from {self.server[0]}:{self.server[1]}"
            )
        result = self._registration_result
        if isinstance(result, RegistrationFailed):
            raise RegistrationError(result.status, result.reason)
        return result.expires if isinstance(result, Registered) else 0

    async def unregister(self) -> None:
        if self.server is None or self._ua is None or not self._ua.registered:
            return
        waiter = self._registration
        await self._do(lambda now: self.ua.unregister(now))
        with trio.move_on_after(5):
            await waiter.wait()

    async def call(
        self,
        number: str,
        *,
        tone: float | None = None,
        play: str | Path | None = None,
        record: str | Path | None = None,
    ) -> Call:
        """Start a call to `number` (a number at the server, or sip:EXT@IP:PORT)."""
        try:
            self.ua.target_uri(number)
        except UserAgentError as exc:
            raise PhoneError(str(exc)) from None
        call = Call(self, "", "outgoing", number)
        await call._open_media(tone=tone, play=play, record=record)
        assert call.sdp is not None
        offer = call.sdp.offer()
        try:
            call_id, outputs = self.ua.invite(number, offer, trio.current_time())
        except UserAgentError as exc:
            call._finish_media()
            raise PhoneError(str(exc)) from None
        call.call_id = call_id
        self._calls[call_id] = call
        await self._process(outputs)
        return call

    async def next_call(self) -> Call:
        """The next incoming call (already answered 100 Trying; ring, answer or reject it)."""
        return await self._incoming.receive()

    async def send_text(self, number: str, text: str) -> int:
        """Send a SIP MESSAGE; returns the final status."""
        try:
            key, outputs = self.ua.send_text(number, text, trio.current_time())
        except UserAgentError as exc:
            raise PhoneError(str(exc)) from None
        await self._process(outputs)
        with trio.fail_after(GUARD + 5):  # the transaction reports 408 after GUARD at most
            while key not in self._delivered:
                await self._delivery.wait()
        return self._delivered.pop(key).status

    async def wait_message(self, count: int = 1) -> list[TextMessage]:
        """Until at least `count` MESSAGEs have arrived since the phone started; returns the
        ones kept (the latest MAX_MESSAGES)."""
        while self.messages_received < count:
            await self._message_event.wait()
        return list(self.messages)

    def _texts_since(self, received: int) -> list[str]:
        """The texts of the MESSAGEs received after the first `received` (those still kept)."""
        newer = self.messages_received - received
        return [m.text for m in list(self.messages)[-newer:]] if newer > 0 else []

    async def aclose(self) -> None:
        """Hang up every call and unregister."""
        for call in list(self._calls.values()):
            await call.hangup()
        await self.unregister()


@asynccontextmanager
async def open_phone(
    *,
    ext: str,
    password: str | None = None,
    server: str | Address | None = None,
    local_ip: str = "127.0.0.1",
    sip_port: int = 0,
    register: bool = True,
    register_expires: int = 300,
    register_timeout: float = GUARD,
) -> AsyncIterator[Phone]:
    """A running phone; registered first when a `server` is given (and `register`).

    Raises `RegistrationError` / `PhoneError` for an operator's mistake, and OSError when
    the SIP port cannot be bound.
    """
    address = parse_server(server) if isinstance(server, str) else server
    phone = Phone(
        ext=ext,
        password=password,
        server=address,
        local_ip=local_ip,
        register_expires=register_expires,
        register_timeout=register_timeout,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(phone._serve, sip_port)
            try:
                if address is not None and register:
                    await phone.register()
                yield phone
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await phone.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller sees what went wrong (PhoneError, OSError, its own exception), not the
        # nursery's wrapping of it.
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            raise
        raise inner from None
