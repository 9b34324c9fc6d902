"""The 49 torture messages of RFC 4475, each with the outcome the RFC asks for.

Valid messages parse, validate, serialize and re-parse to the same thing. Invalid requests raise
our `SipParseError` with the status RFC 4475 names and carry the request so a reply can be
built; malformed responses are dropped (the error carries no request). Messages that are
syntactically fine but refused by policy further up (415, 401, 406, 483) must pass this layer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.sip.errors import SipParseError
from shared.sip.framing import KeepAlivePong, SipStreamFramer
from shared.sip.headers import unquote
from shared.sip.message import (
    SipRequest,
    SipResponse,
    error_response,
    parse_message_untrusted,
    validate_request_untrusted,
    validate_response_untrusted,
)
from shared.sip.uri import AbsoluteUri, SipUri

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "sip" / "rfc4475"

ACCEPT = "accept"
DROP = "drop"

# file -> ACCEPT, DROP, or the status of the reply RFC 4475 expects.
EXPECTED: dict[str, str | int] = {
    # §3.1.1: valid messages
    "wsinv.dat": ACCEPT,
    "intmeth.dat": ACCEPT,
    "esc01.dat": ACCEPT,
    "escnull.dat": ACCEPT,
    "esc02.dat": ACCEPT,
    "lwsdisp.dat": ACCEPT,
    "longreq.dat": ACCEPT,
    "dblreq.dat": ACCEPT,
    "semiuri.dat": ACCEPT,
    "transports.dat": ACCEPT,
    "mpart01.dat": ACCEPT,
    "unreason.dat": ACCEPT,
    "noreason.dat": ACCEPT,
    # §3.1.2: invalid messages
    "badinv01.dat": 400,
    "clerr.dat": 400,
    "ncl.dat": 400,
    "scalar02.dat": 400,
    "scalarlg.dat": DROP,
    "quotbal.dat": 400,
    "ltgtruri.dat": 400,
    "lwsruri.dat": 400,
    "lwsstart.dat": 400,
    "trws.dat": 400,
    "escruri.dat": 400,
    "baddate.dat": 400,
    "regbadct.dat": 400,
    "badaspec.dat": 400,
    "baddn.dat": 400,
    "badvers.dat": 505,
    "mismatch01.dat": 400,
    "mismatch02.dat": 400,
    "bigcode.dat": DROP,
    # §3.2: transaction layer semantics (a branch without the magic cookie is RFC 2543 style)
    "badbranch.dat": ACCEPT,
    # §3.3: application layer semantics
    "insuf.dat": 400,
    "unkscm.dat": 416,
    "novelsc.dat": 416,
    "unksm2.dat": ACCEPT,
    "bext01.dat": 420,
    "invut.dat": ACCEPT,  # 415 is the UAS's call, not the parser's
    "regaut01.dat": ACCEPT,  # 401 is the registrar's call
    "multi01.dat": 400,
    "mcl01.dat": 400,
    "bcast.dat": ACCEPT,  # the transaction layer drops it: no matching Via
    "zeromf.dat": ACCEPT,  # 483 is a proxy's call; a UAS may answer
    "cparam01.dat": ACCEPT,
    "cparam02.dat": ACCEPT,
    "regescrt.dat": ACCEPT,
    "sdp01.dat": ACCEPT,  # 406 is the UAS's call
    # §3.4: backward compatibility
    "inv2543.dat": ACCEPT,
}


def _index() -> list[tuple[str, str]]:
    rows = []
    for line in (VECTORS / "INDEX.psv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, section, _title = line.split("|")
        rows.append((name, section))
    return rows


INDEX = _index()
NAMES = [name for name, _ in INDEX]


def load(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def parse_and_validate(data: bytes) -> SipRequest | SipResponse:
    msg = parse_message_untrusted(data)
    if isinstance(msg, SipRequest):
        validate_request_untrusted(msg)
    else:
        validate_response_untrusted(msg)
    return msg


def test_index_lists_all_49_vectors_and_we_expect_something_of_each():
    assert len(INDEX) == 49
    assert set(NAMES) == set(EXPECTED)
    assert {p.name for p in VECTORS.glob("*.dat")} == set(EXPECTED)


def semantics(msg: SipRequest | SipResponse) -> dict[str, object]:
    """What a message means, independent of spelling: used to compare round trips."""
    out: dict[str, object] = {
        "body": msg.body,
        "version": msg.version,
        "headers": [(n, v) for n, v in msg.headers if n != "Content-Length"],
        "vias": [str(v) for v in msg.vias],
        "cseq": msg.cseq,
        "call_id": msg.call_id,
        "from": str(msg.from_),
        "to": str(msg.to),
        "contacts": [str(c) for c in msg.contacts],
        "routes": [str(r) for r in msg.routes],
    }
    if isinstance(msg, SipRequest):
        out["start"] = (msg.method, str(msg.request_uri))
    else:
        out["start"] = (msg.status, msg.reason)
    return out


@pytest.mark.parametrize("name", [n for n in NAMES if EXPECTED[n] == ACCEPT])
def test_valid_message_parses_validates_and_round_trips(name):
    msg = parse_and_validate(load(name))
    encoded = msg.encode()
    again = parse_and_validate(encoded)
    assert semantics(again) == semantics(msg)
    # Serializing what we parsed is stable: a second trip gives the same bytes.
    assert again.encode() == encoded
    # And a changed message is re-serialized, with the change.
    msg.headers.add("X-Branchpbx-Test", "1")
    changed = parse_and_validate(msg.encode())
    assert changed.headers.get("X-Branchpbx-Test") == "1"
    assert semantics(changed)["headers"] == semantics(msg)["headers"]


@pytest.mark.parametrize("name", [n for n in NAMES if isinstance(EXPECTED[n], int)])
def test_invalid_request_gets_the_status_rfc4475_asks_for(name):
    with pytest.raises(SipParseError) as info:
        parse_and_validate(load(name))
    exc = info.value
    assert exc.status == EXPECTED[name]
    assert exc.reason
    # The error carries the request, so the reply can be sent back along its Via.
    reply = error_response(exc, to_tag="abc")
    assert reply is not None
    assert exc.request is not None
    assert reply.status == exc.status
    assert reply.headers.get_all("Via") == exc.request.headers.get_all("Via")
    assert reply.headers.get("CSeq") == exc.request.headers.get("CSeq")
    # The reply itself is a well-formed message.
    assert isinstance(parse_message_untrusted(reply.encode()), SipResponse)


@pytest.mark.parametrize("name", [n for n in NAMES if EXPECTED[n] == DROP])
def test_malformed_response_is_dropped(name):
    data = load(name)
    assert data.startswith(b"SIP/2.0 ")
    with pytest.raises(SipParseError) as info:
        parse_and_validate(data)
    assert info.value.request is None
    assert error_response(info.value) is None


@pytest.mark.parametrize("name", [n for n in NAMES if EXPECTED[n] == ACCEPT])
def test_valid_message_survives_stream_framing_byte_by_byte(name):
    msg = parse_and_validate(load(name))
    data = msg.encode()  # always has a Content-Length, which a stream requires
    framer = SipStreamFramer()
    out = []
    for i in range(len(data)):
        framer.receive_data(data[i : i + 1])
        event = framer.next_message()
        if event is not None:
            out.append(event)
    assert out == [data]


def test_unchanged_message_is_resent_as_received():
    data = load("wsinv.dat")
    msg = parse_message_untrusted(data)
    assert msg.raw == data
    assert msg.encode() is data


# --- §3.1.1 details: what each valid message must mean ----------------------------------


def test_wsinv_short_tortuous_invite():
    msg = parse_and_validate(load("wsinv.dat"))
    assert isinstance(msg, SipRequest)
    assert msg.method == "INVITE"
    assert msg.to.tag == "1918181833n"
    assert msg.from_.display_name == 'J Rosenberg \\"'
    assert msg.from_.tag == "98asjd8"
    assert msg.max_forwards == 68
    assert tuple(msg.cseq) == (9, "INVITE")
    assert [(v.transport, v.host, v.branch) for v in msg.vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert msg.headers.get("Subject") == ""
    assert msg.headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert msg.headers.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    (contact,) = msg.contacts
    assert contact.display_name == 'Quoted string ""'
    assert contact.params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}
    assert contact.q == pytest.approx(0.33)
    (route,) = msg.routes
    assert isinstance(route.uri, SipUri)
    assert route.uri.params == {"lr": None, "unknownwith": "value", "unknown-no-value": None}
    assert len(msg.body) == 150
    assert isinstance(msg.request_uri, SipUri)
    assert msg.request_uri.params == {"unknownparam": None}


def test_intmeth_wide_range_of_valid_characters():
    msg = parse_and_validate(load("intmeth.dat"))
    assert isinstance(msg, SipRequest)
    assert msg.method == "!interesting-Method0123456789_*+`.%indeed'~"
    uri = msg.request_uri
    assert isinstance(uri, SipUri)
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert uri.host == "example.com"
    assert msg.to.display_name == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert msg.from_.display_name == "token1~` token2'+_ token3*%!.-"
    assert msg.from_.tag == "_token~1'+`*%!-."
    param = msg.from_.params["fromparam''~+*_!.-%"]
    assert param is not None
    assert unquote(param) == "\u0440\u0430\u0431\u043e\u0442\u0430\u044e\u0449\u0438\u0439"
    assert msg.branch == "z9hG4bK-.!%66*_+`'~"
    assert msg.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert msg.headers.get("extensionHeader-!.%*+_`'~") == "\ufeff\u5927\u505c\u96fb"


def test_esc01_escapes_are_undone():
    msg = parse_and_validate(load("esc01.dat"))
    assert isinstance(msg, SipRequest)
    assert isinstance(msg.request_uri, SipUri)
    assert msg.request_uri.user == "sips:user@example.com"
    assert isinstance(msg.to.uri, SipUri)
    assert msg.to.uri.user == "user"
    assert isinstance(msg.from_.uri, SipUri)
    assert msg.from_.uri.user == "I have spaces"
    (contact,) = msg.contacts
    assert isinstance(contact.uri, SipUri)
    assert contact.uri.user == "caller"
    assert contact.uri.params == {"lr": None, "name": "value%41"}
    assert msg.content_type == "application/sdp"


def test_escnull_escaped_nulls_survive():
    msg = parse_and_validate(load("escnull.dat"))
    assert isinstance(msg.to.uri, SipUri)
    assert msg.to.uri.user == "null-\x00-null"
    assert [c.uri.user for c in msg.contacts if isinstance(c.uri, SipUri)] == ["\x00", "\x00\x00"]
    assert "sip:%00%00@host5.example.com" in msg.encode().decode()


def test_esc02_percent_that_is_not_an_escape():
    msg = parse_and_validate(load("esc02.dat"))
    assert isinstance(msg, SipRequest)
    assert msg.method == "RE%47IST%45R"  # not REGISTER
    assert msg.to.display_name == "%Z%45"
    assert msg.branch == "z9hG4bK209%fzsnel234"
    # C%6Fntact is an unknown header, not a Contact.
    assert len(msg.contacts) == 2
    assert msg.headers.get("C%6Fntact") == "<sip:alias2@host2.example.com>"


def test_lwsdisp_display_name_without_space():
    msg = parse_and_validate(load("lwsdisp.dat"))
    assert msg.from_.display_name == "caller"
    assert msg.from_.tag == "323"


def test_longreq_long_values():
    msg = parse_and_validate(load("longreq.dat"))
    assert len(msg.vias) == 34
    assert msg.vias[0].host == "sip33.example.com"
    assert msg.vias[-1].host == "host.example.com"
    assert msg.to.display_name is not None and "extremeextreme" in msg.to.display_name
    assert len(msg.call_id) > 100


def test_dblreq_extra_octets_in_datagram_are_ignored():
    data = load("dblreq.dat")
    msg = parse_and_validate(data)
    assert isinstance(msg, SipRequest)
    assert msg.method == "REGISTER"
    assert msg.body == b""
    assert msg.raw is not None and data.startswith(msg.raw)
    assert msg.raw.endswith(b"Content-Length: 0\r\n\r\n")


def test_semiuri_semicolon_in_user_part():
    msg = parse_and_validate(load("semiuri.dat"))
    assert isinstance(msg, SipRequest)
    uri = msg.request_uri
    assert isinstance(uri, SipUri)
    assert uri.user == "user;par=u@example.net"
    assert uri.host == "example.com"
    assert uri.params == {}
    assert msg.headers.values("Accept") == [
        "application/sdp",
        "application/pkcs7-mime",
        "multipart/mixed",
        "multipart/signed",
        "message/sip",
        "message/sipfrag",
    ]


def test_transports_unknown_transport_kept():
    msg = parse_and_validate(load("transports.dat"))
    assert [v.transport for v in msg.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]


def test_mpart01_multipart_body_kept_whole():
    data = load("mpart01.dat")
    msg = parse_and_validate(data)
    assert len(msg.body) == 553
    assert msg.body.startswith(b"--7a9cbec02ceef655\r\n")
    assert msg.content_type == "multipart/mixed;boundary=7a9cbec02ceef655"
    assert data.endswith(msg.body)


def test_unreason_utf8_reason_phrase():
    msg = parse_and_validate(load("unreason.dat"))
    assert isinstance(msg, SipResponse)
    assert msg.status == 200
    assert msg.reason.startswith("= 2**3 * 5**2 \u043d\u043e")


def test_noreason_empty_reason_phrase():
    msg = parse_and_validate(load("noreason.dat"))
    assert isinstance(msg, SipResponse)
    assert (msg.status, msg.reason) == (100, "")


# --- §3.1.2, §3.3: the reasons name the fault -------------------------------------------


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("badinv01.dat", "Empty"),
        ("clerr.dat", "Content-Length"),
        ("ncl.dat", "Content-Length"),
        ("scalar02.dat", "CSeq"),
        ("quotbal.dat", "quoted"),
        ("ltgtruri.dat", "enclosed in <>"),
        ("lwsruri.dat", "Whitespace inside the Request-URI"),
        ("lwsstart.dat", "Extra whitespace"),
        ("trws.dat", "Extra whitespace"),
        ("escruri.dat", "Headers in the Request-URI"),
        ("baddate.dat", "Date"),
        ("regbadct.dat", "<>"),
        ("badaspec.dat", "Whitespace"),
        ("baddn.dat", "display name"),
        ("badvers.dat", "Version"),
        ("mismatch01.dat", "CSeq method"),
        ("mismatch02.dat", "CSeq method"),
        ("insuf.dat", "Missing"),
        ("unkscm.dat", "Scheme"),
        ("multi01.dat", "Multiple"),
        ("mcl01.dat", "Multiple Content-Length"),
    ],
)
def test_reason_names_the_fault(name, words):
    with pytest.raises(SipParseError) as info:
        parse_and_validate(load(name))
    assert words in info.value.reason


def test_bext01_420_lists_unsupported_extensions():
    msg = parse_message_untrusted(load("bext01.dat"))
    assert isinstance(msg, SipRequest)
    with pytest.raises(SipParseError) as info:
        validate_request_untrusted(msg)
    assert info.value.status == 420
    assert info.value.headers == (
        ("Unsupported", "nothingSupportsThis, nothingSupportsThisEither"),
    )
    reply = error_response(info.value)
    assert reply is not None
    assert reply.headers.get("Unsupported") == "nothingSupportsThis, nothingSupportsThisEither"
    # A proxy looks at Proxy-Require instead (RFC 3261 §16.3 step 5).
    with pytest.raises(SipParseError) as info:
        validate_request_untrusted(msg, proxy=True)
    assert info.value.headers == (
        ("Unsupported", "noProxiesSupportThis, norDoAnyProxiesSupportThis"),
    )
    validate_request_untrusted(
        msg, supported_extensions=["NOTHINGSUPPORTSTHIS", "nothingsupportsthiseither"]
    )


def test_unknown_schemes_in_request_uri_accepted_when_supported():
    for name in ("unkscm.dat", "novelsc.dat"):
        msg = parse_message_untrusted(load(name))
        assert isinstance(msg, SipRequest)
        scheme = msg.uri.partition(":")[0].lower()
        validate_request_untrusted(msg, supported_schemes=("sip", scheme))
        assert isinstance(msg.request_uri, AbsoluteUri)


def test_unksm2_unknown_schemes_in_headers():
    msg = parse_and_validate(load("unksm2.dat"))
    assert str(msg.to.uri) == "isbn:2983792873"
    assert str(msg.from_.uri) == "http://www.example.com"
    assert [str(c.uri) for c in msg.contacts] == ["name:John_Smith"]


def test_policy_level_messages_keep_what_the_policy_needs():
    assert parse_and_validate(load("invut.dat")).content_type == "application/unknownformat"
    regaut = parse_and_validate(load("regaut01.dat"))
    assert regaut.headers.get("Authorization") == "NoOneKnowsThisScheme opaque-data=here"
    assert parse_and_validate(load("zeromf.dat")).max_forwards == 0
    assert parse_and_validate(load("sdp01.dat")).headers.get("Accept") == "text/nobodyKnowsThis"
    bcast = parse_and_validate(load("bcast.dat"))
    assert bcast.vias[1].host == "255.255.255.255"


def test_cparam01_addr_spec_parameter_belongs_to_the_contact():
    (contact,) = parse_and_validate(load("cparam01.dat")).contacts
    assert isinstance(contact.uri, SipUri)
    assert contact.uri.params == {}
    assert contact.params == {"unknownparam": None}


def test_cparam02_name_addr_parameter_belongs_to_the_uri():
    (contact,) = parse_and_validate(load("cparam02.dat")).contacts
    assert isinstance(contact.uri, SipUri)
    assert contact.uri.params == {"unknownparam": None}
    assert contact.params == {}


def test_regescrt_escaped_header_in_contact_uri():
    (contact,) = parse_and_validate(load("regescrt.dat")).contacts
    assert isinstance(contact.uri, SipUri)
    assert contact.uri.headers == (("Route", "<sip:sip.example.com>"),)
    assert str(contact.uri) == "sip:user@example.com?Route=%3Csip:sip.example.com%3E"


def test_badbranch_and_inv2543_rfc2543_style_requests():
    msg = parse_and_validate(load("badbranch.dat"))
    assert msg.branch == "z9hG4bK"
    old = parse_and_validate(load("inv2543.dat"))
    assert old.branch is None
    assert old.from_tag is None
    assert old.max_forwards is None
    assert old.content_length is None
    assert old.body.startswith(b"v=0")
    assert old.record_routes[0].uri.params["maddr"] == "ss1.example.com"  # type: ignore[union-attr]


def test_dblreq_on_a_stream_frames_both_requests_then_finds_the_garbage():
    # RFC 4475 §3.1.1.8 is about datagrams; on a stream the same bytes are two requests, a
    # stray CRLF, and (the INVITE's body is 5 octets longer than its Content-Length) junk.
    framer = SipStreamFramer()
    framer.receive_data(load("dblreq.dat"))
    first = framer.next_message()
    assert isinstance(first, bytes) and first.startswith(b"REGISTER ")
    assert isinstance(framer.next_message(), KeepAlivePong)
    second = framer.next_message()
    assert isinstance(second, bytes) and second.startswith(b"INVITE ")
    invite = parse_and_validate(second)
    assert len(invite.body) == 150
    with pytest.raises(SipParseError) as info:
        framer.next_message()
    assert info.value.request is None
