"""`Legs`, the router of SIP events to call legs (remotehost/legs.py), alone: forgetting a leg
removes its own routes and nobody else's. A fake SIP port below it; no sockets."""

from __future__ import annotations

from dataclasses import dataclass

from remotehost.calls import Offer
from remotehost.legs import Legs, UacLeg
from shared.aio.sip_transport import Destination
from shared.sip.message import SipMessage, SipRequest, SipResponse
from shared.sip.transaction import TransactionKey, client_key
from shared.wire.messages import Message
from tests.callhelpers import sdp


@dataclass(frozen=True)
class Binding:
    ext: str
    contact: str
    transport: str = "udp"
    source_ip: str = "192.0.2.20"
    source_port: int = 5060
    reachable: bool = True


class FakePort:
    def __init__(self) -> None:
        self.branches = 0
        self.sent: list[SipRequest] = []

    def local_address(self, peer_ip: str) -> tuple[str, int]:
        return ("192.0.2.1", 5060)

    def new_branch(self) -> str:
        self.branches += 1
        return f"z9hG4bK-test-{self.branches}"

    async def respond(self, key: TransactionKey, response: SipResponse) -> None:
        raise AssertionError("no responses here")

    async def request(self, request: SipRequest, destination: Destination) -> TransactionKey:
        self.sent.append(request)
        return client_key(request)

    async def send_direct(self, message: SipMessage, destination: Destination) -> None:
        raise AssertionError("no ACKs here")


class FakeTrunk:
    def new_call_channel(self) -> int:
        return 1

    async def send_call(self, channel: int, msg: Message) -> None:
        raise AssertionError("no trunk here")


async def _inviting(legs: Legs, n: int) -> UacLeg:
    leg = legs.sip_leg(Binding(f"20{n}", f"sip:20{n}@192.0.2.{20 + n}"))
    await leg._invite(Offer("201", f"20{n}", sdp(30000 + n)))
    return leg


async def test_forgetting_a_leg_removes_its_routes_and_keeps_the_others() -> None:
    legs = Legs(FakePort(), FakeTrunk())
    calls = [await _inviting(legs, n) for n in range(5)]
    assert len(legs.keys) == 5 and len(legs.dialogs) == 5 and len(legs) == 5
    gone = calls[2]
    legs.forget(gone)
    assert gone not in legs.keys.values() and gone not in legs.dialogs.values()
    assert len(legs.keys) == 4 and len(legs.dialogs) == 4 and len(legs) == 4
    for leg in calls[:2] + calls[3:]:
        assert leg.invite is not None and legs.keys[client_key(leg.invite)] is leg
        assert leg.dialog_key is not None and legs.dialogs[leg.dialog_key] is leg


async def test_a_kept_invite_still_routes_its_final_answer() -> None:
    """A UAC leg closed before its INVITE's final answer keeps that one route (the answer
    must still be ACKed, and a 2xx ended with a BYE)."""
    legs = Legs(FakePort(), FakeTrunk())
    leg = await _inviting(legs, 1)
    other = await _inviting(legs, 2)
    assert leg.invite_key is not None
    leg.close()  # not final: the INVITE's key stays
    assert legs.keys == {leg.invite_key: leg, other.invite_key: other}
    assert leg.dialog_key not in legs.dialogs
    legs.forget(leg)  # without a key to keep: all of it
    assert legs.keys == {other.invite_key: other} and len(legs) == 1


async def test_a_route_taken_over_by_another_leg_is_not_removed() -> None:
    legs = Legs(FakePort(), FakeTrunk())
    leg = await _inviting(legs, 1)
    other = await _inviting(legs, 2)
    assert leg.invite_key is not None
    legs.keys[leg.invite_key] = other  # the same key now routes elsewhere
    legs.forget(leg)
    assert legs.keys[leg.invite_key] is other
