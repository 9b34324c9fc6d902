"""SIP messages: parsing datagrams, headers, accessors, encoding, validation, responses."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.sip.errors import SipParseError
from shared.sip.headers import Address, CSeq
from shared.sip.message import (
    REASON_PHRASES,
    Headers,
    SipLimits,
    SipRequest,
    SipResponse,
    content_length_of_head,
    error_response,
    generate_branch,
    generate_tag,
    make_response,
    parse_message_untrusted,
    validate_request_untrusted,
    validate_response_untrusted,
)
from shared.sip.uri import SipUri

REGISTER = (
    b"REGISTER sip:registrar.biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP bobspc.biloxi.example.com:5060;branch=z9hG4bKnashds7;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>\r\n"
    b"From: Bob <sip:bob@biloxi.example.com>;tag=456248\r\n"
    b"Call-ID: 843817637684230@998sdasdh09\r\n"
    b"CSeq: 1826 REGISTER\r\n"
    b"Contact: <sip:bob@192.0.2.4>;expires=7200\r\n"
    b"Expires: 3600\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

INVITE_BODY = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\n"
INVITE = (
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"v: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds\r\n"
    b"Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bK1,SIP/2.0/TCP edge.example.com\r\n"
    b"Max-Forwards: 70\r\n"
    b"t: Bob <sip:bob@biloxi.example.com>\r\n"
    b'f: "Alice" <sip:alice@atlanta.example.com>;tag=1928301774\r\n'
    b"i: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"m: <sip:alice@pc33.atlanta.example.com>\r\n"
    b"Record-Route: <sip:p2.example.com;lr>, <sip:p1.example.com;lr>\r\n"
    b"Route: <sip:p3.example.com;lr>\r\n"
    b"Require: 100rel\r\n"
    b"Timestamp: 54\r\n"
    b"c: application/sdp\r\n"
    b"l: " + str(len(INVITE_BODY)).encode() + b"\r\n"
    b"\r\n" + INVITE_BODY
)

OK = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP bobspc.biloxi.example.com:5060;branch=z9hG4bKnashds7;received=192.0.2.4\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>;tag=2493k59kd\r\n"
    b"From: Bob <sip:bob@biloxi.example.com>;tag=456248\r\n"
    b"Call-ID: 843817637684230@998sdasdh09\r\n"
    b"CSeq: 1826 REGISTER\r\n"
    b"Contact: <sip:bob@192.0.2.4>;expires=7200\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def request(data: bytes) -> SipRequest:
    msg = parse_message_untrusted(data)
    assert isinstance(msg, SipRequest)
    return msg


def response(data: bytes) -> SipResponse:
    msg = parse_message_untrusted(data)
    assert isinstance(msg, SipResponse)
    return msg


def parse_error(data: bytes, limits: SipLimits | None = None) -> SipParseError:
    with pytest.raises(SipParseError) as info:
        if limits is None:
            parse_message_untrusted(data)
        else:
            parse_message_untrusted(data, limits)
    return info.value


def validate_error(msg: SipRequest, **kwargs: object) -> SipParseError:
    with pytest.raises(SipParseError) as info:
        validate_request_untrusted(msg, **kwargs)  # type: ignore[arg-type]
    assert info.value.request is msg
    return info.value


# --- parsing ------------------------------------------------------------------------------


def test_register_accessors():
    msg = request(REGISTER)
    validate_request_untrusted(msg)
    assert msg.method == "REGISTER"
    assert msg.uri == "sip:registrar.biloxi.example.com"
    assert msg.request_uri == SipUri(host="registrar.biloxi.example.com")
    assert msg.version == "SIP/2.0"
    assert msg.call_id == "843817637684230@998sdasdh09"
    assert msg.cseq == CSeq(1826, "REGISTER")
    assert msg.cseq.seq == 1826
    assert msg.branch == "z9hG4bKnashds7"
    assert msg.top_via.has_rport
    assert msg.from_tag == "456248"
    assert msg.to_tag is None
    assert msg.to.display_name == "Bob"
    assert [str(c.uri) for c in msg.contacts] == ["sip:bob@192.0.2.4"]
    assert msg.contacts[0].expires == 7200
    assert not msg.contact_is_star
    assert msg.expires == 3600
    assert msg.max_forwards == 70
    assert msg.content_length == 0
    assert msg.content_type is None
    assert msg.body == b""
    assert msg.routes == []
    assert msg.record_routes == []


def test_invite_compact_forms_and_lists():
    msg = request(INVITE)
    validate_request_untrusted(msg, supported_extensions=["100rel"])
    assert [name for name, _ in msg.headers][:5] == ["Via", "Via", "Max-Forwards", "To", "From"]
    assert [v.host for v in msg.vias] == [
        "pc33.atlanta.example.com",
        "proxy.example.com",
        "edge.example.com",
    ]
    assert msg.from_.display_name == "Alice"
    assert msg.call_id == "a84b4c76e66710@pc33.atlanta.example.com"
    assert msg.content_type == "application/sdp"
    assert msg.body == INVITE_BODY
    assert [str(r.uri) for r in msg.record_routes] == [
        "sip:p2.example.com;lr",
        "sip:p1.example.com;lr",
    ]
    assert msg.routes[0].uri.lr  # type: ignore[union-attr]
    assert msg.option_tags("Require") == ["100rel"]
    assert msg.headers.get("CALL-ID") == msg.headers.get("i") == msg.call_id


def test_response_accessors():
    msg = response(OK)
    validate_response_untrusted(msg)
    assert (msg.version, msg.status, msg.reason) == ("SIP/2.0", 200, "OK")
    assert msg.to_tag == "2493k59kd"
    assert msg.top_via.received == "192.0.2.4"
    assert msg.cseq.method == "REGISTER"


def test_folded_header_lines_are_unfolded():
    data = REGISTER.replace(b"Expires: 3600\r\n", b"Subject: I know\r\n  you're\r\n\tthere\r\n")
    msg = request(data)
    assert msg.headers.get("Subject") == "I know you're there"


def test_whitespace_before_colon_and_empty_values():
    data = REGISTER.replace(b"Expires: 3600\r\n", b"Subject   :\r\nX-Empty:\r\n")
    msg = request(data)
    assert msg.headers.get("subject") == ""
    assert msg.headers.get("x-empty") == ""


def test_leading_crlfs_are_ignored():
    msg = request(b"\r\n\r\n" + REGISTER)
    assert msg.method == "REGISTER"
    assert msg.raw == REGISTER


def test_missing_content_length_in_a_datagram_means_the_rest():
    data = INVITE.replace(b"l: " + str(len(INVITE_BODY)).encode() + b"\r\n", b"")
    msg = request(data)
    assert msg.body == INVITE_BODY
    assert msg.content_length is None
    assert msg.raw is None  # re-sent with a Content-Length
    assert b"\r\nContent-Length: %d\r\n" % len(INVITE_BODY) in msg.encode()


def test_extra_octets_after_content_length_are_discarded():
    msg = request(INVITE + b"garbage")
    assert msg.body == INVITE_BODY
    assert msg.raw == INVITE


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "No empty line"),
        (b"\r\n\r\n", "No empty line"),
        (REGISTER[:-2], "No empty line"),
        (REGISTER.replace(b"\r\nMax", b"\nMax"), "Bare CR or LF"),
        (REGISTER.replace(b"\r\nMax", b"\rMax"), "Bare CR or LF"),
        (REGISTER.replace(b"Bob <", b"B\xffb <"), "not UTF-8"),
        (REGISTER.replace(b"Max-Forwards: 70", b"Max-Forwards 70"), "without a colon"),
        (REGISTER.replace(b"Max-Forwards:", b"Max Forwards:"), "Bad header name"),
        (REGISTER.replace(b"Max-Forwards:", b":"), "Bad header name"),
        (REGISTER.replace(b"REGISTER sip:", b" \r\n\tREGISTER sip:", 1), "Continuation line"),
        (b"REGISTER\r\n\r\n", "Malformed request line"),
        (b"SIP/2.0 2000 OK\r\n\r\n", "Bad status code"),
        (b"SIP/2.0 099 Low\r\n\r\n", "Bad status code"),
        (b"SIP/2.0 700 High\r\n\r\n", "Bad status code"),
        (b"SIP/2.0 2x0 OK\r\n\r\n", "Bad status code"),
    ],
)
def test_unparseable_datagrams(data, reason):
    exc = parse_error(data)
    assert exc.status == 400
    assert reason in exc.reason
    assert exc.request is None


def test_continuation_before_first_header():
    exc = parse_error(b"OPTIONS sip:a@b SIP/2.0\r\n folded\r\n\r\n")
    assert "Continuation" in exc.reason


@pytest.mark.parametrize(
    ("replacement", "reason"),
    [
        (b"Content-Length: 1", "larger than the message"),
        (b"Content-Length: -1", "Bad Content-Length"),
        (b"Content-Length: 1.0", "Bad Content-Length"),
        (b"Content-Length: ", "Bad Content-Length"),
        (b"Content-Length: 0\r\nl: 0", "Multiple Content-Length"),
    ],
)
def test_content_length_errors_carry_the_request(replacement, reason):
    exc = parse_error(REGISTER.replace(b"Content-Length: 0", replacement))
    assert exc.status == 400
    assert reason in exc.reason
    assert exc.request is not None
    assert exc.request.call_id == "843817637684230@998sdasdh09"
    reply = error_response(exc)
    assert reply is not None and reply.status == 400


def test_response_content_length_errors_are_dropped():
    exc = parse_error(OK.replace(b"Content-Length: 0", b"Content-Length: 5"))
    assert exc.request is None


# --- limits -------------------------------------------------------------------------------


def test_message_size_limit_is_513():
    exc = parse_error(REGISTER, SipLimits(max_message_size=100))
    assert (exc.status, exc.reason) == (513, "Message Too Large")


def test_body_size_limit_is_413():
    exc = parse_error(INVITE, SipLimits(max_body_size=10))
    assert exc.status == 413
    assert exc.request is not None


def test_header_count_limit():
    exc = parse_error(REGISTER, SipLimits(max_header_count=5))
    assert (exc.status, exc.reason) == (400, "Too many header fields")
    request(REGISTER.replace(b"Expires: 3600\r\n", b""))  # default limits are roomy


def test_line_length_limits():
    long_subject = b"Subject: " + b"x" * 200 + b"\r\n"
    exc = parse_error(
        REGISTER.replace(b"Expires: 3600\r\n", long_subject), SipLimits(max_line_length=100)
    )
    assert "Header line too long" in exc.reason
    long_uri = b"REGISTER sip:" + b"a" * 200 + b"@x SIP/2.0"
    exc = parse_error(
        REGISTER.replace(b"REGISTER sip:registrar.biloxi.example.com SIP/2.0", long_uri),
        SipLimits(max_line_length=100),
    )
    assert "Start line too long" in exc.reason


def test_request_uri_length_limit_is_414():
    msg = request(REGISTER)
    exc = validate_error(msg, limits=SipLimits(max_uri_length=10))
    assert exc.status == 414


# --- encoding -----------------------------------------------------------------------------


def test_unchanged_message_encodes_to_its_bytes():
    msg = request(INVITE)
    assert msg.raw == INVITE
    assert msg.encode() is INVITE
    # Reading accessors does not change anything.
    _ = msg.vias, msg.contacts, msg.request_uri
    assert msg.encode() is INVITE


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.headers.add("X-New", "1"),
        lambda m: m.headers.remove("Timestamp"),
        lambda m: m.headers.add_first("Via", "SIP/2.0/UDP me.example.com;branch=z9hG4bKme"),
        lambda m: m.headers.set("Max-Forwards", "69"),
        lambda m: m.headers.remove_first("Route"),
        lambda m: setattr(m, "body", b"v=1\r\n"),
        lambda m: setattr(m, "uri", "sip:carol@example.com"),
        lambda m: setattr(m, "method", "OPTIONS"),
        lambda m: setattr(m, "headers", m.headers.copy()),
    ],
)
def test_changed_message_is_reserialized(change):
    msg = request(INVITE)
    change(msg)
    assert msg.raw is None
    data = msg.encode()
    assert data != INVITE
    again = request(data)
    assert (again.method, again.uri, again.version, again.body) == (
        msg.method,
        msg.uri,
        msg.version,
        msg.body,
    )
    assert [h for h in again.headers if h[0] != "Content-Length"] == [
        h for h in msg.headers if h[0] != "Content-Length"
    ]
    assert again.content_length == len(msg.body)
    assert msg.encode() is data  # cached until the next change


def test_encode_writes_one_correct_content_length():
    msg = SipRequest(
        "OPTIONS", "sip:a@example.com", Headers([("Content-Length", "99"), ("l", "7")])
    )
    msg.body = b"hello"
    data = msg.encode()
    assert data == b"OPTIONS sip:a@example.com SIP/2.0\r\nContent-Length: 5\r\n\r\nhello"


def test_encode_adds_content_length_when_missing():
    data = SipResponse(180, "Ringing", Headers([("Call-ID", "x")])).encode()
    assert data == b"SIP/2.0 180 Ringing\r\nCall-ID: x\r\nContent-Length: 0\r\n\r\n"


def test_encode_utf8():
    msg = SipResponse(200, "D\u00e9j\u00e0 vu", Headers([("Subject", "caf\u00e9")]))
    data = msg.encode()
    assert "caf\u00e9".encode() in data
    assert response(data) == SipResponse(
        200, "D\u00e9j\u00e0 vu", Headers([("Subject", "caf\u00e9"), ("Content-Length", "0")])
    )


# --- headers ------------------------------------------------------------------------------


def test_headers_container():
    h = Headers([("v", "SIP/2.0/UDP a"), ("To", "<sip:b@c>"), ("Via", "SIP/2.0/UDP b")])
    assert list(h) == [("Via", "SIP/2.0/UDP a"), ("To", "<sip:b@c>"), ("Via", "SIP/2.0/UDP b")]
    assert len(h) == 3
    assert "VIA" in h and "t" in h and "From" not in h and 5 not in h
    assert h.get("via") == "SIP/2.0/UDP a"
    assert h.get("From") is None
    assert h.get_all("V") == ["SIP/2.0/UDP a", "SIP/2.0/UDP b"]
    h.add_first("Via", "SIP/2.0/UDP top")
    assert h.get_all("Via") == ["SIP/2.0/UDP top", "SIP/2.0/UDP a", "SIP/2.0/UDP b"]
    h.add_first("Record-Route", "<sip:p;lr>")
    assert next(iter(h)) == ("Record-Route", "<sip:p;lr>")
    assert h.remove_first("via") == "SIP/2.0/UDP top"
    assert h.remove_first("Route") is None
    h.set("Via", "SIP/2.0/UDP only")
    assert h.get_all("Via") == ["SIP/2.0/UDP only"]
    assert [n for n, _ in h] == ["Record-Route", "Via", "To"]
    h.set("From", "<sip:x@y>")
    assert [n for n, _ in h][-1] == "From"
    assert h.remove("via") == 1
    assert h.remove("via") == 0
    copy = h.copy()
    assert copy == h
    copy.add("X", "1")
    assert copy != h
    assert h != "not headers"


def test_headers_values_split_lists():
    h = Headers(
        [("Allow", "INVITE, ACK ,BYE"), ("Allow", "OPTIONS,"), ("Contact", '"a,b" <sip:x>')]
    )
    assert h.values("Allow") == ["INVITE", "ACK", "BYE", "OPTIONS"]
    assert h.values("m") == ['"a,b" <sip:x>']


def test_headers_refuse_injection():
    h = Headers()
    with pytest.raises(ValueError, match="CR/LF"):
        h.add("Subject", "x\r\nVia: evil")
    with pytest.raises(ValueError, match="header name"):
        h.add("Bad Name", "x")
    with pytest.raises(ValueError, match="CR/LF"):
        h.set("Subject", "x\n")
    with pytest.raises(ValueError, match="CR/LF"):
        h.add_first("Via", "x\r")


def test_accessor_cache_follows_header_changes():
    msg = request(REGISTER)
    assert msg.expires == 3600
    generation = msg.headers.generation
    msg.headers.set("Expires", "60")
    assert msg.headers.generation > generation
    assert msg.expires == 60
    msg.headers.remove("Contact")
    assert msg.contacts == []
    msg.headers.set("Contact", "*")
    assert msg.contact_is_star
    assert msg.contacts == []


def test_a_header_change_drops_only_that_headers_parsed_views():
    msg = request(REGISTER)
    from_, to, contacts, top = msg.from_, msg.to, msg.contacts, msg.top_via
    require = msg.option_tags("Require")
    msg.headers.replace_first("Via", "SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bKnew")
    # The Via views are parsed again from the new text...
    assert msg.top_via is not top and msg.top_via.host == "192.0.2.7"
    assert [v.branch for v in msg.vias] == ["z9hG4bKnew"]
    # ...the others are the very objects parsed before (not parsed again).
    assert msg.from_ is from_ and msg.to is to
    assert msg.contacts == contacts and msg.option_tags("Require") == require
    # Compact and long names are the same header: changing `m` drops the Contact views.
    msg.headers.set("m", "*")
    assert msg.contact_is_star and msg.contacts == []
    msg.headers.add("Require", "100rel")
    assert msg.option_tags("Require") == [*require, "100rel"]
    msg.headers.remove("From")
    with pytest.raises(SipParseError, match="Missing From"):
        _ = msg.from_
    assert msg.to is to


def test_missing_and_repeated_mandatory_headers():
    msg = request(REGISTER)
    msg.headers.remove("Call-ID")
    with pytest.raises(SipParseError, match="Missing Call-ID"):
        _ = msg.call_id
    msg.headers.remove("Via")
    with pytest.raises(SipParseError, match="Missing Via"):
        _ = msg.vias
    msg.headers.add("To", "<sip:other@x>")
    with pytest.raises(SipParseError, match="Multiple To"):
        _ = msg.to


def test_malformed_call_id():
    msg = request(REGISTER.replace(b"Call-ID: 843817637684230@998sdasdh09", b"Call-ID: a b"))
    assert validate_error(msg).reason == "Malformed Call-ID"


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "status"),
    [
        ("SIP/3.0", 505),
        ("SIP/2.1", 505),
        ("sip/2.0", None),
        ("HTTP/1.1", 400),
        ("SIP/2", 400),
        ("SIP/x.0", 400),
    ],
)
def test_versions(version, status):
    msg = request(REGISTER.replace(b"SIP/2.0\r\n", version.encode() + b"\r\n", 1))
    if status is None:
        validate_request_untrusted(msg)
    else:
        assert validate_error(msg).status == status


def test_bad_method_token():
    msg = request(REGISTER.replace(b"REGISTER sip:", b"REG,ISTER sip:", 1))
    assert validate_error(msg).reason == "Malformed method"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"REGISTER <sip:a@b> SIP/2.0", "Request-URI enclosed in <>"),
        (b"REGISTER sip:a@b;x=<y> SIP/2.0", "Request-URI enclosed in <>"),
        (b"REGISTER sip:a@b\tx SIP/2.0", "Whitespace inside the Request-URI"),
        (b"REGISTER sip:a@b; lr SIP/2.0", "Whitespace inside the Request-URI"),
        (b"REGISTER  sip:a@b SIP/2.0", "Extra whitespace in the request line"),
        (b"REGISTER sip:a@b  SIP/2.0", "Extra whitespace in the request line"),
        (b"REGISTER sip:a@b SIP/2.0 ", "Extra whitespace in the request line"),
        (b"REGISTER  SIP/2.0", "Empty Request-URI"),
    ],
)
def test_malformed_request_line(line, reason):
    data = REGISTER.replace(b"REGISTER sip:registrar.biloxi.example.com SIP/2.0", line, 1)
    assert validate_error(request(data)).reason.startswith(reason)


def test_request_uri_scheme_support():
    msg = request(REGISTER.replace(b"sip:registrar.biloxi.example.com", b"tel:+15551234", 1))
    validate_request_untrusted(msg)
    assert validate_error(msg, supported_schemes=("sip", "sips")).status == 416
    bad = request(REGISTER.replace(b"sip:registrar.biloxi.example.com", b"sip:a@b:x", 1))
    assert validate_error(bad).status == 400


def test_star_contact_rules():
    star = REGISTER.replace(b"Contact: <sip:bob@192.0.2.4>;expires=7200", b"Contact: *")
    msg = request(star)
    validate_request_untrusted(msg)
    assert msg.contact_is_star
    assert msg.contacts == []
    both = request(star.replace(b"Contact: *", b"Contact: *\r\nContact: <sip:a@b>"))
    assert "alone" in validate_error(both).reason
    invite = request(INVITE.replace(b"m: <sip:alice@pc33.atlanta.example.com>", b"m: *"))
    assert "outside REGISTER" in validate_error(invite, supported_extensions=["100rel"]).reason


def test_require_is_not_checked_for_ack_and_cancel():
    for method in (b"ACK", b"CANCEL"):
        data = INVITE.replace(b"INVITE", method)
        validate_request_untrusted(request(data))
    assert validate_error(request(INVITE)).status == 420


def test_bad_header_values_fail_validation():
    for old, new in [
        (b"Max-Forwards: 70", b"Max-Forwards: 256"),
        (b"Expires: 3600", b"Expires: soon"),
        (b";expires=7200", b";expires=-1"),
        (b"CSeq: 1826 REGISTER", b"CSeq: 1826"),
        (b"Contact: <sip:bob@192.0.2.4>", b"Contact: <sip:bob@192.0.2.4>;q=7"),
        (b"Expires: 3600", b"Route: <sip:a@b>,,"),
        (b"Expires: 3600", b"Record-Route: sip:a@b?x=y"),
        (b"Expires: 3600", b"Date: Sat, 13 Nov 2010 23:29:00 PST"),
        (b"Expires: 3600", b"Content-Type: a\r\nContent-Type: b"),
    ]:
        assert old in REGISTER
        exc = validate_error(request(REGISTER.replace(old, new)))
        assert exc.status == 400, new


def test_gmt_date_is_fine():
    data = REGISTER.replace(b"Expires: 3600", b"Date: Sat, 13 Nov 2010 23:29:00 GMT")
    validate_request_untrusted(request(data))


def test_response_validation_drops():
    for old, new in [
        (b"SIP/2.0 200", b"SIP/3.0 200"),
        (b"CSeq: 1826 REGISTER", b"CSeq: x REGISTER"),
        (b"To: Bob", b"To: Bob, Jr."),
    ]:
        msg = response(OK.replace(old, new))
        with pytest.raises(SipParseError) as info:
            validate_response_untrusted(msg)
        assert info.value.request is None
    no_via = response(b"SIP/2.0 200 OK\r\n" + OK.split(b"\r\n", 2)[2])
    with pytest.raises(SipParseError, match="Missing Via"):
        validate_response_untrusted(no_via)


# --- responses ----------------------------------------------------------------------------


def test_make_response_copies_what_rfc3261_says():
    req = request(INVITE)
    resp = make_response(req, 180, to_tag="abc")
    assert (resp.status, resp.reason) == (180, "Ringing")
    assert [n for n, _ in resp.headers] == ["Via", "Via", "From", "To", "Call-ID", "CSeq"]
    assert resp.headers.get_all("Via") == req.headers.get_all("Via")
    assert resp.to_tag == "abc"
    assert resp.from_tag == req.from_tag
    assert resp.call_id == req.call_id
    assert resp.cseq == req.cseq
    assert resp.body == b""
    validate_response_untrusted(response(resp.encode()))


def test_make_response_100_has_no_tag_but_timestamp():
    resp = make_response(request(INVITE), 100, to_tag="abc")
    assert resp.to_tag is None
    assert resp.headers.get("Timestamp") == "54"
    assert make_response(request(INVITE), 200, to_tag="x").headers.get("Timestamp") is None


def test_make_response_keeps_an_existing_to_tag():
    req = request(
        INVITE.replace(b"t: Bob <sip:bob@biloxi.example.com>", b"t: <sip:bob@b.com>;tag=old")
    )
    assert make_response(req, 200, to_tag="new").to_tag == "old"


def test_make_response_extras():
    req = request(REGISTER)
    resp = make_response(
        req, 200, headers=[("Contact", "<sip:bob@192.0.2.4>;expires=3600")], body=b"x"
    )
    assert resp.reason == "OK"
    assert resp.contacts[0].expires == 3600
    assert response(resp.encode()).body == b"x"
    assert make_response(req, 299).reason == "Unknown"
    assert make_response(req, 404, "Nobody Here").reason == "Nobody Here"
    assert REASON_PHRASES[481] == "Call/Transaction Does Not Exist"


def test_make_response_to_a_broken_request():
    req = request(
        b'OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\nTo: "open\r\n\r\n'
    )
    resp = make_response(req, 400, "Bad To", to_tag="t")
    assert resp.headers.get("To") == '"open'
    assert resp.headers.get("From") is None
    assert resp.headers.get_all("Via") == ["SIP/2.0/UDP h;branch=z9hG4bKx"]


def test_error_response_for_unanswerable_errors():
    assert error_response(SipParseError(400, "x")) is None


def test_generated_tags_and_branches():
    tags = {generate_tag() for _ in range(100)}
    assert len(tags) == 100
    branches = {generate_branch() for _ in range(100)}
    assert len(branches) == 100
    assert all(b.startswith("z9hG4bK") and len(b) > 20 for b in branches)


def test_content_length_of_head():
    head = REGISTER.split(b"\r\n\r\n")[0]
    assert content_length_of_head(head) == 0
    assert content_length_of_head(b"OPTIONS sip:a SIP/2.0\r\nl :\r\n  12") == 12
    assert content_length_of_head(b"OPTIONS sip:a SIP/2.0\r\nLocation: x") is None
    with pytest.raises(SipParseError):
        content_length_of_head(b"X\r\nl: 1\r\nContent-Length: 1")
    with pytest.raises(SipParseError):
        content_length_of_head(b"X\r\nl: one")


# --- properties ---------------------------------------------------------------------------

TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~",
    min_size=1,
    max_size=12,
)
VALUE = (
    st.text(max_size=30)
    .filter(lambda s: "\r" not in s and "\n" not in s)
    .map(lambda s: s.strip(" \t"))
)
EXTENSION = st.tuples(TOKEN.map(lambda t: "X-" + t), VALUE)


@st.composite
def requests(draw: st.DrawFn) -> SipRequest:
    method = draw(TOKEN)
    headers = Headers()
    for _ in range(draw(st.integers(1, 3))):
        transport = draw(st.sampled_from(["UDP", "TCP", "TLS"]))
        host = f"h{draw(st.integers(0, 99))}.example.com"
        headers.add("Via", f"SIP/2.0/{transport} {host};branch=z9hG4bK{draw(TOKEN)}")
    headers.add("From", f"<{SipUri('example.com', draw(TOKEN))}>;tag={draw(TOKEN)}")
    headers.add("To", f'"{draw(TOKEN)}" <sip:u@example.com>')
    headers.add("Call-ID", draw(TOKEN))
    headers.add("CSeq", f"{draw(st.integers(0, 2**31 - 1))} {method}")
    headers.add("Max-Forwards", str(draw(st.integers(0, 255))))
    for name, value in draw(st.lists(EXTENSION, max_size=5)):
        headers.add(name, value)
    body = draw(st.binary(max_size=64))
    return SipRequest(method, str(SipUri("example.com", draw(TOKEN))), headers, body)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_request_round_trip(msg):
    data = msg.encode()
    again = request(data)
    validate_request_untrusted(again)
    assert again.method == msg.method and again.uri == msg.uri and again.body == msg.body
    assert [(n, v) for n, v in again.headers if n != "Content-Length"] == list(msg.headers)
    assert again.content_length == len(msg.body)
    assert again.encode() is data
    # A reply to anything valid is valid.
    reply = make_response(again, 486, to_tag=generate_tag())
    validate_response_untrusted(response(reply.encode()))
    assert reply.to_tag is not None


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(100, 699), VALUE, st.lists(EXTENSION, max_size=4), st.binary(max_size=40))
def test_response_round_trip(status, reason, extensions, body):
    msg = SipResponse(status, reason, Headers(extensions), body)
    again = response(msg.encode())
    assert (again.status, again.reason, again.body) == (status, reason, body)
    assert [(n, v) for n, v in again.headers if n != "Content-Length"] == extensions


def test_a_malformed_ack_is_never_answered():
    ack = request(
        INVITE.replace(b"INVITE", b"ACK").replace(b"Max-Forwards: 70", b"Max-Forwards: 300")
    )
    with pytest.raises(SipParseError) as info:
        validate_request_untrusted(ack)
    assert info.value.request is ack
    assert error_response(info.value) is None


def test_raw_cache_survives_many_generations():
    msg = request(REGISTER)
    for i in range(300):
        msg.headers.set("X-Count", str(i))
    data = msg.encode()
    assert msg.raw is data
    assert msg.encode() is data


def test_many_content_length_lines_fail_fast():
    head = b"OPTIONS sip:a SIP/2.0\r\n" + b"l: 0\r\n" * 5000
    with pytest.raises(SipParseError, match="Multiple Content-Length"):
        content_length_of_head(head)


COMPACT = {"Via": "v", "From": "f", "To": "t", "Call-ID": "i", "Contact": "m"}


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_spelling_does_not_change_meaning(msg, data):
    """Name case, compact forms, LWS around the colon and folded lines all parse the same."""
    lines = [msg.start_line]
    for name, value in msg.headers:
        spellings = [name, name.lower(), name.upper()]
        if name in COMPACT:
            spellings += [COMPACT[name], COMPACT[name].upper()]
        spelled = data.draw(st.sampled_from(spellings))
        colon = data.draw(st.sampled_from([":", " :", ":  ", "\t: ", ":\r\n "]))
        if " " in value and "  " not in value and data.draw(st.booleans()):
            value = value.replace(" ", "\r\n\t", 1)
        lines.append(f"{spelled}{colon}{value}")
    lines.append(f"l: {len(msg.body)}")
    again = request(("\r\n".join(lines) + "\r\n\r\n").encode() + msg.body)
    validate_request_untrusted(again)
    # Unknown names keep the sender's spelling; Headers compare names case-insensitively.
    assert Headers(h for h in again.headers if h[0] != "Content-Length") == msg.headers
    assert again.body == msg.body
    assert again.vias == msg.vias
    assert again.to == msg.to


HEADER_NAMES = st.sampled_from(["Via", "v", "Route", "X-A", "x-a", "Contact", "m"])
OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["add", "add_first", "set", "replace_first", "remove", "remove_first"]),
        HEADER_NAMES,
        st.text(alphabet="abc ,;", max_size=5),
    ),
    max_size=20,
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPERATIONS)
def test_headers_behave_like_a_list_of_pairs(operations):
    """Every Headers operation, checked against a plain list model."""
    headers = Headers()
    model: list[tuple[str, str]] = []

    def key(name: str) -> str:
        return {"v": "via", "m": "contact"}.get(name.lower(), name.lower())

    for op, name, value in operations:
        canonical = {"via": "Via", "contact": "Contact", "route": "Route"}.get(key(name), name)
        same = [i for i, (n, _) in enumerate(model) if key(n) == key(name)]
        if op == "add":
            headers.add(name, value)
            model.append((canonical, value))
        elif op == "add_first":
            headers.add_first(name, value)
            model.insert(same[0] if same else 0, (canonical, value))
        elif op == "set":
            headers.set(name, value)
            if same:
                model = [h for i, h in enumerate(model) if i not in same[1:]]
                model[same[0]] = (canonical, value)
            else:
                model.append((canonical, value))
        elif op == "replace_first":
            headers.replace_first(name, value)
            if same:
                model[same[0]] = (canonical, value)
            else:
                model.insert(0, (canonical, value))
        elif op == "remove":
            assert headers.remove(name) == len(same)
            model = [h for i, h in enumerate(model) if i not in same]
        else:
            removed = headers.remove_first(name)
            if same:
                assert removed == model.pop(same[0])[1]
            else:
                assert removed is None
        assert [(key(n), v) for n, v in headers] == [(key(n), v) for n, v in model]
        assert headers.get_all(name) == [v for n, v in model if key(n) == key(name)]
        assert (name in headers) == any(key(n) == key(name) for n, _ in model)


def test_top_via_is_parsed_alone():
    msg = request(INVITE.replace(b"SIP/2.0/TCP edge.example.com", b"SIP/2.0/TCP bad host"))
    assert msg.top_via.host == "pc33.atlanta.example.com"
    assert msg.branch == "z9hG4bK776asdhds"
    with pytest.raises(SipParseError):
        _ = msg.vias
    with pytest.raises(SipParseError, match="Empty Via element"):
        _ = request(REGISTER.replace(b"Via: SIP", b"Via: ,SIP")).top_via


def test_replace_first_stamps_the_top_via_in_place():
    msg = request(INVITE)
    stamped = msg.top_via.with_params(received="203.0.113.9")
    msg.headers.replace_first("Via", str(stamped))
    assert msg.top_via.received == "203.0.113.9"
    assert [v.host for v in msg.vias][1:] == ["proxy.example.com", "edge.example.com"]
    assert [n for n, _ in msg.headers][:3] == ["Via", "Via", "Max-Forwards"]
    assert msg.raw is None
    with pytest.raises(ValueError, match="CR/LF"):
        msg.headers.replace_first("Via", "x\r\n")


def test_copies_are_independent():
    original = request(INVITE)
    twin = original.copy()
    assert twin == original
    assert twin.encode() is INVITE
    twin.headers.add_first("Via", "SIP/2.0/UDP b2bua.example.com;branch=z9hG4bKb2b")
    assert len(twin.vias) == len(original.vias) + 1
    assert original.encode() is INVITE
    assert twin.encode() != INVITE
    reply = response(OK)
    reply_twin = reply.copy()
    assert reply_twin == reply and reply_twin.encode() is OK
    reply_twin.status = 202
    assert reply.status == 200
    assert response(reply_twin.encode()).status == 202
    built = SipRequest("OPTIONS", "sip:a@b")
    assert built.copy().raw is None


def test_accessor_lists_are_the_callers_to_change():
    msg = request(INVITE)
    msg.vias.pop()
    msg.contacts.clear()
    msg.record_routes.clear()
    msg.routes.clear()
    msg.option_tags("Require").clear()
    assert len(msg.vias) == 3
    assert len(msg.contacts) == 1
    assert len(msg.record_routes) == 2
    assert len(msg.routes) == 1
    assert msg.option_tags("Require") == ["100rel"]


DISPLAY = st.none() | st.text(max_size=12).filter(lambda s: "\r" not in s and "\n" not in s)


@st.composite
def addresses(draw: st.DrawFn, header: str) -> Address:
    uri = SipUri(
        host=draw(st.sampled_from(["example.com", "192.0.2.7", "[2001:db8::7]"])),
        user=draw(st.none() | st.text(min_size=1, max_size=8)),
        port=draw(st.none() | st.integers(1, 65535)),
        params=draw(st.sampled_from([{}, {"lr": None}, {"transport": "tcp"}, {"ob": None}])),
    )
    params: dict[str, str | None] = {}
    if header == "Contact":
        if draw(st.booleans()):
            params["expires"] = str(draw(st.integers(0, 2**32 - 1)))
        if draw(st.booleans()):
            params["q"] = draw(st.sampled_from(["0", "0.5", "1", "1.000", "0.001"]))
        if draw(st.booleans()):
            params["+sip.instance"] = '"<urn:uuid:00000000-0000-0000-0000-000000000000>"'
    return Address(uri, draw(DISPLAY), params)


@st.composite
def rich_requests(draw: st.DrawFn) -> tuple[SipRequest, Address, list[Address], list[Address]]:
    msg = draw(requests())
    sender = draw(addresses("From")).with_tag(draw(TOKEN))
    msg.headers.set("From", str(sender))
    contacts = draw(st.lists(addresses("Contact"), max_size=3))
    if contacts:
        # One header line with commas or one line each: the same list (RFC 3261 §7.3.1).
        if draw(st.booleans()):
            msg.headers.add("Contact", ", ".join(str(c) for c in contacts))
        else:
            for contact in contacts:
                msg.headers.add("Contact", str(contact))
    routes = draw(st.lists(addresses("Route"), max_size=2))
    for route in routes:
        msg.headers.add("Route", str(route))
    return msg, sender, contacts, routes


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rich_requests())
def test_addresses_survive_a_trip_through_a_message(case):
    msg, sender, contacts, routes = case
    again = request(msg.encode())
    validate_request_untrusted(again)
    assert again.from_ == sender
    assert again.from_tag == sender.tag
    assert again.contacts == contacts
    assert [c.expires for c in again.contacts] == [c.expires for c in contacts]
    assert again.routes == routes


def test_line_breaks_cannot_be_smuggled_into_the_start_line():
    with pytest.raises(ValueError, match="CR/LF"):
        SipResponse(200, "OK\r\nVia: evil").encode()
    with pytest.raises(ValueError, match="CR/LF"):
        SipRequest("OPTIONS", "sip:a@b\r\nX: y").encode()


def test_a_response_reuses_what_the_request_parsed_of_the_copied_headers():
    msg = request(REGISTER)
    top, from_, cseq = msg.top_via, msg.from_, msg.cseq
    ok = make_response(msg, 200, to_tag="t1")
    assert ok.top_via is top and ok.from_ is from_ and ok.cseq is cseq
    assert ok.to.tag == "t1" and msg.to.tag is None  # To gained a tag: parsed anew
    # Changing the copy's Via drops the seeded view, as for any header.
    ok.headers.replace_first("Via", "SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKother")
    assert ok.top_via.host == "192.0.2.9" and msg.top_via is top
    # A request nothing was parsed of gives a response that parses on demand.
    fresh = request(REGISTER)
    assert make_response(fresh, 200).top_via == top


def test_the_top_via_is_taken_from_the_parsed_list_when_there_is_one():
    msg = request(REGISTER)
    [only] = msg.vias
    assert msg.top_via is only
    lone = request(REGISTER)
    assert lone.top_via == only and lone.top_via is not only  # parsed alone when needed
