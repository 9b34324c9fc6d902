"""Helpers for the host tests: free loopback ports, the two CLIs as subprocesses, read-only paths.

The CLI tests run `python -m mainhost` / `python -m remotehost` as real subprocesses (what an
operator types), each with its own `--data` under the test's tmp_path and loopback ports found by
binding port 0 and closing the socket again.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from mainhost import pki
from mainhost.config import (
    ADMIN_KEY,
    ApiConfig,
    MainHostConfig,
    StunConfig,
    TrunkConfig,
)
from mainhost.store import DB_NAME as MAIN_DB
from mainhost.store import MainStore
from remotehost.config import CA_NAME, SECRET_NAME, RemoteHostConfig
from remotehost.config import SipConfig as RemoteSipConfig
from remotehost.config import StunConfig as RemoteStunConfig
from remotehost.config import TrunkConfig as RemoteTrunkConfig
from remotehost.uplink import client_ssl_context
from shared.aio.trunk import TrunkConnection
from shared.token import JoinToken
from shared.wire.frame import FrameDecoder
from shared.wire.messages import Message, UnknownMessage, decode_message_untrusted
from shared.wire.session import Closed, Event, LoggedIn, LoginRejected, TrunkSession

LOOPBACK = "127.0.0.1"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nobody uses right now (bound to port 0, read back, closed)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def free_udp_pair() -> tuple[int, int]:
    """Two free UDP ports (STUN needs a primary and an alternate port)."""
    first = free_port(socket.SOCK_DGRAM)
    second = free_port(socket.SOCK_DGRAM)
    while second == first:
        second = free_port(socket.SOCK_DGRAM)
    return first, second


@dataclass(frozen=True)
class Ports:
    trunk: int
    stun: int
    stun_alternate: int
    api: int


def free_ports() -> Ports:
    stun, alternate = free_udp_pair()
    trunk = free_port()
    api = free_port()
    while api == trunk:
        api = free_port()
    return Ports(trunk, stun, alternate, api)


def run(program: str, *args: str | Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m program args...` and capture its output (never raises on failure)."""
    env = dict(os.environ)
    env.pop("BRANCHPBX_MAINHOST_DATA", None)
    env.pop("BRANCHPBX_REMOTEHOST_DATA", None)
    env["COLUMNS"] = "200"  # rich wraps long lines to the terminal width
    return subprocess.run(
        [sys.executable, "-m", program, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def mainhost(*args: str | Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return run("mainhost", *args, timeout=timeout)


def remotehost(*args: str | Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return run("remotehost", *args, timeout=timeout)


def init_args(data: Path, ports: Ports) -> list[str | Path]:
    return [
        "init",
        "--data",
        data,
        "--public-address",
        LOOPBACK,
        "--listen",
        LOOPBACK,
        "--trunk-port",
        str(ports.trunk),
        "--stun-port",
        str(ports.stun),
        "--stun-alternate-port",
        str(ports.stun_alternate),
        "--api-port",
        str(ports.api),
        "--media-port",
        "0",
    ]


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The operator-error contract: non-zero exit, ONE line on stderr, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    for needle in needles:
        assert needle in line, line
    return line


@contextlib.contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    """Make `paths` unwritable even for root (chattr +i), or skip the test if we cannot."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(0o500 if p.is_dir() else 0o400)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("root without chattr: cannot make a path unwritable")
    done: list[Path] = []
    try:
        for p in paths:
            if subprocess.run([chattr, "+i", str(p)], capture_output=True).returncode != 0:
                pytest.skip(f"chattr +i does not work on {p}'s file system")
            done.append(p)
        yield
    finally:
        for p in done:
            subprocess.run([chattr, "-i", str(p)], capture_output=True)


# --- in-process hosts on loopback (trio) ---------------------------------------------------

GUARD = 20.0  # seconds: a hang guard for one wait, never a timing assertion


def make_mainhost_data(
    data: Path, *, free_login_failures: int = 2, heartbeat: float = 1.0, dead_after: float = 4.0
) -> MainHostConfig:
    """A main host data directory (CA, certificate, admin key, empty store) and its config.

    The config listens on loopback port 0 with STUN and the web API off, so several tests can run
    at once; read the trunk port from what `MainHost.serve` reports.
    """
    data.mkdir(mode=0o700, parents=True)
    pki.create(data, LOOPBACK)
    (data / ADMIN_KEY).write_text(secrets.token_urlsafe(32) + "\n")
    MainStore(data / MAIN_DB).close()
    return MainHostConfig(
        public_address=LOOPBACK,
        media_port=0,  # never a fixed port on a shared loopback
        trunk=TrunkConfig(
            listen=LOOPBACK,
            port=0,
            heartbeat_interval=heartbeat,
            dead_after=dead_after,
            login_failures_before_delay=free_login_failures,
        ),
        stun=StunConfig(enabled=False),
        api=ApiConfig(enabled=False),
    )


def trunk_port(addresses: dict[str, Any]) -> int:
    """The port out of the 'trunk' entry that `MainHost.serve` reports ("ip:port/tcp")."""
    text: str = addresses["trunk"]
    return int(text.rsplit(":", 1)[1].split("/", 1)[0])


def token_for(data: Path, port: int, office: str, secret: bytes) -> JoinToken:
    return JoinToken(LOOPBACK, port, office, secret, pki.fingerprint(pki.ca_der(data)))


def make_remotehost_data(
    data: Path, token: JoinToken, ca_der: bytes, *, stun_port: int | None = None
) -> RemoteHostConfig:
    """What `remotehost join` writes, from a checked token; STUN aimed at a closed loopback port."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = x509.load_der_x509_certificate(ca_der).public_bytes(serialization.Encoding.PEM)
    (data / CA_NAME).write_bytes(pem)
    (data / SECRET_NAME).write_bytes(token.secret)
    return RemoteHostConfig(
        office=token.office,
        trunk=RemoteTrunkConfig(
            main_host=token.host, port=token.port, connect_timeout=5.0, backoff_max=0.5
        ),
        stun=RemoteStunConfig(
            server=LOOPBACK,
            port=stun_port or free_port(socket.SOCK_DGRAM),
            probe_timeout=1.0,
            keepalive_interval=1.0,
        ),
        sip=RemoteSipConfig(listen=LOOPBACK, port=0),
    )


async def wait_until(predicate: Callable[[], bool], guard: float = GUARD) -> None:
    """Poll `predicate` until true; fail (TooSlowError) after `guard` seconds."""
    with trio.fail_after(guard):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)


async def open_tls(port: int, ca_pem: str | None = None) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection to the trunk (verified against `ca_pem` when given)."""
    with trio.fail_after(GUARD):
        stream = await trio.open_ssl_over_tcp_stream(
            LOOPBACK, port, ssl_context=client_ssl_context(ca_pem), https_compatible=True
        )
        await stream.do_handshake()
    return stream


async def login(
    port: int, office: str, secret: bytes, *, ca_der: bytes | None = None, version: int = 0
) -> tuple[TrunkConnection, Event]:
    """Dial and log in as `office` with our own session; return the connection and the verdict.

    The verdict is the first LoggedIn, LoginRejected or Closed event.
    """
    stream = await open_tls(port)
    session = TrunkSession.client(
        trio.current_time(),
        office=office,
        secret=secret,
        client_nonce=secrets.token_bytes(32),
        software="branchpbx-test/0",
        ca_sha256=None if ca_der is None else pki.fingerprint(ca_der),
        directory_version=version,
        boot_id="test",
    )
    conn = TrunkConnection(stream, session)
    with trio.fail_after(GUARD):
        while True:
            event = await conn.next_event()
            if isinstance(event, LoggedIn | LoginRejected | Closed):
                return conn, event


class RawTrunkClient:
    """Bytes straight onto a TLS (or plain TCP) stream, frames read back without a session."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.eof = False

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_message(self) -> Message | UnknownMessage | None:
        """The next frame, decoded; None when the server closed the connection."""
        with trio.fail_after(GUARD):
            while True:
                frame = self.decoder.next_frame_untrusted()
                if frame is not None:
                    return decode_message_untrusted(frame)
                if self.eof:
                    return None
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self.eof = True
                self.decoder.feed(bytes(data))

    async def until_closed(self) -> list[Message | UnknownMessage]:
        """Every message up to the end of the connection."""
        out: list[Message | UnknownMessage] = []
        while (msg := await self.next_message()) is not None:
            out.append(msg)
        return out
