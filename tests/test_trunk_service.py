"""The main host's trunk service and the remote host, in one trio process, over loopback TLS.

A real `MainHost` serves in a nursery (trunk on port 0, STUN and the web API off); remote hosts
are either a real `RemoteHost` or our own session over TLS (to see exactly what the server sends),
or raw bytes (to send what no correct client would). Waits are bounded by `trio.fail_after`
guards; nothing asserts how long anything took.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from mainhost import pki
from mainhost.config import MainHostConfig
from mainhost.service import MainHost
from mainhost.store import DB_NAME as MAIN_DB
from mainhost.store import MainStore
from remotehost.cli import check_join
from remotehost.service import RemoteHost
from shared.aio import control
from shared.aio.control import serve_control
from shared.cli import CliError
from shared.wire.frame import HEADER, ErrorCode, encode_frame
from shared.wire.messages import (
    PROTOCOL_VERSION,
    Challenge,
    Close,
    DirectoryAck,
    DirectoryDelta,
    DirectorySnapshot,
    Hello,
    Login,
    encode_message,
)
from shared.wire.session import Closed, Ignored, LoggedIn, LoginRejected, Received
from tests.hosthelpers import (
    GUARD,
    LOOPBACK,
    RawTrunkClient,
    free_port,
    login,
    make_mainhost_data,
    make_remotehost_data,
    open_tls,
    token_for,
    trunk_port,
    wait_until,
)

REALM = "branchpbx"
PASSWORD = "correct-horse-battery"


@dataclass
class Running:
    """A main host serving in the test's nursery, with one office ('lyon') and its secret."""

    host: MainHost
    data: Path
    port: int
    secret: bytes
    store: MainStore  # a second connection, as the CLI would have

    def office(self, name: str = "lyon") -> dict[str, Any]:
        offices: list[dict[str, Any]] = self.host.status()["offices"]
        (entry,) = [o for o in offices if o["name"] == name]
        return entry


@pytest.fixture
async def main(tmp_path: Path) -> AsyncIterator[Running]:
    data = tmp_path / "mainhost"
    config = make_mainhost_data(data)
    cli_store = MainStore(data / MAIN_DB)
    secret = cli_store.add_office("lyon", "2000-2099", 1000)
    cli_store.add_office("paris", "2100-2199", 1000)
    cli_store.add_phone("2001", PASSWORD, REALM, "Anne")
    cli_store.add_phone("2002", PASSWORD, REALM, "Bea")
    host = MainHost(data, config)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(host.serve)
        yield Running(host, data, trunk_port(addresses), secret, cli_store)
        nursery.cancel_scope.cancel()
    cli_store.close()


async def start_remote(
    nursery: trio.Nursery, main: Running, tmp_path: Path, name: str = "remote"
) -> RemoteHost:
    """Join with the token (the real join check) and serve a RemoteHost in `nursery`."""
    token = token_for(main.data, main.port, "lyon", main.secret)
    ca_der = await check_join(token, GUARD)
    assert pki.fingerprint(ca_der) == token.ca_sha256
    data = tmp_path / name
    config = make_remotehost_data(data, token, ca_der)
    remote = RemoteHost(data, config)
    await nursery.start(remote.serve)
    return remote


# --- a remote host logs in and mirrors the directory (F1, F6) ---


