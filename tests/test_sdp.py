"""Tests for shared.media.sdp: RFC 8866 parse/serialize, RFC 3264 offer/answer, rewriting."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.media.sdp import (
    PCMA,
    PCMU,
    TELEPHONE_EVENT,
    Attribute,
    Bandwidth,
    Codec,
    Connection,
    MediaDescription,
    Origin,
    SdpNegotiationError,
    SdpParseError,
    SessionDescription,
    Timing,
    build_answer,
    build_offer,
    is_on_hold,
    negotiate_direction,
    parse_sdp_untrusted,
    rewrite_media_address,
    with_next_version,
)


def crlf(text: str) -> bytes:
    return ("\r\n".join(text.strip().splitlines()) + "\r\n").encode()


# RFC 8866 §5 example session description.
RFC8866_EXAMPLE = crlf(
    """
v=0
o=jdoe 3724394400 3724394405 IN IP4 198.51.100.1
s=Call to John Smith
i=SDP Offer #1
u=http://www.jdoe.example.com/home.html
e=Jane Doe <jane@jdoe.example.com>
p=+1 617 555-6011
c=IN IP4 198.51.100.1
t=0 0
m=audio 49170 RTP/AVP 0
m=audio 49180 RTP/AVP 0
m=video 51372 RTP/AVP 99
c=IN IP6 2001:db8::2
a=rtpmap:99 h263-1998/90000
"""
)

# What SIPp's uac scenario offers.
SIPP_OFFER = crlf(
    """
v=0
o=user1 53655765 2353687637 IN IP4 192.0.2.10
s=-
c=IN IP4 192.0.2.10
t=0 0
m=audio 6000 RTP/AVP 0
a=rtpmap:0 PCMU/8000
"""
)

# A baresip-like offer: several codecs, dynamic PTs, telephone-event, rtcp-mux, ptime.
BARESIP_OFFER = crlf(
    """
v=0
o=- 1871467935 2144367563 IN IP4 192.0.2.20
s=-
c=IN IP4 192.0.2.20
t=0 0
a=tool:baresip 3.10.1
m=audio 10432 RTP/AVP 96 9 0 8 101
b=AS:96
a=rtpmap:96 opus/48000/2
a=fmtp:96 stereo=1;sprop-stereo=1
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=rtcp:10433 IN IP4 192.0.2.20
a=rtcp-mux
a=candidate:1 1 UDP 2130706431 192.0.2.20 10432 typ host
a=ptime:20
a=sendrecv
"""
)


# -- parse / encode ----------------------------------------------------------------------------


def test_rfc8866_example_parses_and_round_trips() -> None:
    sdp = parse_sdp_untrusted(RFC8866_EXAMPLE)
    assert sdp.origin == Origin("jdoe", "3724394400", 3724394405, "IN", "IP4", "198.51.100.1")
    assert sdp.session_name == "Call to John Smith"
    assert sdp.information == "SDP Offer #1"
    assert sdp.uri == "http://www.jdoe.example.com/home.html"
    assert sdp.emails == ("Jane Doe <jane@jdoe.example.com>",)
    assert sdp.phones == ("+1 617 555-6011",)
    assert sdp.connection == Connection("198.51.100.1")
    assert sdp.timings == (Timing(0, 0),)
    assert [m.media for m in sdp.media] == ["audio", "audio", "video"]
    assert [m.port for m in sdp.media] == [49170, 49180, 51372]
    assert sdp.connection_for(0) == Connection("198.51.100.1")
    assert sdp.connection_for(2) == Connection("2001:db8::2", "IN", "IP6")
    assert sdp.media[2].codecs() == [(99, Codec("h263-1998", 90000, payload_type=99))]
    assert sdp.media[0].codecs() == [(0, PCMU)]
    assert sdp.encode() == RFC8866_EXAMPLE


def test_baresip_offer_accessors() -> None:
    sdp = parse_sdp_untrusted(BARESIP_OFFER)
    audio = sdp.media[0]
    assert sdp.attribute("tool") == "baresip 3.10.1"
    assert audio.formats == ("96", "9", "0", "8", "101")
    assert audio.bandwidths == (Bandwidth("AS", 96),)
    codecs = audio.codecs()
    assert [pt for pt, _ in codecs] == [96, 9, 0, 8, 101]
    assert codecs[0][1] == Codec("opus", 48000, 2, 96, "stereo=1;sprop-stereo=1")
    assert codecs[4][1].fmtp == "0-15"
    assert audio.ptime == 20
    assert audio.maxptime is None
    assert audio.direction == "sendrecv"
    assert audio.attribute("rtcp-mux") == ""
    assert audio.attribute("nothing") is None
    assert audio.rtcp == (10433, Connection("192.0.2.20"))
    assert sdp.encode() == BARESIP_OFFER


def test_full_session_level_round_trip() -> None:
    text = crlf(
        """
