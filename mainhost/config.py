"""The main host's settings (`DATA/mainhost.toml`), typed and frozen.

Each field's doc string is written into the file as a comment by `mainhost init`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared import config as cfg
from shared.config import check_ip, check_port, check_positive

CONFIG_NAME = "mainhost.toml"
ADMIN_KEY = "admin.key"


@dataclass(frozen=True)
class TrunkConfig:
    listen: str = cfg.field("0.0.0.0", "Address the trunk (TLS over TCP) listens on.")
    port: int = cfg.field(5090, "Trunk port (TCP, TLS). Remote hosts dial out to it.")
    heartbeat_interval: float = cfg.field(1.0, "Seconds between heartbeats, both ways.")
    dead_after: float = cfg.field(
        4.0, "Seconds of silence after which a remote host is declared offline."
    )
    login_failures_before_delay: int = cfg.field(
        3, "Failed logins from one address before its answers are slowed down."
    )

    def __post_init__(self) -> None:
        check_ip("trunk.listen", self.listen)
        check_port("trunk.port", self.port)
        check_positive("trunk.heartbeat_interval", self.heartbeat_interval)
        if self.dead_after <= self.heartbeat_interval:
            raise ValueError("key 'trunk.dead_after' must be larger than trunk.heartbeat_interval")


@dataclass(frozen=True)
class StunConfig:
    enabled: bool = cfg.field(True, "Run the STUN server (RFC 5389 / RFC 3489).")
    listen: str = cfg.field("0.0.0.0", "Primary address of the STUN server.")
    port: int = cfg.field(3478, "STUN port (UDP).")
    alternate_port: int = cfg.field(3479, "Second STUN port, for RFC 3489 change requests.")
    alternate_address: str = cfg.field(
        "", "Second IP address of this machine, for RFC 3489 NAT type detection ('' = none)."
    )

    def __post_init__(self) -> None:
        check_ip("stun.listen", self.listen)
        check_port("stun.port", self.port)
        check_port("stun.alternate_port", self.alternate_port)
        if self.alternate_address:
            check_ip("stun.alternate_address", self.alternate_address)
            # RFC 3489 §11.2.3: CHANGED-ADDRESS names the other address, so both must be real.
            if self.listen in ("0.0.0.0", "::"):
                raise ValueError(
                    "key 'stun.listen' must be a specific address of this machine when"
                    " stun.alternate_address is set"
                )


@dataclass(frozen=True)
class ApiConfig:
    enabled: bool = cfg.field(True, "Serve the web page and HTTP API.")
    listen: str = cfg.field("127.0.0.1", "Address of the web page and HTTP API.")
    port: int = cfg.field(8080, "Port of the web page and HTTP API (TCP).")

    def __post_init__(self) -> None:
        check_ip("api.listen", self.listen)
        check_port("api.port", self.port)


@dataclass(frozen=True)
class SipConfig:
    realm: str = cfg.field(
        "branchpbx",
        "Digest realm of every phone. Changing it invalidates all phone passwords.",
    )

    def __post_init__(self) -> None:
        if not self.realm or '"' in self.realm:
            raise ValueError("key 'sip.realm' must be a non-empty string without quotes")


@dataclass(frozen=True)
class MainHostConfig:
    public_address: str = cfg.field(
        "", "Address remote hosts use to reach this main host (written into join tokens)."
    )
    media_port: int = cfg.field(
        5090, "Media relay port (UDP) for calls between offices (0: any free port)."
    )
    direct_media: bool = cfg.field(
        True,
        "Let offices send a call's audio to each other directly when both NATs allow it\n"
        "(hole punching, F4); the relay stays the fallback. false: always through the relay.",
    )
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    stun: StunConfig = field(default_factory=StunConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    sip: SipConfig = field(default_factory=SipConfig)

    def __post_init__(self) -> None:
        if not self.public_address:
            raise ValueError("key 'public_address' must be set (the address remote hosts dial)")
        check_port("media_port", self.media_port)


def load(data: Path) -> MainHostConfig:
    return cfg.load(MainHostConfig, data / CONFIG_NAME)
