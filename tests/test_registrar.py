"""The office registrar (remotehost/registrar.py): RFC 3261 §10.3 policy, without sockets.

Every test drives `Registrar.handle_register` with requests built as bytes and parsed by the real
parser, answered by a `Phone` that computes digests with `answer_challenge`, at a given `now`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from remotehost.location import Binding, Location
from remotehost.registrar import Origin, Registrar, RegistrarPolicy
from shared.sip.digest import DigestVerifier, answer_challenge
from shared.sip.errors import SipParseError
from shared.sip.message import SipRequest, SipResponse
from tests.siphelpers import (
    DOMAIN,
    REALM,
    LookupHa1,
    Phone,
    challenges_of,
    contact_expiries,
    directory,
    parse_request,
    register_bytes,
)

NOW = 1_700_000_000.0
SECRET = b"registrar-test-secret-0123456789"
PHONE = Origin("udp", "192.0.2.10", 5062)
OTHER = Origin("udp", "192.0.2.20", 5062)
ATTACKER = Origin("udp", "198.51.100.66", 40000)


def make_registrar(
    *,
    policy: RegistrarPolicy | None = None,
    max_contacts: int = 10,
    lookup: LookupHa1 | None = None,
    algorithms: tuple[str, ...] = ("MD5",),
    nonce_lifetime: float = 300.0,
) -> Registrar:
    return Registrar(
        verifier=DigestVerifier(
            secret=SECRET, realm=REALM, algorithms=algorithms, nonce_lifetime=nonce_lifetime
        ),
        lookup_ha1=lookup or directory(),
        serves_domain=lambda host: host == DOMAIN,
        location=Location(max_contacts),
        policy=policy or RegistrarPolicy(),
    )


@pytest.fixture
def registrar() -> Registrar:
    return make_registrar()


def send(
    registrar: Registrar, request: SipRequest, origin: Origin = PHONE, now: float = NOW
) -> SipResponse:
    response = registrar.handle_register(request, origin, now)
    assert response is not None
    return response


def register(
    registrar: Registrar,
    phone: Phone,
    origin: Origin = PHONE,
    now: float = NOW,
    **kwargs: Any,
) -> SipResponse:
    """Register like a phone: answer a 401 (first challenge or stale nonce) and retry once."""
    response = send(registrar, phone.register(**kwargs), origin, now)
    if response.status == 401:
        phone.learn(response)
        response = send(registrar, phone.register(**kwargs), origin, now)
    return response


def contacts_of(registrar: Registrar, ext: str) -> set[str]:
    return {b.contact for b in registrar.location.get(ext)}


# -- challenge and acceptance --------------------------------------------------------------------


def test_first_register_is_challenged(registrar):
    response = send(registrar, Phone("201").register())
    assert (response.status, response.reason) == (401, "Unauthorized")
    [challenge] = challenges_of(response)
    assert challenge.realm == REALM and challenge.qop == ("auth",) and not challenge.stale
    assert response.to_tag is not None
    assert len(registrar.location) == 0
    assert registrar.stats.challenged == 1 and registrar.stats.auth_failures == 0


def test_challenge_offers_every_configured_algorithm_strongest_first():
    registrar = make_registrar(algorithms=("MD5", "SHA-256"))
    response = send(registrar, Phone("201").register())
    assert [c.algorithm for c in challenges_of(response)] == ["SHA-256", "MD5"]
    phone = Phone("201")
    assert register(registrar, phone).status == 200
    assert phone.challenge is not None and phone.challenge.algorithm == "SHA-256"


def test_answered_register_is_accepted_and_lists_the_contact(registrar):
    phone = Phone("201", contact="sip:201@192.0.2.10:5062;transport=udp")
    response = register(registrar, phone)
    assert (response.status, response.reason) == (200, "OK")
    assert contact_expiries(response) == {"sip:201@192.0.2.10:5062;transport=udp": 3600}
    assert (response.headers.get("Date") or "").endswith(" GMT")
    [binding] = registrar.location.get("201")
    assert binding == Binding(
        ext="201",
        contact="sip:201@192.0.2.10:5062;transport=udp",
        expires_at=NOW + 3600,
        call_id=phone.call_id,
        cseq=phone.cseq,
        transport="udp",
        source_ip="192.0.2.10",
        source_port=5062,
        user_agent="siphelpers-phone/1.0",
    )
    assert registrar.stats.accepted == 1


def test_a_retransmitted_request_gets_the_same_to_tag(registrar):
    # The transaction layer normally absorbs retransmissions; when it cannot (a restart), the
    # same request still gets the same To tag.
    request = Phone("201").register()
    assert send(registrar, request).to_tag == send(registrar, request).to_tag


def test_register_without_contact_lists_current_bindings(registrar):
    phone = Phone("201")
    register(registrar, phone)
    response = register(registrar, phone, contacts=[], now=NOW + 600)
    assert response.status == 200
    assert contact_expiries(response) == {phone.contact: 3000}


def mask(value: str) -> str:
    return re.sub(r'nonce="[^"]*"', 'nonce="-"', value)


def test_unknown_extension_and_wrong_password_get_identical_answers(registrar):
    answers = []
    for phone in (Phone("299", password="guess"), Phone("201", password="wrong")):
        first = send(registrar, phone.register())
        phone.learn(first)
        answers.append((first, send(registrar, phone.register())))
    (unknown_first, unknown), (wrong_first, wrong) = answers
    for a, b in ((unknown_first, wrong_first), (unknown, wrong)):
        assert (a.status, a.reason) == (b.status, b.reason) == (401, "Unauthorized")
        assert [n for n, _ in a.headers] == [n for n, _ in b.headers]
        assert [mask(v) for v in a.headers.get_all("WWW-Authenticate")] == [
            mask(v) for v in b.headers.get_all("WWW-Authenticate")
        ]
        assert a.body == b.body == b""
    assert registrar.stats.auth_failures == 2
    assert len(registrar.location) == 0


def test_wrong_domain_is_refused_before_any_credential_check():
    looked_up: list[str] = []
    lookup = directory()

    def spy(ext: str, algorithm: str) -> str | None:
        looked_up.append(ext)
        return lookup(ext, algorithm)

    registrar = make_registrar(lookup=spy)
    phone = Phone("201")
    phone.learn(send(registrar, phone.register()))
    for request in (
        phone.register(request_uri="sip:paris.example.com"),  # with credentials
        parse_request(register_bytes(ext="201", request_uri="sip:paris.example.com")),
        parse_request(register_bytes(ext="201", request_uri="tel:+331234")),
    ):
        response = send(registrar, request)
        assert response.status == 403
        assert response.headers.get("WWW-Authenticate") is None
    assert looked_up == []
    assert registrar.stats.auth_failures == 0 and len(registrar.location) == 0


def test_unknown_required_option_is_420_before_authentication(registrar):
    request = Phone("201").register(extra=[("Require", "foo-bar")])
    response = send(registrar, request)
    assert response.status == 420
    assert response.headers.get("Unsupported") == "foo-bar"
    assert response.headers.get("WWW-Authenticate") is None


@pytest.mark.parametrize("option", ["path", "outbound"])
def test_extensions_we_do_not_implement_are_not_claimed(registrar, option):
    # Path (RFC 3327) and outbound (RFC 5626) would need the registrar to act on them: a phone
    # that requires one must be told (420), not silently get less than it asked for.
    response = send(registrar, Phone("201").register(extra=[("Require", f"{option}, foo-bar")]))
    assert response.status == 420
    assert response.headers.get("Unsupported") == f"{option}, foo-bar"


def test_to_user_must_be_the_authenticated_user(registrar):
    # 201 knows its own password and tries to register 202's extension.
    phone = Phone("202", username="201", password="secret-201")
    response = register(registrar, phone)
    assert response.status == 403
    assert len(registrar.location) == 0
    # ... and the same phone registering its own extension is fine.
    assert register(registrar, phone, to_user="201").status == 200
    assert registrar.location.extensions() == ["201"]


# -- expiry --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "how", [{"expires": 30}, {"contacts": ["<sip:201@192.0.2.10:5062>;expires=59"]}]
)
def test_expires_below_min_expires_is_423(registrar, how):
    response = register(registrar, Phone("201"), **how)
    assert (response.status, response.reason) == (423, "Interval Too Brief")
    assert response.headers.get("Min-Expires") == "60"
    assert len(registrar.location) == 0
    assert registrar.stats.refused == 1


def test_expires_at_min_expires_is_accepted(registrar):
    response = register(registrar, Phone("201"), expires=60)
    assert response.status == 200
    assert list(contact_expiries(response).values()) == [60]


def test_expires_above_max_is_clamped(registrar):
    response = register(registrar, Phone("201"), expires=100_000)
    assert response.status == 200
    assert list(contact_expiries(response).values()) == [3600]
    [binding] = registrar.location.get("201")
    assert binding.expires_at == NOW + 3600


def test_contact_expires_parameter_wins_over_the_header(registrar):
    phone = Phone("201")
    response = register(
        registrar, phone, expires=600, contacts=["<sip:a@192.0.2.10>;expires=120", "<sip:b@x>"]
    )
    assert contact_expiries(response) == {"sip:a@192.0.2.10": 120, "sip:b@x": 600}


def test_default_expires_without_any(registrar):
    registrar = make_registrar(policy=RegistrarPolicy(default_expires=1800))
    response = register(registrar, Phone("201"))
    assert list(contact_expiries(response).values()) == [1800]


# -- adding, refreshing and removing bindings ----------------------------------------------------


def test_several_contacts_in_one_request(registrar):
    response = register(
        registrar,
        Phone("201"),
        contacts=["<sip:201@192.0.2.10:5062>;q=0.7, <sip:201@192.0.2.11>", "<sip:201@phone.lan>"],
        expires=300,
    )
    assert contact_expiries(response) == {
        "sip:201@192.0.2.10:5062": 300,
        "sip:201@192.0.2.11": 300,
        "sip:201@phone.lan": 300,
    }
    q = {b.contact: b.q for b in registrar.location.get("201")}
    assert q == {
        "sip:201@192.0.2.10:5062": 0.7,
        "sip:201@192.0.2.11": 1.0,
        "sip:201@phone.lan": 1.0,
    }


def test_contacts_of_other_extensions_are_untouched(registrar):
    register(registrar, Phone("201"))
    register(registrar, Phone("202", port=5070))
    register(registrar, Phone("201"), contacts=["*"], expires=0)
    assert registrar.location.extensions() == ["202"]


def test_refresh_keeps_one_binding_with_a_new_expiry(registrar):
    phone = Phone("201")
    register(registrar, phone, expires=600)
    response = register(registrar, phone, now=NOW + 500, expires=600)
    assert response.status == 200
    assert contact_expiries(response) == {phone.contact: 600}
    [binding] = registrar.location.get("201")
    assert binding.expires_at == NOW + 1100
    assert binding.cseq == phone.cseq


def test_star_with_expires_zero_removes_all(registrar):
    phone = Phone("201")
    register(registrar, phone, contacts=["<sip:a@192.0.2.10>", "<sip:b@192.0.2.10>"])
    assert len(registrar.location) == 2
    response = register(registrar, phone, contacts=["*"], expires=0)
    assert response.status == 200
    assert response.contacts == []
    assert registrar.location.get("201") == [] and registrar.location.extensions() == []


@pytest.mark.parametrize("expires", [None, 60, 3600])
def test_star_with_other_expires_is_400_and_changes_nothing(registrar, expires):
    phone = Phone("201")
    register(registrar, phone)
    before = registrar.location.get("201")
    response = register(registrar, phone, contacts=["*"], expires=expires)
    assert response.status == 400
    assert registrar.location.get("201") == before


def test_expires_zero_on_one_contact_removes_only_that_one(registrar):
    phone = Phone("201")
    register(registrar, phone, contacts=["<sip:a@192.0.2.10>", "<sip:b@192.0.2.10>"])
    response = register(registrar, phone, contacts=["<sip:a@192.0.2.10>;expires=0"])
    assert response.status == 200
    assert contact_expiries(response) == {"sip:b@192.0.2.10": 3600}
    assert contacts_of(registrar, "201") == {"sip:b@192.0.2.10"}


def test_expires_zero_header_removes_the_listed_contact(registrar):
    phone = Phone("201")
    register(registrar, phone)
    response = register(registrar, phone, expires=0)
    assert response.status == 200 and response.contacts == []
    assert len(registrar.location) == 0


@pytest.mark.parametrize("offset", [0, -1])
def test_same_call_id_with_old_cseq_is_500_and_changes_nothing(registrar, offset):
    phone = Phone("201")
    register(registrar, phone, expires=600)
    accepted = phone.cseq
    before = registrar.location.get("201")
    for request in (
        phone.register(cseq=accepted + offset, expires=3600),
        phone.register(cseq=accepted + offset, contacts=["*"], expires=0),
        phone.register(cseq=accepted + offset, expires=0),
    ):
        response = send(registrar, request, now=NOW + 10)
        assert (response.status, response.reason.startswith("Server Internal Error")) == (500, True)
    assert registrar.location.get("201") == before


def test_new_call_id_replaces_the_binding(registrar):
    """A phone that rebooted starts a new Call-ID at a low CSeq: that is no reordering."""
    old = Phone("201", cseq=40)
    register(registrar, old)
    rebooted = Phone("201")
    assert rebooted.call_id != old.call_id
    response = register(registrar, rebooted, now=NOW + 5, expires=600)
    assert response.status == 200
    [binding] = registrar.location.get("201")
    assert (binding.call_id, binding.cseq) == (rebooted.call_id, 2)
    assert binding.expires_at == NOW + 605


def test_max_contacts_per_extension():
    registrar = make_registrar(max_contacts=2)
    phone = Phone("201")
    three = ["<sip:a@192.0.2.10>", "<sip:b@192.0.2.10>", "<sip:c@192.0.2.10>"]
    assert register(registrar, phone, contacts=three).status == 403
    assert len(registrar.location) == 0
    assert register(registrar, phone, contacts=three[:2]).status == 200
    before = registrar.location.get("201")
    response = register(registrar, phone, contacts=three[2:])
    assert response.status == 403 and "at most 2" in response.reason
    assert registrar.location.get("201") == before
    assert registrar.stats.refused == 2  # counted, so that `status` shows it
    # At the limit, refreshing and replacing one (remove + add in one request) still work.
    assert register(registrar, phone, contacts=three[:1]).status == 200
    response = register(registrar, phone, contacts=["<sip:a@192.0.2.10>;expires=0", three[2]])
    assert response.status == 200
    assert contacts_of(registrar, "201") == {"sip:b@192.0.2.10", "sip:c@192.0.2.10"}


def test_malformed_contact_expires_is_400(registrar):
    phone = Phone("201")
    phone.learn(send(registrar, phone.register()))
    request = phone.register()
    # The transport's validation refuses this before us; a caller that skipped it still gets
    # a 400, not an exception. Digest does not cover Contact, so the credentials stay valid.
    request.headers.set("Contact", "<sip:a@192.0.2.10>;expires=soon")
    response = send(registrar, request)
    assert response.status == 400
    assert len(registrar.location) == 0


# -- brute force, replays, stale nonces ---------------------------------------------------------


def fail_password(registrar: Registrar, origin: Origin, now: float = NOW) -> SipResponse | None:
    guesser = Phone("201", password="guess")
    first = registrar.handle_register(guesser.register(), origin, now)
    if first is None:
        return None
    guesser.learn(first)
    return registrar.handle_register(guesser.register(), origin, now)


def test_five_bad_passwords_block_that_source_only(registrar):
    for _ in range(4):
        response = fail_password(registrar, ATTACKER)
        assert response is not None and response.status == 401
    assert not registrar.blocked(ATTACKER.ip, NOW)
    response = fail_password(registrar, ATTACKER)  # the fifth
    assert response is not None and response.status == 401
    assert registrar.blocked(ATTACKER.ip, NOW)
    # From then on even a right password from there is dropped unanswered.
    assert registrar.handle_register(Phone("201").register(), ATTACKER, NOW + 1) is None
    assert registrar.stats.blocked_drops == 1 and registrar.stats.blocked_sources == 1
    # The real phone, at another address (even another port of another IP), still registers.
    assert register(registrar, Phone("201"), origin=PHONE, now=NOW + 2).status == 200
    assert registrar.location.find("201", Phone("201").contact or "") is not None


def test_missing_credentials_do_not_count_as_failures(registrar):
    for _ in range(20):
        assert send(registrar, Phone("201").register(), ATTACKER).status == 401
    assert not registrar.blocked(ATTACKER.ip, NOW)
    assert registrar.stats.auth_failures == 0


def test_successes_do_not_wipe_the_failures_of_an_address(registrar):
    """An insider with one account must not guess the others' passwords forever by
    registering its own extension between guesses."""
    insider = Phone("201")
    for round_ in range(3):
        guesser = Phone("202", password=f"guess-{round_}")
        guesser.learn(send(registrar, guesser.register(), ATTACKER))
        for _ in range(2):
            response = registrar.handle_register(guesser.register(), ATTACKER, NOW)
            if response is None:
                break
            assert response.status == 401
        if registrar.blocked(ATTACKER.ip, NOW):
            break
        assert register(registrar, insider, origin=ATTACKER).status == 200
    assert registrar.blocked(ATTACKER.ip, NOW)
    assert registrar.stats.auth_failures == 5


def test_failures_are_forgotten_after_block_seconds():
    registrar = make_registrar(policy=RegistrarPolicy(block_seconds=60))
    for minute in range(10):
        for _ in range(4):
            fail_password(registrar, PHONE, NOW + minute * 61)
    assert not registrar.blocked(PHONE.ip, NOW + 9 * 61)
    assert register(registrar, Phone("201"), now=NOW + 9 * 61).status == 200


def test_block_lifts_after_block_seconds():
    registrar = make_registrar(policy=RegistrarPolicy(block_seconds=60))
    for _ in range(5):
        fail_password(registrar, ATTACKER)
    assert registrar.handle_register(Phone("201").register(), ATTACKER, NOW + 59) is None
    assert register(registrar, Phone("201"), origin=ATTACKER, now=NOW + 61).status == 200


def test_replayed_authorization_is_refused(registrar):
    phone = Phone("201")
    register(registrar, phone, expires=600)
    accepted = registrar.location.get("201")
    assert phone.challenge is not None
    # An eavesdropper replays the phone's Authorization (same nonce, same nc), with its own
    # contact: Digest does not cover Contact, only the nonce count stops this.
    authorization = answer_challenge(
        phone.challenge,
        method="REGISTER",
        uri=f"sip:{DOMAIN}",
        username="201",
        password="secret-201",
        cnonce=phone.cnonce,
        nc=phone.nc,
    )
    replay = parse_request(
        register_bytes(
            ext="201",
            contacts=["<sip:evil@198.51.100.66>"],
            call_id="evil@attacker",
            cseq=99,
            authorization=authorization,
        )
    )
    response = send(registrar, replay, ATTACKER, NOW + 10)
    assert response.status == 401
    assert registrar.location.get("201") == accepted
    # The very same request again (a late duplicate) is refused too, without a refresh.
    same = phone.register(cseq=phone.cseq + 1, nc=phone.nc, expires=600)
    assert send(registrar, same, PHONE, NOW + 20).status == 401
    assert registrar.location.get("201") == accepted


def test_stale_nonce_gets_stale_true_and_a_retry_works():
    registrar = make_registrar(nonce_lifetime=300)
    phone = Phone("201")
    assert register(registrar, phone).status == 200
    old_challenge = phone.challenge
    response = send(registrar, phone.register(), now=NOW + 400)
    assert response.status == 401
    [challenge] = challenges_of(response)
    assert challenge.stale
    assert registrar.stats.auth_failures == 0  # a right password with an old nonce is no failure
    phone.learn(response)
    assert phone.challenge != old_challenge
    response = send(registrar, phone.register(), now=NOW + 400)
    assert response.status == 200
    [binding] = registrar.location.get("201")
    assert binding.expires_at == NOW + 400 + 3600


def test_credentials_for_another_realm_are_challenged_not_counted(registrar):
    phone = Phone("201")
    phone.learn(send(registrar, phone.register()))
    assert phone.challenge is not None
    phone.challenge = replace(phone.challenge, realm="elsewhere")
    for _ in range(10):
        assert send(registrar, phone.register(), ATTACKER).status == 401
    assert not registrar.blocked(ATTACKER.ip, NOW)


# -- a model of the location table under random operations --------------------------------------

CONTACTS = ("sip:201@192.0.2.10:5062", "sip:201@192.0.2.11:5062", "sip:201@192.0.2.12:5062")
EXTS = ("201", "202")
EXPIRES = (None, 0, 30, 60, 600, 5000)


class RegistrarModel(RuleBasedStateMachine):
    """Random register / refresh / unregister / reboot / expire operations, compared with a
    dictionary of {ext: {contact: expires_at}} that says what RFC 3261 §10.3 leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.registrar = make_registrar(max_contacts=2)
        self.now = NOW
        self.phones = {ext: Phone(ext) for ext in EXTS}
        self.model: dict[str, dict[str, float]] = {}
        self.announced: dict[str, set[str]] = {}
        self.registrar.location.add_listener(self.listen)

    def listen(self, ext: str, bindings: list[Binding]) -> None:
        self.announced[ext] = {b.contact for b in bindings}

    def contact(self, ext: str, index: int) -> str:
        return CONTACTS[index].replace("201", ext)

    def expect(self, ext: str, contacts: dict[str, int | None]) -> int:
        """The status RFC 3261 §10.3 gives, and the model updated accordingly."""
        policy = self.registrar.policy
        current = dict(self.model.get(ext, {}))
        for contact, expires in contacts.items():
            seconds = policy.default_expires if expires is None else expires
            if seconds == 0:
                current.pop(contact, None)
            elif seconds < policy.min_expires:
                return 423
            else:
                current[contact] = self.now + min(seconds, policy.max_expires)
        if len(current) > self.registrar.location.max_contacts:
            return 403
        if current:
            self.model[ext] = current
        else:
            self.model.pop(ext, None)
        return 200

    def do(self, ext: str, **kwargs: Any) -> SipResponse:
        return register(self.registrar, self.phones[ext], now=self.now, **kwargs)

    @rule(
        ext=st.sampled_from(EXTS),
        indexes=st.sets(st.integers(0, 2), min_size=1, max_size=3),
        expires=st.sampled_from(EXPIRES),
        param=st.booleans(),
    )
    def register_contacts(self, ext, indexes, expires, param):
        contacts = [self.contact(ext, i) for i in sorted(indexes)]
        if param and expires is not None:
            values = [f"<{c}>;expires={expires}" for c in contacts]
            response = self.do(ext, contacts=values)
        else:
            response = self.do(ext, contacts=[f"<{c}>" for c in contacts], expires=expires)
        assert response.status == self.expect(ext, dict.fromkeys(contacts, expires))
        if response.status == 200:
            assert set(contact_expiries(response)) == set(self.model.get(ext, {}))

    @rule(ext=st.sampled_from(EXTS))
    def fetch(self, ext):
        response = self.do(ext, contacts=[])
        assert response.status == 200
        expiries = contact_expiries(response)
        assert expiries == {
            c: max(0, int(at - self.now + 0.5)) for c, at in self.model.get(ext, {}).items()
        }

    @rule(ext=st.sampled_from(EXTS))
    def unregister_all(self, ext):
        response = self.do(ext, contacts=["*"], expires=0)
        assert response.status == 200
        self.model.pop(ext, None)

    @rule(ext=st.sampled_from(EXTS))
    def reboot(self, ext):
        self.phones[ext] = Phone(ext)

    @rule(ext=st.sampled_from(EXTS), older=st.integers(0, 3), star=st.booleans())
    def replay_old_cseq(self, ext, older, star):
        phone = self.phones[ext]
        contact = self.contact(ext, 0)
        binding = self.registrar.location.find(ext, contact)
        if binding is None or binding.call_id != phone.call_id:
            return
        # RFC 3261 §10.3 step 7: not newer than the binding's CSeq of this Call-ID: refused.
        latest = phone.cseq
        before = self.registrar.location.all()
        contacts = ["*"] if star else [f"<{contact}>"]
        cseq = max(1, binding.cseq - older)
        for _ in range(2):
            request = phone.register(cseq=cseq, contacts=contacts, expires=0)
            response = send(self.registrar, request, now=self.now)
            if response.status != 401:
                break
            phone.learn(response)  # the nonce went stale: answered first, as a phone would
        assert response.status == 500
        assert self.registrar.location.all() == before
        phone.cseq = latest

    @rule(seconds=st.sampled_from([1, 59, 60, 300, 599, 601, 3600, 4000]))
    def advance(self, seconds):
        self.now += seconds
        gone = self.registrar.location.expire(self.now)
        expected = {
            (e, c) for e, cs in self.model.items() for c, at in cs.items() if at <= self.now
        }
        assert {(b.ext, b.contact) for b in gone} == expected
        for ext in list(self.model):
            self.model[ext] = {c: at for c, at in self.model[ext].items() if at > self.now}
            if not self.model[ext]:
                del self.model[ext]

    @invariant()
    def location_matches_the_model(self):
        location = self.registrar.location
        actual = {ext: {b.contact: b.expires_at for b in location.get(ext)} for ext in EXTS}
        assert {ext: v for ext, v in actual.items() if v} == self.model
        assert location.extensions() == sorted(self.model)
        assert len(location) == sum(len(v) for v in self.model.values())
        for ext, contacts in self.announced.items():
            assert contacts == set(self.model.get(ext, {}))


