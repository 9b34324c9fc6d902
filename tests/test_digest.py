"""Tests for shared.sip.digest: RFC vectors, the verifier's refusals, parser robustness."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.sip.digest import (
    Challenge,
    DigestParseError,
    DigestResult,
    DigestVerifier,
    UnsupportedChallengeError,
    answer_challenge,
    ha1,
    parse_authorization_untrusted,
    parse_challenge_untrusted,
    select_challenge,
)

SECRET = b"0123456789abcdef0123456789abcdef"
REALM = "branch1.example.com"
URI = "sip:branch1.example.com"

# RFC 7616 §3.9.1
RFC7616_CHALLENGE_TAIL = (
    'realm="http-auth@example.org", qop="auth, auth-int", '
    'nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", '
    'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
)
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"


def response_of(value: str) -> str:
    match = re.search(r'response="([0-9a-f]+)"', value)
    assert match is not None
    return match.group(1)


# -- RFC vectors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_example(algorithm: str, expected: str) -> None:
    challenge = parse_challenge_untrusted(f"Digest {RFC7616_CHALLENGE_TAIL}, algorithm={algorithm}")
    assert challenge.qop == ("auth", "auth-int")
    value = answer_challenge(
        challenge,
        method="GET",
        uri="/dir/index.html",
        username="Mufasa",
        password="Circle of Life",
        cnonce=RFC7616_CNONCE,
        nc=1,
    )
    assert response_of(value) == expected
    creds = parse_authorization_untrusted(value)
    assert creds.nc == 1
    assert creds.qop == "auth"
    assert creds.cnonce == RFC7616_CNONCE
    assert creds.opaque == "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
    assert creds.algorithm == algorithm


def test_rfc2617_example() -> None:
    challenge = parse_challenge_untrusted(
        'Digest realm="testrealm@host.com", qop="auth,auth-int", '
        'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
    )
    assert challenge.algorithm == "MD5"
    value = answer_challenge(
        challenge,
        method="GET",
        uri="/dir/index.html",
        username="Mufasa",
        password="Circle Of Life",
        cnonce="0a4f113b",
        nc=1,
    )
    assert response_of(value) == "6629fae49393a05397450978507c4ef1"
    assert "nc=00000001" in value


def test_rfc2069_style_answer_has_no_qop() -> None:
    challenge = Challenge(realm="r", nonce="n")
    value = answer_challenge(
        challenge, method="REGISTER", uri="sip:r", username="u", password="p", cnonce="c", nc=1
    )
    assert "qop=" not in value
    assert "cnonce=" not in value
    assert "nc=" not in value
    # RFC 2069: response = H(HA1:nonce:HA2)
    import hashlib

    ha2 = hashlib.md5(b"REGISTER:sip:r").hexdigest()
    expected = hashlib.md5(f"{ha1('MD5', 'u', 'r', 'p')}:n:{ha2}".encode()).hexdigest()
    assert response_of(value) == expected


def test_ha1_values() -> None:
    assert ha1("MD5", "Mufasa", "testrealm@host.com", "Circle Of Life") == (
        "939e7578ed9e3c518a452acee763bce9"
    )
    assert len(ha1("SHA-256", "a", "b", "c")) == 64
    assert ha1("md5-sess", "a", "b", "c") == ha1("MD5", "a", "b", "c")
    with pytest.raises(ValueError):
        ha1("SHA-1", "a", "b", "c")


def test_answer_refuses_what_it_cannot_do() -> None:
    kwargs = dict(method="INVITE", uri="sip:x", username="u", password="p", cnonce="c", nc=1)
    with pytest.raises(UnsupportedChallengeError):
        answer_challenge(Challenge(realm="r", nonce="n", algorithm="SHA-512-256"), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedChallengeError):
        answer_challenge(Challenge(realm="r", nonce="n", qop=("auth-int",)), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedChallengeError):
        answer_challenge(Challenge(realm="r", nonce="n", algorithm="MD5-sess"), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        answer_challenge(Challenge(realm="r", nonce="n"), **{**kwargs, "nc": 0})  # type: ignore[arg-type]


# -- parsing -----------------------------------------------------------------------------------


def test_parse_challenge_robustly() -> None:
    challenge = parse_challenge_untrusted(
        '  digest  ,realm = "a \\"quoted\\" realm\\\\" ,, nonce=abc/def==,'
        " algorithm=sha-256 , unknown=thing, stale=True,qop=auth , "
    )
    assert challenge.realm == 'a "quoted" realm\\'
    assert challenge.nonce == "abc/def=="
    assert challenge.algorithm == "SHA-256"
    assert challenge.stale is True
    assert challenge.qop == ("auth",)
    assert challenge.opaque is None


def test_parse_stale_false_and_unknown_algorithm_kept() -> None:
    challenge = parse_challenge_untrusted('Digest realm="r", nonce="n", stale=no, algorithm=X-1')
    assert challenge.stale is False
    assert challenge.algorithm == "X-1"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        'Basic realm="r"',
        'Digest realm="r"',
        'Digest nonce="n"',
        'Digest realm="r", realm="s", nonce="n"',
        'Digest realm="r" nonce="n"',
        'Digest realm="unterminated, nonce="n"',
        'Digest realm="r", nonce="n\x01"',
        'Digest realm="r\r\n", nonce="n"',
        "Digest =x",
        "Digest realm",
        'Digest realm="r", nonce="n", ' + "x=" + "y" * 5000,
    ],
)
def test_parse_challenge_rejects_garbage(value: str) -> None:
    with pytest.raises(DigestParseError):
        parse_challenge_untrusted(value)


@pytest.mark.parametrize(
    "value",
    [
        'Digest username="u", realm="r", nonce="n", uri="sip:r"',
        'Digest username="u", realm="r", nonce="n", uri="sip:r", response="x", nc=1',
        'Digest username="u", realm="r", nonce="n", uri="sip:r", response="x", nc=0000000g',
        'Bearer username="u", realm="r", nonce="n", uri="sip:r", response="x"',
    ],
)
def test_parse_authorization_rejects(value: str) -> None:
    with pytest.raises(DigestParseError):
        parse_authorization_untrusted(value)


_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)


@given(value=_TEXT)
def test_fuzz_parse_challenge_raises_only_parse_error(value: str) -> None:
    try:
        parse_challenge_untrusted(value)
    except DigestParseError:
        pass


@given(value=_TEXT)
def test_fuzz_parse_authorization_raises_only_parse_error(value: str) -> None:
    try:
        parse_authorization_untrusted(value)
    except DigestParseError:
        pass


_PIECES = st.sampled_from(
    [
        "Digest ",
        "digest",
        "realm",
        "nonce",
        "uri",
        "username",
        "response",
        "nc",
        "qop",
        "cnonce",
        "=",
        '"',
        "\\",
        ",",
        " ",
        "\t",
        "auth",
        "00000001",
        "abc",
        "\x00",
        "é",
    ]
)


@given(pieces=st.lists(_PIECES, max_size=40))
def test_fuzz_structured_header_pieces(pieces: list[str]) -> None:
    value = "".join(pieces)
    for parse in (parse_challenge_untrusted, parse_authorization_untrusted):
        try:
            parse(value)
        except DigestParseError:
            pass


_QUOTABLE = st.text(
    alphabet=st.characters(
        codec="utf-8", exclude_categories=("Cs", "Cc"), exclude_characters="\x7f"
    ),
    max_size=30,
)


@given(realm=_QUOTABLE, nonce=_QUOTABLE, opaque=st.none() | _QUOTABLE, user=_QUOTABLE)
def test_answer_round_trips_through_parser(
    realm: str, nonce: str, opaque: str | None, user: str
) -> None:
    challenge = Challenge(realm=realm, nonce=nonce, qop=("auth",), opaque=opaque)
    value = answer_challenge(
        challenge, method="REGISTER", uri="sip:a@b", username=user, password="pw", cnonce="c", nc=7
    )
    creds = parse_authorization_untrusted(value)
    assert (creds.realm, creds.nonce, creds.opaque, creds.username) == (realm, nonce, opaque, user)
    assert creds.nc == 7


# -- the verifier ------------------------------------------------------------------------------


USERS = {"201": "secret201", "202": "pässword"}


def lookup(username: str, algorithm: str) -> str | None:
    password = USERS.get(username)
    return None if password is None else ha1(algorithm, username, REALM, password)


def make_verifier(**kwargs: object) -> DigestVerifier:
    return DigestVerifier(secret=SECRET, realm=REALM, instance=b"\x00\x00\x00\x01", **kwargs)  # type: ignore[arg-type]


def answer(
    challenge_value: str,
    *,
    username: str = "201",
    password: str = "secret201",
    nc: int = 1,
    method: str = "REGISTER",
    uri: str = URI,
    cnonce: str = "cn0nce",
) -> str:
    return answer_challenge(
        parse_challenge_untrusted(challenge_value),
        method=method,
        uri=uri,
        username=username,
        password=password,
        cnonce=cnonce,
        nc=nc,
    )


def verify(verifier: DigestVerifier, value: str | None, now: float, **kw: str) -> DigestResult:
    return verifier.verify(
        value, method=kw.get("method", "REGISTER"), uri=URI, now=now, lookup_ha1=lookup
    )


def test_challenges_offer_sha256_first() -> None:
    verifier = make_verifier(algorithms=("md5", "SHA-256", "MD5"))
    assert verifier.algorithms == ("SHA-256", "MD5")
    assert [parse_challenge_untrusted(v).algorithm for v in verifier.challenges(10.0)] == [
        "SHA-256",
        "MD5",
    ]
    values = make_verifier().challenges(10.0)
    parsed = [parse_challenge_untrusted(v) for v in values]
    assert [c.algorithm for c in parsed] == ["SHA-256", "MD5"]
    assert all(c.realm == REALM and c.qop == ("auth",) and not c.stale for c in parsed)
    assert parsed[0].nonce == parsed[1].nonce


def test_nonces_are_unique() -> None:
    verifier = make_verifier()
    nonces = {parse_challenge_untrusted(verifier.challenges(5.0)[0]).nonce for _ in range(100)}
    assert len(nonces) == 100


@pytest.mark.parametrize("index", [0, 1])
def test_both_algorithms_verify(index: int) -> None:
    verifier = make_verifier()
    challenge = verifier.challenges(100.0)[index]
    result = verify(verifier, answer(challenge), 101.0)
    assert result.ok
    assert result.status == "ok"
    assert result.username == "201"
    assert result.algorithm == ("SHA-256", "MD5")[index]
    assert result.challenges == ()


@pytest.mark.parametrize("algorithm", ["MD5-sess", "SHA-256-sess"])
def test_sess_algorithms_verify(algorithm: str) -> None:
    verifier = make_verifier(algorithms=(algorithm,))
    challenge = verifier.challenges(0.0)[0]
    assert f"algorithm={algorithm}" in challenge
    assert verify(verifier, answer(challenge), 1.0).ok
    assert not verify(verifier, answer(challenge, password="x", nc=2), 1.0).ok


def test_non_ascii_password() -> None:
    verifier = make_verifier()
    value = answer(verifier.challenges(0.0)[0], username="202", password="pässword")
    assert verify(verifier, value, 1.0).ok


def test_nonce_count_must_increase() -> None:
    verifier = make_verifier()
    challenge = verifier.challenges(0.0)[0]
    first = answer(challenge, nc=1)
    assert verify(verifier, first, 1.0).ok
    replay = verify(verifier, first, 2.0)
    assert replay.status == "stale"
    assert not replay.ok
    assert "stale=TRUE" in replay.challenges[0]
    assert verify(verifier, answer(challenge, nc=2), 3.0).ok
    assert verify(verifier, answer(challenge, nc=5), 4.0).ok
    assert verify(verifier, answer(challenge, nc=3), 5.0).status == "stale"
    assert verify(verifier, answer(challenge, nc=5), 5.0).status == "stale"
    assert verify(verifier, answer(challenge, nc=6), 6.0).ok


def test_replayed_nc_refused_even_after_wrong_attempts() -> None:
    verifier = make_verifier()
    challenge = verifier.challenges(0.0)[0]
    good = answer(challenge, nc=1)
    assert verify(verifier, answer(challenge, password="nope", nc=1), 0.5).status == "bad"
    assert verify(verifier, good, 1.0).ok
    assert not verify(verifier, good, 1.5).ok


def test_expired_nonce_with_right_password_is_stale() -> None:
    verifier = make_verifier(nonce_lifetime=60.0)
    challenge = verifier.challenges(0.0)[0]
    result = verify(verifier, answer(challenge), 61.0)
    assert result.status == "stale"
    new = parse_challenge_untrusted(result.challenges[0])
    assert new.stale
    assert new.nonce != parse_challenge_untrusted(challenge).nonce
    # The client retries with the new nonce without asking its user.
    assert verify(verifier, answer(result.challenges[0]), 62.0).ok


def test_expired_nonce_with_wrong_password_is_bad() -> None:
    verifier = make_verifier(nonce_lifetime=60.0)
    challenge = verifier.challenges(0.0)[0]
    result = verify(verifier, answer(challenge, password="guess"), 61.0)
    assert result.status == "bad"
    assert not any("stale" in c for c in result.challenges)


def test_nonce_from_the_future_is_stale() -> None:
    verifier = make_verifier()
    challenge = verifier.challenges(1000.0)[0]
    assert verify(verifier, answer(challenge), 10.0).status == "stale"


def test_forged_nonce_refused() -> None:
    verifier = make_verifier()
    challenge = verifier.challenges(0.0)[0]
    nonce = parse_challenge_untrusted(challenge).nonce
    # Flip one character of the nonce: the HMAC no longer matches.
    forged_nonce = nonce[:-2] + ("A" if nonce[-2] != "A" else "B") + nonce[-1]
    forged = challenge.replace(nonce, forged_nonce)
    result = verify(verifier, answer(forged), 1.0)
    assert result.status == "bad"
    for nonce_text in ["", "x", "!" * len(nonce), "é" * len(nonce), nonce + "A"]:
        value = answer(challenge.replace(nonce, nonce_text))
        assert verify(verifier, value, 1.0).status == "bad"


def test_nonce_from_other_secret_refused() -> None:
    other = DigestVerifier(secret=b"another secret of 32 bytes......", realm=REALM)
    value = answer(other.challenges(0.0)[0])
    assert verify(make_verifier(), value, 1.0).status == "bad"


def test_nonce_from_previous_instance_is_stale() -> None:
    before = DigestVerifier(secret=SECRET, realm=REALM, instance=b"AAAA")
    value = answer(before.challenges(0.0)[0])
    after = DigestVerifier(secret=SECRET, realm=REALM, instance=b"BBBB")
    after.challenges(0.0)
    assert after.verify(value, method="REGISTER", uri=URI, now=1.0, lookup_ha1=lookup).status == (
        "stale"
    )


def test_unknown_user_and_wrong_password_are_indistinguishable() -> None:
    verifier_a = make_verifier()
    verifier_b = make_verifier()
    challenge_a = verifier_a.challenges(0.0)[0]
    challenge_b = verifier_b.challenges(0.0)[0]
    assert challenge_a == challenge_b
    wrong_password = verify(verifier_a, answer(challenge_a, password="guess"), 1.0)
    unknown_user = verify(verifier_b, answer(challenge_b, username="999", password="guess"), 1.0)
    assert wrong_password.status == unknown_user.status == "bad"
    assert wrong_password == unknown_user


def test_unknown_user_gets_the_same_hash_work() -> None:
    calls: list[tuple[str, str]] = []

    def counting_lookup(username: str, algorithm: str) -> str | None:
        calls.append((username, algorithm))
        return lookup(username, algorithm)

    verifier = make_verifier()
    challenge = verifier.challenges(0.0)[0]
    for user in ["201", "999"]:
        verifier.verify(
            answer(challenge, username=user, password="x"),
            method="REGISTER",
            uri=URI,
            now=1.0,
            lookup_ha1=counting_lookup,
        )
    assert calls == [("201", "SHA-256"), ("999", "SHA-256")]


def test_missing_and_other_realm() -> None:
    verifier = make_verifier()
    for value in (None, ""):
        result = verify(verifier, value, 0.0)
        assert result.status == "missing"
        assert len(result.challenges) == 2
    other = answer(verifier.challenges(0.0)[0]).replace(REALM, "other.example")
    assert verify(verifier, other, 0.0).status == "missing"


def test_malformed_credentials_are_bad() -> None:
    verifier = make_verifier()
    result = verify(verifier, 'Digest username="201", realm=', 0.0)
    assert result.status == "bad"
    assert result.challenges


def test_method_and_uri_are_bound() -> None:
    verifier = make_verifier()
    challenge = verifier.challenges(0.0)[0]
    # The response was computed for INVITE, the request is a REGISTER.
    assert verify(verifier, answer(challenge, method="INVITE"), 1.0).status == "bad"
    # The digest-uri differs from the Request-URI.
    assert verify(verifier, answer(challenge, uri="sip:elsewhere"), 1.0).status == "bad"
    # uri=None skips the Request-URI comparison (the hash still binds digest-uri).
    value = answer(challenge, uri="sip:elsewhere")
    result = verifier.verify(value, method="REGISTER", uri=None, now=1.0, lookup_ha1=lookup)
    assert result.ok


def test_algorithm_not_offered_is_bad() -> None:
    verifier = make_verifier(algorithms=("SHA-256",))
    md5_challenge = make_verifier().challenges(0.0)[1]
    nonce = parse_challenge_untrusted(verifier.challenges(0.0)[0]).nonce
    md5_challenge = re.sub(r'nonce="[^"]*"', f'nonce="{nonce}"', md5_challenge)
    assert verify(verifier, answer(md5_challenge), 1.0).status == "bad"


def test_no_qop_client_allowed_once_per_nonce() -> None:
    verifier = make_verifier()
    no_qop = re.sub(r', qop="auth"', "", verifier.challenges(0.0)[1])
    value = answer(no_qop)
    assert "qop" not in value
    assert verify(verifier, value, 1.0).ok
    assert verify(verifier, value, 2.0).status == "stale"


def test_no_qop_client_refused_when_configured() -> None:
    verifier = make_verifier(allow_no_qop=False)
    no_qop = re.sub(r', qop="auth"', "", verifier.challenges(0.0)[1])
    assert verify(verifier, answer(no_qop), 1.0).status == "bad"


def test_qop_auth_without_nc_is_bad() -> None:
    verifier = make_verifier()
    value = re.sub(r", nc=[0-9a-f]+", "", answer(verifier.challenges(0.0)[0]))
    assert verify(verifier, value, 1.0).status == "bad"


def test_evicted_nonce_cannot_be_replayed() -> None:
    verifier = make_verifier(max_tracked_nonces=2)
    challenges = [verifier.challenges(0.0)[0] for _ in range(4)]
    values = [answer(c) for c in challenges]
    for value in values:
        assert verify(verifier, value, 1.0).ok
    # The first two nonces were evicted from the table: their replays are refused.
    for value in values:
        assert verify(verifier, value, 2.0).status == "stale"
    # A nonce issued after the eviction but not used yet is still fine.
    fresh = verifier.challenges(3.0)[0]
    assert verify(verifier, answer(fresh), 3.0).ok


def test_expired_entries_leave_the_table() -> None:
    verifier = make_verifier(max_tracked_nonces=1000, nonce_lifetime=10.0)
    for now in range(0, 100, 5):
        value = answer(verifier.challenges(float(now))[0])
        assert verify(verifier, value, float(now)).ok
    assert len(verifier._counts) <= 3


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        DigestVerifier(secret=b"short", realm=REALM)
    with pytest.raises(ValueError):
        DigestVerifier(secret=SECRET, realm=REALM, algorithms=("SHA-1",))
    with pytest.raises(ValueError):
        DigestVerifier(secret=SECRET, realm=REALM, algorithms=())
    with pytest.raises(ValueError):
        DigestVerifier(secret=SECRET, realm=REALM, instance=b"x")
    with pytest.raises(ValueError):
        DigestVerifier(secret=SECRET, realm=REALM, max_tracked_nonces=0)


@settings(max_examples=200)
@given(value=_TEXT | _PIECES)
def test_fuzz_verify_never_raises(value: str) -> None:
    verifier = make_verifier()
    result = verify(verifier, value, 0.0)
    assert result.status in ("missing", "bad")
    assert result.challenges


@given(
    steps=st.lists(
        st.tuples(st.integers(min_value=1, max_value=6), st.booleans()), min_size=1, max_size=20
    )
)
def test_nonce_counts_accept_exactly_increasing_sequence(steps: list[tuple[int, bool]]) -> None:
    """Property: over one nonce, a right answer is accepted iff its nc beats all accepted."""
    verifier = make_verifier()
    challenge = verifier.challenges(0.0)[0]
    best = 0
    for nc, right in steps:
        value = answer(challenge, nc=nc, password="secret201" if right else "wrong")
        result = verify(verifier, value, 1.0)
        assert result.ok == (right and nc > best)
        if result.ok:
            best = nc


_ANY_TEXT = st.text(alphabet=st.characters(codec="utf-8", min_codepoint=0x20), max_size=20)


@settings(max_examples=200)
@given(
    field=st.sampled_from(["username", "uri", "response", "cnonce", "nc", "qop", "algorithm"]),
    text=_ANY_TEXT,
)
def test_fuzz_fields_behind_a_valid_nonce(field: str, text: str) -> None:
    """With a genuine nonce every field reaches the hash code: still only results, no raise."""
    verifier = make_verifier()
    creds = parse_authorization_untrusted(answer(verifier.challenges(0.0)[0]))
    params = {
        "username": creds.username,
        "realm": creds.realm,
        "nonce": creds.nonce,
        "uri": creds.uri,
        "response": creds.response,
        "cnonce": creds.cnonce or "",
        "nc": f"{creds.nc:08x}",
        "qop": creds.qop or "",
        "algorithm": creds.algorithm or "",
    }
    original = params[field]
    params[field] = text
    value = "Digest " + ", ".join(
        f'{name}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for name, v in params.items()
    )
    result = verify(verifier, value, 1.0)
    assert result.status in ("ok", "bad", "stale")
    if result.ok:
        # Only the unchanged value (up to case, for the hex and token fields) can pass.
        assert text.lower() == original.lower()


def test_non_ascii_response_is_bad_not_a_crash() -> None:
    verifier = make_verifier()
    value = answer(verifier.challenges(0.0)[0])
    response = parse_authorization_untrusted(value).response
    forged = value.replace(response, "é" * len(response))
    assert verify(verifier, forged, 1.0).status == "bad"


def test_select_challenge_prefers_the_strongest_answerable() -> None:
    md5 = Challenge(realm="r", nonce="n", algorithm="MD5", qop=("auth",))
    sha = Challenge(realm="r", nonce="n", algorithm="SHA-256", qop=("auth",))
    sha_sess = Challenge(realm="r", nonce="n", algorithm="SHA-256-sess", qop=("auth",))
    unknown = Challenge(realm="r", nonce="n", algorithm="SHA-512-256", qop=("auth",))
    auth_int = Challenge(realm="r", nonce="n", algorithm="SHA-256", qop=("auth-int",))
    sess_no_qop = Challenge(realm="r", nonce="n", algorithm="MD5-sess")
    rfc2069 = Challenge(realm="r", nonce="n")
    assert select_challenge([md5, sha]) is sha
    assert select_challenge([unknown, md5]) is md5
    assert select_challenge([sha_sess, md5]) is sha_sess
    assert select_challenge([auth_int, rfc2069]) is rfc2069
    assert select_challenge([unknown, auth_int, sess_no_qop]) is None
    assert select_challenge([]) is None
    # Whatever is selected can be answered.
    for challenge in (sha, md5, sha_sess, rfc2069):
        answer_challenge(
            challenge, method="REGISTER", uri="sip:r", username="u", password="p", cnonce="c", nc=1
        )


def test_softphone_against_verifier_with_selection() -> None:
    """The whole client path: parse every challenge value, select, answer, verify."""
    verifier = make_verifier()
    result = verify(verifier, None, 0.0)
    chosen = select_challenge([parse_challenge_untrusted(v) for v in result.challenges])
    assert chosen is not None
    assert chosen.algorithm == "SHA-256"
    for nc in (1, 2, 3):
        value = answer_challenge(
            chosen,
            method="REGISTER",
            uri=URI,
            username="202",
            password="pässword",
            cnonce="abc",
            nc=nc,
        )
        assert verify(verifier, value, float(nc)).ok


@pytest.mark.parametrize(
    ("algorithm", "hash_name"), [("MD5-sess", "md5"), ("SHA-256-sess", "sha256")]
)
def test_sess_response_formula(algorithm: str, hash_name: str) -> None:
    """RFC 7616 §3.4.2: for -sess, HA1 = H(H(user:realm:pass):nonce:cnonce)."""
    import hashlib

    def h(text: str) -> str:
        return hashlib.new(hash_name, text.encode()).hexdigest()

    challenge = parse_challenge_untrusted(f"Digest {RFC7616_CHALLENGE_TAIL}, algorithm={algorithm}")
    value = answer_challenge(
        challenge,
        method="GET",
        uri="/dir/index.html",
        username="Mufasa",
        password="Circle of Life",
        cnonce=RFC7616_CNONCE,
        nc=1,
    )
    nonce = challenge.nonce
    session_ha1 = h(f"{h('Mufasa:http-auth@example.org:Circle of Life')}:{nonce}:{RFC7616_CNONCE}")
    ha2 = h("GET:/dir/index.html")
    expected = h(f"{session_ha1}:{nonce}:00000001:{RFC7616_CNONCE}:auth:{ha2}")
    assert response_of(value) == expected
    assert f"algorithm={algorithm}" in value
