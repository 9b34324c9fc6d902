"""The NAT lab: real Linux NAT built from network namespaces, for people and for tests.

This module owns building, changing and tearing down a lab of network namespaces: an "internet",
a main host "in the cloud", and branch offices each behind its own NAT router with LAN hosts
(a remote host, phones). It does not own what runs inside them: callers start their own programs
with `Lab.run` / `Lab.popen` (deploy/demo.py starts a main host in `lab.main_ns` and remote
hosts in office LAN hosts). It is plain synchronous code on top of `ip`, `iptables` and
`conntrack` run as subprocesses; it needs root.

Address plan (documentation ranges only, RFC 5737; nothing else is ever configured)
-------------------------------------------------------------------------------------
    internet  bpx<id>-inet       bridge br0, 203.0.113.1/24: the "ISP gateway" every public host
                                 uses as default route; it forwards nothing (ip_forward=0), so
                                 only 203.0.113.0/24 is reachable on the internet.
    main      bpx<id>-main       eth0: 203.0.113.10/24 and 203.0.113.11/24 (the second address
                                 is for the STUN server's RFC 3489 §9.3 CHANGED-ADDRESS).
    office k  bpx<id>-o<k>       router: wan 203.0.113.(100+k)/24 on the internet bridge,
                                 lan bridge with the LAN's .1; NAT on wan, ip_forward=1.
    LAN host  bpx<id>-o<k>-<nm>  eth0: LAN address from .10 upwards, default via the router.

LAN subnets: by default every office uses 192.0.2.0/24 (router 192.0.2.1, hosts 192.0.2.10, .11,
...), so two offices with the same subnet is the normal case. With `different_subnets=True`
office k gets its own /27 of 198.51.100.0/24: office 1 is 198.51.100.0/27 (router .1, hosts from
.10), office 2 is 198.51.100.32/27 (router .33, hosts from .42), ... (at most 8 offices, 21 hosts
each). `Office.new_public_address()` takes addresses from 203.0.113.200-254.

NAT behaviour: the router masquerades everything leaving wan
(`iptables -t nat -A POSTROUTING -o wan -j MASQUERADE`). Linux keeps the LAN source port when it
is free (port preserving) and lets in only replies from the exact address and port a LAN host sent
to (conntrack), i.e. a port-restricted cone in RFC 3489 §5 terms. `symmetric=True` adds
`--random-fully`: every new destination gets a random public port, a symmetric NAT. The router
also drops everything arriving on wan that is not a reply (FORWARD and INPUT `-i wan` without
ESTABLISHED/RELATED), so nothing from the internet reaches a LAN host unsolicited, even with a
route to the LAN, nor the router itself. Interface names (≤ 15 characters): br0 and o<k> / main
in the internet namespace, eth0 in main and LAN hosts, wan / lan / h<n> in routers. IPv6 is
disabled in every namespace so that no link-local address appears.

API
---
    Lab(offices=1, *, symmetric=(), different_subnets=False, hosts=())  builds a lab now; a
        context manager. `symmetric` holds office numbers (1-based); `hosts` names LAN hosts to
        add to every office.
      .id, .prefix ("bpx<id>-"), .internet_ns, .gateway_address, .main_ns, .main_addresses,
      .offices, .office(k or "o<k>"), .namespaces(), .add_office(symmetric=False) -> Office,
      .run(ns, argv, **kw) -> CompletedProcess, .popen(ns, argv, **kw) -> Popen  (`ip netns
        exec`; keyword arguments go to subprocess; `ns` must be one of this lab's namespaces),
        .exec_argv(ns, argv) -> list[str] (the same command line, for trio.run_process),
      .destroy() (idempotent), .detach(owner_pid=None) (keep it after this process exits, for
        `lab up`; with owner_pid, until that process is gone), .persistent, .owner_pid,
      .describe() -> str (the table `lab up` prints), Lab.load(id) (a lab from the registry).
    Office: .index, .name ("o<k>"), .router_ns, .public_address, .lan_subnet,
      .router_lan_address, .symmetric, .hosts, .host(name), .add_host(name) -> Host,
      .cut_wan(), .restore_wan(), .wan_is_cut(), .new_public_address(address=None) -> str,
      .set_loss(percent), .loss_percent(), .flush_conntrack(), .run(argv, **kw), .popen(argv, **kw).
    Host: .name, .ns, .address, .office, .run(argv, **kw), .popen(argv, **kw).
    check_requirements() raises NotRootError / LabError naming what is missing;
    cleanup_stale() -> ids removed; destroy_lab(id); list_labs() -> [LabRecord].

Cleanup: `destroy()` kills the processes this lab started (and any other process found in its
namespaces, with SIGKILL: stop your programs gracefully first if that matters), deletes every
`bpx<id>-` namespace (the veth pairs and bridges go with them) and the registry entry. It runs
from the context manager, from `atexit` and on SIGTERM. Each lab records its creator's pid and
start time in /run/branchpbx-lab/<id>.json; `cleanup_stale()` removes the namespaces of labs whose
owner is gone (a test run killed with SIGKILL); a lab detached without an owner (`lab up`) is
never stale and stays until `lab down`.

Why this module is over 700 lines: it is one cohesive thing (a lab and its parts share the
registry, the command runner and the cleanup), and splitting it would scatter the address plan.
The command-line front end lives in the `lab` script beside it.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REGISTRY_DIR = Path("/run/branchpbx-lab")
NETNS_DIR = Path("/run/netns")
NAME_PREFIX = "bpx"
_ID_RE = re.compile(r"^[0-9a-f]{6}$")
_NS_RE = re.compile(r"^bpx([0-9a-f]{6})-")
_HOST_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")

INTERNET = ipaddress.IPv4Network("203.0.113.0/24")
GATEWAY_ADDRESS = "203.0.113.1"
MAIN_ADDRESSES = ("203.0.113.10", "203.0.113.11")
SHARED_LAN = ipaddress.IPv4Network("192.0.2.0/24")
SPLIT_LANS = ipaddress.IPv4Network("198.51.100.0/24")
SPLIT_PREFIX = 27
MAX_OFFICES = 50  # public addresses 203.0.113.101-150; 200-254 are for readdressing
READDRESS_POOL = range(200, 255)
FIRST_HOST_OFFSET = 10
WAN = "wan"
LAN = "lan"
CUT_CHAIN = "bpx-cut"
LOSS_CHAIN = "bpx-loss"

# The tools a lab needs, and the Debian package that installs each.
REQUIRED_TOOLS = {
    "ip": "iproute2",
    "iptables": "iptables",
    "iptables-restore": "iptables",
    "conntrack": "conntrack",
    "sysctl": "procps",
}
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"


class LabError(Exception):
    """The lab cannot be built or changed; the message says what to fix."""


class NotRootError(LabError):
    """Network namespaces need root; tests skip on this one and fail on any other LabError."""


def check_requirements(search_path: str | None = None) -> dict[str, str]:
    """Raise unless this process can build labs; return the full path of each tool."""
    if os.geteuid() != 0:
        raise NotRootError("the NAT lab needs root (network namespaces, iptables): run as root")
    path = search_path if search_path is not None else f"{os.environ.get('PATH', '')}:{_SBIN_PATH}"
    found: dict[str, str] = {}
    missing: list[str] = []
    for tool, package in REQUIRED_TOOLS.items():
        where = shutil.which(tool, path=path)
        if where is None:
            missing.append(f"{tool} (apt-get install {package})")
        else:
            found[tool] = where
    if missing:
        raise LabError("the NAT lab needs tools that are not installed: " + ", ".join(missing))
    probe = subprocess.run([found["ip"], "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise LabError(f"`ip netns` does not work here: {probe.stderr.strip()}")
    return found


def _tools() -> dict[str, str]:
    """The tools' paths, looked up once; whether we are root is checked every time."""
    global _TOOLS
    if _TOOLS is None or os.geteuid() != 0:
        _TOOLS = check_requirements()
    return _TOOLS


