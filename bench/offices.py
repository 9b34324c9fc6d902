"""Two offices on one main host, as processes on loopback: what the figures between offices need.

`tests/peerhelpers.open_office` starts a main host and one office. `open_two_offices` starts that
and then a second office on the same main host, the way an operator adds one to a running main
host: `mainhost office add`, its phones, `office token`, `remotehost join`, `serve`. The main
host notices the new office and phones by itself (it watches its store), so nothing restarts.

This module only starts and stops processes; the figures (bench/calls_between.py,
bench/memory_calls.py) measure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.peerhelpers import HostFailed, Office, free_sip_port, open_office, run_cli

# F7's WAN voice budget of both offices: 10 Gbit/s, so the figures measure call handling and
# not the budget (the default 2 Mbit/s admits 21 G.711 calls at once).
WAN_KBPS = 10_000_000


@dataclass
class TwoOffices:
    """Office `a` (its remote host and the main host) and office `b` (its remote host, on the
    same main host)."""

    a: Office
    b: Office

    @property
    def pids(self) -> tuple[int, int, int]:
        """Remote host a, the main host, remote host b: the three processes a call crosses."""
        return (self.a.remote.pid, self.a.main.pid, self.b.remote.pid)


def start_second_office(first: Office, root: Path, phones: dict[str, str], *, name: str,
                        extensions: str, wan_kbps: int, attempts: int = 3) -> Office:  # fmt: skip
    """Add office `name` to the main host `first` runs, join its remote host and serve it."""
    second = Office(root, phones, name=name, extensions=extensions)
    # The main host is `first`'s: same data directory, same process, same STUN port.
    second.main_data = first.main_data
    second.main = first.main
    second.stun_port = first.stun_port
    run_cli("mainhost", "office", "add", name, "--extensions", extensions,
            "--wan-kbps", str(wan_kbps), "--data", first.main_data)  # fmt: skip
    second.add_phones(phones)
    token = run_cli("mainhost", "office", "token", name, "--data", first.main_data)
    second.sip_port = free_sip_port()
    run_cli("remotehost", "join", token.strip().splitlines()[-1], "--data",
            second.remote_data, "--sip-port", str(second.sip_port))  # fmt: skip
    for attempt in range(attempts):
        second.write_remote_config()
        try:
            second.start_remote()
            return second
        except HostFailed:
            second.remote.stop()
            if attempt == attempts - 1:
                raise
            second.sip_port = free_sip_port()  # someone took the port in between
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def open_two_offices(
    root: Path,
    phones_a: dict[str, str],
    phones_b: dict[str, str],
    *,
    extensions_a: str = "2000-2099",
    extensions_b: str = "3000-3099",
    wan_kbps: int = WAN_KBPS,
) -> Iterator[TwoOffices]:
    """Offices berlin (`extensions_a`) and munich (`extensions_b`) on one main host; all three
    processes stopped on exit, always. Both offices' WAN voice budget is `wan_kbps`."""
    root.mkdir(parents=True, exist_ok=True)
    with open_office(root / "berlin", phones_a, extensions=extensions_a) as a:
        # Set before munich logs in, and the main host applies it within a second, long
        # before the first call (munich's start alone takes longer).
        run_cli("mainhost", "office", "set", a.name, "--wan-kbps", str(wan_kbps),
                "--data", a.main_data)  # fmt: skip
        b = Office(root / "munich", phones_b, name="munich", extensions=extensions_b)
        try:
            (root / "munich").mkdir(exist_ok=True)
            b = start_second_office(
                a, root / "munich", phones_b, name="munich", extensions=extensions_b,
                wan_kbps=wan_kbps,
            )  # fmt: skip
            yield TwoOffices(a, b)
        finally:
            b.stop_remote()  # only its remote host: the main host is a's
