"""The WAN cost model and codec choice of mainhost/bandwidth.py (F7)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mainhost.bandwidth import OfficeBudget, choose_codec, cost_kbps

CODECS = ["PCMU/8000", "PCMA/8000", "G729/8000", "GSM/8000", "opus/48000/2", "G722/8000"]


@pytest.mark.parametrize(
    ("codec", "ptime", "kbps"),
    [
        # 160 + 12 RTP + 32 WAN + 8 UDP + 20 IP = 232 bytes, 50 per second.
        ("PCMU/8000", 20, 92.8),
        ("PCMA/8000", 20, 92.8),
        # 20 ms of G.729 is 20 bytes: 92 bytes, 50 per second.
        ("G729/8000", 20, 36.8),
        # Longer packets carry the same audio with fewer headers.
        ("PCMU/8000", 40, 78.4),
        # An unknown codec is never free: priced like G.711.
        ("X-SECRET/8000", 20, 92.8),
    ],
)
def test_cost_includes_every_header(codec: str, ptime: int, kbps: float) -> None:
    assert cost_kbps(codec, ptime) == pytest.approx(kbps)


def test_telephone_events_alone_cannot_make_a_call() -> None:
    assert choose_codec(["telephone-event/8000"], [OfficeBudget(1000)]) is None


def test_the_callers_first_choice_wins_when_it_fits() -> None:
    offered = ["PCMA/8000", "G729/8000", "telephone-event/8000"]
    assert choose_codec(offered, [OfficeBudget(100), OfficeBudget(100)]) == (offered, 92.8)


def test_a_dearer_codec_is_never_chosen_to_save_bandwidth() -> None:
    # G.729 first does not fit; G.711 after it is dearer still: refuse.
    assert choose_codec(["G729/8000", "PCMU/8000"], [OfficeBudget(30)]) is None


@given(
    offered=st.lists(st.sampled_from(CODECS), min_size=1, max_size=4, unique=True),
    budgets=st.lists(st.tuples(st.integers(0, 300), st.floats(0, 300)), min_size=1, max_size=2),
)
def test_whatever_is_chosen_fits_every_budget(
    offered: list[str], budgets: list[tuple[int, float]]
) -> None:
    offices = [OfficeBudget(budget, used) for budget, used in budgets]
    choice = choose_codec([*offered, "telephone-event/8000"], offices)
    if choice is None:
        # Refused only when no offered codec at most as dear as the first would fit.
        first = cost_kbps(offered[0])
        assert not any(
            all(o.room_for(cost_kbps(c)) for o in offices) for c in offered if cost_kbps(c) <= first
        )
        return
    codecs, cost = choice
    assert codecs[0] in offered and cost == cost_kbps(codecs[0])
    assert all(o.room_for(cost) for o in offices)
    assert "telephone-event/8000" in codecs  # DTMF survives a codec change