TestRegistrarModel = RegistrarModel.TestCase
TestRegistrarModel.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- any REGISTER the transport lets through ----------------------------------------------------

URIS = (f"sip:{DOMAIN}", f"sips:{DOMAIN}", f"sip:{DOMAIN};transport=tcp", "sip:paris.example.com",
        f"sip:201@{DOMAIN}", "tel:+33123456789")  # fmt: skip
CONTACT_VALUES = (
    "*",
    "<sip:201@192.0.2.10:5062>",
    "<sip:201@192.0.2.10:5062>;expires=0",
    "<sip:201@192.0.2.11>;expires=4294967295;q=0.5",
    "<sip:201@192.0.2.12>;expires=30",
    "sip:201@192.0.2.13;expires=120",
    '"Desk" <sips:201@phone.lan;transport=tls>;q=1.0;+sip.instance="<urn:uuid:1>"',
    "<sip:201@192.0.2.10:5062>, <sip:201@192.0.2.14>;expires=600",
    "<tel:+331234>",
    "<sip:201@[2001:db8::1]:5060>;reg-id=1",
)
AUTHORIZATIONS = st.one_of(
    st.none(),
    st.sampled_from(["valid"] * 4 + ["valid-other-user"]),
    st.sampled_from(["Digest", "Basic YWxhZGRpbjpvcGVu", 'Digest username="201"', "Digest ,,,"]),
    st.text(max_size=60).map(lambda t: "Digest " + t),
)


