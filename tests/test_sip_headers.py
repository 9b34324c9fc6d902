"""Header names and header-value grammar (RFC 3261 §7.3, §20, §25.1)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.sip.errors import SipParseError
from shared.sip.headers import (
    LIST_HEADERS,
    Address,
    CSeq,
    Via,
    canonical_name,
    format_params,
    header_key,
    is_token,
    parse_address_list_untrusted,
    parse_address_untrusted,
    parse_cseq_untrusted,
    parse_delta_seconds_untrusted,
    parse_max_forwards_untrusted,
    parse_params_untrusted,
    parse_token_list_untrusted,
    parse_via_list_untrusted,
    parse_via_untrusted,
    quote,
    sip_uri_of,
    split_comma_untrusted,
    unquote,
)
from shared.sip.uri import AbsoluteUri, SipUri, TelUri

# --- names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("compact", "full"),
    [
        ("i", "Call-ID"),
        ("m", "Contact"),
        ("f", "From"),
        ("t", "To"),
        ("v", "Via"),
        ("l", "Content-Length"),
        ("c", "Content-Type"),
        ("k", "Supported"),
        ("s", "Subject"),
        ("e", "Content-Encoding"),
        ("o", "Event"),
        ("u", "Allow-Events"),
        ("r", "Refer-To"),
        ("b", "Referred-By"),
        ("x", "Session-Expires"),
        ("y", "Identity"),
        ("a", "Accept-Contact"),
        ("j", "Reject-Contact"),
        ("d", "Request-Disposition"),
    ],
)
def test_compact_forms(compact, full):
    assert canonical_name(compact) == full
    assert canonical_name(compact.upper()) == full
    assert header_key(compact) == header_key(full) == full.lower()


def test_canonical_spelling():
    assert canonical_name("CALL-ID") == "Call-ID"
    assert canonical_name("cseq") == "CSeq"
    assert canonical_name("www-authenticate") == "WWW-Authenticate"
    assert canonical_name("X-Custom-Thing") == "X-Custom-Thing"
    assert header_key("X-Custom-Thing") == "x-custom-thing"
    assert "Via" in LIST_HEADERS and "Authorization" not in LIST_HEADERS


def test_tokens():
    assert is_token("INVITE")
    assert is_token("!interesting-Method0123456789_*+`.%indeed'~")
    assert not is_token("")
    assert not is_token("a b")
    assert not is_token("a,b")
    assert not is_token("caf\u00e9")


# --- quoting and splitting ----------------------------------------------------------------


def test_quote_unquote():
    assert quote('say "hi" \\ there') == '"say \\"hi\\" \\\\ there"'
    assert unquote('"say \\"hi\\" \\\\ there"') == 'say "hi" \\ there'
    assert unquote("token") == "token"
    assert quote("a\r\nb") == '"a  b"'
    assert quote("\x07") == '"\\\x07"'
    with pytest.raises(SipParseError):
        unquote('"open')
    with pytest.raises(SipParseError):
        unquote('"closed" junk')


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=30))
def test_quote_round_trip(text):
    if "\r" in text or "\n" in text:
        return
    assert unquote(quote(text)) == text


def test_split_comma_respects_quotes_and_angle_brackets():
    value = '"Doe, John" <sip:j@x;a=1,b>;tag=1 , <sip:y?h=a,b>, sip:z@w'
    assert split_comma_untrusted(value) == [
        '"Doe, John" <sip:j@x;a=1,b>;tag=1',
        "<sip:y?h=a,b>",
        "sip:z@w",
    ]
    assert split_comma_untrusted("a, b,,c") == ["a", "b", "", "c"]
    assert split_comma_untrusted('"a\\", b", c') == ['"a\\", b"', "c"]
    with pytest.raises(SipParseError):
        split_comma_untrusted('"unterminated, x')


def test_params():
    assert parse_params_untrusted("") == {}
    assert parse_params_untrusted(" ; tag = abc ;lr; Q=0.5") == {
        "tag": "abc",
        "lr": None,
        "q": "0.5",
    }
    assert parse_params_untrusted(';x="a;b, c"') == {"x": '"a;b, c"'}
    assert parse_params_untrusted(";received=[2001:db8::1]") == {"received": "[2001:db8::1]"}
    assert format_params({"tag": "abc", "lr": None}) == ";tag=abc;lr"


@pytest.mark.parametrize(
    "text",
    [
        "x",
        ";",
        ";;",
        ";a;;b",
        ";=v",
        ";a b=1",
        ";a=b c",
        ";a=",
        ';a="x',
        ';a="x"y',
        ";a=1;A=2",
        ";a=<>",
    ],
)
def test_bad_params(text):
    with pytest.raises(SipParseError) as info:
        parse_params_untrusted(text)
    assert info.value.status == 400


# --- addresses ----------------------------------------------------------------------------


def test_name_addr_with_quoted_display_name():
    a = parse_address_untrusted('"Alice \\"A\\" Smith" <sip:alice@atlanta.com>;tag=1928301774')
    assert a.display_name == 'Alice "A" Smith'
    assert a.uri == SipUri(host="atlanta.com", user="alice")
    assert a.tag == "1928301774"
    assert str(a) == '"Alice \\"A\\" Smith" <sip:alice@atlanta.com>;tag=1928301774'


def test_name_addr_with_token_display_name():
    a = parse_address_untrusted("Bob   Smith<sip:bob@biloxi.com>")
    assert a.display_name == "Bob Smith"
    assert a.params == {}
    assert parse_address_untrusted(str(a)) == a


def test_name_addr_without_display_name():
    a = parse_address_untrusted("  <sip:bob@biloxi.com;transport=tcp> ;expires=60;q=0.7")
    assert a.display_name is None
    assert isinstance(a.uri, SipUri)
    assert a.uri.params == {"transport": "tcp"}
    assert a.expires == 60
    assert a.q == 0.7
    assert sip_uri_of(a) == a.uri


def test_empty_quoted_display_name_is_kept():
    a = parse_address_untrusted('"" <sip:x@y>')
    assert a.display_name == ""
    assert str(a) == '"" <sip:x@y>'


def test_addr_spec_params_belong_to_the_header():
    a = parse_address_untrusted("sip:carol@chicago.com;tag=887s ; foo")
    assert a.uri == SipUri(host="chicago.com", user="carol")
    assert a.params == {"tag": "887s", "foo": None}


def test_other_uri_schemes_in_addresses():
    assert parse_address_untrusted("<tel:+15551234>").uri == TelUri("+15551234")
    a = parse_address_untrusted("<urn:service:sos>")
    assert a.uri == AbsoluteUri("urn", "service:sos")
    assert sip_uri_of(a) is None


def test_with_tag():
    a = parse_address_untrusted("<sip:a@b>;x=1")
    tagged = a.with_tag("t9")
    assert tagged.tag == "t9"
    assert tagged.params == {"x": "1", "tag": "t9"}
    assert a.tag is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        '"unterminated <sip:a@b>',
        '"name" sip:a@b',
        "Bell, Alexander <sip:a@b>",
        "< sip:a@b >",
        "<sip:a@b",
        "<>",
        "sip:a@b?x=y",
        "sip:a@b,c@d",
        "<sip:a@b>;;",
        "<sip:a@b> junk",
        "<sip:a@b>;tag=1;tag=2",
        "<sip:a@b>;expires=x",
        "sip:a b@c",
        "<not a uri>",
        "<sip:a@b;lr;lr>",
    ],
)
def test_bad_addresses(text):
    with pytest.raises(SipParseError) as info:
        a = parse_address_untrusted(text)
        _ = a.expires
    assert info.value.status == 400


@pytest.mark.parametrize("q", ["0", "0.", "0.5", "0.333", "1", "1.0", "1.000"])
def test_good_q_values(q):
    assert parse_address_untrusted(f"<sip:a@b>;q={q}").q == float(q)


@pytest.mark.parametrize("q", ["2", "0.1234", "1.5", "-0", "x", ".5", "0.5.1", "\u0661"])
def test_bad_q_values(q):
    with pytest.raises(SipParseError):
        _ = parse_address_untrusted(f"<sip:a@b>;q={q}").q


def test_expires_bounds():
    assert parse_address_untrusted("<sip:a@b>;expires=4294967295").expires == 2**32 - 1
    assert parse_address_untrusted("<sip:a@b>").expires is None
    with pytest.raises(SipParseError):
        _ = parse_address_untrusted("<sip:a@b>;expires=4294967296").expires
    with pytest.raises(SipParseError):
        _ = parse_address_untrusted("<sip:a@b>;expires").expires


def test_address_list():
    contacts = parse_address_list_untrusted(
        ['"A, B" <sip:a@x>;q=1, <sip:b@y>', "sip:c@z;expires=5"], "Contact"
    )
    assert [c.display_name for c in contacts] == ["A, B", None, None]
    assert [str(c.uri) for c in contacts] == ["sip:a@x", "sip:b@y", "sip:c@z"]
    assert contacts[2].expires == 5
    with pytest.raises(SipParseError):
        parse_address_list_untrusted(["<sip:a@x>,,<sip:b@y>"], "Route")
    assert parse_address_list_untrusted([], "Route") == []


# --- Via ----------------------------------------------------------------------------------


def test_simple_via():
    via = parse_via_untrusted("SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK776asdhds")
    assert via == Via("UDP", "pc33.atlanta.com", None, {"branch": "z9hG4bK776asdhds"})
    assert via.branch == "z9hG4bK776asdhds"
    assert via.sent_by == "pc33.atlanta.com"
    assert not via.has_rport
    assert via.rport is None
    assert via.received is None
    assert str(via) == "SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK776asdhds"


def test_via_with_lws_everywhere():
    via = parse_via_untrusted("SIP  /   2.0 /udp  192.0.2.1:5070   ; branch =  z9hG4bKx ;rport")
    assert via.protocol == "SIP/2.0"
    assert via.transport == "UDP"
    assert (via.host, via.port) == ("192.0.2.1", 5070)
    assert via.params == {"branch": "z9hG4bKx", "rport": None}
    assert via.has_rport
    assert via.rport is None


def test_via_ipv6_and_nat_params():
    via = parse_via_untrusted(
        "SIP/2.0/TCP [2001:db8::9]:5061;branch=z9hG4bKa;received=2001:db8::1;rport=40000"
    )
    assert via.host == "[2001:db8::9]"
    assert via.port == 5061
    assert via.received == "2001:db8::1"
    assert via.rport == 40000
    assert via.sent_by == "[2001:db8::9]:5061"


def test_via_with_params_marks_nat():
    via = parse_via_untrusted("SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKq;rport")
    seen = via.with_params(received="203.0.113.7", rport="61000")
    assert str(seen) == (
        "SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKq;rport=61000;received=203.0.113.7"
    )
    assert parse_via_untrusted(str(seen)) == seen
    assert via.rport is None  # the original is unchanged


def test_via_list():
    vias = parse_via_list_untrusted(
        ["SIP/2.0/UDP a.example.com;branch=z9hG4bK1, SIP/2.0/TCP b.example.com", "SIP/2.0/TLS c"]
    )
    assert [(v.transport, v.host) for v in vias] == [
        ("UDP", "a.example.com"),
        ("TCP", "b.example.com"),
        ("TLS", "c"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SIP/2.0",
        "SIP/2.0/UDP",
        "SIP/2.0/UDP ",
        "SIP 2.0 UDP host",
        "SIP/2.0/U,DP host",
        "SIP/2.0/UDP host:99999",
        "SIP/2.0/UDP host;;",
        "SIP/2.0/UDP host;branch=",
        "SIP/2.0/UDP host;received=example.com",
        "SIP/2.0/UDP host;rport=abc",
        "SIP/2.0/UDP host;rport=70000",
        "SIP/2.0/UDP host;ttl=256",
        "SIP/2.0/UDP host junk",
        "SIP/2.0/UDP [::1",
    ],
)
def test_bad_vias(text):
    with pytest.raises(SipParseError) as info:
        parse_via_untrusted(text)
    assert info.value.status == 400


def test_empty_via_element_is_refused():
    with pytest.raises(SipParseError) as info:
        parse_via_list_untrusted(["SIP/2.0/UDP 192.0.2.15;branch=z9hG4bK1,,"])
    assert "Empty Via element" in info.value.reason


# --- scalars ------------------------------------------------------------------------------


def test_cseq():
    assert parse_cseq_untrusted("4711 INVITE") == CSeq(4711, "INVITE")
    assert parse_cseq_untrusted("  0009 \t INVITE ") == (9, "INVITE")
    assert str(CSeq(1, "REGISTER")) == "1 REGISTER"
    assert parse_cseq_untrusted(f"{2**31 - 1} ACK").seq == 2**31 - 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1",
        "INVITE",
        "1 2 INVITE",
        "-1 INVITE",
        "2147483648 INVITE",
        "x INVITE",
        "1 IN,VITE",
        "\u0661 INVITE",
    ],
)
def test_bad_cseq(text):
    with pytest.raises(SipParseError):
        parse_cseq_untrusted(text)


def test_max_forwards_and_delta_seconds():
    assert parse_max_forwards_untrusted("70") == 70
    assert parse_max_forwards_untrusted("0068") == 68
    assert parse_max_forwards_untrusted("0") == 0
    for bad in ("256", "-1", "", "7 0", "x", "99999999999"):
        with pytest.raises(SipParseError):
            parse_max_forwards_untrusted(bad)
    assert parse_delta_seconds_untrusted(" 3600 ", "Expires") == 3600
    for bad in ("4294967296", "-5", "1.5", ""):
        with pytest.raises(SipParseError) as info:
            parse_delta_seconds_untrusted(bad, "Expires")
        assert "Expires" in info.value.reason


def test_token_lists():
    assert parse_token_list_untrusted(["100rel, timer", " path,", "gruu"], "Supported") == [
        "100rel",
        "timer",
        "path",
        "gruu",
    ]
    with pytest.raises(SipParseError):
        parse_token_list_untrusted(["a b"], "Require")


# --- properties ---------------------------------------------------------------------------

TOKENS = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~",
    min_size=1,
    max_size=10,
)
PARAM_VALUES = (
    st.none()
    | TOKENS
    | st.text(max_size=10).filter(lambda s: "\r" not in s and "\n" not in s).map(quote)
)


@st.composite
def addresses(draw: st.DrawFn) -> Address:
    uri = SipUri(
        host=draw(st.from_regex(r"[a-z][a-z0-9]{0,8}(\.[a-z]{2,4}){0,2}", fullmatch=True)),
        user=draw(st.none() | st.text(min_size=1, max_size=8)),
        params=draw(st.dictionaries(TOKENS.map(str.lower), st.none() | TOKENS, max_size=3)),
    )
    display = draw(
        st.none() | st.text(max_size=12).filter(lambda s: "\r" not in s and "\n" not in s)
    )
    params = draw(st.dictionaries(TOKENS.map(str.lower), PARAM_VALUES, max_size=3))
    return Address(uri, display, params)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(addresses())
def test_address_round_trip(address):
    text = str(address)
    assert parse_address_untrusted(text) == address
    # ... and inside a comma-separated list with others
    assert parse_address_list_untrusted([f"{text} , {text}"], "Contact") == [address, address]


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["UDP", "TCP", "TLS", "WS", "WSS", "SCTP"]),
    st.from_regex(r"[a-z][a-z0-9]{0,8}(\.[a-z]{2,4}){0,2}", fullmatch=True)
    | st.ip_addresses().map(lambda a: f"[{a}]" if a.version == 6 else str(a)),
    st.none() | st.integers(1, 65535),
    st.dictionaries(
        TOKENS.map(str.lower).filter(lambda n: n not in ("received", "rport", "ttl", "branch")),
        st.none() | TOKENS,
        max_size=3,
    ),
)
def test_via_round_trip(transport, host, port, params):
    via = Via(transport, host, port, params)
    assert parse_via_untrusted(str(via)) == via


def test_lenient_parameter_values_phones_send():
    assert parse_params_untrusted(";path=a/b@c;name=caf\u00e9") == {
        "path": "a/b@c",
        "name": "caf\u00e9",
    }
    a = parse_address_untrusted('sip:a@b;x="<y>";z=1')
    assert a.uri == SipUri(host="b", user="a")
    assert a.params == {"x": '"<y>"', "z": "1"}
    assert parse_address_untrusted(str(a)) == a