async def test_remote_host_logs_in_and_mirrors_the_directory(main, tmp_path):
    async with trio.open_nursery() as nursery:
        remote = await start_remote(nursery, main, tmp_path)
        # The join check logged in too: wait for the remote host's own session.
        await wait_until(lambda: remote.uplink.state.state == "online")
        await wait_until(lambda: main.office()["online"])
        office = main.office()
        assert office["public_address"] == LOOPBACK
        assert office["name"] == "lyon"
        assert main.office("paris")["online"] is False
        assert main.host.trunk.stats.logins >= 2  # the join check, then the remote host

        await wait_until(lambda: remote.mirror.info().version == 2)
        info = remote.mirror.info()
        assert (info.office, info.realm, info.ext_first, info.ext_last) == (
            "lyon",
            REALM,
            2000,
            2099,
        )
        assert [e.ext for e in remote.mirror.entries()] == ["2001", "2002"]
        snapshot = main.store.directory_snapshot("lyon", REALM)
        assert remote.mirror.entries() == snapshot.entries
        await wait_until(lambda: main.office()["directory_acked"] == 2)

        status = remote.status()
        assert status["online"] is True and status["public_address"] == LOOPBACK
        assert status["directory"]["extensions"] == 2

        # A phone added by the CLI (another connection to the database) reaches the mirror.
        main.store.add_phone("2003", PASSWORD, REALM, "Cleo")
        await wait_until(lambda: remote.mirror.lookup("2003") is not None)
        assert remote.mirror.info().version == 3
        main.store.remove_phone("2001")
        await wait_until(lambda: remote.mirror.lookup("2001") is None)
        assert [e.ext for e in remote.mirror.entries()] == ["2002", "2003"]
        assert remote.mirror.entries() == main.store.directory_snapshot("lyon", REALM).entries

        # After the login the remote host reports its LAN and NAT type (F1: the main host
        # tracks every remote host's NAT type); STUN is unreachable here, so the type says so.
        await wait_until(lambda: main.host.trunk.online["lyon"].nat_type != "unknown")
        assert main.office()["nat_type"] == remote.uplink.state.nat_type
        assert main.office()["lan"] == remote.uplink.state.lan

        # Another office's phone does not reach this mirror.
        main.store.add_phone("2101", PASSWORD, REALM)
        await wait_until(lambda: main.office()["directory_acked"] == 4)
        assert remote.mirror.lookup("2101") is None
        nursery.cancel_scope.cancel()
    await wait_until(lambda: not main.office()["online"])


async def test_changes_arrive_as_deltas(main):
    conn, verdict = await login(main.port, "lyon", main.secret, version=0)
    assert isinstance(verdict, LoggedIn)
    with trio.fail_after(GUARD):
        event = await conn.next_event()
    assert isinstance(event, Received) and isinstance(event.message, DirectorySnapshot)
    assert event.message.version == 2
    await conn.send(DirectoryAck(2))
    main.store.add_phone("2003", PASSWORD, REALM)
    with trio.fail_after(GUARD):
        event = await conn.next_event()
    assert isinstance(event, Received)
    delta = event.message
    assert isinstance(delta, DirectoryDelta)
    assert (delta.base_version, delta.version) == (2, 3)
    assert [e.ext for e in delta.put] == ["2003"] and delta.delete == []
    await conn.aclose()


async def test_a_remote_host_up_to_date_gets_nothing_and_one_behind_gets_a_delta(main):
    conn, verdict = await login(main.port, "lyon", main.secret, version=2)
    assert isinstance(verdict, LoggedIn)
    main.store.add_phone("2003", PASSWORD, REALM)
    with trio.fail_after(GUARD):
        event = await conn.next_event()
    assert isinstance(event, Received) and isinstance(event.message, DirectoryDelta)
    assert event.message.base_version == 2  # no snapshot came first
    await conn.aclose()
    conn, verdict = await login(main.port, "lyon", main.secret, version=1)
    assert isinstance(verdict, LoggedIn)
    with trio.fail_after(GUARD):
        event = await conn.next_event()
    assert isinstance(event, Received) and isinstance(event.message, DirectoryDelta)
    assert (event.message.base_version, event.message.version) == (1, 3)
    await conn.aclose()


async def test_a_wrong_ack_gets_a_snapshot(main):
    conn, _ = await login(main.port, "lyon", main.secret)
    with trio.fail_after(GUARD):
        first = await conn.next_event()
    assert isinstance(first, Received) and isinstance(first.message, DirectorySnapshot)
    await conn.send(DirectoryAck(1))  # "my mirror is elsewhere": the server resends
    with trio.fail_after(GUARD):
        again = await conn.next_event()
    assert isinstance(again, Received) and isinstance(again.message, DirectorySnapshot)
    await conn.aclose()


# --- replacing, refusing ---


async def test_a_second_login_replaces_the_first(main):
    first, verdict = await login(main.port, "lyon", main.secret, version=2)
    assert isinstance(verdict, LoggedIn)
    await wait_until(lambda: main.office()["online"])
    first_session = main.host.trunk.online["lyon"].session_id
    second, verdict = await login(main.port, "lyon", main.secret, version=2)
    assert isinstance(verdict, LoggedIn)
    with trio.fail_after(GUARD):
        while True:
            event = await first.next_event()
            if isinstance(event, Closed):
                break
    assert event.code == ErrorCode.REPLACED and event.by_peer
    await first.aclose()
    await wait_until(lambda: main.host.trunk.stats.replaced_sessions == 1)
    assert main.office()["online"] is True
    assert main.host.trunk.online["lyon"].session_id != first_session
    # The replaced connection's end must not take the office offline.
    await trio.lowlevel.checkpoint()
    assert main.office()["online"] is True
    await second.aclose()
    await wait_until(lambda: not main.office()["online"])


