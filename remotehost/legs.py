"""Call legs: what the call vocabulary of `calls.py` means in SIP and on the trunk.

Three kinds of leg translate between the controller's words (`Offer`, `Ring`, `Connect`,
`Update`, `Disconnect`, `Fail`) and a protocol:

- `UasLeg`: the calling phone. Its INVITE's server transaction gets our 1xx and final answer;
  the 2xx is retransmitted until its ACK (RFC 3261 §13.3.1.4: the TU's job; RFC 6026 sends it
  through the Accepted transaction), a CANCEL gets 200 and the INVITE 487 (§9.2).
- `UacLeg`: one registered contact of the called phone. It sends the INVITE to the address the
  REGISTER came from (the phone may be behind a NAT), ACKs a 2xx (§13.2.2.4), CANCELs only after
  a provisional response (§9.1), and ACKs and BYEs a 2xx that comes after it gave up.
- `TrunkLeg`: a call channel to the main host (CallSetup, CallProgress, CallAnswer, CallEnd,
  CallHold, CallInfo, MediaLeg).

Both SIP legs hold a `Dialog` once it exists and pass requests inside it (BYE, re-INVITE, INFO,
UPDATE, MESSAGE) to the controller. `Legs` is the factory the controller uses and the router
the SIP service uses: it matches client transactions, dialogs and CANCELs to their leg.

It does not decide anything about a call (`calls.py`), authenticate (the SIP service does, with
the registrar's verifier and throttle), or run transactions (`shared/sip/transaction.py`). It is
long (about 700 lines) because both SIP roles share one dialog base and the router that matches
SIP events to legs, and splitting them would separate each leg from the code that feeds it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from remotehost.calls import (
    Bindings,
    Call,
    CallController,
    CallEvent,
    Connect,
    Disconnect,
    Fail,
    Offer,
    Ring,
    Update,
    UpdateResult,
    WanMedia,
)
from shared.aio.sip_transport import Destination, Source
from shared.aio.trunk import ConnectionLost
from shared.sip.dialog import TARGET_REFRESH_METHODS, Dialog, DialogError
from shared.sip.errors import SipParseError
from shared.sip.message import (
    REASON_PHRASES,
    Headers,
    SipMessage,
    SipRequest,
    SipResponse,
    make_response,
)
from shared.sip.transaction import TransactionError, TransactionKey, client_key, make_cancel
from shared.sip.uri import SipUri
from shared.wire.messages import (
    CallAnswer,
    CallEnd,
    CallHold,
    CallInfo,
    CallProgress,
    CallSetup,
    MediaLeg,
    Message,
)

log = logging.getLogger("remotehost.legs")
SERVER_NAME = "branchpbx-remotehost/0.1"
T1, T2 = 0.5, 4.0  # RFC 3261 §17.1.1.1 defaults


class SipPort(Protocol):
    """What the legs need of the SIP service (`sipservice.SipService`)."""

    def local_address(self, peer_ip: str) -> tuple[str, int]: ...
    def new_branch(self) -> str: ...
    async def respond(self, key: TransactionKey, response: SipResponse) -> None: ...
    async def request(self, request: SipRequest, destination: Destination) -> TransactionKey:
        """Start a client transaction; its responses come back through `Legs.on_response`.
        Raises TransactionError when it cannot be started (overload)."""
        ...

    async def send_direct(self, message: SipMessage, destination: Destination) -> None:
        """Send outside any transaction: the ACK for a 2xx."""
        ...


class Trunk(Protocol):
    def new_call_channel(self) -> int: ...
    async def send_call(self, channel: int, msg: Message) -> None: ...


def _warning(host: str, text: str) -> str:
    # RFC 3261 §20.43: warn-code 399 (miscellaneous), the agent, and the text quoted.
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'399 {host} "{quoted}"'


class SipLeg:
    """What both SIP legs share: the dialog, requests inside it, 2xx retransmission."""

    def __init__(self, legs: Legs, destination: Destination, peer_ip: str) -> None:
        self.legs = legs
        self.port = legs.port
        self.destination = destination
        self.peer_ip = peer_ip
        self.call: Call | None = None
        self.dialog: Dialog | None = None
        self.closed = False
        self._waiting: dict[TransactionKey, trio.MemorySendChannel[SipResponse]] = {}
        self._unacked: dict[int, trio.Event] = {}
        # What `Legs` routes to this leg, so forgetting it need not scan every call's entries.
        self.sent_keys: set[TransactionKey] = set()
        self.dialog_key: tuple[str, str] | None = None

    @property
    def controller(self) -> CallController:
        assert self.legs.controller is not None
        return self.legs.controller

    def _via(self) -> str:
        host, port = self.port.local_address(self.peer_ip)
        transport = self.destination.transport.upper()
        return f"SIP/2.0/{transport} {_host(host)}:{port};branch={self.port.new_branch()};rport"

    def _contact(self, user: str = "b2bua") -> str:
        host, port = self.port.local_address(self.peer_ip)
        suffix = ";transport=tcp" if self.destination.transport == "tcp" else ""
        return f"<sip:{user}@{_host(host)}:{port}{suffix}>"

    async def _request(self, request: SipRequest) -> TransactionKey | None:
        # Known before it is sent: on loopback or a LAN the answer (a 180, which is never
        # repeated) may be handled while the send itself is still returning.
        expected = client_key(request)
        if not self.closed:
            self.legs.keys[expected] = self
            self.sent_keys.add(expected)
        try:
            key = await self.port.request(request, self.destination)
        except TransactionError as exc:
            log.warning("cannot send %s: %s", request.method, exc)
            self.legs.keys.pop(expected, None)
            return None
        return key

    # -- inside the dialog --

    async def on_request(self, key: TransactionKey, request: SipRequest) -> None:
        dialog = self.dialog
        assert dialog is not None
        refusal = dialog.receive_request(request)
        if refusal is not None:
            await self.port.respond(key, refusal)
            return
        if request.method == "BYE":
            await self._answer(key, request, UpdateResult(200, "OK"))
            await self.controller.on_event(self, Disconnect("hung up"))
            return
        update = Update(request.method, request.content_type or "", request.body)

        async def reply(result: UpdateResult) -> None:
            await self._answer(key, request, result)

        self.controller.spawn_update(self, update, reply)

    async def _answer(self, key: TransactionKey, request: SipRequest, result: UpdateResult) -> None:
        dialog = self.dialog
        assert dialog is not None
        headers = [("Server", SERVER_NAME)]
        if 200 <= result.status < 300 and request.method in TARGET_REFRESH_METHODS:
            headers.append(("Contact", str(dialog.local_contact or self._contact())))
        if result.body:
            headers.append(("Content-Type", result.content_type or "application/sdp"))
        response = make_response(
            request,
            result.status,
            result.reason or None,
            to_tag=dialog.local_tag,
            headers=headers,
            body=result.body,
        )
        await self.port.respond(key, response)
        if request.method == "INVITE" and 200 <= result.status < 300:
            self._retransmit_until_ack(key, request.cseq.seq, response)

    def _retransmit_until_ack(self, key: TransactionKey, seq: int, response: SipResponse) -> None:
        """RFC 3261 §13.3.1.4: our 2xx again at T1, 2*T1 ... T2 until its ACK; after 64*T1
        the session ends with a BYE."""
        acked = trio.Event()
        self._unacked[seq] = acked
        if self.destination.transport == "tcp":
            return  # a reliable transport does not lose the 2xx: only its ACK is awaited

        t1, t2 = self.legs.t1, self.legs.t2

        async def run() -> None:
            interval = t1
            with trio.move_on_after(64 * t1):
                while not acked.is_set() and not self.closed:
                    with trio.move_on_after(interval):
                        await acked.wait()
                    if acked.is_set() or self.closed:
                        return
                    await self.port.respond(key, response)
                    interval = min(2 * interval, t2)
                return
            if not acked.is_set() and not self.closed:
                log.warning("no ACK for our 2xx from %s: ending the call", self.peer_ip)
                await self.send(Disconnect("no ACK"))
                await self.controller.on_event(self, Disconnect("no ACK"))

        self.legs.spawn(run)

    def on_ack(self, request: SipRequest) -> None:
        acked = self._unacked.pop(request.cseq.seq, None)
        if acked is not None:
            acked.set()

    async def on_response(self, key: TransactionKey, response: SipResponse) -> None:
        waiter = self._waiting.get(key)
        if waiter is not None and response.status >= 200:
            waiter.send_nowait(response)
            if response.status >= 200 and response.cseq.method != "INVITE":
                self.legs.keys.pop(key, None)
        elif response.cseq.method == "INVITE" and 200 <= response.status < 300:
            await self._ack(None)  # a retransmitted 2xx to a re-INVITE: ACK it again

    async def update(self, update: Update) -> UpdateResult:
        """Send `update` inside the dialog, wait for the final answer."""
        dialog = self.dialog
        if dialog is None or self.closed:
            return UpdateResult(481, "Call/Transaction Does Not Exist")
        headers: list[tuple[str, str]] = [("User-Agent", SERVER_NAME)]
        if update.body:
            headers.append(("Content-Type", update.content_type or "application/sdp"))
        try:
            request = dialog.create_request(
                update.method, via=self._via(), headers=headers, body=update.body
            )
        except DialogError as exc:
            return UpdateResult(481, f"Call/Transaction Does Not Exist ({exc})")
        send, receive = trio.open_memory_channel[SipResponse](1)
        key = client_key(request)
        self._waiting[key] = send  # before sending: the answer may come at once
        try:
            if await self._request(request) is None:
                return UpdateResult(503, "Service Unavailable (overloaded)")
            with trio.move_on_after(64 * self.legs.t1 + 1):
                response = await receive.receive()
                dialog.receive_response(update.method, response)
                if update.method == "INVITE" and 200 <= response.status < 300:
                    await self._ack(request)
                return UpdateResult(
                    response.status, response.reason, response.content_type or "", response.body
                )
            return UpdateResult(408, "Request Timeout")
        finally:
            del self._waiting[key]

    async def _ack(self, invite: SipRequest | None) -> None:
        if self.dialog is None:
            return
        try:
            ack = self.dialog.create_ack(via=self._via(), invite=invite)
        except DialogError:
            return
        await self.port.send_direct(ack, self.destination)

    async def _bye(self) -> None:
        dialog = self.dialog
        if dialog is None or dialog.terminated:
            return
        try:
            bye = dialog.create_bye(via=self._via(), headers=[("User-Agent", SERVER_NAME)])
        except DialogError:
            return
        dialog.terminate()
        await self._request(bye)

    def close(self) -> None:
        self.closed = True
        self.legs.forget(self)

    async def send(self, event: CallEvent) -> None:
        raise NotImplementedError


class UasLeg(SipLeg):
    """The calling phone: we are the server of its INVITE."""

    def __init__(self, legs: Legs, key: TransactionKey, invite: SipRequest, source: Source) -> None:
        super().__init__(legs, source.destination, source.remote[0])
        self.key = key
        self.invite = invite
        self.local_tag = secrets.token_hex(6)
        self.final = False
        legs.invites[key] = self
        self.dialog_key = (invite.call_id, self.local_tag)
        legs.dialogs[self.dialog_key] = self

    def _response(self, status: int, reason: str | None, extra: list[tuple[str, str]],
                  body: bytes = b"") -> SipResponse:  # fmt: skip
        headers = [("Server", SERVER_NAME), *extra]
        if 100 < status < 300:
            callee = self.invite.request_uri
            user = callee.user if isinstance(callee, SipUri) and callee.user else "b2bua"
            headers.append(("Contact", self._contact(user)))
        if body:
            headers.append(("Content-Type", "application/sdp"))
        return make_response(
            self.invite, status, reason, to_tag=self.local_tag, headers=headers, body=body
        )

    async def _send_response(self, response: SipResponse) -> None:
        if 100 < response.status < 300:
            if self.dialog is None:
                self.dialog = Dialog.as_uas(self.invite, response)
            else:
                self.dialog.sent_response("INVITE", response)
        await self.port.respond(self.key, response)

    async def send(self, event: CallEvent) -> None:
        if isinstance(event, Ring):
            if not self.final:
                body = event.sdp or b""
                await self._send_response(self._response(event.status, event.reason, [], body))
        elif isinstance(event, Connect):
            if not self.final:
                self.final = True
                response = self._response(200, "OK", [], event.sdp or b"")
                await self._send_response(response)
                self._retransmit_until_ack(self.key, self.invite.cseq.seq, response)
        elif isinstance(event, Fail):
            if not self.final:
                self.final = True
                extra = []
                if event.warning:
                    host, _ = self.port.local_address(self.peer_ip)
                    extra.append(("Warning", _warning(host, event.warning)))
                await self.port.respond(self.key, self._response(event.status, event.reason, extra))
        elif isinstance(event, Disconnect):
            if not self.final:
                self.final = True
                await self.port.respond(
                    self.key, self._response(480, f"Temporarily Unavailable ({event.reason})", [])
                )
            else:
                await self._bye()

    async def on_cancel(self, key: TransactionKey, cancel: SipRequest) -> None:
        # RFC 3261 §9.2: the CANCEL gets 200 either way; a pending INVITE gets 487.
        await self.port.respond(key, make_response(cancel, 200, to_tag=self.local_tag))
        if self.final:
            return
        self.final = True
        await self.port.respond(self.key, self._response(487, "Request Terminated", []))
        await self.controller.on_event(self, Disconnect("cancelled by the caller"))

    def close(self) -> None:
        super().close()
        self.legs.invites.pop(self.key, None)


class UacLeg(SipLeg):
    """One contact of the called phone: we are the client of the INVITE we send it."""

    def __init__(self, legs: Legs, binding: Bindings) -> None:
        address = (binding.source_ip, binding.source_port)
        destination = Destination("tcp" if binding.transport == "tcp" else "udp", address)
        super().__init__(legs, destination, binding.source_ip)
        self.binding = binding
        self.invite: SipRequest | None = None
        self.invite_key: TransactionKey | None = None
        self.local_tag = secrets.token_hex(6)
        self.call_id = secrets.token_hex(12)
        self.provisional = False  # a 1xx came: a CANCEL may be sent (§9.1)
        self.cancelling = False
        self.final = False
        self.dialog_key = (self.call_id, self.local_tag)
        legs.dialogs[self.dialog_key] = self

    async def send(self, event: CallEvent) -> None:
        if isinstance(event, Offer):
            await self._invite(event)
        elif isinstance(event, Disconnect):
            if self.final:
                await self._bye()
            elif not self.cancelling:
                self.cancelling = True
                if self.provisional:
                    await self._cancel()

    async def _invite(self, offer: Offer) -> None:
        host, _ = self.port.local_address(self.peer_ip)
        name = offer.caller_name.replace('"', "")
        display = f'"{name}" ' if name else ""
        headers = Headers()
        headers.add("Via", self._via())
        headers.add("Max-Forwards", "70")
        headers.add("From", f"{display}<sip:{offer.caller}@{_host(host)}>;tag={self.local_tag}")
        headers.add("To", f"<sip:{offer.callee}@{_host(host)}>")
        headers.add("Call-ID", self.call_id)
        headers.add("CSeq", "1 INVITE")
        headers.add("Contact", self._contact(offer.caller))
        headers.add("User-Agent", SERVER_NAME)
        if offer.sdp:
            headers.add("Content-Type", "application/sdp")
        self.invite = SipRequest("INVITE", self.binding.contact, headers, offer.sdp or b"")
        self.invite_key = client_key(self.invite)
        if await self._request(self.invite) is None:
            self.invite_key = None
            await self.controller.on_event(self, Fail(503, "Service Unavailable (overloaded)"))

    async def _cancel(self) -> None:
        if self.invite is not None:
            await self._request(make_cancel(self.invite))

    async def on_response(self, key: TransactionKey, response: SipResponse) -> None:
        if key != self.invite_key or self.invite is None:
            await super().on_response(key, response)
            return
        status = response.status
        if status < 200:
            self.provisional = True
            if self.cancelling:
                await self._cancel()
                return
            if status > 100:
                self._early_dialog(response)
                body = response.body if response.body else None
                await self.controller.on_event(self, Ring(status, response.reason, body))
        elif status < 300:
            await self._answered(response)
        else:
            if not self.final:
                self.final = True
                self.legs.keys.pop(key, None)
                await self.controller.on_event(self, Fail(status, response.reason))

    def _early_dialog(self, response: SipResponse) -> None:
        assert self.invite is not None
        if self.dialog is None and response.to_tag is not None:
            self.dialog = Dialog.as_uac(self.invite, response)

    async def _answered(self, response: SipResponse) -> None:
        assert self.invite is not None
        if self.dialog is None or (
            self.dialog.remote_tag != response.to_tag and response.to_tag is not None
        ):
            if self.final:
                return  # a second 2xx from another fork of the phone: ignored
            self.dialog = Dialog.as_uac(self.invite, response)
        else:
            self.dialog.receive_response("INVITE", response)
        await self._ack(self.invite)
        if self.final:
            return  # a retransmission: the ACK again is all it needs
        self.final = True
        if self.cancelling or self.closed:
            await self._bye()  # answered after we gave up (§15: the 2xx is ACKed, then BYE)
            if self.closed and self.invite_key is not None:
                self.legs.keys.pop(self.invite_key, None)
            return
        await self.controller.on_event(self, Connect(response.body or None))

    async def on_timeout(self, key: TransactionKey, response: SipResponse | None) -> None:
        if key == self.invite_key and not self.final:
            self.final = True
            self.legs.keys.pop(key, None)
            status = response.status if response is not None else 408
            if status == 408:
                event = Fail(408, "Request Timeout (the called phone does not answer)")
            else:
                event = Fail(480, "Temporarily Unavailable (the called phone cannot be reached)")
            await self.controller.on_event(self, event)
        else:
            waiter = self._waiting.get(key)
            if waiter is not None and response is not None:
                waiter.send_nowait(response)

    def close(self) -> None:
        self.closed = True
        self.legs.forget(self, keep=self.invite_key if not self.final else None)


class TrunkLeg:
    """A call channel on the trunk: the wire messages of one call."""

    peer_ip = ""

    def __init__(self, legs: Legs, call_id: str, channel: int) -> None:
        self.legs = legs
        self.call_id = call_id
        self.channel = channel
        self.call: Call | None = None
        self.answered = False

    @property
    def controller(self) -> CallController:
        assert self.legs.controller is not None
        return self.legs.controller

    async def _send(self, msg: Message) -> bool:
        try:
            await self.legs.trunk.send_call(self.channel, msg)
            return True
        except ConnectionLost:
            return False

    async def send(self, event: CallEvent) -> None:
        if isinstance(event, Offer):
            setup = CallSetup(
                self.call_id, event.caller, event.callee, list(event.codecs), event.caller_name
            )
            if not await self._send(setup):
                await self.controller.on_event(
                    self, Fail(503, "Service Unavailable (main host unreachable)")
                )
        elif isinstance(event, Ring):
            await self._send(CallProgress(self.call_id, event.status, event.reason))
        elif isinstance(event, Connect):
            self.answered = True
            await self._send(CallAnswer(self.call_id, event.codec))
        elif isinstance(event, Fail):
            await self._send(CallEnd(self.call_id, event.status, event.reason))
        elif isinstance(event, Disconnect):
            status = 0 if self.answered else 487
            await self._send(CallEnd(self.call_id, status, event.reason))

    async def update(self, update: Update) -> UpdateResult:
        if update.method == "hold":
            sent = await self._send(CallHold(self.call_id, bool(update.hold)))
        else:
            sent = await self._send(
                CallInfo(self.call_id, update.method, update.content_type, update.body)
            )
        return UpdateResult(200, "OK") if sent else UpdateResult(503, "Service Unavailable")

    async def on_message(self, msg: Message) -> None:
        controller = self.controller
        if isinstance(msg, CallProgress):
            await controller.on_event(self, Ring(msg.status, msg.reason or "Ringing"))
        elif isinstance(msg, CallAnswer):
            self.answered = True
            await controller.on_event(self, Connect(codec=msg.codec))
        elif isinstance(msg, CallEnd):
            if msg.status == 0:
                await controller.on_event(self, Disconnect(msg.reason or "hung up"))
            else:
                event = Fail(msg.status, _reason_phrase(msg.status, msg.reason), msg.reason or None)
                await controller.on_event(self, event)
        elif isinstance(msg, MediaLeg):
            await controller.on_event(self, WanMedia(msg.leg, msg.relay_host, msg.relay_port))
        elif isinstance(msg, CallHold):
            controller.spawn_update(self, Update("hold", hold=msg.on_hold), _ignore)
        elif isinstance(msg, CallInfo):
            update = Update(msg.method, msg.content_type, msg.body)
            controller.spawn_update(self, update, _ignore)

    def close(self) -> None:
        self.legs.forget_trunk(self)


async def _ignore(result: UpdateResult) -> None:
    return None


def _reason_phrase(status: int, reason: str) -> str:
    """The reason phrase for a failure from the far side: the standard phrase and why."""
    phrase = REASON_PHRASES.get(status, "Call Failed")
    if not reason or reason.startswith(phrase):
        return reason or phrase
    return f"{phrase} ({reason})"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class Legs:
    """Makes legs for the controller; routes SIP events from the SIP service to them.

    `serve` runs the legs' own timers (2xx retransmissions) in its nursery.
    """

    def __init__(self, port: SipPort, trunk: Trunk, *, t1: float = T1, t2: float = T2) -> None:
        self.port = port
        self.trunk = trunk
        self.t1, self.t2 = t1, t2  # the transaction layer's, for our 2xx retransmissions
        self.controller: CallController | None = None
        self.keys: dict[TransactionKey, SipLeg] = {}
        self.invites: dict[TransactionKey, UasLeg] = {}
        self.dialogs: dict[tuple[str, str], SipLeg] = {}
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None  # stopping: no new task is taken any more

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` in the legs' nursery; nothing when it is not serving (shutting down)."""
        nursery = self._nursery
        if nursery is None:
            return

        async def guarded() -> None:
            try:
                await fn()
            except Exception:  # one call's trouble must not stop the others
                log.exception("call leg task failed")

        nursery.start_soon(guarded)

    # -- the controller's factory --

    def sip_leg(self, binding: Bindings) -> UacLeg:
        return UacLeg(self, binding)

    def trunk_leg(self, call_id: str, channel: int | None = None) -> TrunkLeg:
        leg = TrunkLeg(
            self, call_id, channel if channel is not None else self.trunk.new_call_channel()
        )
        assert self.controller is not None
        self.controller.register_trunk_leg(leg.channel, leg.on_message)
        return leg

    def forget(self, leg: SipLeg, keep: TransactionKey | None = None) -> None:
        # The leg's own entries, not a scan of every call's: with a hundred calls up, closing a
        # leg went through all of theirs twice.
        for key in leg.sent_keys:
            if key != keep and self.keys.get(key) is leg:
                del self.keys[key]
        if leg.dialog_key is not None and self.dialogs.get(leg.dialog_key) is leg:
            del self.dialogs[leg.dialog_key]

    def forget_trunk(self, leg: TrunkLeg) -> None:
        if self.controller is not None:
            self.controller.forget_trunk_leg(leg.channel)

    def __len__(self) -> int:
        """SIP legs still known (the INVITE of a cancelled one lives until its final answer)."""
        return len({id(v) for v in (*self.keys.values(), *self.dialogs.values())})

    # -- the SIP service's events --

    async def on_invite(self, key: TransactionKey, request: SipRequest, source: Source,
                        caller: str) -> None:  # fmt: skip
        """A new INVITE (outside any dialog), its caller authenticated."""
        assert self.controller is not None
        leg = UasLeg(self, key, request, source)
        uri = request.request_uri
        callee = uri.user if isinstance(uri, SipUri) and uri.user else ""
        if not request.body or "sdp" not in (request.content_type or "").lower():
            await leg.send(Fail(488, "Not Acceptable Here (an INVITE needs an SDP offer)"))
            leg.close()
            return
        try:
            name = request.from_.display_name or ""
        except SipParseError:
            name = ""
        await self.controller.new_call(leg, Offer(caller, callee, request.body, (), name))

    async def on_request(
        self, key: TransactionKey, request: SipRequest, cancels: TransactionKey | None
    ) -> SipResponse | None:
        """A request for the calls: in a dialog, or a CANCEL. Returns a response to send when
        it belongs to no call."""
        if request.method == "CANCEL":
            leg = self.invites.get(cancels) if cancels is not None else None
            if leg is None:
                return make_response(request, 481, to_tag=secrets.token_hex(6))
            await leg.on_cancel(key, request)
            return None
        sip_leg = self.dialogs.get((request.call_id, request.to_tag or ""))
        if sip_leg is None or sip_leg.dialog is None:
            return make_response(request, 481, to_tag=secrets.token_hex(6))
        await sip_leg.on_request(key, request)
        return None

    def on_ack(self, request: SipRequest) -> None:
        leg = self.dialogs.get((request.call_id, request.to_tag or ""))
        if leg is not None:
            leg.on_ack(request)

    async def on_response(self, key: TransactionKey, response: SipResponse) -> None:
        leg = self.keys.get(key)
        if leg is not None:
            await leg.on_response(key, response)

    async def on_timeout(self, key: TransactionKey, response: SipResponse | None) -> None:
        leg = self.keys.get(key)
        if isinstance(leg, UacLeg):
            await leg.on_timeout(key, response)
        elif leg is not None and response is not None:
            await leg.on_response(key, response)
