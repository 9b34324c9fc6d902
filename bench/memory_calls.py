"""Remote host memory with 500 registered phones and 100 calls up (issue 6, target <= 80 MB RSS).

Office berlin's remote host gets 500 phones (2000-2499) registered by SIPp with digest auth at
250/s, then 100 calls that stay up: a SIPp caller registered as 2001 dials 3002, a phone of
office munich on the same main host, whose SIPp callee answers every call. These are calls
between offices because they are the heavier kind for a remote host: each has a media anchor
(two UDP sockets, a WAN leg with its key) besides the B2BUA's two legs, where a call inside the
office carries no media through the remote host at all. While the calls are up, the caller
streams G.711 (SIPp `rtp_stream`, 50 packets/s per call) to the anchor and the callee echoes it
(`-rtp_echo`), so the audio crosses berlin's anchor, the main host's relay and munich's anchor
both ways. The RSS of berlin's remote host (VmRSS) is read after the media has run for a few
seconds; the RSS before the calls, munich's and the main host's are in the runs.

    .venv/bin/python bench/memory_calls.py
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project (tests.*)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/run.py, bench/offices.py

from offices import open_two_offices
from run import (
    FIRST_EXT,
    FULL,
    PHONES,
    QUICK,
    Figure,
    Mode,
    log,
    no_pauses,
    rss_mb,
    sipp_register_step,
)

from tests.peerhelpers import (
    LOOPBACK,
    SIPP_DIR,
    free_port,
    free_sip_port,
    peer_binary,
    sipp_auth,
    stop_process,
    wait_for,
    write_injection,
)

CALLS = 100
CALLER = "2001"
CALLEE = ("3002", "bench-3002-secret")
MEDIA_SECONDS = 3.0


def password(ext: str) -> str:
    return f"bench-{ext}-secret"


def silence_wav(path: Path, seconds: float = 1.0) -> Path:
    """A WAV file of G.711 mu-law silence (format 7, 8 kHz, mono) for SIPp's rtp_stream."""
    samples = b"\xff" * int(8000 * seconds)
    fmt = struct.pack("<HHIIHH", 7, 1, 8000, 8000, 1, 8)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(samples)) + samples
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def long_call_scenario(work: Path, wav: Path) -> Path:
    """tests/sipp/call_uac.xml with audio streamed after the ACK and the call held up for
    10 minutes (the caller is stopped once the memory is read)."""
    text = (SIPP_DIR / "call_uac.xml").read_text()
    stream = (
        f'<nop><action><exec rtp_stream="{wav},-1,0"/></action></nop>\n'
        '  <pause milliseconds="600000"/>'
    )
    text, count = re.subn(r'<pause milliseconds="2000"/>', stream, text)
    if count != 1:
        raise RuntimeError("call_uac.xml changed: no 2 s pause to replace")
    out = work / "call_uac_long.xml"
    out.write_text(text)
    return out


@contextlib.contextmanager
def echoing_callee(workdir: Path, target: tuple[str, int], ext: str, secret: str) -> Iterator[None]:
    """bench/run.py's `sipp_callee` (registered as `ext`, answering every call), echoing the
    audio it gets (-rtp_echo) from a media port of its own."""
    port = free_sip_port()
    fields = write_injection(workdir / f"callee-{ext}.csv", [[ext]])
    common = ["-t", "u1", "-i", LOOPBACK, "-bind_local", "-p", str(port), "-nostdin"]
    register = [peer_binary("sipp"), f"{target[0]}:{target[1]}"]
    register += ["-sf", str(SIPP_DIR / "register_auth.xml"), "-inf", str(fields), "-m", "1"]
    register += ["-au", ext, "-ap", secret, "-timeout", "10s", *common]
    subprocess.run(
        register, cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
        check=True,
    )  # fmt: skip
    uas = [peer_binary("sipp"), "-sf", str(no_pauses("call_uas.xml", workdir)), "-aa"]
    uas += ["-rtp_echo", "-mp", str(free_port(socket.SOCK_DGRAM)), "-buff_size", "4194304"]
    process = subprocess.Popen(
        [*uas, *common], cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.3)
        yield
    finally:
        stop_process(process, grace=2.0)


def connected_calls(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in status.get("calls") or [] if c.get("state") == "connected"]


def media_packets(calls: list[dict[str, Any]]) -> int:
    """Packets that reached the anchors of these calls, from the phone and from the WAN."""
    total = 0
    for call in calls:
        media = call.get("media") or {}
        total += int(media.get("phone_packets_in", 0)) + int(media.get("wan_packets_in", 0))
    return total