async def test_wrong_secret_is_refused_counted_logged_and_throttled(main, caplog):
    caplog.set_level(logging.WARNING, logger="mainhost.trunk")
    trunk = main.host.trunk
    for attempt in (1, 2):
        conn, verdict = await login(main.port, "lyon", b"x" * 32)
        assert isinstance(verdict, LoginRejected), verdict
        await conn.aclose()
        assert trunk.stats.login_failures == attempt
    refused = [r for r in caplog.records if "login refused" in r.getMessage()]
    assert len(refused) == 2
    assert "lyon" in refused[0].getMessage() and LOOPBACK in refused[0].getMessage()
    assert trunk.throttle.delay(LOOPBACK, trio.current_time()) > 0
    assert main.office()["online"] is False
    # An unknown office gets the same answer (office names are not revealed).
    conn, verdict = await login(main.port, "nowhere", main.secret)
    assert isinstance(verdict, LoginRejected)
    await conn.aclose()
    # The right secret still works from the same address, and clears the throttle.
    conn, verdict = await login(main.port, "lyon", main.secret)
    assert isinstance(verdict, LoggedIn)
    assert trunk.throttle.delay(LOOPBACK, trio.current_time()) == 0
    await conn.aclose()


async def test_join_check_refuses_a_wrong_secret_and_a_wrong_pin(main):
    token = token_for(main.data, main.port, "lyon", b"y" * 32)
    with pytest.raises(CliError, match="refused"):
        await check_join(token, GUARD)
    good = token_for(main.data, main.port, "lyon", main.secret)
    from dataclasses import replace

    with pytest.raises(CliError, match=r"fingerprint|refused"):
        await check_join(replace(good, ca_sha256=b"\0" * 32), GUARD)
    with pytest.raises(CliError, match="cannot connect"):
        await check_join(replace(good, port=free_port()), GUARD)


# --- hostile bytes ---


async def assert_still_serves(main: Running) -> None:
    conn, verdict = await login(main.port, "lyon", main.secret)
    assert isinstance(verdict, LoggedIn), verdict
    await conn.aclose()


async def test_garbage_instead_of_tls(main):
    with trio.fail_after(GUARD):
        stream = await trio.open_tcp_stream(LOOPBACK, main.port)
        await stream.send_all(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)) * 4)
        client = RawTrunkClient(stream)
        assert await client.until_closed() == []  # the server hung up without a frame
        await stream.aclose()
    await assert_still_serves(main)


async def hello_then(stream: trio.SSLStream[trio.SocketStream], payload: bytes) -> RawTrunkClient:
    client = RawTrunkClient(stream)
    await client.send(encode_message(Hello(PROTOCOL_VERSION, 1, "raw")))
    challenge = await client.next_message()
    assert isinstance(challenge, Challenge)
    await client.send(payload)
    return client


def close_code(messages: list[Any]) -> int:
    closes = [m for m in messages if isinstance(m, Close)]
    assert len(closes) == 1, messages
    return closes[0].code


async def test_oversized_frame_header(main, caplog):
    caplog.set_level(logging.WARNING, logger="mainhost.trunk")
    stream = await open_tls(main.port)
    client = await hello_then(stream, HEADER.pack(0x7FFF_FFFF, 3, 0, 0))
    assert close_code(await client.until_closed()) == ErrorCode.TOO_LARGE
    await stream.aclose()
    await wait_until(lambda: main.host.trunk.stats.protocol_errors == 1)
    (record,) = [r for r in caplog.records if "frame too large" in r.getMessage()]
    assert LOOPBACK in record.getMessage()
    await assert_still_serves(main)


async def test_oversized_frame_before_hello(main):
    stream = await open_tls(main.port)
    client = RawTrunkClient(stream)
    await client.send(HEADER.pack(2**32 - 1, 1, 0, 0) + b"x" * 100)
    assert close_code(await client.until_closed()) == ErrorCode.TOO_LARGE
    await stream.aclose()
    await assert_still_serves(main)


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\x01", b"", b"\xa3abc"])
async def test_bad_msgpack(main, body):
    stream = await open_tls(main.port)
    client = await hello_then(stream, encode_frame(Login.TYPE, body))
    assert close_code(await client.until_closed()) == ErrorCode.BAD_MESSAGE
    await stream.aclose()
    await wait_until(lambda: main.host.trunk.stats.protocol_errors == 1)
    await assert_still_serves(main)


