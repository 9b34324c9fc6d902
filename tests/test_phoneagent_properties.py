"""Property tests across the phone agent's pure parts: PCM helpers, tones, jitter buffer
bounds, loss counting, and the user agent's addresses."""

from __future__ import annotations

from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from phoneagent.audio import resample
from phoneagent.jitter import JitterBuffer
from phoneagent.rtpsession import RtpSession
from phoneagent.tone import ToneGenerator, detect_tone, pcm_bytes, pcm_samples
from phoneagent.useragent import AgentConfig, Transmit, UserAgent
from shared.sip.uri import SipUri

samples_16 = st.lists(st.integers(-32768, 32767), max_size=500)


@given(samples_16)
def test_pcm_bytes_and_samples_round_trip(values: list[int]) -> None:
    samples = array("h", values)
    data = pcm_bytes(samples)
    assert len(data) == 2 * len(values)
    assert pcm_samples(data) == samples
    assert pcm_samples(data + b"\x01") == samples  # an odd last byte is dropped


@settings(max_examples=50, deadline=None)
@given(st.integers(100, 3400), st.lists(st.integers(1, 400), min_size=1, max_size=8))
def test_tone_frames_split_anyhow_join_to_the_same_wave(frequency: int, sizes: list[int]) -> None:
    pieces = ToneGenerator(frequency)
    whole = ToneGenerator(frequency).frame(sum(sizes))
    assert b"".join(pieces.frame(size) for size in sizes) == whole


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([300, 500, 800, 1300, 2100]), st.sampled_from([300, 500, 800, 1300, 2100]))
def test_the_louder_of_two_tones_wins(loud: int, quiet: int) -> None:
    if loud == quiet:
        return
    a = pcm_samples(ToneGenerator(loud, amplitude=9000).frame(1600))
    b = pcm_samples(ToneGenerator(quiet, amplitude=3000).frame(1600))
    mixed = array("h", (x + y for x, y in zip(a, b, strict=True)))
    assert detect_tone(mixed, [300, 500, 800, 1300, 2100]) == loud


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from([11025, 16000, 22050, 32000, 44100, 48000]), st.sampled_from([400, 900, 1700])
)
def test_resampling_keeps_the_tone(rate: int, frequency: int) -> None:
    source = pcm_samples(ToneGenerator(frequency, sample_rate=rate).frame(rate // 4))
    out = resample(source, rate)
    assert detect_tone(out, [400, 900, 1700]) == frequency


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(0, 65535), st.just("pop")),
        max_size=300,
    ),
    st.integers(1, 8),
    st.integers(8, 40),
)
def test_jitter_buffer_stays_bounded_and_ordered_whatever_arrives(
    steps: list[int | str], prefill: int, depth: int
) -> None:
    jb = JitterBuffer(prefill=prefill, max_depth=depth)
    played = []
    for step in steps:
        if step == "pop":
            frame = jb.pop()
            if frame is not None:
                played.append(frame)
        else:
            assert isinstance(step, int)
            jb.push(step, step.to_bytes(2, "big"))
        assert len(jb) <= depth
    played += jb.drain()
    sequences = [f.sequence for f in played]
    assert sequences == sorted(set(sequences))
    for frame in played:
        if frame.payload is not None:
            assert int.from_bytes(frame.payload, "big") == frame.sequence & 0xFFFF
    stats = jb.stats
    assert stats.played == sum(1 for f in played if f.payload is not None)
    assert stats.pushed == sum(1 for s in steps if s != "pop")


@settings(max_examples=200, deadline=None)
@given(
    st.integers(10, 200).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(2, n - 2))))
)
def test_every_lost_packet_is_counted(case: tuple[int, set[int]]) -> None:
    """In-order delivery with any packets missing between the first two and the last:
    the loss count is exactly the number missing."""
    count, lost = case
    sender, receiver = RtpSession(), RtpSession()
    for n in range(count):
        packet = sender.tick(bytes(320))
        if n not in lost:
            receiver.receive_untrusted(packet or b"", n * 0.02)
    stats = receiver.statistics()
    assert stats.packets_lost == len(lost)
    assert stats.packets_received == count - len(lost)


def agent(ip: str, port: int = 5070) -> UserAgent:
    return UserAgent(AgentConfig(ext="2001", local_ip=ip, local_port=port))


def test_ipv6_addresses_are_bracketed() -> None:
    ua = agent("::1")
    assert ua.contact == "<sip:2001@[::1]:5070>"
    assert ua.aor == "sip:2001@[::1]"
    assert ua.target_uri("sip:2002@[::1]:5080") == ("sip:2002@[::1]:5080", ("::1", 5080))
    _, out = ua.invite("sip:2002@[::1]:5080", b"v=0\r\n", 0.0)
    sent = out[0]
    assert isinstance(sent, Transmit) and sent.destination == ("::1", 5080)
    invite = sent.message
    assert invite.top_via.host == "[::1]"
    sender = invite.from_.uri
    assert isinstance(sender, SipUri) and sender.host == "[::1]"


@given(st.integers(1, 65535), st.from_regex(r"[0-9]{2,6}", fullmatch=True))
def test_calls_to_any_extension_at_any_port(port: int, ext: str) -> None:
    ua = agent("127.0.0.1")
    uri, destination = ua.target_uri(f"{ext}@127.0.0.1:{port}")
    assert uri == f"sip:{ext}@127.0.0.1:{port}"
    assert destination == ("127.0.0.1", port)
