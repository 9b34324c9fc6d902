"""Helpers for the host tests: free loopback ports, the two CLIs as subprocesses, read-only paths.

The CLI tests run `python -m mainhost` / `python -m remotehost` as real subprocesses (what an
operator types), each with its own `--data` under the test's tmp_path and loopback ports found by
binding port 0 and closing the socket again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

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
