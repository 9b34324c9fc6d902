#!/usr/bin/env python3
"""The branchpbx demo: a main host and two branch offices, each behind its own real Linux NAT.

Builds the NAT lab (network namespaces, deploy/lab/netlab.py), sets the system up exactly as an
operator would (`mainhost init`, `office add`, `phone add`, `remotehost join`, `serve`), and shows
`mainhost status` live while it cuts an office's WAN, restores it, and gives the office a new
public address. Everything is removed at the end, also on Ctrl-C. Needs root.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "lab"))

import netlab  # noqa: E402
from labsystem import LabSystem  # noqa: E402
from rich.console import Console, Group  # noqa: E402
from rich.live import Live  # noqa: E402
from rich.panel import Panel  # noqa: E402

from mainhost.cli import render_status  # noqa: E402

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
    with netlab.Lab(2, hosts=["rh"], different_subnets=args.different_subnets) as lab:
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

    story: list[tuple[str, Callable[[], object] | None, float]] = [
        ("both offices log in from behind their NAT routers", None, 8),
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
