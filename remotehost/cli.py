"""The `remotehost` command: join, serve, status."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import secrets
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.table import Table

from remotehost.config import CA_NAME, CONFIG_NAME, SECRET_NAME, RemoteHostConfig, TrunkConfig
from remotehost.config import load as load_config
from remotehost.location import DB_NAME as LOCATION_DB
from remotehost.location import read_bindings, registration_entry
from remotehost.mirror import DB_NAME, DirectoryMirror
from remotehost.service import RemoteHost
from remotehost.uplink import SOFTWARE, client_ssl_context
from shared import config as cfg
from shared.aio import control
from shared.aio.trunk import ConnectionLost, TrunkConnection
from shared.cli import (
    OPERATOR_ERRORS,
    CliError,
    add_data_argument,
    ago,
    make_private_dir,
    run_main,
    serve_until_signal,
    setup_logging,
    unwrap_group,
    write_private,
)
from shared.token import JoinToken, decode_token_untrusted
from shared.wire.frame import ErrorCode
from shared.wire.session import Closed, LoggedIn, LoginRejected, TrunkSession

DEFAULT_DATA = "/var/lib/branchpbx/remotehost"
DATA_ENV = "BRANCHPBX_REMOTEHOST_DATA"
log = logging.getLogger("remotehost")


async def check_join(token: JoinToken, timeout: float) -> bytes:
    """Dial the main host, check its CA against the token's pin, and log in once.

    Returns the CA certificate (DER). Raises CliError saying what went wrong.
    """
    where = f"{token.host}:{token.port}"
    stream: trio.SSLStream[trio.SocketStream] | None = None
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_ssl_over_tcp_stream(
                token.host, token.port, ssl_context=client_ssl_context(None), https_compatible=True
            )
            await stream.do_handshake()
    except (trio.TooSlowError, OSError, ssl.SSLError, trio.BrokenResourceError) as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)  # the handshake failed, the socket is open
        if isinstance(exc, trio.TooSlowError):
            raise CliError(
                f"the main host at {where} did not answer within {timeout:.0f} s"
            ) from None
        raise CliError(f"cannot connect to the main host at {where}: {exc}") from None
    leaf_der = stream.getpeercert(binary_form=True)

    def check_ca(ca_der: bytes) -> str | None:
        # The session checked SHA-256(CA) against the pin; this checks that the certificate the
        # TLS handshake was made with really was issued by that CA, before the Login is sent,
        # so nobody relaying the connection in the middle sees anything of the office.
        try:
            ca = x509.load_der_x509_certificate(ca_der)
            if leaf_der is None:
                return "no server certificate"
            x509.load_der_x509_certificate(leaf_der).verify_directly_issued_by(ca)
        except (ValueError, TypeError) as exc:
            return f"not issued by the pinned CA ({exc})"
        return None

    session = TrunkSession.client(
        trio.current_time(),
        office=token.office,
        secret=token.secret,
        client_nonce=secrets.token_bytes(32),
        software=SOFTWARE,
        ca_sha256=token.ca_sha256,
        check_ca=check_ca,
    )
    conn = TrunkConnection(stream, session)
    try:
        with trio.fail_after(timeout):
            while True:
                event = await conn.next_event()
                if isinstance(event, LoginRejected):
                    raise CliError(f"the main host at {where} refused the token: {event.reason}")
                if isinstance(event, Closed):
                    raise CliError(
                        f"the main host at {where} closed the connection: {event.reason}"
                    )
                if isinstance(event, LoggedIn):
                    break
    except trio.TooSlowError:
        raise CliError(f"the main host at {where} did not complete the login") from None
    except ConnectionLost as exc:
        raise CliError(f"lost the main host at {where}: {exc}") from None
    finally:
        with trio.CancelScope(shield=True):
            await conn.aclose(ErrorCode.NORMAL, "join check done")
    ca_der = session.ca_cert
    assert hashlib.sha256(ca_der).digest() == token.ca_sha256
    return ca_der


def cmd_join(args: argparse.Namespace) -> int:
    token = decode_token_untrusted(args.token)
    data: Path = args.data
    if (data / CONFIG_NAME).exists():
        raise CliError(
            f"{data} has joined an office already ({data / CONFIG_NAME}); use another --data"
            " or remove it first"
        )
    ca_der = trio.run(check_join, token, args.timeout)
    config = RemoteHostConfig(
        office=token.office,
        trunk=TrunkConfig(main_host=token.host, port=token.port),
    )
    if args.sip_port is not None:
        from dataclasses import replace

        try:
            config = replace(config, sip=replace(config.sip, port=args.sip_port))
        except ValueError as exc:
            raise CliError(str(exc)) from None
    make_private_dir(data)
    ca_pem = x509.load_der_x509_certificate(ca_der).public_bytes(serialization.Encoding.PEM)
    (data / CA_NAME).write_bytes(ca_pem)
    write_private(data / SECRET_NAME, token.secret)
    DirectoryMirror(data / DB_NAME).close()
    (data / CONFIG_NAME).write_text(
        "# branchpbx remote host settings, written by `remotehost join`.\n" + cfg.dump(config)
    )
    print(f"joined office {token.office} at main host {token.host}:{token.port}")
    print(f"  data directory  {data}")
    print("next: `remotehost serve` (or enable deploy/systemd/branchpbx-remotehost.service)")
    return 0


async def _serve(data: Path, config: RemoteHostConfig) -> None:
    await serve_until_signal(RemoteHost(data, config).serve, "remotehost")


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    data: Path = args.data
    if not data.is_dir():
        raise CliError(f"data directory {data} does not exist (run `remotehost join` first)")
    config = load_config(data)
    try:
        trio.run(_serve, data, config)
    except BaseExceptionGroup as group:
        unwrap_group(group, OPERATOR_ERRORS)
        raise
    return 0


def read_status(data: Path) -> dict[str, Any]:
    config = load_config(data)
    try:
        result: dict[str, Any] = control.call(data, "status")
        return result
    except control.ControlError as exc:
        mirror = DirectoryMirror(data / DB_NAME)
        try:
            info = mirror.info()
        finally:
            mirror.close()
        now = time.time()
        bindings = read_bindings(data / LOCATION_DB, now)
        return {
            "running": False,
            "why": str(exc),
            "office": config.office,
            "main_host": f"{config.trunk.main_host}:{config.trunk.port}",
            "online": False,
            "public_address": None,
            "nat_type": "unknown",
            "lan": [],
            "trunk": None,
            "directory": {
                "version": info.version,
                "extensions": info.entries,
                "realm": info.realm,
                "range": None,
            },
            # What the disk last knew: the bindings a restart will serve again.
            "registrations": [
                registration_entry(b, now)
                for b in sorted(bindings, key=lambda b: (b.ext, b.contact))
            ],
        }


def cmd_status(args: argparse.Namespace) -> int:
    status = read_status(args.data)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    now = time.time()
    table = Table(show_header=False, title=f"office {status['office']}", title_justify="left")
    table.add_column("what")
    table.add_column("value")
    if not status["running"]:
        table.add_row("remote host", f"[red]{status.get('why') or 'not running'}[/]")
    trunk = status.get("trunk") or {}
    state = trunk.get("state", "-")
    colour = "green" if state == "online" else "red"
    table.add_row(
        "main host",
        f"{status['main_host']}  [{colour}]{state}[/]"
        + (f" since {ago(trunk.get('since'), now)}" if state == "online" else ""),
    )
    if trunk.get("last_error"):
        table.add_row("last error", trunk["last_error"])
    public = status.get("public_address")
    table.add_row("public address", f"{public}:{trunk.get('public_port')}" if public else "-")
    table.add_row("NAT type", status.get("nat_type") or "unknown")
    for lan in status.get("lan") or []:
        table.add_row(f"LAN {lan['name']}", " ".join(lan["addresses"]))
    directory = status["directory"]
    table.add_row(
        "directory",
        f"version {directory['version']}, {directory['extensions']}"
        f" extension(s), realm {directory['realm'] or '-'}",
    )
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="remotehost", description="branchpbx remote host")
    common = argparse.ArgumentParser(add_help=False)
    add_data_argument(common, DATA_ENV, DEFAULT_DATA)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("join", parents=[common], help="join an office with a token")
    p.add_argument("token", help="the token `mainhost office add` printed")
    p.add_argument("--sip-port", type=int, metavar="PORT", help="SIP port for phones (5060)")
    p.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_join)
    p = sub.add_parser("serve", parents=[common], help="run the remote host")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("status", parents=[common], help="trunk, addresses, NAT, directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_main("remotehost", _main, argv))