v=0
o=alice 1 2 IN IP6 2001:db8::1
s=Conference
i=about
u=http://example.com/
e=a@example.com
e=b@example.com
p=+44 1
c=IN IP4 224.2.1.1/127/3
b=CT:128
t=3034423619 3042462419
r=7d 1h 0 25h
t=0 0
z=2882844526 -1h 2898848070 0
k=prompt
a=recvonly
m=audio 49170/2 RTP/AVP 0
i=voice
c=IN IP4 224.2.1.1/127
b=AS:64
k=clear:x
a=maxptime:40
"""
    )
    sdp = parse_sdp_untrusted(text)
    assert sdp.timings[0].repeats == ("7d 1h 0 25h",)
    assert sdp.zone == "2882844526 -1h 2898848070 0"
    assert sdp.key == "prompt"
    media = sdp.media[0]
    assert media.port_count == 2
    assert media.information == "voice"
    assert media.key == "clear:x"
    assert media.maxptime == 40
    assert sdp.direction(0) == "recvonly"  # inherited from the session level
    assert sdp.encode() == text


def test_lenient_input() -> None:
    # LF only, blank lines, no s= and no t=, trailing blank after a flag, unknown x= line.
    sdp = parse_sdp_untrusted(
        b"v=0\no=- 1 1 IN IP4 192.0.2.1\n\nc=IN IP4 192.0.2.1\nx=whatever\n"
        b"m=audio 4000 RTP/AVP 8\na=sendonly \n"
    )
    assert sdp.session_name == "-"
    assert sdp.timings == (Timing(0, 0),)
    assert sdp.direction(0) == "sendonly"
    assert sdp.media[0].codecs() == [(8, PCMA)]
    assert sdp.encode().startswith(b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=")


def test_64_bit_session_version() -> None:
    sdp = parse_sdp_untrusted(b"v=0\r\no=- 1 18446744073709551615 IN IP4 a\r\ns=-\r\n")
    assert sdp.origin.session_version == 2**64 - 1


def test_codecs_skips_unknown_formats() -> None:
    media = MediaDescription(
        "audio",
        1,
        "RTP/AVP",
        ("97", "x", "200", "18", "98"),
        attributes=(
            Attribute("rtpmap", "98 iLBC/8000"),
            Attribute("rtpmap", "bogus"),
            Attribute("rtpmap", "97 x/y"),
        ),
    )
    assert [(pt, c.encoding) for pt, c in media.codecs()] == [(18, "G729"), (98, "iLBC")]


def test_rtcp_attribute_forms() -> None:
    def media(value: str) -> MediaDescription:
        return MediaDescription(
            "audio", 1, "RTP/AVP", ("0",), attributes=(Attribute("rtcp", value),)
        )

    assert media("5001").rtcp == (5001, None)
    assert media("5001 IN IP6 ::1").rtcp == (5001, Connection("::1", "IN", "IP6"))
    assert media("x").rtcp is None
    assert media("70000").rtcp is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n",
        b"v=1\r\no=- 1 1 IN IP4 a\r\n",
        b"o=- 1 1 IN IP4 a\r\nv=0\r\n",
        b"v=0\r\ns=-\r\n",
        b"v=0\r\no=- 1 x IN IP4 a\r\n",
        b"v=0\r\no=- 1 1 IN IP4\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\no=- 1 1 IN IP4 a\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\nv=0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\nb=AS\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\nt=0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\nr=1d\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=a\r\ns=b\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\nm=audio\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\nm=audio 70000 RTP/AVP 0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\nm=audio -1 RTP/AVP 0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\nm=audio 1/0 RTP/AVP 0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\nm=audio 1 RTP/AVP 0\r\nt=0 0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\nm=audio 1 RTP/AVP 0\r\na=:x\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\nbogus\r\n",
        b"v=0\r\no=- 1 1 IN IP4 \xff\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\n" + b"m=audio 1 RTP/AVP 0\r\n" * 40,
        b"v=0\r\n" + b"a=x\r\n" * 20000,
    ],
)
def test_parse_rejects(data: bytes) -> None:
    with pytest.raises(SdpParseError):
        parse_sdp_untrusted(data)


@given(data=st.binary(max_size=300))
def test_fuzz_raw_bytes(data: bytes) -> None:
    try:
        parse_sdp_untrusted(data)
    except SdpParseError:
        pass


_LINE = st.sampled_from(
    [
        "v=0",
        "o=- 1 2 IN IP4 192.0.2.1",
        "s=-",
        "c=IN IP4 192.0.2.1",
        "c=IN IP4 0.0.0.0",
        "t=0 0",
        "r=1d 0",
        "b=AS:64",
        "m=audio 4000 RTP/AVP 0 8 101",
        "m=audio 0 RTP/AVP 0",
        "m=video 5000 RTP/AVP 99",
        "a=rtpmap:101 telephone-event/8000",
        "a=rtpmap:99",
        "a=fmtp:101 0-16",
        "a=ptime:20",
        "a=ptime:x",
        "a=rtcp:4001",
        "a=sendonly",
        "a=inactive",
        "a=",
        "k=x",
        "i=y",
        "z=0 0",
        "=",
        "",
        "é=1",
    ]
)


@given(lines=st.lists(_LINE, max_size=20), mutate=st.binary(max_size=3))
def test_fuzz_structured(lines: list[str], mutate: bytes) -> None:
    data = ("\r\n".join(["v=0", *lines]) + "\r\n").encode() + mutate
    try:
        sdp = parse_sdp_untrusted(data)
    except SdpParseError:
        return
    # Whatever parses, encodes and parses back to the same value.
    assert parse_sdp_untrusted(sdp.encode()) == sdp
    for index in range(len(sdp.media)):
        sdp.media[index].codecs()
        sdp.media[index].rtcp  # noqa: B018
        sdp.media[index].ptime  # noqa: B018
        is_on_hold(sdp, index)


_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=8)
_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", min_codepoint=0x20),
    min_size=1,
    max_size=12,
).filter(lambda t: t.strip() == t)
_ATTRIBUTES = st.lists(
    st.builds(Attribute, _WORD, st.none() | st.text(alphabet="ab 0:/=", max_size=8)), max_size=4
)
_MEDIA = st.builds(
    MediaDescription,
    media=_WORD,
    port=st.integers(0, 65535),
    proto=st.sampled_from(["RTP/AVP", "RTP/AVPF", "udp"]),
    formats=st.lists(_WORD, max_size=4).map(tuple),
    port_count=st.none() | st.integers(1, 4),
    information=st.none() | _TEXT,
    connections=st.lists(st.builds(Connection, _WORD), max_size=2).map(tuple),
    bandwidths=st.lists(st.builds(Bandwidth, _WORD, st.integers(0, 10**6)), max_size=2).map(tuple),
    key=st.none() | _TEXT,
    attributes=_ATTRIBUTES.map(tuple),
)
_SESSIONS = st.builds(
    SessionDescription,
    origin=st.builds(Origin, _WORD, _WORD, st.integers(0, 2**64 - 1), _WORD, _WORD, _WORD),
    session_name=_TEXT,
    media=st.lists(_MEDIA, max_size=3).map(tuple),
    connection=st.none() | st.builds(Connection, _WORD),
    attributes=_ATTRIBUTES.map(tuple),
    timings=st.lists(
        st.builds(Timing, st.integers(0, 2**63), st.integers(0, 2**63), st.just(())),
        min_size=1,
        max_size=2,
    ).map(tuple),
    bandwidths=st.lists(st.builds(Bandwidth, _WORD, st.integers(0, 10**6)), max_size=2).map(tuple),
    information=st.none() | _TEXT,
    uri=st.none() | _TEXT,
    emails=st.lists(_TEXT, max_size=2).map(tuple),
    phones=st.lists(_TEXT, max_size=2).map(tuple),
    zone=st.none() | _TEXT,
    key=st.none() | _TEXT,
)


@settings(max_examples=200)
@given(sdp=_SESSIONS)
def test_round_trip(sdp: SessionDescription) -> None:
    encoded = sdp.encode()
    assert encoded.endswith(b"\r\n")
    assert b"\n" not in encoded.replace(b"\r\n", b"")
    assert parse_sdp_untrusted(encoded) == sdp


# -- directions and hold -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "local", "answer"),
    [
        ("sendrecv", "sendrecv", "sendrecv"),
        ("sendonly", "sendrecv", "recvonly"),
        ("recvonly", "sendrecv", "sendonly"),
        ("inactive", "sendrecv", "inactive"),
        ("sendrecv", "sendonly", "sendonly"),
        ("sendrecv", "recvonly", "recvonly"),
        ("sendrecv", "inactive", "inactive"),
        ("sendonly", "sendonly", "inactive"),
        ("recvonly", "recvonly", "inactive"),
        ("sendonly", "recvonly", "recvonly"),
    ],
)
def test_negotiate_direction(offered: str, local: str, answer: str) -> None:
    assert negotiate_direction(offered, local) == answer


def test_negotiate_direction_rejects_unknown() -> None:
    with pytest.raises(ValueError):
        negotiate_direction("both")


def offer_with(lines: str) -> SessionDescription:
    return parse_sdp_untrusted(
        crlf("v=0\no=- 1 1 IN IP4 192.0.2.1\ns=-\nc=IN IP4 192.0.2.1\nt=0 0\n" + lines)
    )


def test_hold_detection() -> None:
    assert not is_on_hold(offer_with("m=audio 4000 RTP/AVP 0\n"), 0)
    assert is_on_hold(offer_with("m=audio 4000 RTP/AVP 0\na=sendonly\n"), 0)
    assert is_on_hold(offer_with("m=audio 4000 RTP/AVP 0\na=inactive\n"), 0)
    assert not is_on_hold(offer_with("m=audio 4000 RTP/AVP 0\na=recvonly\n"), 0)
    assert is_on_hold(offer_with("a=sendonly\nm=audio 4000 RTP/AVP 0\n"), 0)
    assert is_on_hold(offer_with("m=audio 4000 RTP/AVP 0\nc=IN IP4 0.0.0.0\n"), 0)


# -- offer / answer ----------------------------------------------------------------------------

OUR_ORIGIN = Origin("branchpbx", "4242", 1, "IN", "IP4", "203.0.113.5")


def answer_to(offer: bytes | SessionDescription, **kwargs: object) -> SessionDescription:
    sdp = parse_sdp_untrusted(offer) if isinstance(offer, bytes) else offer
    answer = build_answer(
        sdp,
        origin=OUR_ORIGIN,
        address="203.0.113.5",
        port=30000,
        **kwargs,  # type: ignore[arg-type]
    )
    # Whatever we build must survive our own parser.
    assert parse_sdp_untrusted(answer.encode()) == answer
    return answer


def test_answer_to_sipp() -> None:
    answer = answer_to(SIPP_OFFER)
    assert answer.origin == OUR_ORIGIN
    assert answer.connection == Connection("203.0.113.5")
    (media,) = answer.media
    assert (media.media, media.port, media.proto, media.formats) == (
        "audio",
        30000,
        "RTP/AVP",
        ("0",),
    )
    assert media.codecs() == [(0, PCMU)]
    assert media.direction == "sendrecv"


def test_answer_to_baresip_keeps_offer_payload_types() -> None:
    telephone_event = replace(TELEPHONE_EVENT, payload_type=100)
    answer = answer_to(BARESIP_OFFER, codecs=(PCMA, PCMU, telephone_event))
    (media,) = answer.media
    # Offer order, offer's payload type numbers (101 for telephone-event, not our 100).
    assert media.formats == ("0", "8", "101")
    codecs = dict(media.codecs())
    assert codecs[101].encoding == "telephone-event"
    assert codecs[101].fmtp == "0-16"
    assert media.ptime == 20
    assert media.attribute("rtcp") is None
    assert media.attribute("candidate") is None


def test_answer_matches_dynamic_pcmu_by_name() -> None:
    offer = offer_with(
        "m=audio 4000 RTP/AVP 110 111\na=rtpmap:110 pcmu/8000\na=rtpmap:111 x/8000\n"
    )
    (media,) = answer_to(offer).media
    assert media.formats == ("110",)
    assert media.codecs()[0][1].encoding == "pcmu"


def test_answer_rejects_port_zero_and_other_media() -> None:
    offer = offer_with(
        "m=video 5000 RTP/AVP 99\na=rtpmap:99 H264/90000\n"
        "m=audio 0 RTP/AVP 0\n"
        "m=audio 4000 RTP/SAVP 0\n"
        "m=audio 4002 RTP/AVP 0 8\n"
        "m=audio 4004 RTP/AVP 8\n"
    )
    answer = answer_to(offer)
    assert [m.port for m in answer.media] == [0, 0, 0, 30000, 0]
    assert [m.media for m in answer.media] == ["video", "audio", "audio", "audio", "audio"]
    assert answer.media[0].formats == ("99",)
    assert answer.media[2].proto == "RTP/SAVP"
    assert answer.media[3].formats == ("0", "8")


def test_answer_without_common_codec_is_488() -> None:
    offer = offer_with("m=audio 4000 RTP/AVP 18 101\na=rtpmap:101 telephone-event/8000\n")
    with pytest.raises(SdpNegotiationError) as caught:
        answer_to(offer)
    assert caught.value.status == 488
    with pytest.raises(SdpNegotiationError):
        answer_to(offer_with(""))


@pytest.mark.parametrize(
    ("lines", "local", "expected"),
    [
        ("m=audio 4000 RTP/AVP 0\na=sendonly\n", "sendrecv", "recvonly"),
        ("m=audio 4000 RTP/AVP 0\na=recvonly\n", "sendrecv", "sendonly"),
        ("m=audio 4000 RTP/AVP 0\na=inactive\n", "sendrecv", "inactive"),
        ("a=sendonly\nm=audio 4000 RTP/AVP 0\n", "sendrecv", "recvonly"),
        ("m=audio 4000 RTP/AVP 0\n", "sendonly", "sendonly"),
        # RFC 3264 §8.4: c=0.0.0.0 hold; the offerer does not want to receive.
        ("m=audio 4000 RTP/AVP 0\nc=IN IP4 0.0.0.0\n", "sendrecv", "recvonly"),
        ("m=audio 4000 RTP/AVP 0\nc=IN IP4 0.0.0.0\na=sendonly\n", "sendrecv", "recvonly"),
        ("m=audio 4000 RTP/AVP 0\nc=IN IP4 0.0.0.0\na=recvonly\n", "sendrecv", "inactive"),
    ],
)
def test_answer_direction(lines: str, local: str, expected: str) -> None:
    (media,) = answer_to(offer_with(lines), direction=local).media
    assert media.direction == expected


def test_offer_answer_conversation() -> None:
    """Our offer, answered by our own answerer on the other side, and back."""
    offer = build_offer(origin=OUR_ORIGIN, address="192.0.2.7", port=4000)
    parsed = parse_sdp_untrusted(offer.encode())
    assert parsed == offer
    assert parsed.media[0].formats == ("0", "8", "101")
    assert parsed.media[0].ptime == 20
    assert parsed.media[0].fmtp(101) == "0-16"
    answer = answer_to(parsed, codecs=(PCMA,))
    assert answer.media[0].codecs() == [(8, PCMA)]


def test_build_offer_assigns_dynamic_payload_types() -> None:
    codecs = (Codec("opus", 48000, 2), PCMU, Codec("telephone-event", 8000, payload_type=96))
    offer = build_offer(origin=OUR_ORIGIN, address="2001:db8::5", port=4000, codecs=codecs)
    assert offer.media[0].formats == ("97", "0", "96")
    assert offer.connection == Connection("2001:db8::5", "IN", "IP6")
    assert dict(offer.media[0].codecs())[97].channels == 2
    assert b"a=rtpmap:97 opus/48000/2\r\n" in offer.encode()
    with pytest.raises(ValueError):
        build_offer(origin=OUR_ORIGIN, address="a", port=1, direction="up")


# -- versions and rewriting --------------------------------------------------------------------


def test_with_next_version() -> None:
    first = build_offer(origin=OUR_ORIGIN, address="192.0.2.7", port=4000)
    assert with_next_version(None, first) is first
    # Unchanged (even with another origin proposed): the same version (RFC 3264 §8).
    again = replace(first, origin=replace(OUR_ORIGIN, session_version=99, session_id="9"))
    assert with_next_version(first, again) == first
    # Changed: same origin, version + 1.
    held = build_offer(origin=OUR_ORIGIN, address="192.0.2.7", port=4000, direction="sendonly")
    second = with_next_version(first, held)
    assert second.origin == replace(OUR_ORIGIN, session_version=2)
    assert second.media == held.media
    third = with_next_version(second, held)
    assert third == second


def test_rewrite_media_address_anchors_media() -> None:
    sdp = parse_sdp_untrusted(BARESIP_OFFER)
    rewritten = rewrite_media_address(sdp, address="203.0.113.9", ports=[40000])
    assert rewritten.connection == Connection("203.0.113.9")
    media = rewritten.media[0]
    assert media.port == 40000
    assert media.attribute("rtcp") is None
    assert media.attribute("candidate") is None
    assert media.attribute("rtcp-mux") == ""
    assert media.codecs() == sdp.media[0].codecs()
    assert rewritten.origin == sdp.origin
    with_rtcp = rewrite_media_address(sdp, address="2001:db8::9", ports=[40000], rtcp_ports=[40001])
    assert with_rtcp.media[0].rtcp == (40001, None)
    assert with_rtcp.connection == Connection("2001:db8::9", "IN", "IP6")


def test_rewrite_keeps_rejected_streams_and_hold_address() -> None:
    offer = offer_with(
        "m=audio 0 RTP/AVP 0\n"
        "m=audio 4000 RTP/AVP 0\nc=IN IP4 192.0.2.99\n"
        "m=audio 4002 RTP/AVP 0\nc=IN IP4 0.0.0.0\n"
        "m=audio 4004 RTP/AVP 0\n"
    )
    rewritten = rewrite_media_address(offer, address="203.0.113.9", ports=[5000, 5002, 5004, None])
    assert [m.port for m in rewritten.media] == [0, 5002, 5004, 4004]
    assert rewritten.connection_for(1) == Connection("203.0.113.9")
    assert rewritten.connection_for(2) == Connection("0.0.0.0")
    assert is_on_hold(rewritten, 2)
    with pytest.raises(ValueError):
        rewrite_media_address(offer, address="x", ports=[1])


def test_rewrite_adds_media_connection_when_session_has_none() -> None:
    sdp = parse_sdp_untrusted(
        crlf("v=0\no=- 1 1 IN IP4 a\ns=-\nt=0 0\nm=audio 1000 RTP/AVP 0\nc=IN IP4 192.0.2.1\n")
    )
    sdp = replace(sdp, media=(replace(sdp.media[0], connections=()),))
    rewritten = rewrite_media_address(sdp, address="203.0.113.9", ports=[7000])
    assert rewritten.connection_for(0) == Connection("203.0.113.9")


@settings(max_examples=100)
@given(
    formats=st.lists(st.sampled_from(["0", "8", "9", "18", "101", "96"]), min_size=1, max_size=6),
    direction=st.sampled_from(["sendrecv", "sendonly", "recvonly", "inactive"]),
    local=st.sampled_from(["sendrecv", "sendonly", "recvonly", "inactive"]),
)
def test_answer_properties(formats: list[str], direction: str, local: str) -> None:
    """Property: an answer keeps the m= count, only offered formats, and a legal direction."""
    offer = offer_with(
        f"m=audio 4000 RTP/AVP {' '.join(formats)}\n"
        "a=rtpmap:101 telephone-event/8000\na=rtpmap:96 opus/48000/2\n"
        f"a={direction}\n"
    )
    try:
        answer = answer_to(offer, direction=local)
    except SdpNegotiationError:
        assert not {"0", "8"} & set(formats)
        return
    (media,) = answer.media
    assert set(media.formats) <= set(formats)
    assert {"0", "8"} & set(media.formats)
    assert media.direction == negotiate_direction(direction, local)


# -- real phones -------------------------------------------------------------------------------

# A desk phone (Yealink-like): many codecs, SRTP crypto offered as an option on RTP/AVP.
DESK_PHONE_OFFER = crlf(
    """
