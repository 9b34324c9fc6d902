"""How many authenticated REGISTERs per second one remote host takes: SIPp against it.

Not part of the test suite. Starts a main host and one office's remote host as processes on
loopback (tests/peerhelpers.py), adds `--phones` phones to the directory, and lets SIPp register
them round-robin at `--rate` registrations per second for `--seconds` seconds. Each
registration is the full exchange a phone makes: REGISTER, 401 with an MD5 challenge, REGISTER
with credentials, 200 (tests/sipp/register_fields.xml; every row of the injection file carries
its phone's extension and its own `[authentication ...]` keyword).

Prints one markdown table row and one JSON object: the rate asked for and the rate achieved
(SIPp's successful calls over its elapsed time), failures, and the remote host process's CPU
seconds (user + system, from /proc/PID/stat before and after) per registration.

    .venv/bin/python bench/register_sipp.py --seconds 5 --rate 200 --phones 500
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.peerhelpers import (
    LOOPBACK,
    SIPP_DIR,
    cpu_seconds,
    free_sip_port,
    open_office,
    peer_binary,
    sipp_auth,
    wait_for,
    write_injection,
)


def phone_password(ext: str) -> str:
    return f"bench-{ext}-secret"


def read_stats(path: Path) -> dict[str, str]:
    """The last row of SIPp's -trace_stat file (cumulative counters, ';'-separated)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    if len(rows) < 2:
        raise RuntimeError(f"SIPp wrote no statistics to {path}")
    return dict(zip(rows[0], rows[-1], strict=False))


def epoch_of(text: str) -> float:
    """The Unix time in one of SIPp's date fields ('DATE<TAB>TIME<TAB>EPOCH')."""
    return float(text.split("\t")[-1])


def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    sipp = peer_binary("sipp")
    first = 2000
    phones = {str(first + i): phone_password(str(first + i)) for i in range(args.phones)}
    last = first + max(args.phones, 100) - 1
    with open_office(root / "office", phones, extensions=f"{first}-{last}") as office:
        rows = [[ext, sipp_auth(ext, pw), str(args.expires)] for ext, pw in phones.items()]
        injection = write_injection(root / "phones.csv", rows)
        calls = int(args.rate * args.seconds)
        stats_file = root / "stats.csv"
        argv = [sipp, f"{LOOPBACK}:{office.sip_port}", "-sf", str(SIPP_DIR / "register_fields.xml")]
        argv += ["-inf", str(injection), "-t", args.transport, "-i", LOOPBACK, "-bind_local"]
        argv += ["-p", str(free_sip_port()), "-r", str(args.rate), "-rp", "1s"]
        argv += ["-m", str(calls), "-l", str(args.limit), "-nostdin"]
        argv += ["-timeout", f"{args.seconds + 60}s", "-default_behaviors", "all,-bye"]
        argv += ["-trace_stat", "-stf", str(stats_file), "-fd", "1"]
        pid = office.remote.pid
        cpu_before = cpu_seconds(pid)
        wall_before = time.monotonic()
        result = subprocess.run(
            argv,
            cwd=root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=args.seconds + 120,
            check=False,
        )
        wall = time.monotonic() - wall_before
        # The batch writer saves what the last registrations changed; count that in too.
        wanted = min(args.phones, calls)
        wait_for(lambda: len(office.registrations()) >= wanted or None, "bindings", 30.0)
        time.sleep(0.5)
        cpu = cpu_seconds(pid) - cpu_before
        stats = read_stats(stats_file)
        registrar = office.sip_stats()["service"]["registrar"]
    ok = int(stats.get("SuccessfulCall(C)", "0"))
    failed = int(stats.get("FailedCall(C)", "0"))
    # From the first call to SIPp's last statistics line, which it writes as it ends.
    elapsed = epoch_of(stats["CurrentTime"]) - epoch_of(stats["StartTime"]) or wall
    return {
        "transport": "udp" if args.transport.startswith("u") else "tcp",
        "phones": args.phones,
        "target_rate": args.rate,
        "seconds": round(elapsed, 3),
        "registrations": ok,
        "failures": failed,
        "achieved_rate": round(ok / elapsed, 1) if elapsed else 0.0,
        "register_requests_per_second": round(2 * ok / elapsed, 1) if elapsed else 0.0,
        "remote_cpu_seconds": round(cpu, 3),
        "remote_cpu_ms_per_registration": round(1000 * cpu / ok, 3) if ok else None,
        "registrar": registrar,
        "sipp_exit": result.returncode,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="how long SIPp sends")
    parser.add_argument("--rate", type=float, default=200.0, help="registrations per second")
    parser.add_argument("--phones", type=int, default=500, help="phones in the directory")
    parser.add_argument("--transport", choices=["u1", "t1"], default="u1", help="SIPp -t")
    parser.add_argument("--limit", type=int, default=200, help="registrations in flight")
    parser.add_argument("--expires", type=int, default=300, help="Expires asked for")
    parser.add_argument("--keep", type=Path, help="keep logs and data here (default: a temp dir)")
    args = parser.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        out = bench(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-register-") as tmp:
            out = bench(args, Path(tmp))
    print(
        "| transport | phones | target/s | achieved/s | REGISTER msgs/s | failures |"
        " remote CPU ms/registration |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {out['transport']} | {out['phones']} | {out['target_rate']:g} |"
        f" {out['achieved_rate']:g} | {out['register_requests_per_second']:g} |"
        f" {out['failures']} | {out['remote_cpu_ms_per_registration']} |"
    )
    print(json.dumps(out))
    return 0 if out["failures"] == 0 and out["sipp_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
