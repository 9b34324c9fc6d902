"""The phone agent's jitter buffer: reordering, duplicates, late packets, gaps, bounds."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phoneagent.jitter import Frame, JitterBuffer


def payload(seq: int) -> bytes:
    return seq.to_bytes(4, "big")


def test_in_order_packets_play_in_order_after_prefill() -> None:
    jb = JitterBuffer(prefill=3)
    jb.push(10, payload(10))
    assert jb.pop() is None  # waiting for the prefill
    jb.push(11, payload(11))
    assert jb.pop() is None
    jb.push(12, payload(12))
    frames = [jb.pop(), jb.pop(), jb.pop()]
    assert [f.payload for f in frames if f] == [payload(10), payload(11), payload(12)]
    assert jb.stats.played == 3


def test_reordered_packets_come_out_sorted() -> None:
    jb = JitterBuffer(prefill=3)
    for seq in (3, 1, 2):
        jb.push(seq, payload(seq))
    assert [f.sequence for f in jb.drain()] == [1, 2, 3]


def test_gap_is_concealed_with_a_lost_frame() -> None:
    jb = JitterBuffer(prefill=2)
    jb.push(1, payload(1))
    jb.push(3, payload(3))
    frames = jb.drain()
    assert frames == [Frame(1, payload(1)), Frame(2, None), Frame(3, payload(3))]
    assert jb.stats.concealed == 1


def test_duplicate_is_dropped_and_counted() -> None:
    jb = JitterBuffer(prefill=1)
    assert jb.push(5, payload(5))
    assert not jb.push(5, payload(5))
    assert jb.stats.duplicates == 1
    assert [f.sequence for f in jb.drain()] == [5]


def test_packet_after_its_turn_is_late() -> None:
    jb = JitterBuffer(prefill=1)
    jb.push(5, payload(5))
    jb.push(7, payload(7))
    assert jb.pop() == Frame(5, payload(5))
    assert jb.pop() == Frame(6, None)  # concealed: 6 did not come in time
    assert not jb.push(6, payload(6))
    assert jb.stats.late == 1
    assert jb.pop() == Frame(7, payload(7))


def test_sequence_wraps_around() -> None:
    jb = JitterBuffer(prefill=1)
    for seq in (65534, 65535, 0, 1):
        jb.push(seq, payload(seq))
    frames = jb.drain()
    assert [f.payload for f in frames] == [payload(s) for s in (65534, 65535, 0, 1)]
    assert [f.sequence for f in frames] == [65534, 65535, 65536, 65537]


def test_underrun_waits_for_the_prefill_again() -> None:
    jb = JitterBuffer(prefill=2)
    jb.push(1, payload(1))
    jb.push(2, payload(2))
    assert jb.pop() is not None
    assert jb.pop() is not None
    assert jb.pop() is None
    assert jb.stats.underruns == 1
    jb.push(3, payload(3))
    assert jb.pop() is None  # refilling
    jb.push(4, payload(4))
    assert jb.pop() == Frame(3, payload(3))


def test_jump_far_ahead_resynchronises_within_the_bound() -> None:
    jb = JitterBuffer(prefill=1, max_depth=10)
    jb.push(1, payload(1))
    assert jb.pop() == Frame(1, payload(1))
    jb.push(1000, payload(1000))
    frames = jb.drain()
    # At most max_depth frames of concealment, never a thousand.
    assert len(frames) <= 10
    assert frames[-1] == Frame(1000, payload(1000))


def test_depth_stays_bounded_when_nothing_is_played() -> None:
    jb = JitterBuffer(prefill=3, max_depth=8)
    for seq in range(100):
        jb.push(seq, payload(seq))
        assert len(jb) <= 8
    assert jb.stats.overflow == 92
    assert [f.sequence for f in jb.drain()] == list(range(92, 100))


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        JitterBuffer(prefill=0)
    with pytest.raises(ValueError):
        JitterBuffer(prefill=5, max_depth=4)


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[int, list[int], set[int]]:
    """A stream start, the arrival order (losses, duplicates, reordering) and what was sent."""
    start = draw(st.integers(0, 65535))
    count = draw(st.integers(1, 120))
    lost = draw(st.sets(st.integers(0, count - 1), max_size=count - 1))
    kept = [i for i in range(count) if i not in lost]
    dups = draw(st.lists(st.sampled_from(kept), max_size=20))
    order = kept + dups
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    # Reorder within a window (networks reorder a little, not arbitrarily).
    window = draw(st.integers(1, 8))
    for i in range(len(order)):
        j = min(len(order) - 1, i + rng.randrange(window))
        order[i], order[j] = order[j], order[i]
    return start, order, set(kept)


@settings(max_examples=300, deadline=None)
@given(arrivals())
def test_any_arrival_order_gives_ordered_output_with_silence_for_gaps(
    case: tuple[int, list[int], set[int]],
) -> None:
    start, order, kept = case
    jb = JitterBuffer(prefill=1, max_depth=200)
    for index in order:
        jb.push((start + index) & 0xFFFF, payload(index))
    frames = jb.drain()
    sequences = [f.sequence for f in frames]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
    first = min(kept)
    # Everything from the earliest packet to the newest, in order; gaps concealed (None).
    assert len(frames) == max(kept) - first + 1
    for offset, frame in enumerate(frames):
        index = first + offset
        if index in kept:
            assert frame.payload == payload(index)
        else:
            assert frame.payload is None


@settings(max_examples=300, deadline=None)
@given(arrivals(), st.lists(st.booleans(), min_size=1, max_size=300))
def test_interleaved_push_and_pop_never_play_backwards_or_wrong(
    case: tuple[int, list[int], set[int]], pops: list[bool]
) -> None:
    start, order, _ = case
    jb = JitterBuffer(prefill=2, max_depth=16)
    played: list[Frame] = []
    steps = iter(pops)
    for index in order:
        jb.push((start + index) & 0xFFFF, payload(index))
        assert len(jb) <= 16
        if next(steps, True):
            frame = jb.pop()
            if frame is not None:
                played.append(frame)
    played += jb.drain()
    sequences = [f.sequence for f in played]
    assert sequences == sorted(set(sequences))  # strictly increasing: no repeats, no going back
    for frame in played:
        if frame.payload is not None:
            index = int.from_bytes(frame.payload, "big")
            assert (start + index) & 0xFFFF == frame.sequence & 0xFFFF