async def test_message_out_of_order(main):
    stream = await open_tls(main.port)
    client = RawTrunkClient(stream)
    await client.send(encode_message(Login("lyon", b"c" * 32, b"p" * 32)))
    assert close_code(await client.until_closed()) == ErrorCode.PROTOCOL
    await stream.aclose()
    await assert_still_serves(main)


async def test_unknown_type_before_login_is_ignored(main):
    # Unknown types are kept, not fatal (hyperframe's ExtensionFrame): newer remote hosts may
    # send types this main host does not know yet, even before the login.
    stream = await open_tls(main.port)
    client = await hello_then(stream, encode_frame(999, b"\x01\x02\x03"))
    await client.send(encode_message(Login("lyon", b"c" * 32, b"p" * 32)))
    messages = await client.until_closed()
    # The Login (wrong proof) was answered: the unknown frame did not end the connection.
    assert any(type(m).__name__ == "LoginRefused" for m in messages), messages
    await stream.aclose()
    await wait_until(lambda: main.host.trunk.stats.ignored_messages == 1)


async def test_unknown_type_after_login_does_not_end_the_connection(main):
    conn, verdict = await login(main.port, "lyon", main.secret, version=2)
    assert isinstance(verdict, LoggedIn)
    await conn.stream.send_all(encode_frame(999, b"from a newer version", channel=0))
    await conn.stream.send_all(encode_frame(60000, b"", channel=7))
    await wait_until(lambda: main.host.trunk.stats.ignored_messages == 2)
    assert main.office()["online"] is True
    # Still alive both ways: a directory change reaches us on this connection.
    main.store.add_phone("2003", PASSWORD, REALM)
    with trio.fail_after(GUARD):
        event = await conn.next_event()
        while isinstance(event, Ignored):
            event = await conn.next_event()
    assert isinstance(event, Received) and isinstance(event.message, DirectoryDelta)
    await conn.aclose()


async def test_a_silent_client_is_dropped_at_the_handshake_deadline(main, monkeypatch):
    # A TLS connection that never says Hello must not hold a slot forever (HANDSHAKE_TIMEOUT).
    import shared.wire.session as session_module

    monkeypatch.setattr(session_module, "HANDSHAKE_TIMEOUT", 0.5)
    stream = await open_tls(main.port)
    client = RawTrunkClient(stream)
    assert close_code(await client.until_closed()) == ErrorCode.TIMEOUT
    await stream.aclose()


async def test_a_dead_remote_host_goes_offline(tmp_path):
    # After login, silence longer than dead_after means the path is gone.
    data = tmp_path / "mh"
    config = make_mainhost_data(data, heartbeat=0.1, dead_after=0.5)
    store = MainStore(data / MAIN_DB)
    secret = store.add_office("lyon", "2000-2099", 100)
    store.close()
    host = MainHost(data, config)
    async with trio.open_nursery() as nursery:
        port = trunk_port(await nursery.start(host.serve))
        conn, verdict = await login(port, "lyon", secret)
        assert isinstance(verdict, LoggedIn)
        await wait_until(lambda: "lyon" in host.trunk.online)
        # We stop reading and never answer heartbeats: the server must give up on us.
        await wait_until(lambda: "lyon" not in host.trunk.online)
        # The offline record follows (written by the connection's task as it ends).
        await wait_until(lambda: host.store.office_log("lyon", limit=1)[0]["kind"] == "offline")
        assert "nothing heard" in host.store.office_log("lyon", limit=1)[0]["detail"]
        await conn.aclose()
        nursery.cancel_scope.cancel()


# --- the mirror outlives the main host (F6) ---


async def test_mirror_survives_a_restart_without_the_main_host(main, tmp_path):
    async with trio.open_nursery() as nursery:
        remote = await start_remote(nursery, main, tmp_path)
        await wait_until(lambda: remote.mirror.info().version == 2)
        config = remote.config
        nursery.cancel_scope.cancel()
    data = tmp_path / "remote"
    # The main host is now out of reach: nothing listens on the port the config names.
    from dataclasses import replace

    closed = replace(config, trunk=replace(config.trunk, port=free_port()))
    again = RemoteHost(data, closed)
    async with trio.open_nursery() as nursery:
        await nursery.start(again.serve)
        await wait_until(lambda: again.uplink.state.last_error is not None)
        status = await trio.to_thread.run_sync(control.call, data, "status")
        assert status["online"] is False
        assert status["trunk"]["state"] != "online"
        assert "cannot connect" in status["trunk"]["last_error"]
        assert status["directory"]["version"] == 2
        assert status["directory"]["extensions"] == 2
        assert status["directory"]["realm"] == REALM
        assert again.mirror.lookup("2001") is not None  # phones can register from disk
        nursery.cancel_scope.cancel()


