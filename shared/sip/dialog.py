"""SIP dialogs (RFC 3261 §12): identity, sequence numbers, route set, remote target, state.

This module owns one `Dialog` seen from our side (`local_tag`, `remote_tag`, `local_cseq`,
`remote_cseq`): creating it from the request and response that establish it, as UAC (§12.1.2)
or UAS (§12.1.1), early and confirmed states, the checks on a request received inside it
(§12.2.2: a lower CSeq earns a 500), target refresh (re-INVITE, UPDATE: a new Contact becomes
the remote target), building requests inside it with loose or strict routing (§12.2.1.1), the
ACK for a 2xx (§13.2.2.4) and BYE (§15), and termination.

It does not send, retransmit or match transactions (`transaction.py`; the 2xx and its ACK are
retransmitted by the TU that owns the dialog), resolve the next hop to an address (§8.1.2 gives
the URI: `next_hop`; DNS and sockets are the adapter's), or hold offer/answer state (SDP).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.sip.headers import Address
from shared.sip.message import Headers, SipRequest, SipResponse, make_response
from shared.sip.uri import SipUri, Uri

# RFC 3261 §12.2 / RFC 3311 / RFC 3265 / RFC 3515: requests that may change the remote target.
TARGET_REFRESH_METHODS = frozenset({"INVITE", "UPDATE", "SUBSCRIBE", "NOTIFY", "REFER"})

# RFC 3261 §8.1.1.5: CSeq numbers stay below 2**31.
_MAX_CSEQ = 2**31 - 1


class DialogError(Exception):
    """The TU used a dialog wrongly: a request in a terminated dialog, a response that does
    not belong to it, a CSeq that would overflow."""


class DialogState(enum.Enum):
    EARLY = "early"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


@dataclass(frozen=True, slots=True)
class DialogId:
    """§12: Call-ID, local tag, remote tag, named from our side."""

    call_id: str
    local_tag: str
    remote_tag: str


def dialog_id_of_request(request: SipRequest) -> DialogId | None:
    """The id of the dialog an incoming request belongs to (§12.2.2: To tag is ours), or None
    for a request outside any dialog (no To tag)."""
    to_tag = request.to_tag
    if to_tag is None:
        return None
    return DialogId(request.call_id, to_tag, request.from_tag or "")


def dialog_id_of_response(response: SipResponse) -> DialogId | None:
    """The id of the dialog a response to our request belongs to (From tag is ours), or None
    when it has no To tag (a 100, or a peer that sets none)."""
    to_tag = response.to_tag
    if to_tag is None:
        return None
    return DialogId(response.call_id, response.from_tag or "", to_tag)


def _creates_dialog(response: SipResponse) -> bool:
    # §12.1: a 2xx or a 101-199 with a To tag to a dialog-creating request.
    return 101 <= response.status < 300 and response.to_tag is not None


@dataclass(slots=True)
class Dialog:
    """One dialog from our side. Build it with `as_uac` or `as_uas`."""

    call_id: str
    local_tag: str
    remote_tag: str
    local_address: Address
    """Our From (UAC) or To (UAS) address without the tag: our URI in the dialog."""
    remote_address: Address
    """The peer's address without the tag: its URI in the dialog."""
    remote_target: Uri
    """Where in-dialog requests go: the peer's Contact, updated by target refreshes."""
    route_set: list[Address]
    local_cseq: int | None
    """The CSeq number of the last request we sent in the dialog; None until we send one."""
    remote_cseq: int | None
    """The CSeq number of the last request the peer sent; None until it sends one."""
    secure: bool = False
    """§12.1.1 / §12.1.2: sips Request-URI over TLS."""
    state: DialogState = DialogState.EARLY
    local_contact: Address | None = None
    """Our Contact, put in target refresh requests we build."""
    invite_cseq: int | None = field(default=None)
    """The CSeq number of the last INVITE we sent, which its ACK repeats (§13.2.2.4)."""

    @property
    def id(self) -> DialogId:
        return DialogId(self.call_id, self.local_tag, self.remote_tag)

    @property
    def terminated(self) -> bool:
        return self.state is DialogState.TERMINATED

    @classmethod
    def as_uac(cls, request: SipRequest, response: SipResponse, *, secure: bool = False) -> Dialog:
        """§12.1.2: the dialog a 1xx-with-tag or 2xx creates for the request we sent."""
        if not _creates_dialog(response):
            raise DialogError(f"a {response.status} without a To tag creates no dialog")
        local_tag = request.from_tag
        if local_tag is None:
            raise DialogError("our request has no From tag")
        remote_tag = response.to_tag
        assert remote_tag is not None
        contacts = response.contacts
        # §12.1.2: without a Contact (a broken peer, or a 1xx) keep the Request-URI as target.
        target = contacts[0].uri if contacts else request.request_uri
        ours = request.contacts
        return cls(
            call_id=request.call_id,
            local_tag=local_tag,
            remote_tag=remote_tag,
            local_address=_untagged(request.from_),
            remote_address=_untagged(response.to),
            remote_target=target,
            # §12.1.2: the Record-Route of the response, in reverse order.
            route_set=list(reversed(response.record_routes)),
            local_cseq=request.cseq.seq,
            remote_cseq=None,
            secure=secure,
            state=DialogState.CONFIRMED if response.status >= 200 else DialogState.EARLY,
            local_contact=ours[0] if ours else None,
            invite_cseq=request.cseq.seq if request.method == "INVITE" else None,
        )

    @classmethod
    def as_uas(cls, request: SipRequest, response: SipResponse, *, secure: bool = False) -> Dialog:
        """§12.1.1: the dialog our 1xx-with-tag or 2xx to `request` creates."""
        if not _creates_dialog(response):
            raise DialogError(f"a {response.status} without a To tag creates no dialog")
        remote_tag = request.from_tag
        if remote_tag is None:
            # §12.1.1 / RFC 2543: a missing From tag is an empty remote tag.
            remote_tag = ""
        local_tag = response.to_tag
        assert local_tag is not None
        contacts = request.contacts
        ours = response.contacts
        return cls(
            call_id=request.call_id,
            local_tag=local_tag,
            remote_tag=remote_tag,
            local_address=_untagged(request.to),
            remote_address=_untagged(request.from_),
            remote_target=contacts[0].uri if contacts else request.from_.uri,
            # §12.1.1: the Record-Route of the request, in order.
            route_set=list(request.record_routes),
            local_cseq=None,
            remote_cseq=request.cseq.seq,
            secure=secure,
            state=DialogState.CONFIRMED if response.status >= 200 else DialogState.EARLY,
            local_contact=ours[0] if ours else None,
        )

    # -- what the peer sends --

    def receive_request(self, request: SipRequest) -> SipResponse | None:
        """Check and apply a request the peer sent inside this dialog (§12.2.2).

        Returns the response to send when the request must be refused (500 for a CSeq lower
        than the last one, 481 when the dialog is terminated), else None and the dialog is
        updated: `remote_cseq`, the remote target of a target refresh, BYE terminates.
        ACK and CANCEL carry the CSeq number of their INVITE and are not checked.
        """
        if request.method in ("ACK", "CANCEL"):
            return None
        if self.terminated:
            return make_response(request, 481)
        seq = request.cseq.seq
        if self.remote_cseq is not None and seq < self.remote_cseq:
            # §12.2.2: out of order: "the UAS MUST reject the request with a 500".
            return make_response(request, 500, "CSeq Out of Order")
        self.remote_cseq = seq
        if request.method in TARGET_REFRESH_METHODS:
            contacts = request.contacts
            if contacts:
                # §12.2.2: a target refresh replaces the remote target.
                self.remote_target = contacts[0].uri
        if request.method == "BYE":
            # §15.1.2: the dialog ends once the UAS answers the BYE (with a 2xx).
            self.state = DialogState.TERMINATED
        return None

    def receive_response(self, method: str, response: SipResponse) -> None:
        """Apply a response to a request we sent (the initial one or one inside the dialog)."""
        if response.status < 101:
            return
        if dialog_id_of_response(response) not in (None, self.id):
            raise DialogError("the response belongs to another dialog")
        if self.state is DialogState.EARLY and method == "INVITE":
            if 200 <= response.status < 300:
                # §12.1.2 / §13.2.2.4: the 2xx confirms the dialog and fixes the route set.
                self.state = DialogState.CONFIRMED
                self.route_set = list(reversed(response.record_routes))
            elif response.status >= 300:
                # §12.3: a non-2xx final response ends the early dialogs of the request.
                self.state = DialogState.TERMINATED
                return
        if 200 <= response.status < 300 and method in TARGET_REFRESH_METHODS:
            contacts = response.contacts
            if contacts:
                # §12.2.1.2: a 2xx to a target refresh replaces the remote target.
                self.remote_target = contacts[0].uri
        if response.status in (408, 481) or (method == "BYE" and response.status >= 200):
            # §12.2.1.2: 481/408 end the dialog; §15.1.1: any final answer to BYE does too.
            self.state = DialogState.TERMINATED

    def sent_response(self, method: str, response: SipResponse) -> None:
        """Apply a response we (the UAS) sent: for the INVITE that created an early dialog,
        a 2xx confirms it and a 300-699 ends it (§12.1.1, §12.3)."""
        if self.state is not DialogState.EARLY or method != "INVITE":
            return
        if 200 <= response.status < 300:
            self.state = DialogState.CONFIRMED
        elif response.status >= 300:
            self.state = DialogState.TERMINATED

    def terminate(self) -> None:
        self.state = DialogState.TERMINATED

    # -- what we send --

    @property
    def next_hop(self) -> Uri:
        """Where a request built here goes first (§8.1.2): the first route, else the target."""
        return self.route_set[0].uri if self.route_set else self.remote_target

    def create_request(
        self,
        method: str,
        *,
        via: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> SipRequest:
        """A request inside the dialog (§12.2.1.1) with the next `local_cseq`. `via` is the
        top Via the transport chose, with a fresh branch. A body needs its Content-Type among
        `headers`. Target refresh requests carry our Contact."""
        if method in ("ACK", "CANCEL"):
            raise DialogError(f"{method} is built with create_ack / make_cancel")
        if self.terminated:
            raise DialogError("the dialog is terminated")
        seq = 1 if self.local_cseq is None else self.local_cseq + 1
        if seq > _MAX_CSEQ:
            raise DialogError("local CSeq exhausted")
        self.local_cseq = seq
        if method == "INVITE":
            self.invite_cseq = seq
        return self._build(method, seq, via, headers, body)

    def create_ack(
        self,
        *,
        via: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        invite: SipRequest | None = None,
    ) -> SipRequest:
        """The ACK for a 2xx to our INVITE (§13.2.2.4): built like any in-dialog request but
        with the INVITE's CSeq number and its credentials (`invite`, when given, supplies
        both; else the last INVITE we sent in this dialog)."""
        if invite is not None:
            seq = invite.cseq.seq
        elif self.invite_cseq is not None:
            seq = self.invite_cseq
        else:
            raise DialogError("no INVITE to acknowledge")
        extra = list(headers)
        if invite is not None:
            for name in ("Authorization", "Proxy-Authorization"):
                extra.extend((name, value) for value in invite.headers.get_all(name))
        return self._build("ACK", seq, via, extra, body)

    def create_bye(self, *, via: str, headers: Iterable[tuple[str, str]] = ()) -> SipRequest:
        """A BYE (§15.1.1). The dialog ends when its final response arrives
        (`receive_response`), or when the TU gives up on it (`terminate`)."""
        return self.create_request("BYE", via=via, headers=headers)

    def _build(
        self,
        method: str,
        seq: int,
        via: str,
        extra: Iterable[tuple[str, str]],
        body: bytes,
    ) -> SipRequest:
        uri, routes = self._routing()
        headers = Headers()
        headers.add("Via", via)
        for route in routes:
            headers.add("Route", route)
        headers.add("Max-Forwards", "70")
        headers.add("From", str(self.local_address.with_tag(self.local_tag)))
        to = (
            self.remote_address.with_tag(self.remote_tag)
            if self.remote_tag
            else self.remote_address
        )
        headers.add("To", str(to))
        headers.add("Call-ID", self.call_id)
        headers.add("CSeq", f"{seq} {method}")
        if method in TARGET_REFRESH_METHODS and self.local_contact is not None:
            headers.add("Contact", str(self.local_contact))
        for name, value in extra:
            headers.add(name, value)
        return SipRequest(method, uri, headers, body)

    def _routing(self) -> tuple[str, list[str]]:
        """§12.2.1.1: the Request-URI and Route values."""
        if not self.route_set:
            return str(self.remote_target), []
        first = self.route_set[0].uri
        if isinstance(first, SipUri) and first.lr:
            # Loose routing: the target stays in the Request-URI.
            return str(self.remote_target), [str(route) for route in self.route_set]
        # Strict routing (RFC 2543 proxies): the first route becomes the Request-URI, without
        # the parameters a Request-URI may not carry (§19.1.1: method, headers), and the
        # remote target goes last in the Route set.
        request_uri: Uri = first
        if isinstance(first, SipUri):
            params = {k: v for k, v in first.params.items() if k != "method"}
            request_uri = SipUri(
                first.host, first.user, first.password, first.port, params, (), first.scheme
            )
        routes = [str(route) for route in self.route_set[1:]]
        routes.append(f"<{self.remote_target}>")
        return str(request_uri), routes


def _untagged(address: Address) -> Address:
    if "tag" not in address.params:
        return address
    params = {k: v for k, v in address.params.items() if k != "tag"}
    return Address(address.uri, address.display_name, params)


def response_in_dialog(
    dialog: Dialog, request: SipRequest, status: int, reason: str | None = None
) -> SipResponse:
    """A response to `request` inside `dialog`, with our tag and, for a 2xx to a target
    refresh, our Contact (§12.1.1: the Contact of a dialog-creating 2xx)."""
    extra: list[tuple[str, str]] = []
    contact = dialog.local_contact
    if 200 <= status < 300 and request.method in TARGET_REFRESH_METHODS and contact is not None:
        extra.append(("Contact", str(contact)))
    return make_response(request, status, reason, to_tag=dialog.local_tag, headers=extra)
