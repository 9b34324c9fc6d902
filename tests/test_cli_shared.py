"""What the three programs' command lines share (shared/cli.py)."""

from __future__ import annotations

import stat
from pathlib import Path

from shared.cli import ago, make_private_dir, write_private


def test_a_data_directory_is_private_even_when_it_existed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    make_private_dir(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    fresh = tmp_path / "a" / "b"
    make_private_dir(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


def test_secrets_are_written_private_even_over_a_readable_file(tmp_path: Path) -> None:
    secret = tmp_path / "office.secret"
    secret.write_bytes(b"old")
    secret.chmod(0o644)
    write_private(secret, b"new secret")
    assert secret.read_bytes() == b"new secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_ago_reads_like_a_person_would_say_it() -> None:
    assert ago(None, 100.0) == "never"
    assert ago(99.5, 100.0) == "now"
    assert ago(40.0, 100.0) == "60 s ago"
    assert ago(100.0 - 600, 100.0) == "10 min ago"