async def test_remote_host_reconnects_after_the_main_host_restarts(tmp_path):
    data = tmp_path / "mh"
    config = make_mainhost_data(data)
    store = MainStore(data / MAIN_DB)
    secret = store.add_office("lyon", "2000-2099", 100)
    store.add_phone("2001", PASSWORD, REALM)
    port = free_port()
    from dataclasses import replace

    fixed: MainHostConfig = replace(config, trunk=replace(config.trunk, port=port))
    token = token_for(data, port, "lyon", secret)
    async with trio.open_nursery() as outer:
        first = MainHost(data, fixed)
        main_scope = trio.CancelScope()

        async def run_main(host: MainHost, scope: trio.CancelScope, *, task_status: Any) -> None:
            with scope:
                await host.serve(task_status=task_status)

        await outer.start(run_main, first, main_scope)
        ca_der = await check_join(token, GUARD)
        remote = RemoteHost(tmp_path / "rh", make_remotehost_data(tmp_path / "rh", token, ca_der))
        await outer.start(remote.serve)
        await wait_until(lambda: remote.status()["online"])
        main_scope.cancel()
        await wait_until(lambda: not remote.status()["online"])
        store.add_phone("2002", PASSWORD, REALM)  # changed while the main host was down
        second = MainHost(data, fixed)
        await outer.start(run_main, second, trio.CancelScope())
        await wait_until(lambda: remote.status()["online"])
        await wait_until(lambda: remote.mirror.lookup("2002") is not None)
        assert remote.status()["trunk"]["logins"] == 2
        outer.cancel_scope.cancel()
    store.close()


# --- control socket ---


async def test_control_status_round_trip(main):
    status = await trio.to_thread.run_sync(control.call, main.data, "status")
    assert status["running"] is True
    assert status["public_address"] == LOOPBACK
    assert status["listening"]["trunk"] == f"{LOOPBACK}:{main.port}/tcp"
    assert {o["name"] for o in status["offices"]} == {"lyon", "paris"}
    with pytest.raises(control.ControlError, match="bad control request"):
        await trio.to_thread.run_sync(control.call, main.data, "no-such-command")


async def raw_control(path: Path, request: bytes) -> dict[str, Any]:
    with trio.fail_after(GUARD):
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(request)
            buffer = b""
            while not buffer.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buffer += chunk
    answer = json.loads(buffer)
    assert isinstance(answer, dict)
    return answer


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"not json\n",
        b"\xff\xfe\n",
        b"[1, 2]\n",
        b"5\n",
        b'{"nocmd": 1}\n',
        b'{"cmd": ["status"]}\n',
        b'{"cmd": "nope"}\n',
        b"{" * 10 + b"\n",
        b"x" * 70000,  # longer than a request may be, with no newline
    ],
)
async def test_control_bad_request_gets_an_error_answer(tmp_path, request_bytes):
    async def status(request: dict[str, Any]) -> Any:
        return {"fine": True}

    async with trio.open_nursery() as nursery:
        path = await nursery.start(serve_control, tmp_path, {"status": status})
        answer = await raw_control(path, request_bytes)
        assert answer == {"ok": False, "error": "bad control request"}
        # The server is still there for the next request.
        assert await raw_control(path, b'{"cmd": "status"}\n') == {
            "ok": True,
            "result": {"fine": True},
        }
        nursery.cancel_scope.cancel()


async def test_control_failing_handler_answers_an_error_and_keeps_serving(tmp_path):
    async def broken(request: dict[str, Any]) -> Any:
        return request["missing-argument"]

    async def refused(request: dict[str, Any]) -> Any:
        raise control.ControlError("no such office")

    async def status(request: dict[str, Any]) -> Any:
        return "up"

    handlers = {"broken": broken, "refused": refused, "status": status}
    async with trio.open_nursery() as nursery:
        path = await nursery.start(serve_control, tmp_path, handlers)
        assert await raw_control(path, b'{"cmd": "refused"}\n') == {
            "ok": False,
            "error": "no such office",
        }
        answer = await raw_control(path, b'{"cmd": "broken"}\n')
        assert answer["ok"] is False and answer["error"]
        assert await raw_control(path, b'{"cmd": "status"}\n') == {"ok": True, "result": "up"}
        nursery.cancel_scope.cancel()


