"""SDP for the phone agent: our offers and answers, and what media a negotiated call uses.

This module owns the agent's side of RFC 3264 offer/answer: an offer of PCMU, PCMA and
telephone-event/8000 at our RTP address (a new o= version for every new offer in the call,
§8), the answer to a peer's offer, and the `MediaPlan` either exchange leads to: where to send,
which payload types, and whether we send at all (hold: §8.4). It relies on `shared.media.sdp`
for the grammar and the negotiation rules; it does not open sockets.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from shared.media.sdp import (
    HOLD_ADDRESSES,
    PCMA,
    PCMU,
    TELEPHONE_EVENT,
    Origin,
    SdpNegotiationError,
    SdpParseError,
    SessionDescription,
    build_answer,
    build_offer,
    is_on_hold,
    negotiate_direction,
    parse_sdp_untrusted,
)

CODECS = (PCMU, PCMA, TELEPHONE_EVENT)
Address = tuple[str, int]


class MediaNegotiationError(Exception):
    """The peer's SDP is unreadable or has nothing we can use (answered 488 / call ended)."""


@dataclass(frozen=True, slots=True)
class MediaPlan:
    remote: Address | None
    """Where to send RTP; None when the peer gave port 0 or a hold address."""
    payload_type: int
    dtmf_payload_type: int | None
    direction: str
    """Our direction, seen from our side (RFC 3264 §6.1): sendrecv, sendonly, recvonly,
    inactive."""

    @property
    def sends(self) -> bool:
        return self.direction in ("sendrecv", "sendonly") and self.remote is not None


class SdpSession:
    """Our SDP in one call: origin with a session id, a version that grows with each offer."""

    def __init__(self, address: str, port: int, *, username: str = "phoneagent") -> None:
        self.address = address
        self.port = port
        self._origin = Origin(
            username=username,
            session_id=str(secrets.randbelow(10**9)),
            session_version=0,
            addrtype="IP6" if ":" in address else "IP4",
            address=address,
        )

    def _next_origin(self) -> Origin:
        origin = self._origin
        self._origin = Origin(
            origin.username,
            origin.session_id,
            origin.session_version + 1,
            origin.nettype,
            origin.addrtype,
            origin.address,
        )
        return origin

    def offer(self, direction: str = "sendrecv") -> bytes:
        sdp = build_offer(
            origin=self._next_origin(),
            address=self.address,
            port=self.port,
            codecs=CODECS,
            direction=direction,
        )
        return sdp.encode()

    def answer(self, offer: bytes, direction: str = "sendrecv") -> tuple[bytes, MediaPlan]:
        """Our answer to `offer`, and the media it agrees on."""
        parsed = _parse(offer)
        try:
            answer = build_answer(
                parsed,
                origin=self._next_origin(),
                address=self.address,
                port=self.port,
                codecs=CODECS,
                direction=direction,
                ptime=20,
            )
        except SdpNegotiationError as exc:
            raise MediaNegotiationError(str(exc)) from None
        return answer.encode(), _plan(answer, parsed, answer_is_ours=True)


def _parse(data: bytes) -> SessionDescription:
    if not data:
        raise MediaNegotiationError("no SDP")
    try:
        return parse_sdp_untrusted(data)
    except SdpParseError as exc:
        raise MediaNegotiationError(f"unreadable SDP: {exc}") from None


def plan_from_answer(answer: bytes, offered_direction: str = "sendrecv") -> MediaPlan:
    """The media of our offer (with `offered_direction`) once the peer answered it."""
    parsed = _parse(answer)
    return _plan(parsed, parsed, answer_is_ours=False, offered_direction=offered_direction)


def _plan(
    answer: SessionDescription,
    remote: SessionDescription,
    *,
    answer_is_ours: bool,
    offered_direction: str = "sendrecv",
) -> MediaPlan:
    """Read the accepted stream: codecs from the answer, address from the peer's SDP."""
    for index, media in enumerate(answer.media):
        if media.port == 0 or media.media != "audio":
            continue
        codecs = media.codecs()
        audio = [
            pt
            for pt, codec in codecs
            if pt in (0, 8) and codec.encoding.upper() in ("PCMU", "PCMA")
        ]
        if not audio:
            continue
        dtmf = [pt for pt, codec in codecs if codec.encoding.lower() == "telephone-event"]
        if index >= len(remote.media):
            break
        peer_media = remote.media[index]
        connection = remote.connection_for(index)
        address: Address | None = None
        if connection is not None and connection.address not in HOLD_ADDRESSES and peer_media.port:
            address = (connection.address.split("/")[0], peer_media.port)
        if answer_is_ours:
            direction = answer.direction(index)
        else:
            # The answer's direction is the peer's view: we send if it receives (§6.1).
            try:
                direction = negotiate_direction(answer.direction(index), offered_direction)
            except ValueError:
                direction = "inactive"
        return MediaPlan(address, audio[0], dtmf[0] if dtmf else None, direction)
    raise MediaNegotiationError("no G.711 audio stream accepted")


def offer_is_hold(offer: bytes) -> bool:
    """RFC 3264 §8.4: the peer's offer puts us on hold (sendonly, inactive or c=0.0.0.0)."""
    try:
        parsed = parse_sdp_untrusted(offer)
    except SdpParseError:
        return False
    return bool(parsed.media) and is_on_hold(parsed, 0)
