"""Join tokens: everything a remote host needs to find and trust its main host, in one line.

A token is `bpx1-` followed by base64url (no padding) of a msgpack map and a CRC-32 of that map,
so that a token damaged in copy and paste is refused with a clear message instead of failing
later with a confusing login error. It carries the main host's address and trunk port, the office
name, the office secret, and the SHA-256 fingerprint of the main host's CA certificate, which the
remote host pins.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass

import msgpack

PREFIX = "bpx1-"


class TokenError(Exception):
    """The token is not one `mainhost office add` printed (or it was damaged)."""


@dataclass(frozen=True)
class JoinToken:
    host: str
    port: int
    office: str
    secret: bytes
    ca_sha256: bytes

    def encode(self) -> str:
        body = msgpack.packb(
            {
                "h": self.host,
                "p": self.port,
                "o": self.office,
                "s": self.secret,
                "f": self.ca_sha256,
            },
            use_bin_type=True,
        )
        crc = zlib.crc32(body).to_bytes(4, "big")
        return PREFIX + base64.urlsafe_b64encode(body + crc).decode().rstrip("=")


def decode_token_untrusted(text: str) -> JoinToken:
    text = text.strip()
    if not text.startswith(PREFIX):
        raise TokenError(f"a join token starts with '{PREFIX}' (got {text[:8]!r}...)")
    payload = text[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("the join token is not valid base64url: was it copied whole?") from None
    # The decoder skips characters outside the alphabet and the unused bits of the last one, so
    # a changed last character or a stray character would pass: only the canonical form is ours.
    canonical = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    if (
        len(raw) < 5
        or canonical != payload.rstrip("=")
        or zlib.crc32(raw[:-4]).to_bytes(4, "big") != raw[-4:]
    ):
        raise TokenError("the join token is damaged (checksum mismatch): copy it again whole")
    try:
        fields = msgpack.unpackb(raw[:-4], raw=False)
    except Exception:  # any msgpack failure means a damaged token
        raise TokenError("the join token's content is damaged") from None
    if not isinstance(fields, dict):
        raise TokenError("the join token's content is damaged")
    host, port, office = fields.get("h"), fields.get("p"), fields.get("o")
    secret, fingerprint = fields.get("s"), fields.get("f")
    if not (isinstance(host, str) and host):
        raise TokenError("the join token has no main host address")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise TokenError("the join token has no valid port")
    if not (isinstance(office, str) and office):
        raise TokenError("the join token has no office name")
    if not (isinstance(secret, bytes) and len(secret) >= 16):
        raise TokenError("the join token's secret is missing or too short")
    if not (isinstance(fingerprint, bytes) and len(fingerprint) == 32):
        raise TokenError("the join token's CA fingerprint is missing")
    return JoinToken(host, port, office, secret, fingerprint)