async def test_control_socket_is_private_and_removed_at_exit(tmp_path):
    async def status(request: dict[str, Any]) -> Any:
        return 1

    async with trio.open_nursery() as nursery:
        path = await nursery.start(serve_control, tmp_path, {"status": status})
        assert path.stat().st_mode & 0o077 == 0
        nursery.cancel_scope.cancel()
    assert not path.exists()
    with pytest.raises(control.ControlError, match="not running"):
        control.call(tmp_path, "status")


async def test_control_replaces_a_stale_socket(tmp_path):
    stale = tmp_path / "run" / "control.sock"
    stale.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # left behind by a crashed run: nobody listens

    async def status(request: dict[str, Any]) -> Any:
        return "fresh"

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, tmp_path, {"status": status})
        assert await trio.to_thread.run_sync(control.call, tmp_path, "status") == "fresh"
        nursery.cancel_scope.cancel()


def test_control_call_with_a_dead_socket(tmp_path):
    stale = tmp_path / "run" / "control.sock"
    stale.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    with pytest.raises(control.ControlError, match="not running"):
        control.call(tmp_path, "status", timeout=2.0)


def test_struct_header_matches_the_wire_layout():
    # The hostile-frame tests build headers by hand; make sure the layout is what they assume.
    assert HEADER.size == 12
    assert HEADER.pack(1, 2, 3, 4) == struct.pack(">IHHI", 1, 2, 3, 4)


# --- a remote host that cannot be let in ---


async def test_remote_host_with_a_wrong_secret_is_refused(main, tmp_path):
    from dataclasses import replace

    good = token_for(main.data, main.port, "lyon", main.secret)
    ca_der = await check_join(good, GUARD)
    bad = replace(good, secret=b"w" * 32)
    config = make_remotehost_data(tmp_path / "remote", bad, ca_der)
    remote = RemoteHost(tmp_path / "remote", config)
    async with trio.open_nursery() as nursery:
        await nursery.start(remote.serve)
        await wait_until(lambda: remote.uplink.state.state == "refused")
        assert "refused" in (remote.uplink.state.last_error or "")
        assert main.host.trunk.stats.login_failures >= 1
        assert main.office()["online"] is False
        assert remote.mirror.info().version == 0  # nothing was sent to it
        nursery.cancel_scope.cancel()


async def test_remote_host_refuses_a_main_host_with_another_ca(main, tmp_path):
    # The pinned CA is what makes the remote host trust the main host (F1): a main host whose
    # certificate another CA signed is not dialled into, whatever it says.
    good = token_for(main.data, main.port, "lyon", main.secret)
    other = tmp_path / "other-ca"
    other.mkdir()
    pki.create(other, LOOPBACK)
    config = make_remotehost_data(tmp_path / "remote", good, pki.ca_der(other))
    remote = RemoteHost(tmp_path / "remote", config)
    async with trio.open_nursery() as nursery:
        await nursery.start(remote.serve)
        await wait_until(lambda: remote.uplink.state.last_error is not None)
        assert "certificate" in (remote.uplink.state.last_error or "").lower()
        assert remote.uplink.state.state != "online"
        assert main.host.trunk.stats.logins == 0
        nursery.cancel_scope.cancel()


async def test_join_check_against_something_that_is_not_a_main_host():
    async def not_tls(stream: trio.SocketStream) -> None:
        await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, not_tls, 0, host=LOOPBACK))
        port = listeners[0].socket.getsockname()[1]
        from shared.token import JoinToken

        token = JoinToken(LOOPBACK, port, "lyon", b"s" * 32, b"f" * 32)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(10):
            with pytest.raises(CliError, match="cannot connect"):
                await check_join(token, GUARD)
        # Each failed handshake must close its socket (one fd each would be left otherwise;
        # a little slack for unrelated threads of earlier tests).
        assert len(os.listdir("/proc/self/fd")) - before < 5
        nursery.cancel_scope.cancel()


async def test_a_connection_gone_before_it_is_served_is_closed(main):
    # getpeername() fails when the peer reset the connection before the handler ran.
    closed: list[bool] = []

    class GoneSocket:
        def getpeername(self) -> tuple[str, int]:
            raise OSError(107, "Transport endpoint is not connected")

    class GoneTransport:
        socket = GoneSocket()

    class GoneStream:
        transport_stream = GoneTransport()

        async def aclose(self) -> None:
            closed.append(True)

    await main.host.trunk.handle_connection(GoneStream())
    assert closed == [True]
    assert main.host.trunk.online == {}