@settings(max_examples=500, deadline=None)
@given(
    uri=st.sampled_from((URIS[0],) * 4 + URIS),
    to_user=st.sampled_from([None, None, None, "201", "202", "299"]),
    contacts=st.lists(st.sampled_from(CONTACT_VALUES), max_size=3),
    expires=st.one_of(st.none(), st.sampled_from([0, 1, 59, 60, 3600, 3601, 2**32 - 1])),
    require=st.sampled_from([None, None, None, "path", "outbound", "foo", "path, 100rel"]),
    authorization=AUTHORIZATIONS,
    cseq=st.sampled_from([1, 2, 3, 2**31]),
    preload=st.booleans(),
)
def test_any_register_gets_a_consistent_answer(
    uri, to_user, contacts, expires, require, authorization, cseq, preload
):
    registrar = make_registrar(max_contacts=3)
    if preload:
        # The same Call-ID as the request below (CSeq 2 when accepted): old CSeqs get 500.
        preloaded = Phone("201", call_id="call-1@phone")
        register(registrar, preloaded, contacts=["<sip:201@192.0.2.10:5062>"])
    if authorization in ("valid", "valid-other-user"):
        phone = Phone("201" if authorization == "valid" else "202")
        phone.learn(send(registrar, phone.register()))
        assert phone.challenge is not None
        authorization = answer_challenge(
            phone.challenge,
            method="REGISTER",
            uri=uri,
            username=phone.ext,
            password=phone.password or "",
            cnonce="c",
            nc=1,
        )
    data = register_bytes(
        ext="201",
        request_uri=uri,
        to_user=to_user,
        contacts=contacts,
        expires=expires,
        cseq=cseq,
        authorization=authorization,
        extra=[("Require", require)] if require else [],
    )
    try:
        request = parse_request(data)
    except SipParseError:
        return  # the transport answers these itself (400)
    before = registrar.location.all()
    heard: list[str] = []
    registrar.location.add_listener(lambda ext, bindings: heard.append(ext))
    response = registrar.handle_register(request, PHONE, NOW)
    assert response is not None  # never blocked here: at most one failure
    event(f"status {response.status}")
    assert response.status in {200, 400, 401, 403, 420, 423, 500}
    assert response.call_id == request.call_id and response.cseq == request.cseq
    assert response.to_tag is not None
    if response.status != 200:
        assert registrar.location.all() == before and heard == []
        return
    ext = to_user or "201"
    assert set(heard) <= {ext}
    listed = contact_expiries(response)
    assert set(listed) == {b.contact for b in registrar.location.get(ext)}
    assert all(v is not None and 0 < v <= 3600 for v in listed.values())
    assert len(registrar.location.get(ext)) <= 3
    assert all(b.ext == ext or b in before for b in registrar.location.all())


def test_the_date_of_a_200_is_the_time_of_the_request(registrar):
    # RFC 3261 §10.3 step 8 / §20.17: phones without a clock set theirs from it.
    dates = []
    for when in (NOW, NOW + 0.5, NOW + 61.25):
        response = register(registrar, Phone("201"), now=when)
        dates.append(response.headers.get("Date"))
    assert dates[0] == dates[1] == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert dates[2] == "Tue, 14 Nov 2023 22:14:21 GMT"
