#!/usr/bin/env python3
"""The branchpbx demo: a main host and two branch offices, each behind its own real Linux NAT.

Builds the NAT lab (network namespaces, deploy/lab/netlab.py), sets the system up exactly as an
operator would (`mainhost init`, `office add`, `phone add`, `remotehost join`, `serve`), and shows
`mainhost status` live while it cuts an office's WAN, restores it, and gives the office a new
public address. Everything is removed at the end, also on Ctrl-C. Needs root.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "lab"))

import netlab  # noqa: E402
from labsystem import PYTHON, LabSystem, wait_until  # noqa: E402
from rich.console import Console, Group  # noqa: E402
from rich.live import Live  # noqa: E402
from rich.panel import Panel  # noqa: E402

from mainhost.cli import render_status  # noqa: E402
from phoneagent.tone import dominant_frequency  # noqa: E402

OFFICES = {1: "berlin", 2: "lisbon"}
console = Console()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hold", action="store_true", help="keep the lab running after the script, until Ctrl-C"
    )
    parser.add_argument(
        "--different-subnets", action="store_true", help="give each office its own LAN subnet"
    )
    args = parser.parse_args()
    try:
        netlab.check_requirements()
    except netlab.LabError as exc:
        console.print(f"[red]demo: {exc}[/]")
        return 2
    netlab.cleanup_stale()
    workdir = Path(tempfile.mkdtemp(prefix="branchpbx-demo-"))
    with netlab.Lab(2, hosts=["rh", "phone"], different_subnets=args.different_subnets) as lab:
        system = LabSystem(lab, workdir, names=OFFICES)
        try:
            run(lab, system, hold=args.hold)
        except KeyboardInterrupt:
            console.print("interrupted")
        finally:
            system.stop_all()
            console.print(f"logs and data directories are in {workdir}")
    console.print("lab removed")
    return 0


def run(lab: netlab.Lab, system: LabSystem, *, hold: bool) -> None:
    console.rule("branchpbx demo")
    console.print(lab.describe())
    step(f"main host: init, public address {lab.main_addresses[0]}")
    system.start_main()
    for k, name in OFFICES.items():
        token = system.add_office(k, f"{k + 1}000-{k + 1}099")
        ext = f"{k + 1}001"
        system.run_main("phone", "add", ext, "--password", f"demo-secret-{ext}")
        step(f"office {name}: added with phone {ext}; its remote host joins with the token")
        console.print(f"  [dim]{token}[/]")
        system.join(k, token)
        system.start_remote(k)
    for k in OFFICES:
        wait_until(partial(office_online, system, k), 30, f"{OFFICES[k]} online")
    step("both offices are online behind their NAT routers")
    console.print(render_status(system.main_status()))
    place_call(lab, system, workdir=system.workdir)

    story: list[tuple[str, Callable[[], object] | None, float]] = [
        ("both offices online", None, 3),
        (f"cutting {OFFICES[1]}'s WAN link", lab.office(1).cut_wan, 7),
        (f"restoring {OFFICES[1]}'s WAN link", lab.office(1).restore_wan, 6),
        (
            f"{OFFICES[2]}'s provider gives it a new public address",
            lab.office(2).new_public_address,
            6,
        ),
    ]
    with Live(console=console, refresh_per_second=4) as live:
        for caption, action, seconds in story:
            if action is not None:
                action()
            show(live, system, caption, seconds)
        while hold:
            show(live, system, "holding: Ctrl-C to stop and remove the lab", 3600)
    console.print(render_status(system.main_status()))


def office_online(system: LabSystem, office: int) -> bool:
    return bool(system.office_status(office)["online"])


def agent(lab: netlab.Lab, office: int, *args: str) -> list[str]:
    ext = f"{office + 1}001"
    return [
        PYTHON, "-m", "phoneagent", "--server", lab.office(office).host("rh").address,
        "--ext", ext, "--password", f"demo-secret-{ext}",
        "--local-ip", lab.office(office).host("phone").address, *args, "--json",
    ]  # fmt: skip


def place_call(lab: netlab.Lab, system: LabSystem, *, workdir: Path) -> None:
    """berlin's phone 2001 calls lisbon's 3001; each plays a tone and records the other."""
    heard = {1: workdir / "berlin-heard.wav", 2: workdir / "lisbon-heard.wav"}
    step("a call: berlin 2001 (plays 440 Hz) -> lisbon 3001 (plays 660 Hz), 4 s of audio")
    answering = lab.popen(
        lab.office(2).host("phone").ns,
        agent(lab, 2, "answer", "--tone", "660", "--record", str(heard[2])),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(
        lambda: any(r["ext"] == "3001" for r in system.remote_status(2)["registrations"]),
        15,
        "3001 registered",
    )
    calling = lab.run(
        lab.office(1).host("phone").ns,
        agent(lab, 1, "call", "3001", "--tone", "440", "--record", str(heard[1]),
              "--duration", "4"),
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    answer_out, _ = answering.communicate(timeout=30)
    for office, output, expected in ((1, calling.stdout, 660), (2, answer_out, 440)):
        stats = [json.loads(x) for x in output.splitlines() if x.startswith("{")]
        if not stats:
            console.print(f"[red]{OFFICES[office]}: the call failed[/] {output[-500:]}")
            continue
        got = stats[-1]
        frequency = dominant_frequency(heard[office])
        ok = frequency is not None and abs(frequency - expected) < 25
        colour = "green" if ok and got["answered"] else "red"
        console.print(
            f"  [{colour}]{OFFICES[office]} heard {frequency or 0:.0f} Hz (expected {expected})[/],"
            f" {got['packets_received']} packets received, {got['packets_lost']} lost,"
            f" codec {got['codec']}, jitter {got['jitter_ms']:.1f} ms"
        )
    relay = system.main_status().get("relay") or {}
    forwarded = relay.get("forwarded", 0)
    dropped = sum(v for k, v in relay.items() if k.startswith("dropped_"))
    sent = sum(
        json.loads(x).get("packets_sent", 0)
        for output in (calling.stdout, answer_out)
        for x in output.splitlines()
        if x.startswith("{")
    )
    how = (
        "through the main host's relay"
        if forwarded >= 0.9 * sent
        else "directly between the offices once both NATs allowed it (F4), the rest relayed"
    )
    console.print(
        f"  the audio went {how}: the relay forwarded {forwarded} of {sent} encrypted packets"
        f" and dropped {dropped} that did not authenticate"
    )


def show(live: Live, system: LabSystem, caption: str, seconds: float) -> None:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            table = render_status(system.main_status())
        except AssertionError as exc:
            live.update(Panel(str(exc), title="mainhost status failed"))
        else:
            elapsed = time.monotonic() - started
            live.update(Group(Panel(f"{caption}  [dim](+{elapsed:.0f} s)[/]"), table))
        time.sleep(0.5)


def step(text: str) -> None:
    console.print(f"[bold cyan]>[/] {text}")


if __name__ == "__main__":
    sys.exit(main())