async def test_a_login_replaced_while_it_is_still_being_welcomed_gets_replaced(main, monkeypatch):
    # The first session's login record is still being written when the second login comes:
    # the first must still be told REPLACED (not a plain shutdown) and leave the office online.
    import threading

    gate = threading.Event()
    calls: list[str] = []
    real_record_login = main.host.store.record_login

    def slow_first_record_login(*args: Any) -> Any:
        calls.append("record_login")
        if len(calls) == 1:
            gate.wait(GUARD)
        return real_record_login(*args)

    monkeypatch.setattr(main.host.store, "record_login", slow_first_record_login)
    first, verdict = await login(main.port, "lyon", main.secret, version=2)
    assert isinstance(verdict, LoggedIn)
    await wait_until(lambda: len(calls) == 1)  # the first is inside its welcome now
    second, verdict = await login(main.port, "lyon", main.secret, version=2)
    assert isinstance(verdict, LoggedIn)
    gate.set()
    with trio.fail_after(GUARD):
        while not isinstance(event := await first.next_event(), Closed):
            pass
    assert event.code == ErrorCode.REPLACED
    await wait_until(lambda: len(calls) == 2)
    assert main.office()["online"] is True
    await first.aclose()
    await second.aclose()


def test_backoff_delay_is_never_zero_never_over_the_cap():
    import random

    from hypothesis import given
    from hypothesis import strategies as st

    from remotehost.uplink import backoff_delay

    @given(
        attempt=st.integers(0, 10_000),
        cap=st.floats(0.01, 1000.0),
        seed=st.integers(0, 2**32),
    )
    def check(attempt: int, cap: float, seed: int) -> None:
        delay = backoff_delay(attempt, cap, random.Random(seed))
        assert 0 < delay <= cap
        # Equal jitter: at least half of the exponential ceiling.
        assert delay >= min(cap, 0.25 * 2 ** min(attempt, 16)) / 2

    check()


# --- the web API's authentication (served by the same MainHost) ---


async def http_get(port: int, path: str, authorization: bytes | None) -> tuple[int, bytes]:
    request = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
    if authorization is not None:
        request += b"Authorization: " + authorization + b"\r\n"
    with trio.fail_after(GUARD):
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        async with stream:
            await stream.send_all(request + b"\r\n")
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_web_api_needs_the_admin_key(tmp_path):
    from dataclasses import replace

    from mainhost.config import ApiConfig

    data = tmp_path / "mh"
    config = replace(make_mainhost_data(data), api=ApiConfig(enabled=True, listen=LOOPBACK, port=0))
    key = (data / "admin.key").read_text().strip().encode()
    host = MainHost(data, config)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(host.serve)
        port = int(addresses["api"][0].rsplit(":", 1)[1])
        assert (await http_get(port, "/healthz", None))[0] == 200
        status, body = await http_get(port, "/api/status", b"Bearer " + key)
        assert status == 200 and json.loads(body)["running"] is True
        for bad in (None, b"Bearer wrong", b"Basic " + key, b"Bearer \xc3\xa9\xff", b"Bearer"):
            assert (await http_get(port, "/api/status", bad))[0] == 401, bad
        nursery.cancel_scope.cancel()


# --- the trio adapter alone (shared.aio.trunk), over in-memory streams, on a mock clock ---


def session_pair_over(
    client_stream: trio.abc.Stream, server_stream: trio.abc.Stream
) -> tuple[Any, Any]:
    from shared.aio.trunk import TrunkConnection
    from shared.wire.session import TrunkSession

    now = trio.current_time()
    secret = b"k" * 32
    client = TrunkSession.client(
        now, office="lyon", secret=secret, client_nonce=b"c" * 32, software="test"
    )
    server = TrunkSession.server(
        now, nonce=b"n" * 32, software="test", heartbeat_interval=1.0, dead_after=4.0
    )
    return TrunkConnection(client_stream, client), TrunkConnection(server_stream, server)


async def serve_side(conn: Any, events: list[Any], secret: bytes = b"k" * 32) -> None:
    from shared.wire.session import LoginAttempt

    while True:
        event = await conn.next_event()
        events.append(event)
        if isinstance(event, LoginAttempt):
            conn.session.complete_login(
                secret, now=trio.current_time(), public_ip="192.0.2.1", public_port=1, session="s"
            )
        if isinstance(event, Closed):
            return


