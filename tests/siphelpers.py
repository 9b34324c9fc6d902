"""Test helpers for the registrar side of SIP: REGISTER requests, a phone that answers digest
challenges with `answer_challenge`, a mirror-like credential lookup, OPTIONS answers.

Requests are built as bytes and parsed back with the real parser, so the registrar and the
service see exactly what they would see from the network.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from shared.sip.digest import (
    Challenge,
    answer_challenge,
    ha1,
    parse_challenge_untrusted,
    select_challenge,
)
from shared.sip.message import (
    SipRequest,
    SipResponse,
    make_response,
    parse_message_untrusted,
    validate_request_untrusted,
)

DOMAIN = "lyon.example.com"
REALM = "lyon.example.com"
PASSWORDS = {"201": "secret-201", "202": "secret-202", "203": "secret-203"}

LookupHa1 = Callable[[str, str], str | None]


def directory(passwords: dict[str, str] = PASSWORDS, realm: str = REALM) -> LookupHa1:
    """A `lookup_ha1` like `DirectoryMirror.lookup_ha1`: stored HA1s only, None if unknown."""
    table = {
        (ext, algorithm): ha1(algorithm, ext, realm, password)
        for ext, password in passwords.items()
        for algorithm in ("MD5", "SHA-256")
    }
    return lambda ext, algorithm: table.get((ext, algorithm))


def register_bytes(
    *,
    ext: str,
    contacts: Sequence[str] = (),
    domain: str = DOMAIN,
    request_uri: str | None = None,
    to_user: str | None = None,
    call_id: str = "call-1@phone",
    cseq: int = 1,
    branch: str | None = None,
    via: str = "SIP/2.0/UDP 127.0.0.1:5062",
    expires: int | None = None,
    authorization: str | None = None,
    extra: Iterable[tuple[str, str]] = (),
) -> bytes:
    """A REGISTER as a phone sends it. `contacts` are whole Contact values (`<sip:...>;q=1`)."""
    lines = [
        f"REGISTER {request_uri or 'sip:' + domain} SIP/2.0",
        f"Via: {via};branch={branch or new_branch()};rport",
        "Max-Forwards: 70",
        f"From: <sip:{ext}@{domain}>;tag={secrets.token_hex(4)}",
        f"To: <sip:{to_user or ext}@{domain}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        "User-Agent: siphelpers-phone/1.0",
    ]
    lines += [f"Contact: {contact}" for contact in contacts]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    lines += [f"{name}: {value}" for name, value in extra]
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def request_bytes(
    method: str,
    *,
    via: str = "SIP/2.0/UDP 127.0.0.1:5062",
    branch: str | None = None,
    uri: str = f"sip:{DOMAIN}",
    call_id: str | None = None,
    cseq: int = 1,
    extra: Iterable[tuple[str, str]] = (),
) -> bytes:
    """Any other request from a phone (OPTIONS, INVITE, ACK, unknown methods)."""
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: {via};branch={branch or new_branch()};rport",
        "Max-Forwards: 70",
        f"From: <sip:201@{DOMAIN}>;tag={secrets.token_hex(4)}",
        f"To: <{uri}>",
        f"Call-ID: {call_id or secrets.token_hex(8)}",
        f"CSeq: {cseq} {method}",
    ]
    lines += [f"{name}: {value}" for name, value in extra]
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_request(data: bytes) -> SipRequest:
    """Parse and validate as the transport would (Require is left to the registrar)."""
    request = parse_message_untrusted(data)
    assert isinstance(request, SipRequest)
    validate_request_untrusted(request, supported_extensions=request.option_tags("Require"))
    return request


def parse_response(data: bytes) -> SipResponse:
    response = parse_message_untrusted(data)
    assert isinstance(response, SipResponse), data
    return response


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


def contact_expiries(response: SipResponse) -> dict[str, int | None]:
    """The Contact URIs of a 200 to REGISTER and their `expires` parameters."""
    return {str(c.uri): c.expires for c in response.contacts}


def challenges_of(response: SipResponse) -> list[Challenge]:
    return [parse_challenge_untrusted(v) for v in response.headers.get_all("WWW-Authenticate")]


@dataclass
class Phone:
    """A SIP phone's registration side: one Call-ID, increasing CSeq, answers challenges.

    `username` / `password` are what it authenticates with (by default its extension's own);
    `ext` is what it registers (the To user).
    """

    ext: str
    password: str | None = None
    username: str | None = None
    contact: str | None = None
    host: str = "127.0.0.1"
    port: int = 5062
    transport: str = "UDP"
    domain: str = DOMAIN
    call_id: str = field(default_factory=lambda: secrets.token_hex(8) + "@phone")
    cseq: int = 0
    challenge: Challenge | None = None
    nc: int = 0
    cnonce: str = field(default_factory=lambda: secrets.token_hex(8))

    def __post_init__(self) -> None:
        if self.password is None:
            self.password = PASSWORDS.get(self.ext, "no-such-password")
        if self.username is None:
            self.username = self.ext
        if self.contact is None:
            self.contact = f"sip:{self.ext}@{self.host}:{self.port}"

    def register(
        self,
        *,
        contacts: Sequence[str] | None = None,
        expires: int | None = None,
        nc: int | None = None,
        cseq: int | None = None,
        extra: Iterable[tuple[str, str]] = (),
        to_user: str | None = None,
        request_uri: str | None = None,
    ) -> SipRequest:
        """The next REGISTER (CSeq + 1), answering the last challenge if there is one.

        `contacts` defaults to the phone's own contact; `nc` forces a nonce count (replays).
        """
        self.cseq = self.cseq + 1 if cseq is None else cseq
        uri = request_uri or f"sip:{self.domain}"
        authorization = None
        if self.challenge is not None:
            self.nc = self.nc + 1 if nc is None else nc
            assert self.username is not None and self.password is not None
            authorization = answer_challenge(
                self.challenge,
                method="REGISTER",
                uri=uri,
                username=self.username,
                password=self.password,
                cnonce=self.cnonce,
                nc=self.nc,
            )
        return parse_request(
            register_bytes(
                ext=self.ext,
                contacts=[f"<{self.contact}>"] if contacts is None else contacts,
                domain=self.domain,
                request_uri=uri,
                to_user=to_user,
                call_id=self.call_id,
                cseq=self.cseq,
                via=f"SIP/2.0/{self.transport} {self.host}:{self.port}",
                expires=expires,
                authorization=authorization,
                extra=extra,
            )
        )

    def learn(self, response: SipResponse) -> Challenge:
        """Take the challenge of a 401 for the next requests (a new nonce restarts nc)."""
        assert response.status == 401, response.start_line
        challenge = select_challenge(challenges_of(response))
        assert challenge is not None
        self.challenge = challenge
        self.nc = 0
        self.cnonce = secrets.token_hex(8)
        return challenge


def options_answer(data: bytes, status: int = 200) -> bytes:
    """A UA's answer to an OPTIONS it received: Via, From, To, Call-ID, CSeq echoed."""
    request = parse_message_untrusted(data)
    assert isinstance(request, SipRequest) and request.method == "OPTIONS", data
    return make_response(request, status, to_tag=secrets.token_hex(4)).encode()