_TOOLS: dict[str, str] | None = None


def _run(argv: Sequence[str], *, stdin: str | None = None) -> str:
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        shown = " ".join(argv) + (f" <<< {stdin.strip()!r}" if stdin else "")
        raise LabError(f"`{shown}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _ip(ns: str, commands: Iterable[str]) -> None:
    """Run `ip` commands inside `ns` in one process (`ip -n NS -batch -`)."""
    _run([_tools()["ip"], "-n", ns, "-batch", "-"], stdin="\n".join(commands) + "\n")


def _in_ns(ns: str, argv: Sequence[str], *, stdin: str | None = None) -> str:
    return _run([_tools()["ip"], "netns", "exec", ns, *argv], stdin=stdin)


def _sysctl(ns: str, settings: dict[str, str]) -> None:
    # -e: a key this kernel lacks (no bridge netfilter, no IPv6) is not an error.
    _in_ns(ns, [_tools()["sysctl"], "-e", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])


def _iptables(ns: str, *args: str) -> str:
    return _in_ns(ns, [_tools()["iptables"], "-w", *args])


# -- namespaces and processes -----------------------------------------------------------------


def list_namespaces() -> list[str]:
    """All network namespace names (`ip netns list`)."""
    out = _run([_tools()["ip"], "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pids_in(namespaces: Collection[str]) -> list[int]:
    """Pids of processes inside the named namespaces (what `ip netns pids` does, in one scan)."""
    inodes = set()
    for name in namespaces:
        with contextlib.suppress(OSError):
            st = os.stat(NETNS_DIR / name)
            inodes.add((st.st_dev, st.st_ino))
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{entry}/ns/net")
            if (st.st_dev, st.st_ino) in inodes:
                pids.append(int(entry))
    return pids


def _kill_namespace_processes(namespaces: Collection[str], deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while pids := _pids_in(namespaces):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > end:
            raise LabError(f"processes {pids} in {sorted(namespaces)} do not die")
        time.sleep(0.01)


def destroy_lab(lab_id: str) -> None:
    """Kill every process in lab `lab_id`'s namespaces, delete them and its registry entry."""
    prefix = f"{NAME_PREFIX}{lab_id}-"
    names = [n for n in list_namespaces() if n.startswith(prefix)]
    _kill_namespace_processes(names)
    for name in names:
        # A namespace deleted meanwhile (SIGTERM handler racing `destroy()`) is fine.
        proc = subprocess.run([_tools()["ip"], "netns", "del", name], capture_output=True)
        if proc.returncode != 0 and (NETNS_DIR / name).exists():
            raise LabError(f"cannot delete namespace {name}: {proc.stderr.decode().strip()}")
    with contextlib.suppress(FileNotFoundError):
        (REGISTRY_DIR / f"{lab_id}.json").unlink()


# -- the registry -----------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks (/proc/<pid>/stat field 22), to detect pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


@dataclass(frozen=True)
class LabRecord:
    """One lab as the registry and the namespace list know it."""

    id: str
    persistent: bool
    pid: int | None
    alive: bool  # persistent, or its creating process still runs
    namespaces: tuple[str, ...]
    description: dict[str, Any] | None  # the registry JSON; None when the entry is missing


def _read_registry(lab_id: str) -> dict[str, Any] | None:
    try:
        data = json.loads((REGISTRY_DIR / f"{lab_id}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def list_labs() -> list[LabRecord]:
    """Every lab found in the registry or by its namespaces, sorted by id."""
    by_id: dict[str, list[str]] = {}
    for name in list_namespaces():
        if m := _NS_RE.match(name):
            by_id.setdefault(m.group(1), []).append(name)
    if REGISTRY_DIR.is_dir():
        for path in REGISTRY_DIR.glob("*.json"):
            if _ID_RE.match(path.stem):
                by_id.setdefault(path.stem, [])
    records = []
    for lab_id, names in sorted(by_id.items()):
        desc = _read_registry(lab_id)
        persistent = bool(desc and desc.get("persistent"))
        pid = desc.get("pid") if desc else None
        started = _process_start(pid) if isinstance(pid, int) else None
        alive = persistent or (started is not None and started == (desc or {}).get("pid_start"))
        records.append(
            LabRecord(lab_id, persistent, pid if isinstance(pid, int) else None, alive,
                      tuple(sorted(names)), desc)
        )  # fmt: skip
    return records


def cleanup_stale() -> list[str]:
    """Destroy labs whose creating process is gone (and that were not detached); return ids."""
    removed = []
    for record in list_labs():
        if not record.alive and record.id not in _LIVE:
            destroy_lab(record.id)
            removed.append(record.id)
    return removed


# -- the lab ----------------------------------------------------------------------------------


@dataclass
class Host:
    """A machine on an office LAN: its own namespace, one address, default route via the router."""

    office: Office = field(repr=False)
    name: str
    index: int  # 1-based; the router's port for it is h<index>
    address: str

    @property
    def ns(self) -> str:
        return f"{self.office.router_ns}-{self.name}"

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        return self.office.lab.run(self.ns, argv, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        return self.office.lab.popen(self.ns, argv, **kw)


@dataclass
class Office:
    """A branch office: a NAT router namespace and the LAN hosts behind it."""

    lab: Lab = field(repr=False)
    index: int
    symmetric: bool
    lan_subnet: str
    public_address: str
    hosts: list[Host]

    @property
    def name(self) -> str:
        return f"o{self.index}"

    @property
    def router_ns(self) -> str:
        return f"{self.lab.prefix}{self.name}"

    @property
    def router_lan_address(self) -> str:
        return str(ipaddress.IPv4Network(self.lan_subnet)[1])

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise LabError(f"office {self.name} has no host {name!r}")

    def add_host(self, name: str) -> Host:
        """Add a LAN host namespace `bpx<id>-o<k>-<name>` with the next free LAN address."""
        if not _HOST_NAME_RE.match(name):
            raise LabError(f"host name {name!r}: use 1-12 lowercase letters/digits, letter first")
        if any(h.name == name for h in self.hosts):
            raise LabError(f"office {self.name} already has a host {name!r}")
        lan = ipaddress.IPv4Network(self.lan_subnet)
        index = len(self.hosts) + 1
        offset = FIRST_HOST_OFFSET + index - 1
        if offset >= lan.num_addresses - 1:
            raise LabError(f"office {self.name}: no free address left in {lan}")
        host = Host(self, name, index, str(lan[offset]))
        self.hosts.append(host)
        self.lab._create_ns(host.ns)
        port = f"h{index}"
        _ip(self.router_ns, [
            f"link add {port} type veth peer name eth0 netns {host.ns}",
            f"link set {port} master {LAN}",
            f"link set {port} up",
        ])  # fmt: skip
        _ip(host.ns, [
            f"addr add {host.address}/{lan.prefixlen} dev eth0",
            "link set eth0 up",
            f"route add default via {self.router_lan_address}",
        ])  # fmt: skip
        self.lab.save()
        return host

    def cut_wan(self) -> None:
        """Drop everything crossing wan, both ways, router's own traffic too; idempotent.

        Addresses, routes and conntrack state stay, as when a cable is pulled, so
        `restore_wan()` is exact and NAT mappings still alive resume.
        """
        rules = f"*filter\n-F {CUT_CHAIN}\n-A {CUT_CHAIN} -i {WAN} -j DROP\n"
        rules += f"-A {CUT_CHAIN} -o {WAN} -j DROP\nCOMMIT\n"
        _in_ns(self.router_ns, [_tools()["iptables-restore"], "-w", "--noflush"], stdin=rules)

    def restore_wan(self) -> None:
        _iptables(self.router_ns, "-F", CUT_CHAIN)

    def wan_is_cut(self) -> bool:
        return "-j DROP" in _iptables(self.router_ns, "-S", CUT_CHAIN)

    def set_loss(self, percent: float) -> None:
        """Drop `percent` % of forwarded packets in each direction at random (0 turns it off)."""
        if not 0 <= percent <= 100:
            raise LabError(f"loss must be 0-100 %, not {percent}")
        rules = f"*filter\n-F {LOSS_CHAIN}\n"
        if percent > 0:
            stat = f"-m statistic --mode random --probability {percent / 100:.6f} -j DROP"
            rules += f"-A {LOSS_CHAIN} -i {WAN} {stat}\n-A {LOSS_CHAIN} -o {WAN} {stat}\n"
        _in_ns(
            self.router_ns,
            [_tools()["iptables-restore"], "-w", "--noflush"],
            stdin=rules + "COMMIT\n",
        )

    def loss_percent(self) -> float:
        """The loss `set_loss` configured (iptables keeps the probability in 2**-31 steps)."""
        found = re.search(r"--probability (\S+)", _iptables(self.router_ns, "-S", LOSS_CHAIN))
        return round(float(found.group(1)) * 100, 3) if found else 0.0

    def flush_conntrack(self) -> None:
        """Forget every NAT mapping (as a router reboot would)."""
        _in_ns(self.router_ns, [_tools()["conntrack"], "-F"])

    def new_public_address(self, address: str | None = None) -> str:
        """Move wan to a new public address (next free one from .200 up), flush NAT state."""
        taken = {o.public_address for o in self.lab.offices} | {GATEWAY_ADDRESS, *MAIN_ADDRESSES}
        if address is None:
            free = [f"203.0.113.{i}" for i in READDRESS_POOL if f"203.0.113.{i}" not in taken]
            if not free:
                raise LabError("no free public address left in 203.0.113.200-254")
            address = free[0]
        else:
            try:
                ip = ipaddress.IPv4Address(address)
            except ValueError as exc:
                raise LabError(f"{address!r} is not an IPv4 address") from exc
            edges = (INTERNET.network_address, INTERNET.broadcast_address)
            if address in taken or ip not in INTERNET or ip in edges:
                raise LabError(f"{address} is taken or not a host address in {INTERNET}")
        # Deleting the old address also deletes the default route through it: add both anew.
        _ip(self.router_ns, [
            f"addr flush dev {WAN}",
            f"addr add {address}/{INTERNET.prefixlen} dev {WAN}",
            f"route replace default via {GATEWAY_ADDRESS} dev {WAN}",
        ])  # fmt: skip
        self.public_address = address
        self.flush_conntrack()
        self.lab.save()
        return address

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        return self.lab.run(self.router_ns, argv, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        return self.lab.popen(self.router_ns, argv, **kw)


_BASE_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
    # Bridged frames must not cross this namespace's iptables (br_netfilter defaults to 1).
    "net.bridge.bridge-nf-call-iptables": "0",
}


def _router_rules(symmetric: bool) -> str:
    masquerade = f"-A POSTROUTING -o {WAN} -j MASQUERADE" + (" --random-fully" if symmetric else "")
    return "\n".join([
        "*nat", masquerade, "COMMIT",
        "*filter",
        f":{CUT_CHAIN} - [0:0]", f":{LOSS_CHAIN} - [0:0]",
        f"-A INPUT -j {CUT_CHAIN}", f"-A OUTPUT -j {CUT_CHAIN}", f"-A FORWARD -j {CUT_CHAIN}",
        f"-A FORWARD -j {LOSS_CHAIN}",
        # A NAT router lets in replies only: nothing unsolicited reaches the LAN.
        f"-A FORWARD -i {WAN} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A FORWARD -i {WAN} -j DROP",
        # Nor anything unsolicited for the router itself, as on a real home router: accepted,
        # such a packet would leave a conntrack entry holding the public port it was sent to,
        # and the NAT would then map the next flow from that LAN port to another port (a
        # port-preserving NAT would look symmetric to RFC 3489 tests).
        f"-A INPUT -i {WAN} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A INPUT -i {WAN} -j DROP",
        "COMMIT", "",
    ])  # fmt: skip


class Lab:
    """A set of namespaces forming an internet, a main host and NATed offices; see the module."""

    def __init__(
        self,
        offices: int = 1,
        *,
        symmetric: Collection[int] = (),
        different_subnets: bool = False,
        hosts: Sequence[str] = (),
    ) -> None:
        _tools()
        if not 0 <= offices <= (8 if different_subnets else MAX_OFFICES):
            raise LabError(f"{offices} offices: at most {MAX_OFFICES} (8 with different subnets)")
        if bad := set(symmetric) - set(range(1, offices + 1)):
            raise LabError(f"symmetric names offices {sorted(bad)} but there are {offices}")
        REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        existing = {r.id for r in list_labs()}
        while (lab_id := secrets.token_hex(3)) in existing:
            pass
        self.id = lab_id
        self.different_subnets = different_subnets
        self.persistent = False
        self.owner_pid: int | None = os.getpid()  # None once detached for good
        self._owner_start = _process_start(os.getpid())
        self.offices: list[Office] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._destroyed = False
        # Registered before the first namespace exists, so nothing is ever left unaccounted for.
        _LIVE[self.id] = self
        _install_exit_hooks()
        try:
            self.save()
            self._build_core()
            for k in range(1, offices + 1):
                office = self.add_office(symmetric=k in symmetric)
                for name in hosts:
                    office.add_host(name)
        except BaseException:
            self.destroy()
            raise

    @property
    def prefix(self) -> str:
        return f"{NAME_PREFIX}{self.id}-"

    @property
    def internet_ns(self) -> str:
        return f"{self.prefix}inet"

    @property
    def main_ns(self) -> str:
        return f"{self.prefix}main"

    @property
    def main_addresses(self) -> tuple[str, str]:
        return MAIN_ADDRESSES

    @property
    def gateway_address(self) -> str:
        return GATEWAY_ADDRESS

    def office(self, which: int | str) -> Office:
        """Office by number (1-based) or name ("o1")."""
        for office in self.offices:
            if which in (office.index, office.name, str(office.index)):
                return office
        raise LabError(f"lab {self.id} has no office {which!r} (it has {len(self.offices)})")

    def namespaces(self) -> list[str]:
        names = [self.internet_ns, self.main_ns]
        for office in self.offices:
            names += [office.router_ns, *(h.ns for h in office.hosts)]
        return names

    def _create_ns(self, name: str) -> None:
        _run([_tools()["ip"], "netns", "add", name])
        _sysctl(name, _BASE_SYSCTLS)
        _ip(name, ["link set lo up"])

    def _build_core(self) -> None:
        self._create_ns(self.internet_ns)
        self._create_ns(self.main_ns)
        _ip(self.internet_ns, [
            "link add br0 type bridge",
            f"addr add {GATEWAY_ADDRESS}/{INTERNET.prefixlen} dev br0",
            "link set br0 up",
            f"link add main type veth peer name eth0 netns {self.main_ns}",
            "link set main master br0",
            "link set main up",
        ])  # fmt: skip
        _ip(self.main_ns, [
            *(f"addr add {a}/{INTERNET.prefixlen} dev eth0" for a in MAIN_ADDRESSES),
            "link set eth0 up",
            f"route add default via {GATEWAY_ADDRESS}",
        ])  # fmt: skip

    def add_office(self, *, symmetric: bool = False) -> Office:
        """Add the next office: a NAT router on the internet bridge and an empty LAN."""
        index = len(self.offices) + 1
        limit = 8 if self.different_subnets else MAX_OFFICES
        if index > limit:
            raise LabError(f"lab {self.id} already has {limit} offices, the most it can have")
        if self.different_subnets:
            lan = list(SPLIT_LANS.subnets(new_prefix=SPLIT_PREFIX))[index - 1]
        else:
            lan = SHARED_LAN
        office = Office(self, index, symmetric, str(lan), f"203.0.113.{100 + index}", [])
        self.offices.append(office)
        ns = office.router_ns
        self._create_ns(ns)
        _sysctl(ns, {"net.ipv4.ip_forward": "1"})
        _ip(self.internet_ns, [
            f"link add {office.name} type veth peer name {WAN} netns {ns}",
            f"link set {office.name} master br0",
            f"link set {office.name} up",
        ])  # fmt: skip
        _ip(ns, [
            f"addr add {office.public_address}/{INTERNET.prefixlen} dev {WAN}",
            f"link set {WAN} up",
            f"route add default via {GATEWAY_ADDRESS}",
            f"link add {LAN} type bridge",
            f"addr add {office.router_lan_address}/{lan.prefixlen} dev {LAN}",
            f"link set {LAN} up",
        ])  # fmt: skip
        _in_ns(ns, [_tools()["iptables-restore"], "-w"], stdin=_router_rules(symmetric))
        self.save()
        return office

    # -- running things inside --

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        """The argv running `argv` inside `ns` (`ip netns exec`), e.g. for `trio.run_process`.

        Processes started this way are not tracked, but `destroy()` still kills them: it kills
        everything inside the lab's namespaces.
        """
        if self._destroyed:
            raise LabError(f"lab {self.id} is destroyed")
        if ns not in self.namespaces():
            raise LabError(f"{ns!r} is not a namespace of lab {self.id}: {self.namespaces()}")
        return [_tools()["ip"], "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """`subprocess.run(argv, **kw)` inside namespace `ns`."""
        return subprocess.run(self.exec_argv(ns, argv), **kw)

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """`subprocess.Popen(argv, **kw)` inside `ns`; `destroy()` kills and reaps it."""
        proc = subprocess.Popen(self.exec_argv(ns, argv), **kw)
        self._procs.append(proc)
        return proc

    # -- registry --

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "persistent": self.persistent,
            "pid": self.owner_pid,
            "pid_start": self._owner_start,
            "different_subnets": self.different_subnets,
            "offices": [
                {
                    "index": o.index,
                    "symmetric": o.symmetric,
                    "lan_subnet": o.lan_subnet,
                    "public_address": o.public_address,
                    "hosts": [{"name": h.name, "address": h.address} for h in o.hosts],
                }
                for o in self.offices
            ],
        }

    def save(self) -> None:
        path = REGISTRY_DIR / f"{self.id}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, lab_id: str) -> Lab:
        """The lab `lab_id` from the registry (e.g. one a `lab up` left running).

        The caller does not own it: it is not destroyed when this process exits.
        """
        desc = _read_registry(lab_id)
        if desc is None:
            raise LabError(f"no lab {lab_id!r} in {REGISTRY_DIR} (see `lab list`)")
        _tools()
        lab = cls.__new__(cls)
        lab.id = lab_id
        lab.different_subnets = bool(desc.get("different_subnets"))
        lab.persistent = bool(desc.get("persistent"))
        pid, start = desc.get("pid"), desc.get("pid_start")
        lab.owner_pid = pid if isinstance(pid, int) else None
        lab._owner_start = start if isinstance(start, str) else None
        lab.offices = []
        lab._procs = []
        lab._destroyed = False
        try:
            for o in desc["offices"]:
                office = Office(lab, int(o["index"]), bool(o["symmetric"]), str(o["lan_subnet"]),
                                str(o["public_address"]), [])  # fmt: skip
                office.hosts = [
                    Host(office, str(h["name"]), i, str(h["address"]))
                    for i, h in enumerate(o["hosts"], start=1)
                ]
                lab.offices.append(office)
        except (KeyError, TypeError, ValueError) as exc:
            raise LabError(f"registry entry {lab_id}.json is damaged: {exc!r}") from exc
        return lab

    def detach(self, owner_pid: int | None = None) -> None:
        """Keep this lab after this process exits (for `lab up`); `lab down` removes it.

        With `owner_pid` the lab lives as long as that process instead: once it is gone the
        lab is stale and `cleanup_stale()` removes it (a test driving `lab up` passes its pid).
        """
        start = None if owner_pid is None else _process_start(owner_pid)
        if owner_pid is not None and start is None:
            raise LabError(f"no process {owner_pid} to own lab {self.id}")
        self.persistent = owner_pid is None
        self.owner_pid, self._owner_start = owner_pid, start
        _LIVE.pop(self.id, None)
        self.save()

    # -- teardown --

    def destroy(self) -> None:
        """Kill processes, delete all namespaces and the registry entry. Idempotent.

        Safe from a signal handler: namespaces go first, and closing a pipe the interrupted
        code was reading (a RuntimeError: reentrant call) is skipped.
        """
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()
        destroy_lab(self.id)
        _LIVE.pop(self.id, None)
        self._destroyed = True
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError, RuntimeError):
                        pipe.close()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    def describe(self) -> str:
        """A table of namespaces and addresses, and how to enter them."""
        rows = [
            ("internet", self.internet_ns, f"{GATEWAY_ADDRESS} (gateway, bridge br0)"),
            ("main", self.main_ns, ", ".join(MAIN_ADDRESSES)),
        ]
        for o in self.offices:
            nat = "symmetric (--random-fully)" if o.symmetric else "port-preserving"
            detail = f"public {o.public_address}, LAN {o.lan_subnet}, NAT {nat}"
            detail += ", WAN CUT" if o.wan_is_cut() else ""
            detail += f", {loss:g} % loss" if (loss := o.loss_percent()) else ""
            rows.append((f"{o.name} router", o.router_ns, detail))
            rows += [(f"{o.name} {h.name}", h.ns, h.address) for h in o.hosts]
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        if self.persistent:
            kept = " (kept until `lab down`)"
        elif _LIVE.get(self.id) is not self:  # not ours to destroy at exit
            kept = f" (kept while process {self.owner_pid} runs)"
        else:
            kept = ""
        lines = [f"lab {self.id}{kept}"]
        lines += [f"  {a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows]
        lines.append(f"enter one with: ip netns exec {self.main_ns} bash")
        return "\n".join(lines)


# -- exit hooks -------------------------------------------------------------------------------

_LIVE: dict[str, Lab] = {}
_atexit_installed = False
_sigterm_installed = False
_previous_sigterm: Callable[[int, FrameType | None], Any] | int | None = None


def _destroy_live() -> None:
    for lab in list(_LIVE.values()):
        try:
            lab.destroy()
        except Exception:
            with contextlib.suppress(Exception):
                destroy_lab(lab.id)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _destroy_live()
    if callable(_previous_sigterm):
        _previous_sigterm(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_exit_hooks() -> None:
    global _atexit_installed, _sigterm_installed, _previous_sigterm
    if not _atexit_installed:
        _atexit_installed = True
        atexit.register(_destroy_live)
    # Signal handlers can only be set from the main thread; a later lab made there sets it.
    if not _sigterm_installed and threading.current_thread() is threading.main_thread():
        _sigterm_installed = True
        previous = signal.getsignal(signal.SIGTERM)
        # An ignored SIGTERM stays ignored; one set from C (None) we cannot chain to.
        if previous is signal.SIG_DFL or callable(previous):
            _previous_sigterm = previous
            signal.signal(signal.SIGTERM, _on_sigterm)
