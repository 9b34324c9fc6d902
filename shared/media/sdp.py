"""SDP session descriptions (RFC 8866) and the offer/answer rules of RFC 3264 for audio calls.

This module owns the SDP text format (parse, serialize), typed accessors for the attributes a
PBX needs (rtpmap, fmtp, ptime, maxptime, direction, rtcp), building offers and answers from our
codec list, hold detection (RFC 3264 §8.4), o= version handling (RFC 3264 §8) and rewriting the
connection address and ports when a host anchors media. It does not allocate ports, know which
side of a call it is on, or do ICE (candidate attributes are dropped when media is anchored).

It is long (about 750 lines) because SDP is one grammar plus one negotiation; splitting the
negotiation off would only move the typed accessors it shares with the parser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

__all__ = [
    "DIRECTIONS",
    "PCMA",
    "PCMU",
    "TELEPHONE_EVENT",
    "Attribute",
    "Bandwidth",
    "Codec",
    "Connection",
    "MediaDescription",
    "Origin",
    "SdpNegotiationError",
    "SdpParseError",
    "SessionDescription",
    "Timing",
    "build_answer",
    "build_offer",
    "is_on_hold",
    "negotiate_direction",
    "parse_sdp_untrusted",
    "rewrite_media_address",
    "with_next_version",
]

MAX_SDP_SIZE = 65536
MAX_MEDIA = 32

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
# RFC 3264 §5.1 / §8.4: the pre-RFC 3264 way to put a stream on hold.
HOLD_ADDRESSES = frozenset({"0.0.0.0", "::"})
# Attributes that describe the phone's own transport; meaningless once a host anchors media.
_TRANSPORT_ATTRIBUTES = frozenset(
    {"rtcp", "candidate", "remote-candidates", "end-of-candidates", "ice-ufrag", "ice-pwd",
     "ice-options", "ice-lite", "ice-mismatch"}
)  # fmt: skip


class SdpParseError(Exception):
    """The bytes are not an SDP session description we can read (the sender's fault)."""


class SdpNegotiationError(Exception):
    """An offer we cannot answer; the SIP layer answers ``status`` (488 Not Acceptable Here)."""

    status = 488


@dataclass(frozen=True, slots=True)
class Origin:
    """``o=`` (RFC 8866 §5.2): the session's identity; only the version changes in a session."""

    username: str = "-"
    session_id: str = "0"
    session_version: int = 0
    nettype: str = "IN"
    addrtype: str = "IP4"
    address: str = "0.0.0.0"


@dataclass(frozen=True, slots=True)
class Connection:
    """``c=`` (RFC 8866 §5.7). ``address`` keeps any multicast /ttl/count suffix verbatim."""

    address: str
    nettype: str = "IN"
    addrtype: str = "IP4"

    @classmethod
    def for_address(cls, address: str) -> Connection:
        return cls(address, "IN", "IP6" if ":" in address else "IP4")


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """``b=<bwtype>:<bandwidth>`` (RFC 8866 §5.8), kbit/s for AS and CT."""

    bwtype: str
    value: int


@dataclass(frozen=True, slots=True)
class Timing:
    """``t=`` with its ``r=`` lines (RFC 8866 §5.9, §5.10); kept verbatim, 0 0 for calls."""

    start: int = 0
    stop: int = 0
    repeats: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Attribute:
    """``a=<name>`` (a flag, value None) or ``a=<name>:<value>`` (RFC 8866 §5.13)."""

    name: str
    value: str | None = None

    def encode(self) -> str:
        return f"a={self.name}" if self.value is None else f"a={self.name}:{self.value}"


@dataclass(frozen=True, slots=True)
class Codec:
    """An RTP payload format as rtpmap names it; ``payload_type`` is the one we offer."""

    encoding: str
    clock_rate: int = 8000
    channels: int = 1
    payload_type: int | None = None
    fmtp: str | None = None

    def same_format(self, other: Codec) -> bool:
        # RFC 4855 §3: encoding names compare case-insensitively.
        return (
            self.encoding.lower() == other.encoding.lower()
            and self.clock_rate == other.clock_rate
            and self.channels == other.channels
        )

    def rtpmap_value(self, payload_type: int) -> str:
        channels = f"/{self.channels}" if self.channels != 1 else ""
        return f"{payload_type} {self.encoding}/{self.clock_rate}{channels}"


PCMU = Codec("PCMU", 8000, payload_type=0)
PCMA = Codec("PCMA", 8000, payload_type=8)
TELEPHONE_EVENT = Codec("telephone-event", 8000, payload_type=101, fmtp="0-16")

# RFC 3551 §6 Table 4: static audio payload types, usable without an rtpmap.
STATIC_PAYLOAD_TYPES: dict[int, Codec] = {
    0: PCMU,
    3: Codec("GSM", 8000, payload_type=3),
    4: Codec("G723", 8000, payload_type=4),
    8: PCMA,
    9: Codec("G722", 8000, payload_type=9),
    13: Codec("CN", 8000, payload_type=13),
    18: Codec("G729", 8000, payload_type=18),
}


def _attribute_value(attributes: Sequence[Attribute], name: str) -> str | None:
    for attribute in attributes:
        if attribute.name == name:
            return attribute.value if attribute.value is not None else ""
    return None


def _direction_in(attributes: Sequence[Attribute]) -> str | None:
    for attribute in attributes:
        if attribute.name in DIRECTIONS:
            return attribute.name
    return None


@dataclass(frozen=True, slots=True)
class MediaDescription:
    """One ``m=`` section (RFC 8866 §5.14) with its media-level lines."""

    media: str
    port: int
    proto: str
    formats: tuple[str, ...]
    port_count: int | None = None
    information: str | None = None
    connections: tuple[Connection, ...] = ()
    bandwidths: tuple[Bandwidth, ...] = ()
    key: str | None = None
    attributes: tuple[Attribute, ...] = ()

    def attribute(self, name: str) -> str | None:
        """The first value of attribute ``name`` ("" for a flag), or None if absent."""
        return _attribute_value(self.attributes, name)

    @property
    def direction(self) -> str | None:
        """The media-level direction attribute, if any (see SessionDescription.direction)."""
        return _direction_in(self.attributes)

    @property
    def ptime(self) -> int | None:
        return _int_or_none(self.attribute("ptime"))

    @property
    def maxptime(self) -> int | None:
        return _int_or_none(self.attribute("maxptime"))

    @property
    def rtcp(self) -> tuple[int, Connection | None] | None:
        """RFC 3605: ``a=rtcp:<port> [IN IP4 <address>]``; None if absent or unreadable."""
        parts = (self.attribute("rtcp") or "").split()
        if not parts:
            return None
        port = _int_or_none(parts[0])
        if port is None or port > 65535:
            return None
        if len(parts) == 4:
            return port, Connection(parts[3], parts[1], parts[2])
        return port, None

    def fmtp(self, payload_type: int) -> str | None:
        prefix = f"{payload_type} "
        for attribute in self.attributes:
            if attribute.name == "fmtp" and attribute.value and attribute.value.startswith(prefix):
                return attribute.value[len(prefix) :].strip()
        return None

    def codecs(self) -> list[tuple[int, Codec]]:
        """The RTP formats in offer order, resolved by rtpmap or the static table.

        Formats that are not payload type numbers, or dynamic ones without an rtpmap, are left
        out: we cannot know what they are.
        """
        rtpmaps: dict[int, Codec] = {}
        for attribute in self.attributes:
            if attribute.name == "rtpmap" and attribute.value:
                parsed = _parse_rtpmap(attribute.value)
                if parsed is not None:
                    rtpmaps.setdefault(parsed[0], parsed[1])
        result = []
        for text in self.formats:
            payload_type = _int_or_none(text)
            if payload_type is None or payload_type > 127:
                continue
            codec = rtpmaps.get(payload_type) or STATIC_PAYLOAD_TYPES.get(payload_type)
            if codec is None:
                continue
            result.append((payload_type, replace(codec, fmtp=self.fmtp(payload_type))))
        return result


def _int_or_none(text: str | None, max_digits: int = 10) -> int | None:
    if text is None:
        return None
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > max_digits:
        return None
    return int(text)


def _parse_rtpmap(value: str) -> tuple[int, Codec] | None:
    # RFC 8866 §6.6: a=rtpmap:<payload type> <encoding name>/<clock rate>[/<parameters>]
    parts = value.split(None, 1)
    if len(parts) != 2:
        return None
    payload_type = _int_or_none(parts[0])
    pieces = parts[1].strip().split("/")
    if payload_type is None or payload_type > 127 or len(pieces) not in (2, 3):
        return None
    clock_rate = _int_or_none(pieces[1])
    channels = _int_or_none(pieces[2]) if len(pieces) == 3 else 1
    if clock_rate is None or not clock_rate or channels is None or not pieces[0]:
        return None
    return payload_type, Codec(pieces[0], clock_rate, channels, payload_type)


@dataclass(frozen=True, slots=True)
class SessionDescription:
    """A whole session description (RFC 8866 §5). Values are immutable: use ``replace``."""

    origin: Origin = field(default_factory=Origin)
    session_name: str = "-"
    media: tuple[MediaDescription, ...] = ()
    connection: Connection | None = None
    attributes: tuple[Attribute, ...] = ()
    timings: tuple[Timing, ...] = (Timing(),)
    bandwidths: tuple[Bandwidth, ...] = ()
    information: str | None = None
    uri: str | None = None
    emails: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    zone: str | None = None
    key: str | None = None
    version: int = 0

    def attribute(self, name: str) -> str | None:
        """The first session-level value of ``name`` ("" for a flag), or None if absent."""
        return _attribute_value(self.attributes, name)

    def direction(self, index: int) -> str:
        """The direction of stream ``index``: media level, else session level, else sendrecv
        (RFC 8866 §6.7)."""
        return self.media[index].direction or _direction_in(self.attributes) or "sendrecv"

    def connection_for(self, index: int) -> Connection | None:
        """The connection of stream ``index``: its own c= line, else the session's."""
        media = self.media[index]
        return media.connections[0] if media.connections else self.connection

    def encode(self) -> bytes:
        """The SDP text with CRLF line ends, fields in the RFC 8866 §5 order."""
        o = self.origin
        lines = [
            f"v={self.version}",
            f"o={o.username} {o.session_id} {o.session_version} {o.nettype} {o.addrtype} "
            f"{o.address}",
            f"s={self.session_name or '-'}",
        ]
        if self.information is not None:
            lines.append(f"i={self.information}")
        if self.uri is not None:
            lines.append(f"u={self.uri}")
        lines += [f"e={email}" for email in self.emails]
        lines += [f"p={phone}" for phone in self.phones]
        if self.connection is not None:
            lines.append(_connection_line(self.connection))
        lines += [f"b={b.bwtype}:{b.value}" for b in self.bandwidths]
        for timing in self.timings or (Timing(),):
            lines.append(f"t={timing.start} {timing.stop}")
            lines += [f"r={repeat}" for repeat in timing.repeats]
        if self.zone is not None:
            lines.append(f"z={self.zone}")
        if self.key is not None:
            lines.append(f"k={self.key}")
        lines += [attribute.encode() for attribute in self.attributes]
        for media in self.media:
            port = f"{media.port}/{media.port_count}" if media.port_count else str(media.port)
            lines.append(" ".join([f"m={media.media}", port, media.proto, *media.formats]))
            if media.information is not None:
                lines.append(f"i={media.information}")
            lines += [_connection_line(c) for c in media.connections]
            lines += [f"b={b.bwtype}:{b.value}" for b in media.bandwidths]
            if media.key is not None:
                lines.append(f"k={media.key}")
            lines += [attribute.encode() for attribute in media.attributes]
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _connection_line(connection: Connection) -> str:
    return f"c={connection.nettype} {connection.addrtype} {connection.address}"


# ---------------------------------------------------------------------------------------------
# Parsing

_SESSION_ONLY = frozenset("vosuepbtrzk")


def _parse_connection(value: str) -> Connection:
    parts = value.split()
    if len(parts) != 3:
        raise SdpParseError(f"bad c= line: {value!r}")
    return Connection(parts[2], parts[0], parts[1])


def _parse_bandwidth(value: str) -> Bandwidth:
    bwtype, sep, amount = value.partition(":")
    number = _int_or_none(amount)
    if not sep or not bwtype or number is None:
        raise SdpParseError(f"bad b= line: {value!r}")
    return Bandwidth(bwtype, number)


def _parse_attribute(value: str) -> Attribute:
    name, sep, rest = value.partition(":")
    # Some phones leave trailing blanks after a flag (a=sendrecv ).
    name = name.strip()
    if not name or " " in name or "\t" in name:
        raise SdpParseError(f"bad a= line: {value!r}")
    return Attribute(name, rest if sep else None)


def _parse_media(value: str) -> MediaDescription:
    # RFC 8866 §5.14: m=<media> <port>[/<number of ports>] <proto> <fmt> ...
    parts = value.split()
    if len(parts) < 3:
        raise SdpParseError(f"bad m= line: {value!r}")
    port_text, _, count_text = parts[1].partition("/")
    port = _int_or_none(port_text)
    count = _int_or_none(count_text) if count_text else None
    if port is None or port > 65535 or (count_text and not count):
        raise SdpParseError(f"bad port in m= line: {value!r}")
    return MediaDescription(
        media=parts[0], port=port, port_count=count, proto=parts[2], formats=tuple(parts[3:])
    )


def _parse_origin(value: str) -> Origin:
    parts = value.split()
    if len(parts) != 6:
        raise SdpParseError(f"bad o= line: {value!r}")
    version_text = parts[2]
    # sess-version is digits; phones use up to 64-bit values (NTP timestamps, 20 digits).
    if not (version_text.isascii() and version_text.isdigit() and len(version_text) <= 20):
        raise SdpParseError(f"bad session version in o= line: {value!r}")
    version = int(version_text)
    return Origin(parts[0], parts[1], version, parts[3], parts[4], parts[5])


def parse_sdp_untrusted(data: bytes) -> SessionDescription:
    """Parse an SDP body; raises only SdpParseError.

    Lenient where real phones are sloppy (LF line ends, a missing s= or t=, blank lines, unknown
    line types are ignored as RFC 8866 §5 allows); strict about structure (v= first, one o=,
    lines of the session level after the first m=).
    """
    if len(data) > MAX_SDP_SIZE:
        raise SdpParseError("SDP body too large")
    try:
        text = bytes(data).decode("utf-8")
    except (UnicodeDecodeError, TypeError, ValueError):
        raise SdpParseError("SDP is not UTF-8") from None
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    lines = [line for line in lines if line.strip()]
    if not lines or lines[0].strip() != "v=0":
        raise SdpParseError("SDP must start with v=0")
    session: dict[str, object] = {}
    origin: Origin | None = None
    attributes: list[Attribute] = []
    timings: list[Timing] = []
    bandwidths: list[Bandwidth] = []
    emails: list[str] = []
    phones: list[str] = []
    media: list[MediaDescription] = []
    # Per-media accumulators for the section being read.
    m_conn: list[Connection] = []
    m_bw: list[Bandwidth] = []
    m_attr: list[Attribute] = []
    m_extra: dict[str, str] = {}

    def close_media() -> None:
        if media:
            media[-1] = replace(
                media[-1],
                connections=tuple(m_conn),
                bandwidths=tuple(m_bw),
                attributes=tuple(m_attr),
                information=m_extra.get("i"),
                key=m_extra.get("k"),
            )
        m_conn.clear()
        m_bw.clear()
        m_attr.clear()
        m_extra.clear()

    for line in lines[1:]:
        if len(line) < 2 or line[1] != "=":
            raise SdpParseError(f"not a <type>=<value> line: {line[:40]!r}")
        kind, value = line[0], line[2:]
        if kind == "m":
            close_media()
            if len(media) >= MAX_MEDIA:
                raise SdpParseError("too many m= lines")
            media.append(_parse_media(value))
        elif media:
            # Media level: i, c, b, k, a.
            if kind == "a":
                m_attr.append(_parse_attribute(value))
            elif kind == "c":
                m_conn.append(_parse_connection(value))
            elif kind == "b":
                m_bw.append(_parse_bandwidth(value))
            elif kind in "ik":
                m_extra[kind] = value
            elif kind in _SESSION_ONLY:
                raise SdpParseError(f"session-level {kind}= line inside a media section")
        elif kind == "a":
            attributes.append(_parse_attribute(value))
        elif kind == "o":
            if origin is not None:
                raise SdpParseError("more than one o= line")
            origin = _parse_origin(value)
        elif kind == "c":
            if "c" in session:
                raise SdpParseError("more than one session c= line")
            session["c"] = _parse_connection(value)
        elif kind == "b":
            bandwidths.append(_parse_bandwidth(value))
        elif kind == "t":
            parts = value.split()
            # NTP seconds: 10 digits until 2036, then beyond; 20 digits is plenty.
            start = _int_or_none(parts[0], 20) if len(parts) == 2 else None
            stop = _int_or_none(parts[1], 20) if len(parts) == 2 else None
            if start is None or stop is None:
                raise SdpParseError(f"bad t= line: {value!r}")
            timings.append(Timing(start, stop))
        elif kind == "r":
            if not timings:
                raise SdpParseError("r= line before any t= line")
            timings[-1] = replace(timings[-1], repeats=(*timings[-1].repeats, value))
        elif kind == "e":
            emails.append(value)
        elif kind == "p":
            phones.append(value)
        elif kind == "v":
            raise SdpParseError("more than one v= line")
        elif kind in "siuzk":
            if kind in session:
                raise SdpParseError(f"more than one {kind}= line")
            session[kind] = value
        # Any other type letter: ignored (RFC 8866 §5).
    close_media()
    if origin is None:
        raise SdpParseError("SDP without o= line")
    connection = session.get("c")
    assert connection is None or isinstance(connection, Connection)
    texts = {k: v for k, v in session.items() if isinstance(v, str)}
    return SessionDescription(
        origin=origin,
        session_name=texts.get("s") or "-",
        information=texts.get("i"),
        uri=texts.get("u"),
        emails=tuple(emails),
        phones=tuple(phones),
        connection=connection,
        bandwidths=tuple(bandwidths),
        timings=tuple(timings) or (Timing(),),
        zone=texts.get("z"),
        key=texts.get("k"),
        attributes=tuple(attributes),
        media=tuple(media),
    )


# ---------------------------------------------------------------------------------------------
# Offer / answer (RFC 3264)

_SENDS = {"sendrecv": True, "sendonly": True, "recvonly": False, "inactive": False}
_RECEIVES = {"sendrecv": True, "sendonly": False, "recvonly": True, "inactive": False}


def _direction(sends: bool, receives: bool) -> str:
    if sends:
        return "sendrecv" if receives else "sendonly"
    return "recvonly" if receives else "inactive"


def negotiate_direction(offered: str, local: str = "sendrecv") -> str:
    """RFC 3264 §6.1: the answer's direction for an offered one, limited by what we want.

    We may send only if the offerer receives, and receive only if it sends: sendonly is answered
    recvonly, recvonly sendonly, inactive inactive.
    """
    if offered not in _SENDS or local not in _SENDS:
        raise ValueError(f"unknown direction {offered!r} or {local!r}")
    return _direction(_RECEIVES[offered] and _SENDS[local], _SENDS[offered] and _RECEIVES[local])


def is_on_hold(sdp: SessionDescription, index: int) -> bool:
    """RFC 3264 §8.4: the sender of ``sdp`` does not want media on stream ``index``: it is
    sendonly or inactive, or uses the old c=0.0.0.0 form (RFC 2543)."""
    connection = sdp.connection_for(index)
    if connection is not None and connection.address in HOLD_ADDRESSES:
        return True
    return sdp.direction(index) in ("sendonly", "inactive")


def _media_lines(
    codecs: Sequence[tuple[int, Codec]], direction: str, ptime: int | None
) -> tuple[Attribute, ...]:
    attributes = [Attribute("rtpmap", codec.rtpmap_value(pt)) for pt, codec in codecs]
    attributes += [Attribute("fmtp", f"{pt} {codec.fmtp}") for pt, codec in codecs if codec.fmtp]
    if ptime is not None:
        attributes.append(Attribute("ptime", str(ptime)))
    attributes.append(Attribute(direction))
    return tuple(attributes)


def build_offer(
    *,
    origin: Origin,
    address: str,
    port: int,
    codecs: Sequence[Codec] = (PCMU, PCMA, TELEPHONE_EVENT),
    direction: str = "sendrecv",
    ptime: int | None = 20,
    session_name: str = "-",
) -> SessionDescription:
    """One audio stream offering ``codecs`` in preference order (RFC 3264 §5)."""
    numbered: list[tuple[int, Codec]] = []
    next_dynamic = 96
    used = {codec.payload_type for codec in codecs if codec.payload_type is not None}
    for codec in codecs:
        payload_type = codec.payload_type
        if payload_type is None:
            while next_dynamic in used:
                next_dynamic += 1
            payload_type = next_dynamic
            used.add(payload_type)
        numbered.append((payload_type, codec))
    if direction not in _SENDS:
        raise ValueError(f"unknown direction {direction!r}")
    media = MediaDescription(
        media="audio",
        port=port,
        proto="RTP/AVP",
        formats=tuple(str(pt) for pt, _ in numbered),
        attributes=_media_lines(numbered, direction, ptime),
    )
    return SessionDescription(
        origin=origin,
        session_name=session_name,
        connection=Connection.for_address(address),
        media=(media,),
    )


def _match_codecs(
    offered: Sequence[tuple[int, Codec]], local: Sequence[Codec]
) -> list[tuple[int, Codec]]:
    """Offered formats we support, in the offer's order, under the offer's payload types.

    RFC 3264 §6.1: the answer uses the offerer's payload type numbers for the formats it keeps.
    """
    chosen = []
    for payload_type, codec in offered:
        for ours in local:
            if ours.same_format(codec):
                chosen.append((payload_type, replace(codec, fmtp=ours.fmtp or codec.fmtp)))
                break
    return chosen


def _is_audio_codec(codec: Codec) -> bool:
    return codec.encoding.lower() not in ("telephone-event", "cn")


def build_answer(
    offer: SessionDescription,
    *,
    origin: Origin,
    address: str,
    port: int,
    codecs: Sequence[Codec] = (PCMU, PCMA, TELEPHONE_EVENT),
    direction: str = "sendrecv",
    ptime: int | None = None,
) -> SessionDescription:
    """Answer ``offer`` with one audio stream at ``address``:``port`` (RFC 3264 §6).

    The answer has one m= line per offered one, in order. The first RTP audio stream with a
    voice codec in common is accepted; every other stream is rejected with port 0 (§6: a
    rejected stream keeps its m= line). ``direction`` is what we want; the offered direction
    (with c=0.0.0.0 read as "do not send to me", §8.4) limits it. Raises SdpNegotiationError
    when no stream can be accepted (the caller answers 488).
    """
    media_out: list[MediaDescription] = []
    accepted = False
    for index, offered in enumerate(offer.media):
        chosen: list[tuple[int, Codec]] = []
        if (
            not accepted
            and offered.port != 0
            and offered.media == "audio"
            and offered.proto in ("RTP/AVP", "RTP/AVPF")
        ):
            chosen = _match_codecs(offered.codecs(), codecs)
        if not any(_is_audio_codec(codec) for _, codec in chosen):
            # RFC 3264 §6: rejected, port 0, and still at least one of the offered formats.
            media_out.append(
                MediaDescription(
                    media=offered.media,
                    port=0,
                    proto=offered.proto,
                    formats=offered.formats[:1] or ("0",),
                )
            )
            continue
        accepted = True
        offered_direction = offer.direction(index)
        connection = offer.connection_for(index)
        if connection is not None and connection.address in HOLD_ADDRESSES:
            # RFC 3264 §8.4: c=0.0.0.0 means the offerer does not want to receive.
            offered_direction = _direction(_SENDS[offered_direction], False)
        answer_direction = negotiate_direction(offered_direction, direction)
        media_out.append(
            MediaDescription(
                media="audio",
                port=port,
                proto=offered.proto,
                formats=tuple(str(pt) for pt, _ in chosen),
                attributes=_media_lines(chosen, answer_direction, ptime or offered.ptime),
            )
        )
    if not accepted:
        raise SdpNegotiationError("no acceptable audio stream in the offer")
    return SessionDescription(
        origin=origin,
        connection=Connection.for_address(address),
        media=tuple(media_out),
    )


def with_next_version(
    previous: SessionDescription | None, current: SessionDescription
) -> SessionDescription:
    """The description to send now, given the one we sent last in this session.

    RFC 3264 §8: the o= line stays the same except the version, which goes up by one when
    anything changed and stays when the description is unchanged (§8: a repeated offer).
    """
    if previous is None:
        return current
    same = replace(current, origin=previous.origin)
    if same == previous:
        return previous
    bumped = replace(previous.origin, session_version=previous.origin.session_version + 1)
    return replace(current, origin=bumped)


def rewrite_media_address(
    sdp: SessionDescription,
    *,
    address: str,
    ports: Sequence[int | None],
    rtcp_ports: Sequence[int | None] | None = None,
) -> SessionDescription:
    """Point the media of ``sdp`` at ``address`` and new ports: how a host anchors media.

    ``ports[i]`` replaces stream i's port (None keeps it); rejected streams (port 0) stay
    rejected. Every c= line is rewritten, except a hold address (0.0.0.0, which must keep its
    meaning, RFC 3264 §8.4). The phone's own transport attributes (rtcp, ICE candidates) are
    removed, or a=rtcp is set from ``rtcp_ports``. The o= version is not touched: pass the
    result through :func:`with_next_version`.
    """
    if len(ports) != len(sdp.media):
        raise ValueError("one port (or None) per m= line")
    new_connection = Connection.for_address(address)

    def rewrite(connection: Connection) -> Connection:
        return connection if connection.address in HOLD_ADDRESSES else new_connection

    media_out = []
    for index, media in enumerate(sdp.media):
        port = ports[index]
        if media.port == 0 or port is None:
            media_out.append(media)
            continue
        attributes = [a for a in media.attributes if a.name not in _TRANSPORT_ATTRIBUTES]
        rtcp = rtcp_ports[index] if rtcp_ports is not None else None
        if rtcp is not None:
            attributes.append(Attribute("rtcp", str(rtcp)))
        connections = tuple(rewrite(c) for c in media.connections)
        if not connections and sdp.connection is None:
            connections = (new_connection,)
        media_out.append(
            replace(media, port=port, connections=connections, attributes=tuple(attributes))
        )
    session_attributes = tuple(a for a in sdp.attributes if a.name not in _TRANSPORT_ATTRIBUTES)
    return replace(
        sdp,
        connection=None if sdp.connection is None else rewrite(sdp.connection),
        media=tuple(media_out),
        attributes=session_attributes,
    )