async def test_adapter_keeps_a_quiet_session_alive_with_heartbeats(autojump_clock):
    from trio.testing import memory_stream_pair

    client_stream, server_stream = memory_stream_pair()
    client, server = session_pair_over(client_stream, server_stream)
    client_events: list[Any] = []
    server_events: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_side, server, server_events)
        nursery.start_soon(serve_side, client, client_events)
        await trio.sleep(600)  # ten quiet minutes of mock time: heartbeats only
        assert any(isinstance(e, LoggedIn) for e in client_events)
        assert not any(isinstance(e, Closed) for e in client_events + server_events)
        await client.aclose()
    closed = [e for e in server_events if isinstance(e, Closed)]
    assert closed and closed[0].code == ErrorCode.SHUTDOWN and closed[0].by_peer


async def test_adapter_declares_a_silent_peer_dead(autojump_clock):
    from trio.testing import memory_stream_pair

    client_stream, server_stream = memory_stream_pair()
    client, server = session_pair_over(client_stream, server_stream)
    server_events: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_side, server, server_events)
        with trio.fail_after(GUARD):
            while not isinstance(await client.next_event(), LoggedIn):
                pass
        # The client stops reading and sending (a pulled cable): the server must notice.
        await wait_until(lambda: any(isinstance(e, Closed) for e in server_events))
    (closed,) = [e for e in server_events if isinstance(e, Closed)]
    assert closed.code == ErrorCode.TIMEOUT and not closed.by_peer


async def test_adapter_send_to_a_peer_that_never_reads_is_connection_lost(autojump_clock):
    from trio.testing import lockstep_stream_pair

    from shared.aio.trunk import ConnectionLost

    client_stream, server_stream = lockstep_stream_pair()
    client, server = session_pair_over(client_stream, server_stream)
    events: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_side, server, events)
        with trio.fail_after(GUARD):
            while not isinstance(await client.next_event(), LoggedIn):
                pass
        nursery.cancel_scope.cancel()  # nobody reads the server side any more
    with pytest.raises(ConnectionLost, match="timed out"), trio.fail_after(GUARD):
        for _ in range(1000):
            await client.send(DirectoryAck(1))


async def test_adapter_send_before_login_and_after_close(autojump_clock):
    from trio.testing import memory_stream_pair

    from shared.aio.trunk import ConnectionLost

    client_stream, server_stream = memory_stream_pair()
    client, _server = session_pair_over(client_stream, server_stream)
    with pytest.raises(ConnectionLost, match="not established"):
        await client.send(DirectoryAck(1))
    await client.aclose()
    await client.aclose()  # twice is harmless
    with pytest.raises(ConnectionLost):
        await client.send(DirectoryAck(1))


async def test_adapter_peer_hangs_up(autojump_clock):
    from trio.testing import memory_stream_pair

    client_stream, server_stream = memory_stream_pair()
    client, server = session_pair_over(client_stream, server_stream)
    events: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_side, server, events)
        with trio.fail_after(GUARD):
            while not isinstance(await client.next_event(), LoggedIn):
                pass
        await client_stream.aclose()  # the TCP connection goes away without a Close frame
    closed = events[-1]
    assert isinstance(closed, Closed) and closed.by_peer


async def test_a_send_failing_inside_the_connection_does_not_end_the_remote_host(
    main, tmp_path, monkeypatch
):
    # The main host vanishes just as the remote host answers it (here: the first directory
    # acknowledgement fails). That is one lost connection to redial, not the end of the host.
    from shared.aio.trunk import ConnectionLost

    async with trio.open_nursery() as nursery:
        token = token_for(main.data, main.port, "lyon", main.secret)
        ca_der = await check_join(token, GUARD)
        config = make_remotehost_data(tmp_path / "remote", token, ca_der)
        remote = RemoteHost(tmp_path / "remote", config)
        real_on_message = remote.uplink._on_message
        failures: list[str] = []

        async def failing_once(conn: Any, event: Any) -> None:
            if not failures:
                failures.append("sent")
                raise ConnectionLost("send failed: simulated reset")
            await real_on_message(conn, event)

        monkeypatch.setattr(remote.uplink, "_on_message", failing_once)
        await nursery.start(remote.serve)
        await wait_until(lambda: remote.uplink.state.logins >= 2 and remote.status()["online"])
        await wait_until(lambda: remote.mirror.info().version == 2)
        assert failures == ["sent"]
        nursery.cancel_scope.cancel()
