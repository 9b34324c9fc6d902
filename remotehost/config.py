"""The remote host's settings (`DATA/remotehost.toml`), typed and frozen; written by `join`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared import config as cfg
from shared.config import check_ip, check_port, check_positive

CONFIG_NAME = "remotehost.toml"
SECRET_NAME = "office.secret"
CA_NAME = "ca.pem"


@dataclass(frozen=True)
class TrunkConfig:
    main_host: str = cfg.field("", "Address of the main host (from the join token).")
    port: int = cfg.field(5090, "The main host's trunk port (TCP, TLS).")
    connect_timeout: float = cfg.field(
        3.0, "Seconds to wait for the TCP connection and TLS handshake."
    )
    backoff_max: float = cfg.field(
        2.0, "Longest wait between reconnect attempts while an outage is short (seconds)."
    )
    backoff_max_long: float = cfg.field(
        15.0, "Longest wait between reconnect attempts after 5 minutes of outage (seconds)."
    )

    def __post_init__(self) -> None:
        if not self.main_host:
            raise ValueError("key 'trunk.main_host' must be set")
        check_port("trunk.port", self.port, allow_zero=False)
        check_positive("trunk.connect_timeout", self.connect_timeout)
        check_positive("trunk.backoff_max", self.backoff_max)
        check_positive("trunk.backoff_max_long", self.backoff_max_long)


@dataclass(frozen=True)
class StunConfig:
    server: str = cfg.field("", "STUN server ('' = the main host).")
    port: int = cfg.field(3478, "STUN server port (UDP).")
    probe_timeout: float = cfg.field(6.0, "Seconds allowed for one NAT type probe.")
    keepalive_interval: float = cfg.field(
        5.0, "Seconds between STUN binding checks that notice a new public address."
    )

    def __post_init__(self) -> None:
        check_port("stun.port", self.port, allow_zero=False)
        check_positive("stun.probe_timeout", self.probe_timeout)
        check_positive("stun.keepalive_interval", self.keepalive_interval)


@dataclass(frozen=True)
class SipConfig:
    listen: str = cfg.field("0.0.0.0", "Address the phones' SIP service listens on.")
    port: int = cfg.field(5060, "SIP port for the office's phones (UDP and TCP).")
    domains: tuple[str, ...] = cfg.field(
        (),
        "Extra SIP domains phones may register to (this box's IP addresses and the realm"
        " are always served).",
    )
    keepalive_interval: float = cfg.field(
        20.0, "Seconds between OPTIONS pings to phones registered over UDP (keeps NAT open)."
    )
    digest_algorithms: tuple[str, ...] = cfg.field(
        ("MD5",),
        "Digest algorithms offered to phones: MD5 and/or SHA-256 (RFC 8760). Many phones\n"
        "answer only the first challenge and know only MD5: add SHA-256 when all yours can.",
    )

    def __post_init__(self) -> None:
        check_ip("sip.listen", self.listen)
        check_port("sip.port", self.port)
        check_positive("sip.keepalive_interval", self.keepalive_interval)
        unknown = set(self.digest_algorithms) - {"MD5", "SHA-256"}
        if unknown or not self.digest_algorithms:
            raise ValueError(
                "key 'sip.digest_algorithms' must list MD5 and/or SHA-256, not"
                f" {list(self.digest_algorithms)}"
            )


@dataclass(frozen=True)
class CallsConfig:
    max_calls: int = cfg.field(100, "Calls at once; more are refused with 503.")
    no_answer_timeout: float = cfg.field(
        60.0, "Seconds a call may ring before the caller is told 480 No answer."
    )
    grant_timeout: float = cfg.field(
        1.0, "Seconds to wait for the main host's grant before deciding alone (F6)."
    )
    trunk_grace: float = cfg.field(
        10.0, "Seconds an answered call between offices waits for the trunk to come back."
    )

    def __post_init__(self) -> None:
        if self.max_calls < 1:
            raise ValueError(f"key 'calls.max_calls' must be at least 1, not {self.max_calls}")
        check_positive("calls.no_answer_timeout", self.no_answer_timeout)
        check_positive("calls.grant_timeout", self.grant_timeout)
        check_positive("calls.trunk_grace", self.trunk_grace)


@dataclass(frozen=True)
class RemoteHostConfig:
    office: str = cfg.field("", "This office's name on the main host.")
    trunk: TrunkConfig = field(default_factory=lambda: TrunkConfig(main_host="-"))
    stun: StunConfig = field(default_factory=StunConfig)
    sip: SipConfig = field(default_factory=SipConfig)
    calls: CallsConfig = field(default_factory=CallsConfig)

    def __post_init__(self) -> None:
        if not self.office:
            raise ValueError("key 'office' must be set")


def load(data: Path) -> RemoteHostConfig:
    return cfg.load(RemoteHostConfig, data / CONFIG_NAME)