def bench_memory(mode: Mode) -> Figure:
    figure = Figure(
        "memory",
        f"Remote host memory with {PHONES} registered phones and {CALLS} calls up",
        "MB RSS",
        "<= 80 MB with 500 phones and 100 calls",
        higher_is_better=False,
    )
    phones_a = {str(FIRST_EXT + i): password(str(FIRST_EXT + i)) for i in range(PHONES)}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        extensions = f"{FIRST_EXT}-{FIRST_EXT + PHONES - 1}"
        with open_two_offices(
            work / "offices", phones_a, {CALLEE[0]: CALLEE[1]}, extensions_a=extensions
        ) as offices:
            a = offices.a
            pid = a.remote.pid
            rows = [[ext, sipp_auth(ext, pw), "300"] for ext, pw in phones_a.items()]
            injection = write_injection(work / "phones.csv", rows)
            log(f"memory: registering {PHONES} phones at 250/s")
            sipp_register_step(work, a.sip_port, injection, 250.0, 2.0, lambda: 0.0)
            wait_for(lambda: len(a.registrations()) >= PHONES or None, "500 bindings", 30.0)
            registered_mb = rss_mb(pid)
            with echoing_callee(work, (LOOPBACK, offices.b.sip_port), *CALLEE):
                wait_for(lambda: offices.b.registrations(CALLEE[0]) or None, "the callee")
                wav = silence_wav(work / "silence.wav")
                argv = [peer_binary("sipp"), f"{LOOPBACK}:{a.sip_port}"]
                argv += ["-sf", str(long_call_scenario(work, wav)), "-s", CALLEE[0]]
                argv += ["-key", "caller", CALLER, "-au", CALLER, "-ap", phones_a[CALLER]]
                argv += ["-auth_uri", f"{CALLEE[0]}@{LOOPBACK}:{a.sip_port}", "-t", "u1"]
                argv += ["-i", LOOPBACK, "-bind_local", "-p", str(free_sip_port())]
                argv += ["-r", "50", "-m", str(CALLS), "-l", str(CALLS), "-nostdin"]
                argv += ["-buff_size", "4194304", "-timeout", "700s"]
                log(f"memory: placing {CALLS} calls from {CALLER} to {CALLEE[0]} at 50/s")
                caller = subprocess.Popen(
                    argv, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
                try:
                    try:
                        up = wait_for(
                            lambda: len(connected_calls(a.remote_status())) >= CALLS or None,
                            f"{CALLS} calls up",
                            60.0,
                            interval=0.5,
                        )
                    except TimeoutError as exc:
                        calls = a.remote_status().get("calls") or []
                        states = collections.Counter(c.get("state") for c in calls)
                        raise TimeoutError(f"{exc}: calls at berlin {dict(states)}") from None
                    first = media_packets(connected_calls(a.remote_status()))
                    time.sleep(MEDIA_SECONDS)
                    status = a.remote_status()
                    calls = connected_calls(status)
                    packets = media_packets(calls) - first
                    figure.ours = rss_mb(pid)
                    figure.runs.append(
                        {
                            "side": "ours",
                            "calls_up": len(calls),
                            "registered": len(status.get("registrations") or []),
                            "rss_registered_only_mb": round(registered_mb, 1),
                            "rss_mb": round(figure.ours, 1),
                            "rss_munich_remote_mb": round(rss_mb(offices.b.remote.pid), 1),
                            "rss_main_mb": round(rss_mb(a.main.pid), 1),
                            "anchor_packets_in_media_window": packets,
                            "media_seconds": MEDIA_SECONDS,
                            "waited_for_calls": bool(up),
                        }
                    )
                finally:
                    stop_process(caller, grace=2.0)
    run = figure.runs[-1]
    figure.target_met = figure.ours is not None and figure.ours <= 80
    figure.note = (
        f"Office berlin's remote host with {run['registered']} phones registered and"
        f" {run['calls_up']} calls up, all from its phone {CALLER} to {CALLEE[0]} at office"
        " munich (calls between offices: each has a media anchor at both remote hosts and a"
        " relay leg at the main host), with G.711 audio streamed by the SIPp caller and echoed"
        f" by the callee; the anchors counted {run['anchor_packets_in_media_window']:,} packets"
        f" in the {MEDIA_SECONDS:.0f} s before the RSS was read. With the 500 phones alone it"
        f" was {run['rss_registered_only_mb']} MB. Munich's remote host (1 phone, the same 100"
        f" calls): {run['rss_munich_remote_mb']} MB; the main host: {run['rss_main_mb']} MB."
    )
    del mode  # one measurement: RSS is not a rate, repeats would read the same process
    return figure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the same as without (one run)")
    args = parser.parse_args()
    figure = bench_memory(QUICK if args.quick else FULL)
    print(f"{figure.name}: {figure.ours:.1f} {figure.unit}")
    print(figure.note)
    for run in figure.runs:
        print(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
