"""The `mainhost` command (and `remotehost join`) as an operator runs them: real subprocesses.

Each test gets its own data directory under tmp_path and free loopback ports. Every operator
mistake must end with a non-zero exit status and ONE line on stderr naming what is wrong (the
file, the key, the port, the directory), never a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shared.aio import control
from shared.token import decode_token_untrusted
from tests.hosthelpers import (
    LOOPBACK,
    Ports,
    assert_one_line_error,
    free_port,
    free_ports,
    init_args,
    mainhost,
    read_only,
    remotehost,
)

READY_GUARD = 60.0  # a hang guard for start-up, never a timing assertion


@pytest.fixture
def ports() -> Ports:
    return free_ports()


@pytest.fixture
def data(tmp_path: Path, ports: Ports) -> Path:
    """An initialised main host data directory (not running)."""
    path = tmp_path / "mainhost"
    result = mainhost(*init_args(path, ports))
    assert result.returncode == 0, result.stderr
    return path


def add_office(data: Path, name: str = "lyon", extensions: str = "2000-2099") -> str:
    result = mainhost("office", "add", name, "--extensions", extensions, "--data", data)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def disable_stun(data: Path) -> None:
    """Serve without the STUN server (its own tests live elsewhere); the trunk is what we test."""
    config = data / "mainhost.toml"
    text = config.read_text()
    new = re.sub(r"(?ms)^(\[stun\].*?^enabled = )true", r"\1false", text)
    assert new != text
    config.write_text(new)


@contextlib.contextmanager
def serving(data: Path, program: str = "mainhost") -> Iterator[subprocess.Popen[str]]:
    """`PROGRAM serve` in the background until the control socket answers; stopped by pid."""
    proc = subprocess.Popen(
        [sys.executable, "-m", program, "serve", "--data", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + READY_GUARD
        while True:
            if proc.poll() is not None:
                _out, err = proc.communicate()
                pytest.fail(f"{program} serve exited with {proc.returncode}: {err}")
            try:
                control.call(data, "status", timeout=2.0)
                break
            except control.ControlError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{program} serve did not start")
                time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


# --- init ---


def test_init_creates_config_ca_and_admin_key(tmp_path, ports):
    path = tmp_path / "mh"
    result = mainhost(*init_args(path, ports))
    assert result.returncode == 0, result.stderr
    for name in ("mainhost.toml", "ca.pem", "ca.key", "trunk.pem", "trunk.key", "admin.key"):
        assert (path / name).is_file(), name
    for secret in ("ca.key", "trunk.key", "admin.key"):
        assert (path / secret).stat().st_mode & 0o077 == 0, f"{secret} readable by others"
    assert path.stat().st_mode & 0o077 == 0
    assert len((path / "admin.key").read_text().strip()) >= 32
    config = (path / "mainhost.toml").read_text()
    assert f"port = {ports.trunk}" in config and f"port = {ports.api}" in config
    assert 'public_address = "127.0.0.1"' in config
    ca = x509.load_pem_x509_certificate((path / "ca.pem").read_bytes())
    fingerprint = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert f"sha256:{fingerprint}" in result.stdout


def test_init_refuses_a_second_time(data, ports):
    before = (data / "ca.pem").read_bytes()
    line = assert_one_line_error(mainhost(*init_args(data, ports)), str(data / "mainhost.toml"))
    assert "already" in line
    assert (data / "ca.pem").read_bytes() == before


def test_init_refuses_a_bad_port(tmp_path, ports):
    args = init_args(tmp_path / "mh", ports)
    args[args.index("--trunk-port") + 1] = "70000"
    assert_one_line_error(mainhost(*args), "trunk.port", "70000")
    assert not (tmp_path / "mh" / "mainhost.toml").exists()


def test_init_in_an_unwritable_place(tmp_path, ports):
    parent = tmp_path / "locked"
    parent.mkdir()
    with read_only(parent):
        below = mainhost(*init_args(parent / "mh", ports))
        inside = mainhost(*init_args(parent, ports))
    assert_one_line_error(below, str(parent / "mh"))
    assert_one_line_error(inside, str(parent), "not writable")
    assert list(parent.iterdir()) == []


# --- offices and tokens ---


def test_office_add_prints_a_token_as_the_last_line(data, ports):
    token = decode_token_untrusted(add_office(data, "lyon", "2000-2099"))
    assert token.office == "lyon"
    assert token.host == LOOPBACK
    assert token.port == ports.trunk
    ca = x509.load_pem_x509_certificate((data / "ca.pem").read_bytes())
    assert token.ca_sha256 == hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).digest()
    assert len(token.secret) >= 16


def test_office_token_prints_the_same_token_again(data):
    first = add_office(data)
    result = mainhost("office", "token", "lyon", "--data", data)
    assert result.returncode == 0
    assert result.stdout.strip().splitlines()[-1] == first
    assert_one_line_error(mainhost("office", "token", "nowhere", "--data", data), "nowhere")


def test_office_range_overlap_is_refused(data):
    add_office(data, "lyon", "2000-2099")
    result = mainhost("office", "add", "paris", "--extensions", "2050-2150", "--data", data)
    assert_one_line_error(result, "2050-2150", "lyon", "overlap")
    status = json.loads(mainhost("status", "--json", "--data", data).stdout)
    assert [o["name"] for o in status["offices"]] == ["lyon"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["lyon", "--extensions", "3000-3099"], "exists already"),
        (["bad name", "--extensions", "3000-3099"], "office name"),
        (["nice", "--extensions", "3000"], "3000"),
        (["nice", "--extensions", "3000-3099", "--wan-kbps", "0"], "wan-kbps"),
    ],
)
def test_office_add_mistakes(data, args, needle):
    add_office(data, "lyon", "2000-2099")
    assert_one_line_error(mainhost("office", "add", *args, "--data", data), needle)


# --- phones ---


def test_phone_add_prints_credentials(data):
    add_office(data)
    result = mainhost("phone", "add", "2001", "--password", "hunter2-hunter2", "--data", data)
    assert result.returncode == 0, result.stderr
    assert "office lyon" in result.stdout
    assert re.search(r"username\s+2001", result.stdout)
    assert re.search(r"password\s+hunter2-hunter2", result.stdout)
    assert re.search(r"realm\s+branchpbx", result.stdout)


def test_phone_add_makes_up_a_password(data):
    add_office(data)
    result = mainhost("phone", "add", "2002", "--name", "Anne", "--data", data)
    assert result.returncode == 0, result.stderr
    password = re.search(r"password\s+(\S+)", result.stdout)
    assert password is not None and len(password.group(1)) >= 12
    listed = json.loads(mainhost("phone", "list", "--json", "--data", data).stdout)
    assert listed == [{"ext": "2002", "office": "lyon", "name": "Anne"}]


@pytest.mark.parametrize(
    ("ext", "password", "needle"),
    [
        ("3001", "long-enough-pw", "3001"),
        ("2001", "short", "8 characters"),
        ("20x1", "long-enough-pw", "digits"),
    ],
)
def test_phone_add_mistakes(data, ext, password, needle):
    add_office(data)
    result = mainhost("phone", "add", ext, "--password", password, "--data", data)
    assert_one_line_error(result, needle)


def test_phone_add_twice_and_remove(data):
    add_office(data)
    assert mainhost("phone", "add", "2001", "--data", data).returncode == 0
    assert_one_line_error(mainhost("phone", "add", "2001", "--data", data), "2001", "exists")
    result = mainhost("phone", "remove", "2001", "--data", data)
    assert result.returncode == 0 and "removed" in result.stdout
    assert_one_line_error(mainhost("phone", "remove", "2001", "--data", data), "2001")


# --- operator mistakes in files and directories ---


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        (["serve"], []),
        (["office", "add", "paris", "--extensions", "3000-3099"], []),
        (["phone", "add", "2001"], []),
    ],
)
def test_unknown_key_in_config(data, command, extra):
    add_office(data)
    config = data / "mainhost.toml"
    lines = config.read_text().splitlines()
    trunk = lines.index("[trunk]")
    lines.insert(trunk + 1, "prot = 5090")
    config.write_text("\n".join(lines) + "\n")
    result = mainhost(*command, "--data", data, *extra, timeout=60)
    assert_one_line_error(result, str(config), "trunk.prot", f"line {trunk + 2}")


def test_bad_value_in_config(data):
    config = data / "mainhost.toml"
    text = config.read_text()
    config.write_text(text.replace('public_address = "127.0.0.1"', 'public_address = ""'))
    assert_one_line_error(mainhost("serve", "--data", data), str(config), "public_address")
    text = re.sub(r"(?ms)^(\[trunk\].*?^port = )\d+", r"\g<1>70000", text)
    config.write_text(text)
    line = assert_one_line_error(mainhost("serve", "--data", data), str(config), "trunk.port")
    assert "70000" in line and re.search(r"line \d+", line)


def test_broken_toml(data):
    config = data / "mainhost.toml"
    config.write_text(config.read_text() + "[trunk\n")
    assert_one_line_error(mainhost("serve", "--data", data), str(config), "TOML")


@pytest.mark.parametrize(
    "command",
    [
        ["serve"],
        ["status"],
        ["office", "add", "lyon", "--extensions", "2000-2099"],
        ["phone", "add", "2001"],
        ["phone", "list"],
    ],
)
def test_missing_data_directory(tmp_path, command):
    missing = tmp_path / "nothere"
    assert_one_line_error(mainhost(*command, "--data", missing), str(missing))
    assert not missing.exists()


def test_unwritable_data_directory(data):
    with read_only(data):
        serve = mainhost("serve", "--data", data)
        add = mainhost("office", "add", "lyon", "--extensions", "2000-2099", "--data", data)
    assert_one_line_error(serve, str(data), "not writable")
    assert_one_line_error(add, str(data))


def test_trunk_port_in_use(data, ports):
    disable_stun(data)
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, ports.trunk))
        squatter.listen()
        result = mainhost("serve", "--data", data)
    assert_one_line_error(result, "trunk", str(ports.trunk), "in use")


def test_api_port_in_use(data, ports):
    disable_stun(data)
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, ports.api))
        squatter.listen()
        result = mainhost("serve", "--data", data)
    assert_one_line_error(result, "web API", str(ports.api), "in use")


def test_port_in_use_is_the_only_line(data, ports):
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, ports.api))
        squatter.listen()
        result = mainhost("serve", "--data", data)
    assert_one_line_error(result, "web API", str(ports.api))


# --- status ---


def test_status_json_with_the_server_down(data):
    add_office(data, "lyon", "2000-2099")
    add_office(data, "paris", "2100-2199")
    assert mainhost("phone", "add", "2001", "--data", data).returncode == 0
    result = mainhost("status", "--json", "--data", data)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["running"] is False
    offices = {o["name"]: o for o in status["offices"]}
    assert set(offices) == {"lyon", "paris"}
    assert all(o["online"] is False for o in offices.values())
    assert offices["lyon"]["phones"] == 1 and offices["lyon"]["extensions"] == "2000-2099"
    assert offices["lyon"]["directory_version"] == 1
    assert offices["paris"]["last_seen_iso"] == "never"
    table = mainhost("status", "--data", data)
    assert table.returncode == 0 and "NOT running" in table.stdout and "paris" in table.stdout


def test_status_json_with_the_server_up_and_a_remote_host_joining(tmp_path, data, ports):
    disable_stun(data)
    token = add_office(data, "lyon", "2000-2099")
    with serving(data):
        result = mainhost("status", "--json", "--data", data)
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["running"] is True
        assert status["public_address"] == LOOPBACK
        assert status["listening"]["trunk"] == f"{LOOPBACK}:{ports.trunk}/tcp"
        assert [(o["name"], o["online"]) for o in status["offices"]] == [("lyon", False)]

        remote = tmp_path / "remote"
        sip_port = str(free_port(socket.SOCK_DGRAM))
        joined = remotehost(
            "join", token, "--data", remote, "--timeout", "20", "--sip-port", sip_port
        )
        assert joined.returncode == 0, joined.stderr
        assert (remote / "remotehost.toml").is_file() and (remote / "ca.pem").is_file()
        again = remotehost("join", token, "--data", remote)
        assert_one_line_error(again, str(remote))

        status = json.loads(mainhost("status", "--json", "--data", data).stdout)
        assert status["trunk"]["logins"] >= 1
        (office,) = status["offices"]
        assert office["public_address"] == LOOPBACK  # recorded by the join's login

        table = mainhost("status", "--data", data)
        assert table.returncode == 0 and "running" in table.stdout and "lyon" in table.stdout

        # The remote host serving: both sides' status say so.
        assert mainhost("phone", "add", "2001", "--data", data).returncode == 0
        config = remote / "remotehost.toml"
        config.write_text(config.read_text().replace('listen = "0.0.0.0"', 'listen = "127.0.0.1"'))
        with serving(remote, "remotehost"):
            deadline = time.monotonic() + READY_GUARD
            while True:
                remote_status = json.loads(remotehost("status", "--json", "--data", remote).stdout)
                status = json.loads(mainhost("status", "--json", "--data", data).stdout)
                if (
                    remote_status["online"]
                    and status["offices"][0]["online"]
                    and remote_status["directory"]["extensions"] == 1
                ):
                    break
                assert time.monotonic() < deadline, (remote_status, status)
                time.sleep(0.1)
            assert remote_status["running"] is True
            assert remote_status["office"] == "lyon"
            assert remote_status["public_address"] == LOOPBACK
            assert status["offices"][0]["public_address"] == LOOPBACK
        offline = json.loads(remotehost("status", "--json", "--data", remote).stdout)
        assert offline["running"] is False
        assert offline["directory"]["extensions"] == 1  # from disk


# --- remotehost join with a bad token ---


@pytest.mark.parametrize(
    ("token", "needle"),
    [
        ("hello", "bpx1-"),
        ("bpx1-AAAA", "token"),
        ("bpx2-" + "A" * 40, "bpx1-"),
    ],
)
def test_remotehost_join_bad_token(tmp_path, token, needle):
    remote = tmp_path / "remote"
    assert_one_line_error(remotehost("join", token, "--data", remote), needle)
    assert not remote.exists()


def test_remotehost_join_damaged_token(tmp_path, data):
    token = add_office(data)
    middle = len(token) // 2
    damaged = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    remote = tmp_path / "remote"
    assert_one_line_error(remotehost("join", damaged, "--data", remote), "damaged")
    assert_one_line_error(remotehost("join", token[:-5], "--data", remote), "token")
    assert not remote.exists()


def test_remotehost_join_with_no_main_host_running(tmp_path, data, ports):
    token = add_office(data)  # nothing listens on the trunk port
    remote = tmp_path / "remote"
    result = remotehost("join", token, "--data", remote, "--timeout", "10")
    assert_one_line_error(result, f"{LOOPBACK}:{ports.trunk}")
    assert not remote.exists()


# --- the whole main host as `init` configured it (STUN included) ---


def test_serve_as_initialised_listens_on_every_port(data, ports):
    with serving(data) as proc:
        status = json.loads(mainhost("status", "--json", "--data", data).stdout)
    assert proc.returncode == 0  # SIGINT is a clean shutdown, not a crash
    assert not (data / "run" / "control.sock").exists()
    assert status["running"] is True
    listening = status["listening"]
    assert listening["trunk"] == f"{LOOPBACK}:{ports.trunk}/tcp"
    assert f"{LOOPBACK}:{ports.stun}/udp" in listening["stun"]
    assert f"{LOOPBACK}:{ports.stun_alternate}/udp" in listening["stun"]
    assert listening["api"] == [f"http://{LOOPBACK}:{ports.api}"]


def test_stun_port_in_use(data, ports):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind((LOOPBACK, ports.stun))
        result = mainhost("serve", "--data", data)
    assert_one_line_error(result, "STUN", str(ports.stun), "in use")


# --- the remote host's own operator mistakes (after a join) ---


def test_remotehost_serve_mistakes(tmp_path):
    missing = tmp_path / "nothere"
    assert_one_line_error(remotehost("serve", "--data", missing), str(missing))
    assert_one_line_error(remotehost("status", "--data", missing), str(missing))
    data = tmp_path / "remote"
    data.mkdir()
    config = data / "remotehost.toml"
    config.write_text('office = "lyon"\n[trunk]\nmain_host = "127.0.0.1"\nprot = 1\n')
    assert_one_line_error(remotehost("serve", "--data", data), str(config), "trunk.prot", "line 4")
    config.write_text('office = "lyon"\n')
    assert_one_line_error(remotehost("serve", "--data", data), str(config), "trunk.main_host")
    config.write_text('office = "lyon"\n[trunk]\nmain_host = "127.0.0.1"\n')
    assert_one_line_error(remotehost("serve", "--data", data), str(data / "ca.pem"))


# --- damaged key material ---


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_missing_or_damaged_ca_certificate(data, damage):
    ca = data / "ca.pem"
    if damage == "missing":
        ca.unlink()
    else:
        ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    assert_one_line_error(mainhost("serve", "--data", data), str(ca))
    result = mainhost("office", "add", "lyon", "--extensions", "2000-2099", "--data", data)
    assert_one_line_error(result, str(ca))
    # Nothing was half-done: no office exists without a token to join it.
    status = json.loads(mainhost("status", "--json", "--data", data).stdout)
    assert status["offices"] == []


def test_damaged_trunk_key(data):
    (data / "trunk.key").write_text("junk\n")
    assert_one_line_error(mainhost("serve", "--data", data), str(data), "trunk certificate")


def test_remotehost_with_a_damaged_mirror(tmp_path):
    data = tmp_path / "remote"
    data.mkdir()
    (data / "remotehost.toml").write_text('office = "lyon"\n[trunk]\nmain_host = "127.0.0.1"\n')
    (data / "remotehost.db").write_text("not a database\n" * 50)
    for command in ("serve", "status"):
        assert_one_line_error(remotehost(command, "--data", data), str(data / "remotehost.db"))


def test_write_private_tightens_a_file_left_behind(tmp_path):
    from shared.cli import write_private

    leftover = tmp_path / "office.secret"
    leftover.write_bytes(b"old")
    leftover.chmod(0o644)
    write_private(leftover, b"new secret")
    assert leftover.read_bytes() == b"new secret"
    assert leftover.stat().st_mode & 0o777 == 0o600
