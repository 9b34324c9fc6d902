"""SIP, SIPS, tel and other URIs (RFC 3261 §19.1, RFC 3966)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.sip.errors import SipParseError
from shared.sip.uri import (
    AbsoluteUri,
    SipUri,
    TelUri,
    format_host_port,
    parse_host_port_untrusted,
    parse_uri_untrusted,
)


def sip(text: str) -> SipUri:
    uri = parse_uri_untrusted(text)
    assert isinstance(uri, SipUri)
    return uri


def test_plain_sip_uri():
    uri = sip("sip:alice@atlanta.example.com")
    assert uri == SipUri(host="atlanta.example.com", user="alice")
    assert uri.scheme == "sip"
    assert uri.port is None
    assert str(uri) == "sip:alice@atlanta.example.com"


def test_all_components():
    uri = sip("sips:alice:secret@[2001:db8::1]:5061;transport=TLS;lr;maddr=192.0.2.1?subject=hi&x=")
    assert uri.scheme == "sips"
    assert uri.user == "alice"
    assert uri.password == "secret"
    assert uri.host == "[2001:db8::1]"
    assert uri.port == 5061
    assert uri.params == {"transport": "TLS", "lr": None, "maddr": "192.0.2.1"}
    assert uri.transport == "tls"
    assert uri.lr
    assert uri.maddr == "192.0.2.1"
    assert uri.headers == (("subject", "hi"), ("x", ""))
    assert parse_uri_untrusted(str(uri)) == uri


def test_host_only_and_scheme_case():
    uri = sip("SIP:Registrar.Example.COM:5060")
    assert uri.scheme == "sip"
    assert uri.user is None
    assert uri.host == "Registrar.Example.COM"
    assert uri.port == 5060
    assert uri.aor == "sip:registrar.example.com"
    assert str(uri) == "sip:Registrar.Example.COM:5060"


def test_parameter_names_are_case_insensitive_values_kept():
    uri = sip("sip:bob@biloxi.example.com;Transport=TCP;USER=phone")
    assert uri.params == {"transport": "TCP", "user": "phone"}


def test_escapes_are_undone_and_redone():
    uri = sip("sip:I%20have%20spaces@example.net;n%61me=v%61lue%25%34%31?h%3d=%3Csip:x%3E")
    assert uri.user == "I have spaces"
    assert uri.params == {"name": "value%41"}
    assert uri.headers == (("h=", "<sip:x>"),)
    assert str(uri) == "sip:I%20have%20spaces@example.net;name=value%2541?h%3D=%3Csip:x%3E"
    assert parse_uri_untrusted(str(uri)) == uri


def test_utf8_escapes():
    uri = sip("sip:%C3%A9l%C3%A8ve@example.com")
    assert uri.user == "\u00e9l\u00e8ve"
    assert str(uri) == "sip:%C3%A9l%C3%A8ve@example.com"


def test_user_part_may_hold_semicolons_and_question_marks():
    uri = sip("sip:user;par=u%40example.net@example.com;lr")
    assert uri.user == "user;par=u@example.net"
    assert uri.params == {"lr": None}
    assert str(uri) == "sip:user;par=u%40example.net@example.com;lr"


def test_telephone_subscriber_user():
    uri = sip("sip:+1-212-555-1212:1234@gateway.com;user=phone")
    assert uri.user == "+1-212-555-1212"
    assert uri.password == "1234"
    assert uri.params["user"] == "phone"


def test_aor_drops_port_params_and_headers():
    assert sip("sip:Alice@Atlanta.COM:5070;transport=tcp?x=y").aor == "sip:Alice@atlanta.com"
    assert sip("sips:%61lice@atlanta.com").aor == "sips:alice@atlanta.com"


@pytest.mark.parametrize(
    "text",
    [
        "sip:[2001:db8::1]",
        "sip:alice@[2001:db8::1]:5060",
        "sip:[::ffff:192.0.2.1]:1",
        "sip:192.0.2.1:65535",
        "sip:a_b.example.com",
    ],
)
def test_hosts_that_parse_and_round_trip(text):
    assert str(parse_uri_untrusted(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sip",
        ":foo",
        "1sip:foo",
        "si p:foo",
        "sip:",
        "sip:@host",
        "sip:alice@",
        "sip:alice@host:",
        "sip:alice@host:65536",
        "sip:alice@host:-1",
        "sip:alice@host:5o60",
        "sip:alice@host:123456",
        "sip:alice@[2001:db8::1",
        "sip:alice@[not:an:address]",
        "sip:alice@[2001:db8::1]x",
        "sip:alice@ho st",
        "sip:alice@host;",
        "sip:alice@host;=x",
        "sip:alice@host;lr;lr",
        "sip:alice@host?",
        "sip:alice@host?x",
        "sip:alice@host?=y",
        "sip:al<ice@host",
        "sip:alice@host\x00",
        "sip:alice@ho%st",
        "sip:al%4@host",
        "sip:al%zzice@host",
        "sip:%ff@host",
        "sip:alice@host@other",
        "sip:alice@host;p=a b",
        "sip:alice@host:5060:5060",
        "sip:ali\u00e9ce@host",
        "tel:",
        "tel:+",
        "tel:12 34",
        "tel:+1;a;a",
        "mailto:",
    ],
)
def test_malformed_uris_are_400(text):
    with pytest.raises(SipParseError) as info:
        parse_uri_untrusted(text)
    assert info.value.status == 400
    assert info.value.reason


def test_tel_uri():
    uri = parse_uri_untrusted("tel:+1-201-555-0123;ext=1234;phone-context=example.com")
    assert isinstance(uri, TelUri)
    assert uri.scheme == "tel"
    assert uri.number == "+1-201-555-0123"
    assert uri.digits == "+12015550123"
    assert uri.params == {"ext": "1234", "phone-context": "example.com"}
    assert str(uri) == "tel:+1-201-555-0123;ext=1234;phone-context=example.com"
    assert uri.equivalent(
        parse_uri_untrusted("tel:+1.201.555.0123;phone-context=EXAMPLE.com;ext=1234")
    )
    assert not uri.equivalent(parse_uri_untrusted("tel:+1-201-555-0124;ext=1234"))
    assert not uri.equivalent(sip("sip:+12015550123@example.com"))


def test_local_tel_number():
    uri = parse_uri_untrusted("tel:*21#;phone-context=+44")
    assert isinstance(uri, TelUri)
    assert uri.number == "*21#"


def test_other_schemes_are_opaque():
    uri = parse_uri_untrusted("urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6")
    assert uri == AbsoluteUri("urn", "uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6")
    assert str(uri) == "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"
    assert uri.equivalent(parse_uri_untrusted("URN:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"))
    assert not uri.equivalent(sip("sip:a@b"))
    assert parse_uri_untrusted("soap.beep://192.0.2.103:3002") == AbsoluteUri(
        "soap.beep", "//192.0.2.103:3002"
    )


# RFC 3261 §19.1.4: the RFC's own examples.
EQUIVALENT = [
    ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;security=on"),
    ("sip:carol@chicago.com;newparam=5", "sip:carol@chicago.com;security=on"),
    (
        "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
        "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com",
    ),
    (
        "sip:alice@atlanta.com?subject=project%20x&priority=urgent",
        "sip:alice@atlanta.com?priority=urgent&subject=project%20x",
    ),
]
NOT_EQUIVALENT = [
    ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),
    ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),
    ("sip:alice@atlanta.com", "sips:alice@atlanta.com"),
    ("sip:alice:pw@atlanta.com", "sip:alice@atlanta.com"),
    ("sip:carol@chicago.com;newparam=5", "sip:carol@chicago.com;newparam=6"),
]


@pytest.mark.parametrize(("a", "b"), EQUIVALENT)
def test_rfc3261_equivalent_uris(a, b):
    assert sip(a).equivalent(sip(b))
    assert sip(b).equivalent(sip(a))


@pytest.mark.parametrize(("a", "b"), NOT_EQUIVALENT)
def test_rfc3261_non_equivalent_uris(a, b):
    assert not sip(a).equivalent(sip(b))
    assert not sip(b).equivalent(sip(a))


def test_sip_uri_is_not_equivalent_to_other_kinds():
    assert not sip("sip:a@b").equivalent(AbsoluteUri("http", "//b"))


def test_host_port_helpers():
    assert parse_host_port_untrusted("example.com") == ("example.com", None)
    assert parse_host_port_untrusted("192.0.2.1:5060") == ("192.0.2.1", 5060)
    assert parse_host_port_untrusted("[::1]:5060") == ("[::1]", 5060)
    assert format_host_port("::1", 5060) == "[::1]:5060"
    assert format_host_port("[::1]", None) == "[::1]"
    assert format_host_port("example.com", 5) == "example.com:5"


# --- properties ---------------------------------------------------------------------------

HOSTNAMES = st.from_regex(r"[a-z0-9]([a-z0-9\-]{0,10}[a-z0-9])?(\.[a-z]{2,6}){0,3}", fullmatch=True)
IPV6 = st.ip_addresses(v=6).map(lambda a: f"[{a}]")
IPV4 = st.ip_addresses(v=4).map(str)
PARAM_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.!~*'", min_size=1, max_size=8)


@st.composite
def sip_uris(draw: st.DrawFn) -> SipUri:
    user = draw(st.none() | st.text(min_size=1, max_size=12))
    password = draw(st.none() | st.text(max_size=8)) if user is not None else None
    return SipUri(
        host=draw(HOSTNAMES | IPV4 | IPV6),
        user=user,
        password=password,
        port=draw(st.none() | st.integers(0, 65535)),
        params=draw(st.dictionaries(PARAM_NAMES, st.none() | st.text(max_size=8), max_size=4)),
        headers=tuple(
            draw(
                st.lists(
                    st.tuples(st.text(min_size=1, max_size=6), st.text(max_size=8)), max_size=3
                )
            )
        ),
        scheme=draw(st.sampled_from(["sip", "sips"])),
    )


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sip_uris())
def test_sip_uri_round_trip(uri):
    text = str(uri)
    assert " " not in text and "<" not in text and ">" not in text
    parsed = parse_uri_untrusted(text)
    assert parsed == uri
    assert parsed.equivalent(uri)
    assert str(parsed) == text


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sip_uris(), st.sampled_from(["upper", "lower"]))
def test_host_case_does_not_matter_for_equivalence(uri, case):
    other = SipUri(
        host=getattr(uri.host, case)(),
        user=uri.user,
        password=uri.password,
        port=uri.port,
        params=uri.params,
        headers=uri.headers,
        scheme=uri.scheme,
    )
    assert uri.equivalent(other)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.from_regex(r"\+?[0-9][0-9\-.()]{0,14}", fullmatch=True),
    st.dictionaries(PARAM_NAMES, st.none() | st.text(max_size=8), max_size=3),
)
def test_tel_uri_round_trip(number, params):
    uri = TelUri(number, params)
    assert parse_uri_untrusted(str(uri)) == uri


def test_parses_are_remembered_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.sip import uri as uri_module

    monkeypatch.setattr(uri_module, "_URI_MEMO", {})
    monkeypatch.setattr(uri_module, "_URI_MEMO_SIZE", 3)
    first = parse_uri_untrusted("sip:2001@192.0.2.1:5060;transport=udp")
    assert parse_uri_untrusted("sip:2001@192.0.2.1:5060;transport=udp") is first
    # A bad URI is refused every time (errors are not remembered as URIs).
    for _ in range(2):
        with pytest.raises(SipParseError):
            parse_uri_untrusted("sip:2001@192.0.2.1:99999")
    for i in range(5):
        parse_uri_untrusted(f"sip:{i}@192.0.2.1")
    assert len(uri_module._URI_MEMO) <= 3
    again = parse_uri_untrusted("sip:2001@192.0.2.1:5060;transport=udp")
    assert again == first and isinstance(again, SipUri) and again.port == 5060
