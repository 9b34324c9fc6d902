"""The `mainhost` command: init, office and phone management, serve, status.

The commands and their output are a contract: scripts and tests rely on them (the join token is
the last line of `office add`, `status --json` has a stable shape).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import trio
from rich.console import Console, Group
from rich.table import Table

from mainhost import announce, pki, records
from mainhost.config import (
    ADMIN_KEY,
    CONFIG_NAME,
    ApiConfig,
    MainHostConfig,
    StunConfig,
    TrunkConfig,
)
from mainhost.config import load as load_config
from mainhost.service import MainHost, StartupError, check_data_dir, data_status_offline
from mainhost.store import DB_NAME, MainStore, StoreError
from shared import config as cfg
from shared.aio import control
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
    when,
    write_private,
)
from shared.token import JoinToken

DEFAULT_DATA = "/var/lib/branchpbx/mainhost"
DATA_ENV = "BRANCHPBX_MAINHOST_DATA"
ERRORS = (StartupError, StoreError)
log = logging.getLogger("mainhost")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def guess_public_address() -> str:
    import netifaces

    for name in netifaces.interfaces():
        for entry in netifaces.ifaddresses(name).get(netifaces.AF_INET, []):
            address = entry.get("addr", "")
            if address and not address.startswith("127."):
                return str(address)
    raise CliError("cannot guess this machine's public address: give --public-address HOST")


def cmd_init(args: argparse.Namespace) -> int:
    data: Path = args.data
    if (data / CONFIG_NAME).exists():
        raise CliError(f"{data} holds a main host already ({data / CONFIG_NAME}); not overwriting")
    address = args.public_address or guess_public_address()
    stun_listen = args.listen
    if args.stun_alternate_address and stun_listen in ("0.0.0.0", "::"):
        # Classic NAT type detection needs the STUN server on two specific addresses.
        if not _is_ip(address):
            raise CliError(
                "--stun-alternate-address needs the primary address as an IP: give --listen IP"
            )
        stun_listen = address
    try:
        config = MainHostConfig(
            public_address=address,
            media_port=args.media_port,
            trunk=TrunkConfig(listen=args.listen, port=args.trunk_port),
            stun=StunConfig(
                listen=stun_listen,
                port=args.stun_port,
                alternate_port=args.stun_alternate_port,
                alternate_address=args.stun_alternate_address or "",
            ),
            api=ApiConfig(port=args.api_port),
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    make_private_dir(data)
    for name in (pki.CA_KEY, pki.TRUNK_KEY, ADMIN_KEY, DB_NAME):
        if (data / name).exists():
            raise CliError(f"{data / name} exists already; not overwriting")
    fingerprint = pki.create(data, address)
    write_private(data / ADMIN_KEY, (secrets.token_urlsafe(32) + "\n").encode())
    MainStore(data / DB_NAME).close()
    (data / CONFIG_NAME).write_text(
        "# branchpbx main host settings. Changes take effect at the next `mainhost serve`.\n"
        + cfg.dump(config)
    )
    print(f"main host initialised in {data}")
    print(
        f"  public address   {address} (trunk {config.trunk.port}/tcp, STUN {config.stun.port}/udp)"
    )
    print(f"  CA fingerprint   sha256:{fingerprint.hex()}")
    print(f"  admin key        {data / ADMIN_KEY}")
    print("next: `mainhost office add NAME --extensions 2000-2099`, then `mainhost serve`")
    return 0


def _store(data: Path) -> MainStore:
    if not (data / CONFIG_NAME).exists():
        raise CliError(f"no main host in {data} (run `mainhost init` first, or give --data)")
    return MainStore(data / DB_NAME)


def _token(data: Path, config: MainHostConfig, office: str, secret: bytes) -> str:
    if config.trunk.port == 0:
        raise CliError(f"{data / CONFIG_NAME}: trunk.port is 0; a join token needs a fixed port")
    fingerprint = pki.fingerprint(pki.ca_der(data))
    return JoinToken(config.public_address, config.trunk.port, office, secret, fingerprint).encode()


def cmd_office_add(args: argparse.Namespace) -> int:
    config = load_config(args.data)
    # Whatever would stop the token from being printed must stop us before the office exists.
    _token(args.data, config, args.name, b"")
    store = _store(args.data)
    try:
        secret = store.add_office(args.name, args.extensions, args.wan_kbps)
    finally:
        store.close()
    print(
        f"office {args.name} added: extensions {args.extensions}, WAN voice budget"
        f" {args.wan_kbps} kbit/s"
    )
    print("on the office's remote host run: remotehost join TOKEN, with this token:")
    print(_token(args.data, config, args.name, secret))
    return 0


def cmd_office_set(args: argparse.Namespace) -> int:
    store = _store(args.data)
    try:
        store.set_wan_kbps(args.name, args.wan_kbps)
    finally:
        store.close()
    print(
        f"office {args.name}: WAN voice budget {args.wan_kbps} kbit/s (calls in progress keep"
        " theirs; a running main host applies it within a second)"
    )
    return 0


def cmd_office_token(args: argparse.Namespace) -> int:
    config = load_config(args.data)
    store = _store(args.data)
    try:
        secret = store.office_secret(args.name)
    finally:
        store.close()
    if secret is None:
        raise CliError(f"no office named {args.name!r}")
    print(_token(args.data, config, args.name, secret))
    return 0


def cmd_phone_add(args: argparse.Namespace) -> int:
    config = load_config(args.data)
    password = args.password or secrets.token_urlsafe(12)
    store = _store(args.data)
    try:
        office = store.add_phone(args.ext, password, config.sip.realm, args.name or "")
    finally:
        store.close()
    print(f"phone {args.ext} added to office {office}; SIP credentials:")
    print(f"  username  {args.ext}")
    print(f"  password  {password}")
    print(f"  realm     {config.sip.realm}")
    print(f"  server    the remote host of office {office} (SIP port 5060)")
    return 0


def cmd_phone_remove(args: argparse.Namespace) -> int:
    store = _store(args.data)
    try:
        office = store.remove_phone(args.ext)
    finally:
        store.close()
    print(f"phone {args.ext} removed from office {office}")
    return 0


def cmd_phone_list(args: argparse.Namespace) -> int:
    store = _store(args.data)
    try:
        phones = store.phones(args.office)
    finally:
        store.close()
    if args.json:
        print(json.dumps(phones, indent=2))
        return 0
    table = Table("extension", "office", "name")
    for phone in phones:
        table.add_row(phone["ext"], phone["office"], phone["name"])
    Console().print(table)
    return 0


def cmd_announce(args: argparse.Namespace) -> int:
    store = _store(args.data)
    try:
        sent = announce.announce(
            store,
            args.text,
            now=time.time(),
            office=args.office,
            extensions=args.ext or (),
            expires=args.expires,
        )
    finally:
        store.close()
    where = ", ".join(
        f"{office} ({' '.join(exts) if exts else 'every phone'})"
        for office, exts in sorted(sent.targets.items())
    )
    print(f"announcement {sent.id} stored, for {where}; expires {when(sent.expires_at)}")
    print("the main host sends it to each office when it is online; see `mainhost announcements`")
    return 0


def cmd_calls(args: argparse.Namespace) -> int:
    if not (args.data / CONFIG_NAME).exists():
        raise CliError(f"no main host in {args.data} (run `mainhost init` first, or give --data)")
    store = records.CallRecordStore(args.data / records.DB_NAME)
    try:
        calls = store.calls(live=args.live, limit=args.limit)
        gaps = store.gaps()
    finally:
        store.close()
    now = time.time()
    if args.csv is not None or args.format == "csv":
        text = records.to_csv(calls, now)
        if args.csv is None or str(args.csv) == "-":
            sys.stdout.write(text)
        else:
            write_csv(args.csv, text)
            print(f"{len(calls)} call(s) written to {args.csv}")
        return 0
    if args.json or args.format == "json":
        print(json.dumps({"calls": [c.as_dict(now) for c in calls], "gaps": gaps}, indent=2))
        return 0
    table = Table("id", "state", "caller", "callee", "route", "offices", "started", "duration",
                  "end")  # fmt: skip
    for call in calls:
        end = "" if call.status is None else f"{call.status or 'hangup'} {call.reason}".strip()
        table.add_row(
            call.id,
            "active" if call.active else "ended",
            call.caller,
            call.callee,
            call.route,
            " ".join(call.offices),
            when(call.started_at) if call.started_at else "",
            f"{call.duration(now):.0f} s" if call.answered_at else "",
            end,
        )
    Console().print(table)
    for gap in gaps:
        if gap["missing"]:
            spans = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in gap["missing"])
            print(f"gap: office {gap['office']} boot {gap['boot_id']}: records {spans} missing")
    return 0


def write_csv(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from None


def cmd_announcements(args: argparse.Namespace) -> int:
    store = _store(args.data)
    try:
        rows = announce.summaries(store, time.time())
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table("id", "text", "created", "expires", "office", "delivered", "failed", "pending")
    for row in rows:
        for office in row["offices"]:
            table.add_row(
                row["id"],
                row["text"] if len(row["text"]) <= 40 else row["text"][:39] + "…",
                when(row["created"]),
                ("expired " if row["expired"] else "") + when(row["expires"]),
                office["office"],
                f"{office['delivered']} {' '.join(office['delivered_extensions'])}".strip(),
                f"{office['failed']} {' '.join(office['failed_extensions'])}".strip(),
                f"{office['pending']} {' '.join(office['pending_extensions'])}".strip(),
            )
    Console().print(table)
    return 0


def read_status(data: Path) -> dict[str, Any]:
    if not (data / CONFIG_NAME).exists():
        raise CliError(f"no main host in {data} (run `mainhost init` first, or give --data)")
    try:
        result: dict[str, Any] = control.call(data, "status")
        return result
    except control.ControlError:
        return data_status_offline(data)


def _bandwidth(bandwidth: dict[str, Any] | None) -> str:
    if not bandwidth:
        return "-"
    text = f"{bandwidth['used_kbps']:.0f}/{bandwidth['budget_kbps']} kbit/s"
    if bandwidth.get("refused"):
        text += f", [red]{bandwidth['refused']} refused[/]"
    return text


def render_status(status: dict[str, Any]) -> Group:
    now = time.time()
    title = "main host " + (
        f"running, {status.get('public_address')}" if status["running"] else "NOT running"
    )
    table = Table(title=title, title_justify="left")
    for column in (
        "office",
        "online",
        "public address",
        "NAT type",
        "last seen",
        "extensions",
        "phones",
        "LAN",
    ):
        table.add_column(column)
    for office in status["offices"]:
        address = office["public_address"] or "-"
        if office["public_address"] and office.get("public_port"):
            address = f"{address}:{office['public_port']}"
        lan = ", ".join(f"{i['name']} {' '.join(i['addresses'])}" for i in office.get("lan") or [])
        table.add_row(
            office["name"],
            "[green]online[/]" if office["online"] else "[red]offline[/]",
            address,
            office["nat_type"],
            ago(office["last_seen"], now),
            office["extensions"],
            str(office["phones"]),
            _bandwidth(office.get("bandwidth")),
            lan or "-",
        )
    phones = Table(title="registered phones", title_justify="left")
    for column in ("office", "extension", "contact", "from", "user agent", "expires", "reachable"):
        phones.add_column(column)
    for office in status["offices"]:
        for reg in office.get("registrations") or []:
            phones.add_row(
                office["name"],
                reg["ext"],
                reg["contact"],
                reg["source"],
                reg["user_agent"] or "-",
                f"{max(0, reg['expires_at'] - now):.0f} s",
                "yes" if reg["reachable"] else "[red]no[/]",
            )
    parts: list[Table] = [table]
    if phones.row_count:
        parts.append(phones)
    calls = Table(title="live calls", title_justify="left")
    for column in ("call", "from", "to", "offices", "state", "for", "media path"):
        calls.add_column(column)
    for call in status.get("live_calls") or []:
        since = call.get("since")
        calls.add_row(
            call["call_id"][:12],
            call["caller"],
            call["callee"],
            " -> ".join(call["offices"]),
            call["state"],
            f"{max(0, now - since):.0f} s" if since else "-",
            call["media_path"],
        )
    if calls.row_count:
        parts.append(calls)
    return Group(*parts)


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        return watch_status(args.data)
    status = read_status(args.data)
    if args.json:
        out = dict(status)
        out["offices"] = [{**o, "last_seen_iso": when(o["last_seen"])} for o in status["offices"]]
        print(json.dumps(out, indent=2, default=str))
        return 0
    Console().print(render_status(status))
    return 0


def watch_status(data: Path, interval: float = 1.0) -> int:
    """`status --watch`: the same view, redrawn every second until Ctrl-C."""
    from rich.live import Live

    console = Console()
    try:
        with Live(render_status(read_status(data)), console=console, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(render_status(read_status(data)))
    except KeyboardInterrupt:
        return 0


async def _serve(data: Path, config: MainHostConfig) -> None:
    await serve_until_signal(MainHost(data, config).serve, "mainhost")


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    check_data_dir(args.data)
    config = load_config(args.data)
    try:
        trio.run(_serve, args.data, config)
    except BaseExceptionGroup as group:
        unwrap_group(group, (*OPERATOR_ERRORS, *ERRORS))
        raise
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mainhost", description="branchpbx main host")
    common = argparse.ArgumentParser(add_help=False)
    add_data_argument(common, DATA_ENV, DEFAULT_DATA)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create the data directory, CA and config")
    p.add_argument("--public-address", metavar="HOST", help="address remote hosts dial")
    p.add_argument("--listen", default="0.0.0.0", help="address to listen on (default all)")
    p.add_argument("--trunk-port", type=int, default=5090, metavar="PORT")
    p.add_argument("--stun-port", type=int, default=3478, metavar="PORT")
    p.add_argument("--stun-alternate-port", type=int, default=3479, metavar="PORT")
    p.add_argument(
        "--stun-alternate-address",
        metavar="IP",
        help="a second IP of this machine, for RFC 3489 NAT type detection",
    )
    p.add_argument("--api-port", type=int, default=8080, metavar="PORT")
    p.add_argument(
        "--media-port",
        type=int,
        default=5090,
        metavar="PORT",
        help="media relay port (UDP; 0: any free port)",
    )
    p.set_defaults(func=cmd_init)

    office = sub.add_parser("office", help="manage offices").add_subparsers(
        dest="office_command", required=True, metavar="COMMAND"
    )
    p = office.add_parser("add", parents=[common], help="add an office; prints its join token")
    p.add_argument("name")
    p.add_argument("--extensions", required=True, metavar="FIRST-LAST")
    p.add_argument(
        "--wan-kbps",
        type=int,
        default=2000,
        metavar="N",
        help="WAN voice budget in kbit/s (default 2000)",
    )
    p.set_defaults(func=cmd_office_add)
    p = office.add_parser("set", parents=[common], help="change an office's settings")
    p.add_argument("name")
    p.add_argument(
        "--wan-kbps", type=int, required=True, metavar="N", help="WAN voice budget in kbit/s"
    )
    p.set_defaults(func=cmd_office_set)
    p = office.add_parser("token", parents=[common], help="print an office's join token again")
    p.add_argument("name")
    p.set_defaults(func=cmd_office_token)

    phone = sub.add_parser("phone", help="manage phones").add_subparsers(
        dest="phone_command", required=True, metavar="COMMAND"
    )
    p = phone.add_parser("add", parents=[common], help="add a phone; prints its credentials")
    p.add_argument("ext")
    p.add_argument("--password", help="SIP password (default: a random one)")
    p.add_argument("--name", help="display name")
    p.set_defaults(func=cmd_phone_add)
    p = phone.add_parser("remove", parents=[common], help="remove a phone")
    p.add_argument("ext")
    p.set_defaults(func=cmd_phone_remove)
    p = phone.add_parser("list", parents=[common], help="list phones")
    p.add_argument("--office")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_phone_list)

    p = sub.add_parser("announce", parents=[common], help="send a text to the offices' phones")
    p.add_argument("text")
    p.add_argument("--office", metavar="NAME", help="only this office's phones")
    p.add_argument(
        "--ext", action="append", metavar="EXT", help="only this phone (may be repeated)"
    )
    p.add_argument(
        "--expires",
        type=float,
        default=announce.DEFAULT_EXPIRES,
        metavar="SECONDS",
        help="stop delivering (also to phones registering later) after this long (default 1 day)",
    )
    p.set_defaults(func=cmd_announce)
    p = sub.add_parser("calls", parents=[common], help="call records: finished and active calls")
    p.add_argument("--live", action="store_true", help="only calls going on now")
    p.add_argument("--json", action="store_true", help="machine-readable output (with gaps)")
    p.add_argument("--csv", type=Path, metavar="FILE", help="export as CSV to FILE (- for stdout)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--limit", type=int, metavar="N", help="only the newest N calls")
    p.set_defaults(func=cmd_calls)
    p = sub.add_parser("announcements", parents=[common], help="announcements and who got them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_announcements)

    p = sub.add_parser("serve", parents=[common], help="run the main host")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", parents=[common], help="offices, addresses, NAT types")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true", help="redraw every second until Ctrl-C")
    p.set_defaults(func=cmd_status)
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_main("mainhost", _main, argv, ERRORS))
