"""What a call costs on an office's WAN link, and whether the office's voice budget has room (F7).

Pure policy. A call between offices crosses two WAN links (the caller's office and the
callee's, each to the main host's relay), so it costs on both; a call inside an office costs
nothing. The cost is what the codec and its packet time really use on the wire, per direction,
at the IP layer: payload + RTP header (12) + our WAN encapsulation (16-byte header and 16-byte
GCM tag) + UDP (8) + IPv4 (20). Link-layer framing is left out: it differs by link (Ethernet,
PPPoE, DOCSIS), and a budget is set with a margin anyway.

G.711 at 20 ms: 160 + 12 + 32 + 8 + 20 = 232 bytes, 50 times a second = 92.8 kbit/s.
"""

from __future__ import annotations

from dataclasses import dataclass

RTP_HEADER = 12
WAN_OVERHEAD = 32  # shared/media/wan.py: 16-byte header + 16-byte tag
UDP_IP = 8 + 20

# Payload bit rate in bit/s of the codecs phones offer (RFC 3551 and the codecs' own RFCs).
# Unknown codecs are priced like G.711, the most expensive common one, never for free.
PAYLOAD_BITRATE = {
    "PCMU": 64_000,
    "PCMA": 64_000,
    "G722": 64_000,
    "G729": 8_000,
    "GSM": 13_200,
    "ILBC": 15_200,
    "OPUS": 32_000,
    "SPEEX": 15_000,
}
DEFAULT_BITRATE = 64_000
NOT_AUDIO = frozenset({"TELEPHONE-EVENT", "CN", "RED"})


def codec_name(codec: str) -> str:
    """ "PCMU/8000" -> "PCMU"."""
    return codec.split("/", 1)[0].strip().upper()


def is_audio(codec: str) -> bool:
    return codec_name(codec) not in NOT_AUDIO


def cost_kbps(codec: str, ptime_ms: int = 20) -> float:
    """kbit/s one direction of one call uses on the WAN, headers included."""
    ptime_ms = max(10, ptime_ms)
    payload = PAYLOAD_BITRATE.get(codec_name(codec), DEFAULT_BITRATE) * ptime_ms / 8000
    packet = payload + RTP_HEADER + WAN_OVERHEAD + UDP_IP
    return packet * 8 * (1000 / ptime_ms) / 1000


@dataclass
class OfficeBudget:
    budget_kbps: int
    used_kbps: float = 0.0
    calls: int = 0
    refused: int = 0

    def room_for(self, kbps: float) -> bool:
        return self.used_kbps + kbps <= self.budget_kbps + 1e-9


def choose_codec(
    offered: list[str], budgets: list[OfficeBudget], ptime_ms: int = 20
) -> tuple[list[str], float] | None:
    """The codec list to offer and its cost, or None when nothing fits every budget.

    The caller's preferred codec when it fits; otherwise the first cheaper one the caller also
    offers that fits (the callee then answers with it), with the non-audio entries kept
    (telephone-event for DTMF).
    """
    audio = [c for c in offered if is_audio(c)]
    extras = [c for c in offered if not is_audio(c)]
    if not audio:
        return None
    first_cost = cost_kbps(audio[0], ptime_ms)
    if all(b.room_for(first_cost) for b in budgets):
        return offered, first_cost
    for codec in audio[1:]:
        cost = cost_kbps(codec, ptime_ms)
        if cost < first_cost and all(b.room_for(cost) for b in budgets):
            return [codec, *extras], cost
    return None
