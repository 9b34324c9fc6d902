"""The NAT lab works: real Linux NAT between namespaces, as the system tests will rely on.

Traffic goes only between the lab's own namespaces. Servers run in the main namespace, clients in
office LAN hosts, each a small Python program started with `lab.popen`. "Nothing arrives" is never
shown by waiting: a packet that must be dropped is first seen dropped (an iptables counter or a
conntrack entry on the router), then a later packet on the same path must be the first to arrive.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.labfixtures import LAB_DIR, LabFactory, netlab, require_lab

PYTHON = sys.executable
DOC_NETS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]

# UDP echo: binds every address given (same port), prints the port, answers "ip:port" seen.
UDP_ECHO = """
import select, socket, sys
socks, port = [], 0
for a in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((a, port))
    port = s.getsockname()[1]
    socks.append(s)
print(port, flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, (ip, p) = s.recvfrom(2048)
        s.sendto(f"{ip}:{p}".encode(), (ip, p))
"""

# TCP echo: accepts, sends the peer's "ip:port", closes.
TCP_ECHO = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
while True:
    conn, (ip, p) = srv.accept()
    with conn:
        conn.sendall(f"{ip}:{p}".encode())
"""

UDP_ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
for _ in range(10):
    s.sendto(b"?", (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recv(2048).decode())
        break
    except TimeoutError:
        pass
else:
    sys.exit("no UDP reply")
"""

TCP_ASK = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
    data = b""
    while chunk := c.recv(2048):
        data += chunk
print(data.decode())
"""

# A UDP peer steered by JSON lines on stdin, one JSON answer line per command.
PEER = """
import json, select, socket, sys
socks, port = [], int(sys.argv[2])
for a in sys.argv[1].split(","):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 1 << 22)
    s.bind((a, port))
    port = s.getsockname()[1]
    socks.append(s)
print(json.dumps(port), flush=True)

def recv(timeout):
    ready = select.select(socks, [], [], timeout)[0]
    if not ready:
        return None
    data, (ip, p) = ready[0].recvfrom(65535)
    return [data.decode(), ip, p]

for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "send":
        out = 0  # how many sends failed (EPERM when the sender's own OUTPUT drops it)
        for d in cmd["data"]:
            try:
                socks[cmd["via"]].sendto(d.encode(), (cmd["to"][0], cmd["to"][1]))
            except OSError:
                out += 1
    elif cmd["op"] == "until":
        out = []
        while len(out) < cmd.get("count", 1 << 30):
            got = recv(cmd["timeout"])
            if got is None:
                break
            out.append(got)
            if got[0] == cmd.get("marker"):
                break
    else:
        out = []
        while (got := recv(0)) is not None:
            out.append(got)
    print(json.dumps(out), flush=True)
"""

Datagram = tuple[str, str, int]  # data, source address, source port


class Peer:
    """A UDP socket (or several on one port) inside a namespace, driven from the test."""

    def __init__(self, lab: netlab.Lab, ns: str, binds: str = "0.0.0.0", port: int = 0) -> None:
        self.proc = lab.popen(
            ns,
            [PYTHON, "-c", PEER, binds, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port: int = self._answer()

    def _answer(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"peer died with exit code {self.proc.poll()}"
        return json.loads(line)

    def _call(self, **cmd: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def send(self, to: tuple[str, int], *data: str, via: int = 0) -> int:
        """Send datagrams; return how many the local stack refused."""
        failed: int = self._call(op="send", to=list(to), data=list(data), via=via)
        return failed

    def until(
        self, *, marker: str | None = None, count: int | None = None, timeout: float = 5.0
    ) -> list[Datagram]:
        """Datagrams received up to `marker` or `count` of them; fails if that never comes."""
        cmd: dict[str, Any] = {"op": "until", "timeout": timeout, "marker": marker}
        if count is not None:
            cmd["count"] = count
        got = [(d, ip, p) for d, ip, p in self._call(**cmd)]
        if marker is not None:
            assert got and got[-1][0] == marker, f"{marker!r} never arrived; got {got}"
        if count is not None:
            assert len(got) == count, f"expected {count} datagrams, got {got}"
        return got

    def drain(self) -> list[Datagram]:
        return [(d, ip, p) for d, ip, p in self._call(op="drain")]


def start_server(lab: netlab.Lab, script: str, *args: str) -> int:
    proc = lab.popen(lab.main_ns, [PYTHON, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"server died with exit code {proc.poll()}"
    return int(line)


def ask(host: netlab.Host, script: str, address: str, port: int) -> tuple[str, int]:
    """What the server at address:port saw as this host's source (ip, port)."""
    done = host.run(
        [PYTHON, "-c", script, address, str(port)], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    ip, _, seen_port = done.stdout.strip().rpartition(":")
    return ip, int(seen_port)


def iptables_packets(office: netlab.Office, chain: str) -> list[int]:
    """Packet counters of `chain`'s rules, in order."""
    out = office.run(
        ["iptables", "-w", "-L", chain, "-v", "-n", "-x"], capture_output=True, text=True
    ).stdout
    return [int(line.split()[0]) for line in out.splitlines()[2:] if line.strip()]


def wait_for(what: str, predicate: Callable[[], bool], deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.005)


def lab_namespaces(lab_id: str) -> list[str]:
    return [n for n in netlab.list_namespaces() if n.startswith(f"bpx{lab_id}-")]


# -- without root -----------------------------------------------------------------------------


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    # Also after the tools were found once (an earlier test as root): root is checked each time.
    monkeypatch.setattr(netlab, "_TOOLS", {"ip": "/usr/sbin/ip"})
    with pytest.raises(netlab.NotRootError, match="needs root"):
        netlab.check_requirements()
    with pytest.raises(netlab.NotRootError):
        netlab.Lab()


def test_missing_tools_are_named_with_their_debian_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(netlab.LabError) as caught:
        netlab.check_requirements(search_path=str(tmp_path))
    message = str(caught.value)
    for tool, package in netlab.REQUIRED_TOOLS.items():
        assert f"{tool} (apt-get install {package})" in message


def test_lab_factory_refuses_unmarked_tests(tmp_path: Path) -> None:
    (tmp_path / "test_unmarked.py").write_text("def test_unmarked(lab_factory):\n    pass\n")
    done = subprocess.run(
        [PYTHON, "-m", "pytest", "-p", "tests.labfixtures", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=LAB_DIR.parents[1],
        env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},  # a faster start
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "must be marked @pytest.mark.lab" in done.stdout
    assert "1 error" in done.stdout


# -- the lab as built -------------------------------------------------------------------------


@pytest.mark.lab
def test_layout_uses_documentation_addresses_only_and_leaves_the_host_alone(
    lab_factory: LabFactory,
) -> None:
    root_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    lab = lab_factory(offices=2, symmetric=[2], hosts=["rh", "phone1"])
    root_after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert [line.split(":")[1] for line in root_before.splitlines()] == [
        line.split(":")[1] for line in root_after.splitlines()
    ]
    assert sorted(lab_namespaces(lab.id)) == sorted(lab.namespaces())
    assert all(ns.startswith(f"bpx{lab.id}-") for ns in lab.namespaces())
    for ns in lab.namespaces():
        links = lab.run(ns, ["ip", "-o", "link"], capture_output=True, text=True).stdout
        for line in links.splitlines():
            assert len(line.split(":")[1].strip().split("@")[0]) <= 15
        addrs = lab.run(ns, ["ip", "-o", "addr"], capture_output=True, text=True).stdout
        assert " inet6 " not in addrs, f"{ns} has IPv6 addresses: {addrs}"
        for found in re.findall(r" inet (\S+)", addrs):
            ip = ipaddress.ip_interface(found).ip
            assert ip.is_loopback or any(ip in net for net in DOC_NETS), f"{ns}: {found}"
    assert lab.main_addresses == ("203.0.113.10", "203.0.113.11")
    assert [o.public_address for o in lab.offices] == ["203.0.113.101", "203.0.113.102"]
    assert [h.address for h in lab.office(1).hosts] == ["192.0.2.10", "192.0.2.11"]
    assert lab.office("o2").symmetric and not lab.office(1).symmetric
    assert lab.office(2).host("phone1").ns == f"bpx{lab.id}-o2-phone1"


@pytest.mark.lab
def test_lab_runs_commands_only_in_its_own_namespaces(lab_factory: LabFactory) -> None:
    lab = lab_factory()
    other = lab_factory()
    with pytest.raises(netlab.LabError, match="not a namespace of lab"):
        lab.run(other.main_ns, ["true"])
    with pytest.raises(netlab.LabError, match="not a namespace of lab"):
        lab.popen("", ["true"])
    assert lab.run(lab.main_ns, ["true"]).returncode == 0
    lab.destroy()
    with pytest.raises(netlab.LabError, match="destroyed"):
        lab.run(lab.main_ns, ["true"])


@pytest.mark.lab
def test_bad_options_and_host_names_are_refused(lab_factory: LabFactory) -> None:
    with pytest.raises(netlab.LabError, match="symmetric"):
        lab_factory(offices=1, symmetric=[2])
    with pytest.raises(netlab.LabError, match="at most"):
        lab_factory(offices=9, different_subnets=True)
    office = lab_factory().office(1)
    for bad in ["", "Rh", "1rh", "rh-1", "a" * 13]:
        with pytest.raises(netlab.LabError, match="host name"):
            office.add_host(bad)
    office.add_host("rh")
    with pytest.raises(netlab.LabError, match="already has"):
        office.add_host("rh")
    with pytest.raises(netlab.LabError, match="no office"):
        office.lab.office(3)
    with pytest.raises(netlab.LabError, match="0-100"):
        office.set_loss(101)


@pytest.mark.lab
def test_load_finds_the_same_lab_in_the_registry(lab_factory: LabFactory) -> None:
    lab = lab_factory(offices=2, different_subnets=True, hosts=["rh"])
    lab.office(2).new_public_address()
    loaded = netlab.Lab.load(lab.id)
    assert loaded.namespaces() == lab.namespaces()
    assert loaded.to_json()["offices"] == lab.to_json()["offices"]
    assert loaded.office(2).public_address == "203.0.113.200"
    record = next(r for r in netlab.list_labs() if r.id == lab.id)
    assert record.alive and not record.persistent and record.pid == os.getpid()
    with pytest.raises(netlab.LabError, match="no lab"):
        netlab.Lab.load("000000" if lab.id != "000000" else "ffffff")


@pytest.mark.lab
def test_describe_shows_the_lab_as_it_is(lab_factory: LabFactory) -> None:
    lab = lab_factory(offices=2, symmetric=[2], hosts=["rh"])
    text = lab.describe()
    for ns in lab.namespaces():
        assert ns in text
    for address in [*lab.main_addresses, "203.0.113.101", "203.0.113.102", "192.0.2.10"]:
        assert address in text
    assert "symmetric" in text and "port-preserving" in text and "ip netns exec" in text
    assert "CUT" not in text and "loss" not in text
    lab.office(1).cut_wan()
    lab.office(2).set_loss(12.5)
    text = lab.describe()
    assert "NAT port-preserving, WAN CUT" in text and "12.5 % loss" in text


@pytest.mark.lab
def test_an_office_lan_runs_out_of_addresses_with_a_clear_error(lab_factory: LabFactory) -> None:
    office = lab_factory(offices=2, different_subnets=True).office(2)
    hosts = [office.add_host(f"h{i}") for i in range(21)]
    assert [h.address for h in hosts[:2]] == ["198.51.100.42", "198.51.100.43"]
    assert hosts[-1].address == "198.51.100.62"  # the last address below the /27's broadcast
    with pytest.raises(
        netlab.LabError, match=re.escape("no free address left in 198.51.100.32/27")
    ):
        office.add_host("onetoomany")
    assert len(office.hosts) == 21


@pytest.mark.lab
def test_two_labs_coexist_with_the_same_addresses(lab_factory: LabFactory) -> None:
    labs = [lab_factory(hosts=["rh"]) for _ in range(2)]
    assert labs[0].id != labs[1].id
    assert not set(labs[0].namespaces()) & set(labs[1].namespaces())
    for lab in labs:
        udp = start_server(lab, UDP_ECHO, lab.main_addresses[0])
        assert ask(lab.office(1).host("rh"), UDP_ASK, lab.main_addresses[0], udp)[0] == (
            "203.0.113.101"
        )


def test_loading_an_unknown_lab_is_a_lab_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netlab, "REGISTRY_DIR", Path(__file__).parent / "no-such-registry")
    with pytest.raises(netlab.LabError, match="no lab"):
        netlab.Lab.load("abcdef")


@pytest.mark.lab
def test_damaged_and_orphaned_registry_entries(lab_factory: LabFactory) -> None:
    lab_factory(offices=1)  # makes sure the registry directory exists
    gone = subprocess.Popen(["true"])
    gone.wait()
    damaged = netlab.REGISTRY_DIR / "f0f0f0.json"
    # No pid_start: an entry that cannot prove its creator still runs is stale.
    damaged.write_text(json.dumps({"pid": gone.pid, "offices": [{}]}))
    try:
        with pytest.raises(netlab.LabError, match="damaged"):
            netlab.Lab.load("f0f0f0")
        record = next(r for r in netlab.list_labs() if r.id == "f0f0f0")
        assert not record.alive and record.namespaces == ()
        assert "f0f0f0" in netlab.cleanup_stale()
        assert not damaged.exists()
    finally:
        damaged.unlink(missing_ok=True)


# -- NAT behaviour ----------------------------------------------------------------------------


@pytest.mark.lab
def test_server_sees_the_public_address_not_the_lan_address(lab_factory: LabFactory) -> None:
    lab = lab_factory(hosts=["rh"])
    rh = lab.office(1).host("rh")
    udp = start_server(lab, UDP_ECHO, *lab.main_addresses)
    tcp = start_server(lab, TCP_ECHO, "0.0.0.0")
    for address in lab.main_addresses:
        assert ask(rh, UDP_ASK, address, udp)[0] == "203.0.113.101"
        assert ask(rh, TCP_ASK, address, tcp)[0] == "203.0.113.101"
    assert rh.address == "192.0.2.10"


@pytest.mark.lab
@pytest.mark.parametrize("different_subnets", [False, True])
def test_two_offices_are_told_apart_by_public_address(
    lab_factory: LabFactory, different_subnets: bool
) -> None:
    lab = lab_factory(offices=2, different_subnets=different_subnets, hosts=["rh"])
    one, two = (lab.office(k).host("rh") for k in (1, 2))
    lans = [ipaddress.IPv4Network(lab.office(k).lan_subnet) for k in (1, 2)]
    if different_subnets:
        assert not lans[0].overlaps(lans[1])
        assert all(lan.subnet_of(ipaddress.IPv4Network("198.51.100.0/24")) for lan in lans)
    else:
        assert lans[0] == lans[1] == ipaddress.ip_network("192.0.2.0/24")
        assert one.address == two.address
    assert all(
        ipaddress.ip_address(h.address) in lan for h, lan in zip((one, two), lans, strict=True)
    )
    udp = start_server(lab, UDP_ECHO, lab.main_addresses[0])
    tcp = start_server(lab, TCP_ECHO, lab.main_addresses[0])
    for host, public in [(one, "203.0.113.101"), (two, "203.0.113.102")]:
        assert ask(host, UDP_ASK, lab.main_addresses[0], udp)[0] == public
        assert ask(host, TCP_ASK, lab.main_addresses[0], tcp)[0] == public


@pytest.mark.lab
def test_nothing_unsolicited_reaches_a_lan_host(lab_factory: LabFactory) -> None:
    lab = lab_factory(hosts=["rh"])
    office = lab.office(1)
    rh = Peer(lab, office.host("rh").ns)
    main = Peer(lab, lab.main_ns)
    # Even a main host that routes the LAN subnet through the router gets nothing in.
    lab.run(lab.main_ns, ["ip", "route", "add", office.lan_subnet, "via", office.public_address])
    main.send((office.public_address, rh.port), "to-public")
    main.send((office.host("rh").address, rh.port), "to-lan")

    def seen_on_router() -> bool:
        # The last rule of INPUT and FORWARD drops what comes in on wan unsolicited.
        dropped = [iptables_packets(office, chain)[-1] for chain in ("INPUT", "FORWARD")]
        return dropped == [1, 1]

    wait_for("the router to receive and drop both packets", seen_on_router)
    conntrack = office.run(["conntrack", "-L", "-p", "udp"], capture_output=True, text=True)
    assert f"dport={rh.port}" not in conntrack.stdout, "a dropped packet leaves no NAT state"
    # The positive control: once rh has sent, the main host's reply does come in.
    rh.send((lab.main_addresses[0], main.port), "hello")
    (_, public_ip, public_port), *_ = main.until(marker="hello")
    assert public_ip == office.public_address
    main.send((public_ip, public_port), "reply")
    assert rh.until(marker="reply") == [("reply", lab.main_addresses[0], main.port)]
    assert rh.drain() == []


@pytest.mark.lab
def test_plain_nat_preserves_ports_and_random_fully_does_not(lab_factory: LabFactory) -> None:
    lab = lab_factory(offices=2, symmetric=[2], hosts=["rh"])
    servers = [Peer(lab, lab.main_ns, ",".join(lab.main_addresses)) for _ in range(2)]
    destinations = [(a, s.port) for s in servers for a in lab.main_addresses]
    seen: dict[int, set[int]] = {}
    for k in (1, 2):
        client = Peer(lab, lab.office(k).host("rh").ns)
        for address, port in destinations:
            client.send((address, port), f"from-o{k}")
        sources = [d[1:] for s in servers for d in s.until(count=2)]
        assert {ip for ip, _ in sources} == {lab.office(k).public_address}
        seen[k] = {p for _, p in sources}
        if k == 1:
            assert seen[1] == {client.port}, "plain MASQUERADE keeps a free source port"
    # Four destinations, four independent random ports: all equal has odds of about 2**-48.
    assert len(seen[2]) > 1, "--random-fully maps each destination to its own port"


@pytest.mark.lab
def test_two_hosts_on_the_same_port_get_distinct_mappings(lab_factory: LabFactory) -> None:
    lab = lab_factory(hosts=["rh", "phone1"])
    office = lab.office(1)
    rh = Peer(lab, office.host("rh").ns)
    phone = Peer(lab, office.host("phone1").ns, port=rh.port)
    assert phone.port == rh.port
    main = Peer(lab, lab.main_ns)
    rh.send((lab.main_addresses[0], main.port), "rh")
    (_, ip1, port1), *_ = main.until(marker="rh")
    phone.send((lab.main_addresses[0], main.port), "phone")
    (_, ip2, port2), *_ = main.until(marker="phone")
    assert ip1 == ip2 == office.public_address
    assert port1 == rh.port and port2 != port1
    main.send((ip1, port2), "for-phone")
    main.send((ip1, port1), "for-rh")
    assert [d[0] for d in phone.until(marker="for-phone")] == ["for-phone"]
    assert [d[0] for d in rh.until(marker="for-rh")] == ["for-rh"]


# -- helpers that change the network ----------------------------------------------------------


@pytest.mark.lab
def test_cut_wan_stops_traffic_both_ways_and_restore_brings_it_back(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(hosts=["rh"])
    office = lab.office(1)
    rh = Peer(lab, office.host("rh").ns)
    main = Peer(lab, lab.main_ns)
    router = Peer(lab, office.router_ns, office.public_address)
    to_main = (lab.main_addresses[0], main.port)
    rh.send(to_main, "before")
    (_, public_ip, public_port), *_ = main.until(marker="before")
    mapping = (public_ip, public_port)
    rules_before = office.run(["iptables-save"], capture_output=True, text=True).stdout

    office.cut_wan()
    office.cut_wan()  # idempotent
    assert office.wan_is_cut()
    rh.send(to_main, "lost-out")
    main.send(mapping, "lost-in")
    assert router.send(to_main, "lost-router") == 1, "the router's own OUTPUT is cut too"
    # The cut's rules count what they drop: lost-in on -i wan, lost-out and lost-router on -o wan.
    wait_for("the cut to drop 3 packets", lambda: iptables_packets(office, "bpx-cut") == [1, 2])

    office.restore_wan()
    assert not office.wan_is_cut()
    rules_after = office.run(["iptables-save"], capture_output=True, text=True).stdout
    strip = re.compile(r"^#.*$|\[\d+:\d+\]", re.MULTILINE)
    assert strip.sub("", rules_after) == strip.sub("", rules_before)
    rh.send(to_main, "after")
    assert [d[0] for d in main.until(marker="after")] == ["after"]
    main.send(mapping, "back")
    assert [d[0] for d in rh.until(marker="back")] == ["back"]
    router.send(to_main, "router-after")
    assert main.until(marker="router-after") == [
        ("router-after", office.public_address, router.port)
    ]
    main.send((office.public_address, router.port), "router-back")
    assert [d[0] for d in router.until(marker="router-back")] == ["router-back"]


# TCP line echo, and a client that sends one line per line on its stdin and prints the echo.
TCP_LINE_ECHO = """
import socket, sys, threading
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
def serve(conn):
    with conn, conn.makefile("rwb") as f:
        for line in f:
            f.write(line)
            f.flush()
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""
TCP_LINE_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as c:
    f = c.makefile("rwb")
    for line in sys.stdin:
        f.write(line.encode())
        f.flush()
        print(f.readline().decode().strip(), flush=True)
"""


@pytest.mark.lab
def test_an_established_tcp_connection_survives_a_cut(lab_factory: LabFactory) -> None:
    lab = lab_factory(hosts=["rh"])
    office = lab.office(1)
    port = start_server(lab, TCP_LINE_ECHO, lab.main_addresses[0])
    client = office.host("rh").popen(
        [PYTHON, "-c", TCP_LINE_CLIENT, lab.main_addresses[0], str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None

    def say(line: str) -> str:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(line + "\n")
        client.stdin.flush()
        return str(client.stdout.readline()).strip()

    assert say("one") == "one"
    office.cut_wan()
    office.restore_wan()
    assert say("two") == "two", "the cut keeps NAT state, so the connection goes on"


@pytest.mark.lab
def test_new_public_address_changes_what_the_server_sees(lab_factory: LabFactory) -> None:
    lab = lab_factory(offices=2, hosts=["rh"])
    office = lab.office(1)
    rh = office.host("rh")
    udp = start_server(lab, UDP_ECHO, lab.main_addresses[0])
    tcp = start_server(lab, TCP_ECHO, lab.main_addresses[0])
    assert ask(rh, UDP_ASK, lab.main_addresses[0], udp)[0] == "203.0.113.101"
    new = office.new_public_address()
    assert new == office.public_address == "203.0.113.200"
    assert ask(rh, UDP_ASK, lab.main_addresses[0], udp)[0] == new
    assert ask(rh, TCP_ASK, lab.main_addresses[0], tcp)[0] == new
    conntrack = office.run(["conntrack", "-L"], capture_output=True, text=True).stdout
    assert "203.0.113.101" not in conntrack
    assert office.new_public_address("203.0.113.77") == "203.0.113.77"
    assert ask(rh, UDP_ASK, lab.main_addresses[0], udp)[0] == "203.0.113.77"
    for bad in [lab.office(2).public_address, "203.0.113.255", "198.51.100.7", "x"]:
        with pytest.raises(netlab.LabError, match=r"taken|not an IPv4"):
            office.new_public_address(bad)
    assert office.public_address == "203.0.113.77"
    assert ask(lab.office(2).host("rh"), UDP_ASK, lab.main_addresses[0], udp)[0] == (
        "203.0.113.102"
    )


@pytest.mark.lab
def test_set_loss_drops_about_the_share_asked_for(lab_factory: LabFactory) -> None:
    lab = lab_factory(hosts=["rh"])
    office = lab.office(1)
    rh = Peer(lab, office.host("rh").ns)
    main = Peer(lab, lab.main_ns)
    to_main = (lab.main_addresses[0], main.port)
    rh.send(to_main, *(f"clean{i}" for i in range(100)))
    main.until(count=100)

    office.set_loss(50)
    office.set_loss(50)  # replaces, does not add up
    assert office.loss_percent() == 50
    rh.send(to_main, *(f"lossy{i}" for i in range(400)))
    office.set_loss(0)
    assert office.loss_percent() == 0
    rh.send(to_main, "end")
    arrived = [d for d, _, _ in main.until(marker="end") if d != "end"]
    # Binomial(400, 0.5): mean 200, sd 10; the band is ±8 sd.
    assert 120 <= len(arrived) <= 280, len(arrived)
    assert len(set(arrived)) == len(arrived)

    rh.send(to_main, *(f"clean-again{i}" for i in range(100)))
    main.until(count=100)


# -- teardown ---------------------------------------------------------------------------------


@pytest.mark.lab
def test_destroy_removes_everything_even_when_the_body_raises() -> None:
    require_lab()

    class Boom(Exception):
        pass

    with pytest.raises(Boom), netlab.Lab(hosts=["rh"]) as lab:
        sleeper = lab.popen(lab.office(1).host("rh").ns, ["sleep", "600"])
        # Started without the lab's help: destroy() finds it inside the namespace all the same.
        untracked = subprocess.Popen(lab.exec_argv(lab.main_ns, ["sleep", "600"]))
        assert len(lab_namespaces(lab.id)) == 4
        raise Boom
    assert lab_namespaces(lab.id) == []
    assert sleeper.returncode == -signal.SIGKILL
    assert untracked.wait(timeout=10) == -signal.SIGKILL
    assert not (netlab.REGISTRY_DIR / f"{lab.id}.json").exists()
    assert lab.id not in [r.id for r in netlab.list_labs()]
    lab.destroy()  # idempotent


CHILD = """
import os, signal, subprocess, sys
sys.path.insert(0, sys.argv[1])
import netlab
lab = netlab.Lab(hosts=["rh"])
# Not holding our stdout: after a SIGKILL it outlives us until cleanup_stale().
lab.popen(lab.office(1).host("rh").ns, ["sleep", "600"], stdout=subprocess.DEVNULL)
print(lab.id, flush=True)
if sys.argv[2] == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
elif sys.argv[2] == "wait":
    sys.stdin.read()
elif sys.argv[2] == "read":  # SIGTERM comes while we read a pipe destroy() wants to close
    quiet = lab.popen(lab.main_ns, ["sleep", "600"], stdout=subprocess.PIPE)
    quiet.stdout.readline()
elif sys.argv[2] == "hand-over":  # the lab outlives us, owned by our parent
    lab.detach(owner_pid=os.getppid())
"""

# A program with its own SIGTERM handler set before the lab: the lab's handler chains to it.
CHAINED_CHILD = """
import signal, sys
def on_term(signum, frame):
    left = [n for n in netlab.list_namespaces() if n.startswith(lab.prefix)]
    print("own handler ran, lab namespaces:", len(left), flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, on_term)
sys.path.insert(0, sys.argv[1])
import netlab
lab = netlab.Lab()
print(lab.id, flush=True)
sys.stdin.read()
"""


def run_child(mode: str) -> tuple[subprocess.Popen[str], str]:
    child = subprocess.Popen(
        [PYTHON, "-c", CHILD, str(LAB_DIR), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    lab_id = child.stdout.readline().strip()
    assert re.fullmatch(r"[0-9a-f]{6}", lab_id), f"child printed {lab_id!r}"
    return child, lab_id


@pytest.mark.lab
@pytest.mark.parametrize("mode", ["exit", "wait", "read"])
def test_labs_are_destroyed_when_their_process_exits_or_gets_sigterm(mode: str) -> None:
    require_lab()
    child, lab_id = run_child(mode)
    try:
        if mode != "exit":
            assert len(lab_namespaces(lab_id)) == 4
            child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=20) == (0 if mode == "exit" else -signal.SIGTERM)
        assert lab_namespaces(lab_id) == []
        assert not (netlab.REGISTRY_DIR / f"{lab_id}.json").exists()
    finally:
        child.kill()
        child.communicate()
        netlab.destroy_lab(lab_id)


@pytest.mark.lab
def test_sigterm_destroys_the_lab_then_runs_the_programs_own_handler() -> None:
    require_lab()
    child = subprocess.Popen(
        [PYTHON, "-c", CHAINED_CHILD, str(LAB_DIR)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    lab_id = child.stdout.readline().strip()
    try:
        assert len(lab_namespaces(lab_id)) == 3
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=20)
        assert child.returncode == 3
        assert out.strip() == "own handler ran, lab namespaces: 0"
    finally:
        child.kill()
        child.communicate()
        netlab.destroy_lab(lab_id)


@pytest.mark.lab
def test_a_detached_lab_outlives_its_process_until_its_owner_is_gone(
    lab_factory: LabFactory,
) -> None:
    child, lab_id = run_child("hand-over")
    try:
        assert child.wait(timeout=20) == 0
        child.communicate()
        assert len(lab_namespaces(lab_id)) == 4, "detached: not destroyed at exit"
        record = next(r for r in netlab.list_labs() if r.id == lab_id)
        assert record.alive and not record.persistent and record.pid == os.getpid()
        assert lab_id not in netlab.cleanup_stale()
        assert "kept while process" in netlab.Lab.load(lab_id).describe()
    finally:
        netlab.destroy_lab(lab_id)
    lab = lab_factory()
    lab.detach()
    record = next(r for r in netlab.list_labs() if r.id == lab.id)
    assert record.alive and record.persistent and record.pid is None
    assert lab.id not in netlab.cleanup_stale(), "a lab left up by `lab up` is never stale"
    assert "kept until `lab down`" in lab.describe()
    with pytest.raises(netlab.LabError, match="no process"):
        lab.detach(owner_pid=child.pid)


@pytest.mark.lab
def test_cleanup_stale_removes_labs_whose_process_died(lab_factory: LabFactory) -> None:
    mine = lab_factory()
    child, lab_id = run_child("sigkill")
    try:
        assert child.wait(timeout=20) == -signal.SIGKILL
        child.communicate()
        namespaces = lab_namespaces(lab_id)
        assert len(namespaces) == 4, "SIGKILL leaves the lab behind"
        record = next(r for r in netlab.list_labs() if r.id == lab_id)
        assert not record.alive
        assert lab_id in netlab.cleanup_stale()
        assert lab_namespaces(lab_id) == []
        assert not (netlab.REGISTRY_DIR / f"{lab_id}.json").exists()
        assert sorted(lab_namespaces(mine.id)) == sorted(mine.namespaces()), "live lab kept"
    finally:
        netlab.destroy_lab(lab_id)


# -- the lab command --------------------------------------------------------------------------


def lab_cli(*args: str, ok: bool = True) -> str:
    done = subprocess.run(
        [PYTHON, str(LAB_DIR / "lab"), *args], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode == 0) == ok, (done.returncode, done.stdout, done.stderr)
    return done.stdout if ok else done.stderr


@pytest.mark.lab
def test_lab_command_builds_steers_and_removes_a_lab_that_outlives_it() -> None:
    require_lab()
    lab_id = None
    try:
        # Owned by this test process, so a killed test run leaves no lab for long: the next
        # run's cleanup_stale() removes it. `lab up` without --owner is tested by the library.
        out = lab_cli("up", "--offices", "2", "--symmetric", "2", "--hosts", "rh,phone1",
                      "--owner", str(os.getpid()))  # fmt: skip
        match = re.search(r"^lab ([0-9a-f]{6}) \(kept while process (\d+)", out, re.MULTILINE)
        assert match, out
        lab_id = match.group(1)
        assert int(match.group(2)) == os.getpid()
        assert f"bpx{lab_id}-o2-phone1" in out and "ip netns exec" in out
        assert len(lab_namespaces(lab_id)) == 2 + 2 * 3, "the lab outlives `lab up`"
        assert f"{lab_id}  owned by pid {os.getpid()}" in lab_cli("list")
        assert lab_id not in netlab.cleanup_stale(), "its owner runs: not stale"

        lab_cli("cut", "1", "--lab", lab_id)
        assert netlab.Lab.load(lab_id).office(1).wan_is_cut()
        assert "WAN CUT" in lab_cli("show", "--lab", lab_id)
        lab_cli("restore", "o1", "--lab", lab_id)
        assert not netlab.Lab.load(lab_id).office(1).wan_is_cut()
        assert "203.0.113.200" in lab_cli("readdress", "2", "--lab", lab_id)
        assert netlab.Lab.load(lab_id).office(2).public_address == "203.0.113.200"
        lab_cli("loss", "1", "30", "--lab", lab_id)
        assert netlab.Lab.load(lab_id).office(1).loss_percent() == 30
        assert "30 % loss" in lab_cli("show", "--lab", lab_id)
        assert "no office" in lab_cli("cut", "7", "--lab", lab_id, ok=False)

        assert netlab.Lab.load(lab_id).owner_pid == os.getpid(), "changes keep the owner"
        lab_cli("down", lab_id)
        assert lab_namespaces(lab_id) == []
        assert lab_id not in lab_cli("list")
        assert "no lab" in lab_cli("down", lab_id, ok=False)
    finally:
        if lab_id is not None:
            netlab.destroy_lab(lab_id)