v=0
o=- 20012 20012 IN IP4 192.0.2.30
s=SDP data
c=IN IP4 192.0.2.30
t=0 0
m=audio 11796 RTP/AVP 9 0 8 18 101
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:18 G729/8000
a=fmtp:18 annexb=no
a=ptime:20
a=sendrecv
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz
"""
)

# A softphone behind NAT that puts its private address in c= and offers video too.
SOFTPHONE_OFFER = crlf(
    """
v=0
o=softphone 1700000000 1700000001 IN IP4 10.1.2.3
s=Talk
c=IN IP4 10.1.2.3
b=AS:380
t=0 0
a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics
m=audio 7078 RTP/AVP 96 97 98 0 8 101 99 100
a=rtpmap:96 opus/48000/2
a=fmtp:96 useinbandfec=1
a=rtpmap:97 speex/16000
a=fmtp:97 vbr=on
a=rtpmap:98 speex/8000
a=fmtp:98 vbr=on
a=rtpmap:101 telephone-event/48000
a=rtpmap:99 telephone-event/16000
a=rtpmap:100 telephone-event/8000
a=rtcp-fb:* trr-int 1000
a=rtcp-fb:* ccm tmmbr
m=video 9078 RTP/AVP 102
a=rtpmap:102 VP8/90000
a=rtcp-fb:102 nack pli
a=rtcp-fb:102 ccm fir
"""
)


def test_desk_phone_offer() -> None:
    sdp = parse_sdp_untrusted(DESK_PHONE_OFFER)
    assert sdp.session_name == "SDP data"
    assert sdp.media[0].fmtp(18) == "annexb=no"
    assert sdp.media[0].fmtp(0) is None
    assert sdp.media[0].attribute("crypto") is not None
    assert sdp.encode() == DESK_PHONE_OFFER
    (media,) = answer_to(DESK_PHONE_OFFER).media
    # G.722 and G.729 are not ours; PCMU and PCMA and the 8 kHz telephone-event are.
    assert media.formats == ("0", "8", "101")
    assert media.fmtp(101) == "0-16"
    assert media.ptime == 20
    assert media.attribute("crypto") is None


def test_softphone_offer_picks_8khz_telephone_event_and_rejects_video() -> None:
    sdp = parse_sdp_untrusted(SOFTPHONE_OFFER)
    assert sdp.encode() == SOFTPHONE_OFFER
    assert sdp.attribute("rtcp-xr") is not None
    assert sdp.bandwidths == (Bandwidth("AS", 380),)
    answer = answer_to(sdp)
    audio, video = answer.media
    assert audio.formats == ("0", "8", "100")
    assert dict(audio.codecs())[100] == Codec("telephone-event", 8000, 1, 100, "0-16")
    assert (video.media, video.port, video.formats) == ("video", 0, ("102",))


def test_answer_ptime_argument_wins() -> None:
    (media,) = answer_to(SIPP_OFFER, ptime=30).media
    assert media.ptime == 30
    (media,) = answer_to(SIPP_OFFER).media
    assert media.ptime is None


def test_answer_with_avpf_profile() -> None:
    offer = offer_with("m=audio 4000 RTP/AVPF 0\na=rtcp-fb:* nack\n")
    (media,) = answer_to(offer).media
    assert media.proto == "RTP/AVPF"
    assert media.port == 30000


def test_anchoring_conversation() -> None:
    """A remote host anchors a call: it rewrites the caller's offer towards the callee, the
    callee answers, and the answer is rewritten towards the caller; then the caller holds."""
    caller_offer = parse_sdp_untrusted(BARESIP_OFFER)
    # Towards the callee, with our relay's port for this leg and our own origin.
    towards_callee = with_next_version(
        None,
        replace(
            rewrite_media_address(caller_offer, address="198.51.100.1", ports=[20000]),
            origin=replace(OUR_ORIGIN, session_version=1),
        ),
    )
    callee_sees = parse_sdp_untrusted(towards_callee.encode())
    assert callee_sees.connection_for(0) == Connection("198.51.100.1")
    assert callee_sees.media[0].port == 20000
    callee_answer = build_answer(
        callee_sees,
        origin=Origin("callee", "77", 1, "IN", "IP4", "192.0.2.40"),
        address="192.0.2.40",
        port=8000,
    )
    caller_sees = rewrite_media_address(
        parse_sdp_untrusted(callee_answer.encode()), address="198.51.100.1", ports=[20002]
    )
    assert caller_sees.connection_for(0) == Connection("198.51.100.1")
    assert caller_sees.media[0].port == 20002
    assert caller_sees.media[0].formats == ("0", "8", "101")
    # The caller puts the call on hold with a re-INVITE: a=sendonly, version up.
    hold = parse_sdp_untrusted(BARESIP_OFFER.replace(b"a=sendrecv", b"a=sendonly"))
    assert is_on_hold(hold, 0)
    hold_towards_callee = with_next_version(
        towards_callee,
        replace(
            rewrite_media_address(hold, address="198.51.100.1", ports=[20000]),
            origin=towards_callee.origin,
        ),
    )
    assert hold_towards_callee.origin.session_version == 2
    assert hold_towards_callee.origin.session_id == OUR_ORIGIN.session_id
    callee_hold_answer = answer_to(hold_towards_callee)
    assert callee_hold_answer.media[0].direction == "recvonly"
    # The same offer again (a session refresh) keeps the version.
    refresh = with_next_version(
        hold_towards_callee,
        rewrite_media_address(hold, address="198.51.100.1", ports=[20000]),
    )
    assert refresh.origin.session_version == 2


def test_connection_for_address_and_attribute_encode() -> None:
    assert Connection.for_address("192.0.2.1") == Connection("192.0.2.1", "IN", "IP4")
    assert Connection.for_address("2001:db8::1").addrtype == "IP6"
    assert Attribute("sendrecv").encode() == "a=sendrecv"
    assert Attribute("ptime", "20").encode() == "a=ptime:20"
    assert Attribute("x", "").encode() == "a=x:"
    assert parse_sdp_untrusted(
        crlf("v=0\no=- 1 1 IN IP4 a\ns=-\nt=0 0\na=x:\na=y\n")
    ).attributes == (Attribute("x", ""), Attribute("y"))


def test_direction_defaults_and_precedence() -> None:
    sdp = offer_with("a=inactive\nm=audio 1 RTP/AVP 0\na=sendonly\nm=audio 2 RTP/AVP 0\n")
    assert sdp.direction(0) == "sendonly"  # media level wins
    assert sdp.direction(1) == "inactive"  # session level inherited
    assert offer_with("m=audio 1 RTP/AVP 0\n").direction(0) == "sendrecv"


def test_codec_same_format() -> None:
    assert PCMU.same_format(Codec("pcmu", 8000, payload_type=99))
    assert not PCMU.same_format(Codec("PCMU", 16000))
    assert not Codec("opus", 48000, 2).same_format(Codec("opus", 48000, 1))
    assert Codec("opus", 48000, 2).rtpmap_value(111) == "111 opus/48000/2"
    assert PCMA.rtpmap_value(8) == "8 PCMA/8000"


@settings(max_examples=300)
@given(
    which=st.sampled_from([SIPP_OFFER, BARESIP_OFFER, DESK_PHONE_OFFER, SOFTPHONE_OFFER]),
    position=st.integers(0, 2000),
    flip=st.integers(1, 255),
    cut=st.integers(0, 2000),
)
def test_fuzz_mangled_real_offers(which: bytes, position: int, flip: int, cut: int) -> None:
    data = bytearray(which)
    data[position % len(data)] ^= flip
    for candidate in (bytes(data), bytes(data[: cut % len(data)])):
        try:
            sdp = parse_sdp_untrusted(candidate)
        except SdpParseError:
            continue
        assert parse_sdp_untrusted(sdp.encode()) == sdp
        try:
            answer_to(sdp)
        except SdpNegotiationError:
            pass
        rewrite_media_address(sdp, address="203.0.113.1", ports=[1000] * len(sdp.media))


@settings(max_examples=300)
@given(
    names=st.lists(
        st.sampled_from(["rtpmap", "fmtp", "rtcp", "ptime", "maxptime", "sendonly", "inactive"]),
        max_size=5,
    ),
    values=st.lists(
        st.text(alphabet=st.characters(codec="utf-8", min_codepoint=0x09), max_size=15),
        min_size=5,
        max_size=5,
    ),
    formats=st.lists(st.text(alphabet="0123456789x ", min_size=1, max_size=4), max_size=4),
)
def test_fuzz_accessors_on_any_attribute_values(
    names: list[str], values: list[str], formats: list[str]
) -> None:
    """Accessors read untrusted attribute values: they answer None or skip, never raise."""
    formats = [f for f in " ".join(formats).split()]
    lines = "".join(f"a={name}:{value}\n" for name, value in zip(names, values, strict=False))
    text = f"m=audio 4000 RTP/AVP {' '.join(formats)}\n{lines}".replace("\r", "")
    try:
        sdp = offer_with(text)
    except SdpParseError:
        return
    media = sdp.media[0]
    media.codecs()
    media.rtcp  # noqa: B018
    media.ptime  # noqa: B018
    media.maxptime  # noqa: B018
    for payload_type in range(0, 128, 7):
        media.fmtp(payload_type)
    try:
        answer_to(sdp)
    except SdpNegotiationError:
        pass


def test_blank_rtcp_attribute() -> None:
    sdp = parse_sdp_untrusted(b"v=0\r\no=- 1 1 IN IP4 a\r\nm=audio 1 RTP/AVP 0\r\na=rtcp: \r\n")
    assert sdp.media[0].attribute("rtcp") == " "
    assert sdp.media[0].rtcp is None
