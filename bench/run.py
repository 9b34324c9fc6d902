"""The benchmark suite: every figure of the issue, ours beside its anchor, in one command.

Not part of the test suite, and asserts nothing: it measures and writes a report. Each figure is
measured `--repeats` times (3 with --quick, 5 otherwise) and the median is reported, with the
anchor measured in the same run on the same machine, the ratio, and the CPU time per unit
(user + system from /proc/PID/stat of the measured process, all of Kamailio's processes summed).

    .venv/bin/python bench/run.py --quick              # under 2 minutes
    .venv/bin/python bench/run.py                      # under 15 minutes
    .venv/bin/python bench/run.py --quick --profile    # plus py-spy of the remote host

Figures, in order:

1. REGISTER/s with digest auth at one remote host (SIPp, tests/sipp/register_fields.xml),
   the highest stepped rate with < 1 % failed registrations; anchor: Kamailio as a registrar
   (`auth` with one fixed password, `registrar`, `usrloc` in memory).
2. Media packets/s relayed by the main host's MediaRelay (172-byte RTP in sealed WAN packets,
   200 flows, < 0.1 % loss); anchor: bench/c_relay.c (recvmmsg/sendmmsg, no crypto). Both are
   fed by the same Python sender and counted by the same Python receiver process.
3. p99 delay added by one relay hop at half of its capacity, ours and the C relay's.
4. Trunk messages/s over one connection, pipelined: TrunkSession pair over loopback TCP
   (bench/trunk_figure.py).
5. Remote host memory (RSS) with 500 registered phones, and (bench/memory_calls.py) with 100
   calls between offices up besides, audio flowing.
6. Calls/s inside one office (0 s calls, < 1 % failures): SIPp caller (tests/sipp/call_uac.xml,
   407 answered with digest) -> remote host -> SIPp callee registered as 2002 (call_uas.xml),
   pauses removed; anchor: Kamailio as a stateful proxy (tm, registrar lookup).
7. Calls/s between two offices (bench/calls_between.py): SIPp at one remote host -> main host
   -> SIPp callee at the other's.
8. Media packets/s through a remote host's media anchor (bench/remote_relay.py), beside the
   C relay.

A rate is found by stepping the target (doubling while SIPp keeps up without failures, then
bisecting); the result is the highest achieved rate of a step with < 1 % failures.

Everything runs on 127.0.0.1 with ports found by binding port 0. Kamailio is installed with
apt-get if missing, the C relay is built with gcc, py-spy is pip-installed into the venv for
--profile. Results go to bench/results/ (git-ignored): report.md and report.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":
    # The figures in their own modules (bench/trunk_figure.py, ...) import this one as `run`:
    # let that be this very module, so there is one Figure class and one set of settings.
    sys.modules.setdefault("run", sys.modules[__name__])

from tests.peerhelpers import (  # noqa: E402
    LOOPBACK,
    SIPP_DIR,
    cpu_seconds,
    free_port,
    free_sip_port,
    open_office,
    peer_binary,
    sipp_auth,
    stop_process,
    wait_for,
    write_injection,
)

RESULTS = ROOT / "bench" / "results"
KAMAILIO_PASSWORD = "bench-kamailio-secret"
PACKET_SIZE = 172  # 12-byte RTP header + 160 bytes of G.711 (20 ms)
FLOWS = 200
PROBE_EVERY = 10  # one packet in 10 is the delay probe's (flow 0)
PHONES = 500
FIRST_EXT = 2000


@dataclass(frozen=True)
class Mode:
    repeats: int
    step_seconds: float  # one SIPp rate step
    relay_seconds: float  # one relay run
    trunk_messages: int
    bisections: int  # SIPp steps between the last rate passed and the first missed


QUICK = Mode(repeats=3, step_seconds=0.7, relay_seconds=0.7, trunk_messages=50_000, bisections=0)
FULL = Mode(repeats=5, step_seconds=3.0, relay_seconds=3.0, trunk_messages=500_000, bisections=1)


@dataclass
class Figure:
    """One line of the report."""

    key: str
    name: str
    unit: str
    target: str
    ours: float | None = None
    anchor_name: str = ""
    anchor: float | None = None
    cpu_unit: str = ""
    ours_cpu: float | None = None  # CPU seconds per unit, ours
    anchor_cpu: float | None = None
    higher_is_better: bool = True
    target_met: bool | None = None
    note: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.anchor:
            return None
        return self.ours / self.anchor


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


# --- what the suite needs installed ---------------------------------------------------------


def ensure_kamailio() -> str | None:
    """The kamailio binary, installed with apt-get if missing; None (and why) if impossible."""
    path = shutil.which("kamailio") or (
        "/usr/sbin/kamailio" if Path("/usr/sbin/kamailio").exists() else None
    )
    if path is None and os.geteuid() == 0:
        log("installing kamailio (apt-get install -y kamailio)")
        subprocess.run(
            ["apt-get", "install", "-y", "kamailio"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        path = shutil.which("kamailio") or (
            "/usr/sbin/kamailio" if Path("/usr/sbin/kamailio").exists() else None
        )
    return path


def ensure_c_relay() -> Path:
    binary = RESULTS / "c_relay"
    source = ROOT / "bench" / "c_relay.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def ensure_py_spy() -> str:
    venv_bin = Path(sys.executable).parent
    path = venv_bin / "py-spy"
    if not path.exists():
        log("installing py-spy into the venv")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return str(path)


# --- /proc ---------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """Every live descendant of `pid` (Kamailio forks its workers)."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents[ppid].append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in [pid, *children_of(pid)]:
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of a process and its children: shared memory counted once."""
    total = 0
    for p in [pid, *children_of(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total / 1024


# --- 1 and 5: REGISTER/s, with Kamailio beside -------------------------------------------


@dataclass(frozen=True)
class StepResult:
    target: float
    ok: int
    failed: int
    elapsed: float
    cpu: float

    @property
    def achieved(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    @property
    def good(self) -> bool:
        """Fewer than 1 % of the attempts failed: the achieved rate counts."""
        total = self.ok + self.failed
        return total > 0 and self.failed / total < 0.01

    @property
    def passed(self) -> bool:
        """Good, and the target rate was kept up with: worth trying a higher one."""
        return self.good and self.achieved >= 0.9 * self.target


def run_sipp_step(
    argv: list[str],
    workdir: Path,
    stats_file: Path,
    rate: float,
    seconds: float,
    cpu: Callable[[], float],
) -> StepResult:
    """Run one SIPp step and read what it reports: calls ok and failed, its own elapsed time,
    and the CPU seconds `cpu()` says the measured process used meanwhile."""
    before = cpu()
    wall = time.monotonic()
    subprocess.run(
        argv,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=seconds + 60,
        check=False,
    )
    wall = time.monotonic() - wall
    used = cpu() - before
    stats = read_stats(stats_file)
    ok = int(stats.get("SuccessfulCall(C)", "0"))
    failed = int(stats.get("FailedCall(C)", "0"))
    elapsed = wall
    if stats:
        start = float(stats["StartTime"].split("\t")[-1])
        end = float(stats["CurrentTime"].split("\t")[-1])
        elapsed = end - start or wall
    return StepResult(rate, ok, failed, elapsed, used)


def read_stats(path: Path) -> dict[str, str]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


SETTLE_TIMES: dict[str, float] = {}


def settle(cpu: Callable[[], float], what: str, guard: float = 20.0) -> float:
    """Wait until the measured process is idle (under 10 % of a CPU over 0.1 s): after an
    overloaded step it still works off the requests queued in its socket buffer, and the next
    step would measure that backlog. Returns the seconds waited (the longest is reported)."""
    start = time.monotonic()
    while time.monotonic() - start < guard:
        before = cpu()
        time.sleep(0.1)
        if cpu() - before < 0.01:
            break
    waited = time.monotonic() - start
    SETTLE_TIMES[what] = max(SETTLE_TIMES.get(what, 0.0), waited)
    return waited


def sipp_register_step(
    workdir: Path,
    port: int,
    injection: Path,
    rate: float,
    seconds: float,
    cpu: Callable[[], float],
    local_port: int | None = None,
) -> StepResult:
    """SIPp registers at `rate`/s for `seconds` against 127.0.0.1:`port`, from `local_port`
    (a free one if None). Give every step of a figure the same `local_port`: the Contact is
    `ext@127.0.0.1:PORT`, and a new port each step would add a binding per step, until the
    registrar's limit of contacts per extension (10) refuses every registration with 403."""
    settle(cpu, f"register {port}")
    calls = max(1, int(rate * seconds))
    scenario = workdir / "register_no_retrans.xml"
    if not scenario.exists():
        # SIPp retransmits an unanswered REGISTER after 500 ms; the retransmission of the
        # answer to a challenge reuses its nonce count, which the registrar takes for a replay
        # and counts as a failed authentication (5 block the source). Without retransmissions
        # an overloaded step fails by timeouts instead, and the next step is still measured.
        xml = (SIPP_DIR / "register_fields.xml").read_text()
        scenario.write_text(xml.replace(' retrans="500"', ""))
    stats_file = workdir / f"stats-{time.monotonic_ns()}.csv"
    argv = [peer_binary("sipp"), f"{LOOPBACK}:{port}", "-sf", str(scenario)]
    argv += ["-inf", str(injection), "-t", "u1", "-i", LOOPBACK, "-bind_local"]
    argv += ["-p", str(local_port or free_sip_port()), "-r", str(int(rate)), "-rp", "1s"]
    argv += ["-m", str(calls), "-l", str(max(200, int(rate))), "-nostdin"]
    argv += ["-buff_size", "4194304", "-recv_timeout", "1000"]
    argv += ["-timeout", f"{seconds + 20:g}s", "-default_behaviors", "all,-bye"]
    argv += ["-trace_stat", "-stf", str(stats_file), "-fd", "1"]
    return run_sipp_step(argv, workdir, stats_file, rate, seconds, cpu)


def find_max_rate(step: Callable[[float], StepResult], start: float, bisections: int) -> StepResult:
    """Double the target rate while steps pass, then bisect between the last pass and the first
    miss; the result is the good step (< 1 % failures) with the highest achieved rate, which
    may be a step that did not keep up with its target but failed nothing."""
    steps: list[StepResult] = []
    rate = start
    low, high = 0.0, 0.0
    for _ in range(10):
        result = step(rate)
        steps.append(result)
        log(
            f"  target {rate:.0f}/s: {result.achieved:.0f}/s, {result.failed} failed"
            f" {'pass' if result.passed else 'miss'}"
        )
        if not result.passed:
            high = rate
            break
        low = rate
        rate *= 2
    for _ in range(bisections if high else 0):
        rate = (low + high) / 2
        if rate < 50:
            break
        result = step(rate)
        steps.append(result)
        log(f"  target {rate:.0f}/s: {result.achieved:.0f}/s, {result.failed} failed")
        if result.passed:
            low = rate
        else:
            high = rate
    good = [r for r in steps if r.good]
    return max(good, key=lambda r: r.achieved) if good else StepResult(start, 0, 0, 1.0, 0.0)


KAMAILIO_CFG = """#!KAMAILIO
# Generated by bench/run.py: Kamailio as a plain registrar, the anchor for REGISTER/s.
debug=0
log_stderror=yes
memdbg=5
memlog=5
children={children}
listen=udp:127.0.0.1:{port}
disable_tcp=yes
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "auth.so"
modparam("usrloc", "db_mode", 0)
request_route {{
    if (method == "REGISTER") {{
        if (!pv_www_authenticate("$td", "{password}", "0")) {{
            www_challenge("$td", "0");
            exit;
        }}
        save("location");
        exit;
    }}
    sl_send_reply("404", "Not here");
}}
"""


KAMAILIO_PROXY_CFG = """#!KAMAILIO
# Generated by bench/run.py: Kamailio as a stateful proxy with a registrar, the anchor for calls
# inside an office (INVITE challenged with 407 like ours, then relayed to the registered callee).
debug=0
log_stderror=yes
children={children}
listen=udp:127.0.0.1:{port}
disable_tcp=yes
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "siputils.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "auth.so"
modparam("usrloc", "db_mode", 0)
request_route {{
    if (has_totag()) {{
        # SIPp's UAS does not echo Record-Route: ACK and BYE come without a Route, to the
        # callee's contact (its address and port), and are relayed there.
        loose_route();
        t_relay();
        exit;
    }}
    if (method == "REGISTER") {{
        if (!pv_www_authenticate("$td", "{password}", "0")) {{
            www_challenge("$td", "0");
            exit;
        }}
        save("location");
        exit;
    }}
    if (method == "ACK") {{
        t_check_trans();
        exit;
    }}
    if (method == "INVITE") {{
        if (!pv_proxy_authenticate("$fd", "{password}", "0")) {{
            proxy_challenge("$fd", "0");
            exit;
        }}
        consume_credentials();
    }}
    if (!lookup("location")) {{
        sl_send_reply("404", "Not Found");
        exit;
    }}
    record_route();
    t_relay();
}}
"""


@contextlib.contextmanager
def kamailio(
    binary: str, workdir: Path, template: str = KAMAILIO_CFG
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(socket.SOCK_DGRAM)
    cfg_file = workdir / "kamailio.cfg"
    children = os.cpu_count() or 2
    cfg_file.write_text(template.format(children=children, port=port, password=KAMAILIO_PASSWORD))
    log_file = (workdir / "kamailio.log").open("wb")
    argv = [binary, "-f", str(cfg_file), "-DD", "-E", "-x", "tlsf", "-m", "4096", "-M", "16"]
    argv += ["-P", str(workdir / "kamailio.pid"), "-Y", str(workdir)]
    process = subprocess.Popen(
        argv,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    try:
        # Ready when its workers are forked (children + the main and timer processes).
        wait_for(
            lambda: (
                (process.poll() is not None and "exit")
                or (len(children_of(process.pid)) >= children)
            ),
            "kamailio to fork its workers",
            15.0,
        )
        if process.poll() is not None:
            raise RuntimeError("kamailio exited: " + (workdir / "kamailio.log").read_text()[-2000:])
        time.sleep(0.3)
        yield process, port
    finally:
        stop_process(process, grace=5.0)
        log_file.close()


def bench_register(mode: Mode, work: Path, profile: bool) -> list[Figure]:
    register = Figure(
        "register",
        "REGISTER/s with digest auth at one remote host (< 1 % failures)",
        "registrations/s",
        ">= 5,000/s",
        anchor_name="Kamailio registrar",
        cpu_unit="ms CPU per registration",
    )
    memory = Figure(
        "memory_registered",
        f"Remote host memory with {PHONES} registered phones (no calls)",
        "MB RSS",
        "- (the target counts 100 calls too: see the memory figure)",
        anchor_name="Kamailio (PSS of all processes)",
        higher_is_better=False,
    )
    bisections = mode.bisections
    phones = {str(FIRST_EXT + i): f"bench-{FIRST_EXT + i}-secret" for i in range(PHONES)}
    ours_best: list[StepResult] = []
    with open_office(
        work / "office", phones, extensions=f"{FIRST_EXT}-{FIRST_EXT + PHONES - 1}"
    ) as office:
        rows = [[ext, sipp_auth(ext, pw), "300"] for ext, pw in phones.items()]
        injection = write_injection(work / "phones.csv", rows)
        pid = office.remote.pid
        sipp_port = free_sip_port()  # every step from the same port (sipp_register_step)
        # Figure 5 first: every phone registered once at a gentle rate, then the RSS.
        gentle = sipp_register_step(
            work, office.sip_port, injection, 250.0, 2.0, lambda: 0.0, sipp_port
        )
        wait_for(lambda: len(office.registrations()) >= PHONES or None, "500 bindings", 30.0)
        memory.ours = rss_mb(pid)
        memory.runs.append(
            {"side": "ours", "registered": len(office.registrations()), "warm_up": gentle.ok}
        )
        for n in range(mode.repeats):
            log(f"REGISTER, remote host, repeat {n + 1}")
            best = find_max_rate(
                lambda rate: sipp_register_step(
                    work,
                    office.sip_port,
                    injection,
                    rate,
                    mode.step_seconds,
                    lambda: cpu_seconds(pid),
                    sipp_port,
                ),
                0.8 * ours_best[-1].achieved if ours_best and ours_best[-1].ok else 500.0,
                bisections,
            )
            ours_best.append(best)
            register.runs.append(
                {"side": "ours", **dataclasses.asdict(best), "achieved": best.achieved}
            )
        registrar = office.sip_stats()["service"]["registrar"]
        register.runs.append({"side": "ours", "registrar": registrar})
        if registrar.get("refused"):
            register.note += (
                f" The remote host refused {registrar['refused']} authenticated registrations"
                " (see remotehost.registrar: CSeq order, Min-Expires, contacts per extension)."
            )
        if registrar.get("auth_failures") or registrar.get("blocked_sources"):
            register.note += (
                f" The remote host counted {registrar['auth_failures']} failed authentications"
                f" and blocked {registrar['blocked_sources']} source(s) during the steps."
            )
        after = rss_mb(pid)
        memory.runs.append({"side": "ours", "after_register_steps_mb": after})
        memory.note += (
            f" After the overload steps of figure 1 the remote host's RSS is {after:.0f} MB."
        )
        if profile:
            register.note += profile_register(
                work, office.sip_port, injection, pid, ours_best, sipp_port
            )
    recovery = max(
        (v for k, v in SETTLE_TIMES.items() if k == f"register {office.sip_port}"), default=0.0
    )
    register.note += (
        f" After an overloaded step the remote host needed up to {recovery:.1f} s to become idle"
        " again (it works off every queued request, however stale; the suite waits for that"
        " before the next step)."
    )
    register.ours = median([b.achieved for b in ours_best])
    register.ours_cpu = median([1000 * b.cpu / b.ok for b in ours_best if b.ok] or [0.0])

    binary = ensure_kamailio()
    if binary is None:
        register.note += " Kamailio: not installed and not root, anchor not measured."
    else:
        with kamailio(binary, work / "kamailio") as (process, port):
            rows = [[ext, sipp_auth(ext, KAMAILIO_PASSWORD), "300"] for ext in phones]
            injection = write_injection(work / "kamailio-phones.csv", rows)
            anchor_best: list[StepResult] = []
            sipp_port = free_sip_port()
            for n in range(mode.repeats):
                log(f"REGISTER, Kamailio, repeat {n + 1}")
                best = find_max_rate(
                    lambda rate: sipp_register_step(
                        work, port, injection, rate, mode.step_seconds,
                        lambda: tree_cpu(process.pid), sipp_port,
                    ),
                    (0.8 * anchor_best[-1].achieved if anchor_best and anchor_best[-1].ok else 8e3),
                    bisections,
                )  # fmt: skip
                anchor_best.append(best)
                register.runs.append(
                    {"side": "kamailio", **dataclasses.asdict(best), "achieved": best.achieved}
                )
            register.anchor = median([b.achieved for b in anchor_best])
            register.anchor_cpu = median(
                [1000 * b.cpu / b.ok for b in anchor_best if b.ok] or [0.0]
            )
            memory.anchor = tree_pss_mb(process.pid)
            anchor_max = max(b.target for b in anchor_best)
            if anchor_max >= 8000:
                register.note += (
                    " Kamailio's figure may be bounded by SIPp (one thread) on this machine."
                )
    register.target_met = register.ours >= 5000
    memory.note = (
        "Measured right after 500 phones registered at 250/s, with no calls (the figure with"
        " 100 calls up is bench/memory_calls.py's)." + memory.note
    )
    return [register, memory]


def profile_register(
    work: Path, port: int, injection: Path, pid: int, best: list[StepResult], sipp_port: int
) -> str:
    """py-spy on the remote host while SIPp registers at about its best rate."""
    rate = 1.2 * max((b.target for b in best), default=250.0)
    return profile_process(
        "register",
        "the remote host under REGISTER load",
        pid,
        work,
        lambda seconds: sipp_register_step(
            work, port, injection, rate, seconds, lambda: cpu_seconds(pid), sipp_port
        ),
        f"{rate:.0f} registrations/s offered",
    )


@dataclass
class Profile:
    title: str
    samples: int
    self_time: list[dict[str, Any]]
    inclusive: list[dict[str, Any]]


PROFILES: dict[str, Profile] = {}
# Frames every sample passes through: the program's entry, runpy, trio's run loop.
PROFILE_SKIP = ("<module>", "<frozen runpy>", "cli.py)", "run (trio", "unrolled_run", "run_main")


def profile_process(
    key: str, title: str, pid: int, work: Path, drive: Callable[[float], object], load: str
) -> str:
    """py-spy (`--gil`: samples of the thread running Python, so CPU, not time waiting in
    epoll) on process `pid` while `drive(seconds)` loads it; the top functions by own and by
    inclusive time go to PROFILES[key] and the report, a flame graph to bench/results/."""
    py_spy = ensure_py_spy()
    seconds = 5.0
    spy_argv = [py_spy, "record", "--pid", str(pid), "--duration", f"{seconds:g}"]
    spy_argv += ["--nonblocking", "--gil"]
    raw = work / f"{key}-profile.txt"
    for fmt, out in (("flamegraph", RESULTS / f"{key}.svg"), ("raw", raw)):
        spy = subprocess.Popen(
            [*spy_argv, "-o", str(out), "--format", fmt],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        drive(seconds)
        spy.wait(60)
    self_time: collections.Counter[str] = collections.Counter()
    total_time: collections.Counter[str] = collections.Counter()
    samples = 0
    if raw.exists():
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            # "name (file:line)" -> "name (file)": a function's lines counted together.
            frames = [f.rsplit(":", 1)[0] + ")" if f.endswith(")") else f for f in stack.split(";")]
            samples += int(count)
            self_time[frames[-1]] += int(count)
            for frame in set(frames):
                total_time[frame] += int(count)
    if not samples:
        return " Profile: py-spy took no samples."
    PROFILES[key] = Profile(
        title,
        samples,
        [
            {"function": f, "self_percent": round(100 * c / samples, 1)}
            for f, c in self_time.most_common(10)
        ],
        [
            {"function": f, "total_percent": round(100 * c / samples, 1)}
            for f, c in total_time.most_common(40)
            if not any(skip in f for skip in PROFILE_SKIP)
        ],
    )
    top = ", ".join(f"`{p['function']}` {p['self_percent']} %" for p in PROFILES[key].self_time[:5])
    return (
        f" Profile ({load}; bench/results/{key}.svg, {samples} samples of the Python thread):"
        f" top functions by own time {top}; the tables below the notes have more."
    )


# --- 6: calls/s inside one office ------------------------------------------------------------


def no_pauses(name: str, workdir: Path) -> Path:
    """A copy of tests/sipp/NAME without its pauses (0 s calls, answered at once)."""
    out = workdir / f"nopause-{name}"
    text = (SIPP_DIR / name).read_text()
    out.write_text(re.sub(r"<pause [^>]*/>", "", text))
    return out


def sipp_call_step(
    workdir: Path,
    target: tuple[str, int],
    caller: tuple[str, str],
    callee: str,
    rate: float,
    seconds: float,
    cpu: Callable[[], float],
) -> StepResult:
    """SIPp calls `callee` at `rate`/s for `seconds`, each call 0 s long."""
    settle(cpu, f"calls {target[1]}")
    calls = max(1, int(rate * seconds))
    stats_file = workdir / f"calls-{time.monotonic_ns()}.csv"
    host, port = target
    argv = [peer_binary("sipp"), f"{host}:{port}", "-sf", str(no_pauses("call_uac.xml", workdir))]
    argv += ["-s", callee, "-key", "caller", caller[0], "-au", caller[0], "-ap", caller[1]]
    argv += ["-auth_uri", f"{callee}@{host}:{port}", "-t", "u1", "-i", LOOPBACK, "-bind_local"]
    argv += ["-p", str(free_sip_port()), "-r", str(int(rate)), "-rp", "1s"]
    argv += ["-m", str(calls), "-l", str(max(200, int(rate))), "-nostdin"]
    argv += ["-buff_size", "4194304", "-recv_timeout", "1500"]
    argv += ["-timeout", f"{seconds + 20:g}s", "-trace_stat", "-stf", str(stats_file), "-fd", "1"]
    return run_sipp_step(argv, workdir, stats_file, rate, seconds, cpu)


@contextlib.contextmanager
def sipp_callee(
    workdir: Path, target: tuple[str, int], ext: str, password: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A SIPp UAS registered as `ext` at `target`, answering every call on the same port."""
    port = free_sip_port()
    fields = write_injection(workdir / f"callee-{ext}.csv", [[ext]])
    common = ["-t", "u1", "-i", LOOPBACK, "-bind_local", "-p", str(port), "-nostdin"]
    register = [peer_binary("sipp"), f"{target[0]}:{target[1]}"]
    register += ["-sf", str(SIPP_DIR / "register_auth.xml"), "-inf", str(fields), "-m", "1"]
    register += ["-au", ext, "-ap", password, "-timeout", "10s", *common]
    subprocess.run(
        register, cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
        check=True,
    )  # fmt: skip
    uas = [peer_binary("sipp"), "-sf", str(no_pauses("call_uas.xml", workdir)), "-aa"]
    uas += ["-buff_size", "4194304", *common]
    process = subprocess.Popen(
        uas, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.3)
        yield process
    finally:
        stop_process(process, grace=2.0)


def bench_calls(mode: Mode, work: Path, profile: bool = False) -> Figure:
    figure = Figure(
        "calls_office",
        "Calls/s inside one office through a remote host (0 s calls, < 1 % failures)",
        "calls/s",
        ">= 1,000/s",
        anchor_name="Kamailio stateful proxy",
        cpu_unit="ms CPU per call",
    )
    phones = {"2001": "bench-2001-secret", "2002": "bench-2002-secret"}
    best_runs: list[StepResult] = []
    with open_office(work / "office", phones) as office:
        target = (LOOPBACK, office.sip_port)
        pid = office.remote.pid
        with sipp_callee(work, target, "2002", phones["2002"]):
            wait_for(lambda: office.registrations("2002") or None, "the callee registered", 10.0)
            for n in range(mode.repeats):
                log(f"calls inside an office, remote host, repeat {n + 1}")
                start = 0.8 * best_runs[-1].achieved if best_runs and best_runs[-1].ok else 100.0
                best = find_max_rate(
                    lambda rate: sipp_call_step(
                        work, target, ("2001", phones["2001"]), "2002", rate,
                        mode.step_seconds, lambda: cpu_seconds(pid),
                    ),
                    start,
                    mode.bisections,
                )  # fmt: skip
                best_runs.append(best)
                figure.runs.append({"side": "ours", **dataclasses.asdict(best)})
            if profile:
                rate = 0.9 * median([b.achieved for b in best_runs])
                figure.note += profile_process(
                    "calls_office",
                    "the remote host under calls inside the office",
                    pid,
                    work,
                    lambda seconds: sipp_call_step(
                        work, target, ("2001", phones["2001"]), "2002", rate, seconds,
                        lambda: cpu_seconds(pid),
                    ),
                    f"{rate:.0f} calls/s offered",
                )  # fmt: skip
    figure.ours = median([b.achieved for b in best_runs])
    figure.ours_cpu = median([1000 * b.cpu / b.ok for b in best_runs if b.ok] or [0.0])
    figure.target_met = figure.ours >= 1000
    binary = ensure_kamailio()
    if binary is None:
        figure.note = "Kamailio: not installed and not root, anchor not measured."
        return figure
    anchor_runs: list[StepResult] = []
    with kamailio(binary, work / "kamailio", KAMAILIO_PROXY_CFG) as (process, port):
        target = (LOOPBACK, port)
        with sipp_callee(work, target, "2002", KAMAILIO_PASSWORD):
            for n in range(mode.repeats):
                log(f"calls inside an office, Kamailio, repeat {n + 1}")
                start = (
                    0.8 * anchor_runs[-1].achieved if anchor_runs and anchor_runs[-1].ok else 2000.0
                )
                best = find_max_rate(
                    lambda rate: sipp_call_step(
                        work, target, ("2001", KAMAILIO_PASSWORD), "2002", rate,
                        mode.step_seconds, lambda: tree_cpu(process.pid),
                    ),
                    start,
                    mode.bisections,
                )  # fmt: skip
                anchor_runs.append(best)
                figure.runs.append({"side": "kamailio", **dataclasses.asdict(best)})
    figure.anchor = median([b.achieved for b in anchor_runs])
    figure.anchor_cpu = median([1000 * b.cpu / b.ok for b in anchor_runs if b.ok] or [0.0])
    if max(b.target for b in anchor_runs) >= 4000:
        figure.note = "Kamailio's figure may be bounded by the two SIPp processes on 2 CPUs."
    return figure


# --- 2 and 3: the relay --------------------------------------------------------------------


@functools.cache
def office_key(name: str) -> bytes:
    """The office's media key, the same object every time, as the main host's key_for gives
    it (a dict look-up of the live session's key): the relay compares keys by identity first,
    and a fresh sha256 per packet was a tenth of the relay's profile."""
    return hashlib.sha256(name.encode()).digest()


def ours_relay_process(conn: multiprocessing.connection.Connection) -> None:
    """Runs MediaRelay alone in this process; makes fresh legs for every run."""
    import trio

    from mainhost.relay import MediaRelay

    async def main() -> None:
        relay = MediaRelay(office_key)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind((LOOPBACK, 0))
        async with trio.open_nursery() as nursery:
            address = await nursery.start(relay.serve, sock)
            conn.send(address)
            while True:
                command = await trio.to_thread.run_sync(conn.recv)
                if command[0] == "legs":
                    run, flows = command[1], command[2]
                    conn.send(
                        [
                            (
                                relay.offer(f"r{run}c{f}", f"a{f}"),
                                relay.answer(f"r{run}c{f}", f"b{f}"),
                            )
                            for f in range(flows)
                        ]
                    )
                elif command[0] == "end":
                    conn.send([f"r{command[1]}c{f}" for f in range(command[2])])
                    for f in range(command[2]):
                        relay.delete(f"r{command[1]}c{f}")
                else:
                    break
            nursery.cancel_scope.cancel()
        sock.close()

    trio.run(main)


class Relay(Protocol):
    """One of the two relays under test: how to start it, latch a flow, build packets."""

    name: str
    pid: int
    address: tuple[str, int]

    def prepare(self, run: int, flows: int) -> None: ...
    def latch(self, flow: int, sender: socket.socket, receiver: socket.socket) -> None: ...
    def packet(self, flow: int, n: int, index: int) -> bytes: ...
    def close(self) -> None: ...

    @staticmethod
    def index_of(flow: int, data: bytes) -> int | None: ...


class OurRelay:
    name = "ours (MediaRelay)"

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=ours_relay_process, args=(child,), daemon=True)
        self.process.start()
        self.address = self.conn.recv()
        assert self.process.pid is not None
        self.pid = self.process.pid
        self.legs: list[tuple[int, int]] = []
        self.run = 0

    def prepare(self, run: int, flows: int) -> None:
        if self.legs:
            with contextlib.suppress(Exception):
                self.conn.send(("end", self.run, len(self.legs)))
                self.conn.recv()
        self.run = run
        self.conn.send(("legs", run, flows))
        self.legs = self.conn.recv()

    def latch(self, flow: int, sender: socket.socket, receiver: socket.socket) -> None:
        from shared.media.wan import DIRECTION_TO_RELAY, seal_keepalive

        leg_a, leg_b = self.legs[flow]
        sender.sendto(
            seal_keepalive(office_key(f"a{flow}"), DIRECTION_TO_RELAY, leg_a, 0), self.address
        )
        receiver.sendto(
            seal_keepalive(office_key(f"b{flow}"), DIRECTION_TO_RELAY, leg_b, 0), self.address
        )

    def packet(self, flow: int, n: int, index: int) -> bytes:
        from shared.media.rtp import RtpPacket
        from shared.media.wan import DIRECTION_TO_RELAY, seal

        body = index.to_bytes(8, "big").ljust(160, b"\xd5")
        payload = RtpPacket(0, n & 0xFFFF, 160 * n & 0xFFFFFFFF, flow, body).encode()
        return seal(office_key(f"a{flow}"), DIRECTION_TO_RELAY, self.legs[flow][0], 1 + n, payload)

    @staticmethod
    def index_of(flow: int, data: bytes) -> int | None:
        from shared.media.wan import DIRECTION_FROM_RELAY, open_untrusted

        try:
            packet = open_untrusted(office_key(f"b{flow}"), data, DIRECTION_FROM_RELAY)
        except Exception:
            return None
        return int.from_bytes(packet.payload[12:20], "big")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("stop",))
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()


class CRelay:
    name = "C relay (recvmmsg/sendmmsg)"

    def __init__(self, binary: Path) -> None:
        self.process = subprocess.Popen([str(binary)], stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        port = int(self.process.stdout.readline())
        self.address = (LOOPBACK, port)
        self.pid = self.process.pid

    def prepare(self, run: int, flows: int) -> None:
        pass

    def latch(self, flow: int, sender: socket.socket, receiver: socket.socket) -> None:
        receiver.sendto(b"R" + flow.to_bytes(4, "big"), self.address)

    def packet(self, flow: int, n: int, index: int) -> bytes:
        return (flow.to_bytes(4, "big") + index.to_bytes(8, "big")).ljust(PACKET_SIZE, b"\xd5")

    @staticmethod
    def index_of(flow: int, data: bytes) -> int | None:
        return int.from_bytes(data[4:12], "big")

    def close(self) -> None:
        stop_process(self.process, grace=2.0)


def probe_process(
    conn: multiprocessing.connection.Connection,
    sock: socket.socket,
    index_of: Callable[[int, bytes], int | None],
) -> None:
    """Flow 0 alone, in a blocking recv, so that its arrival times are not a drain loop's."""
    sock.settimeout(0.3)
    clock = time.perf_counter_ns
    probe: list[tuple[bytes, int]] = []
    conn.send("ready")
    while True:
        try:
            data = sock.recv(2048)
        except TimeoutError:
            if conn.poll():
                break
            continue
        probe.append((data, clock()))
    conn.recv()
    arrivals = {}
    for data, at in probe:
        index = index_of(0, data)
        if index is not None:
            arrivals[index] = at
    conn.send((len(probe), arrivals))


def counter_process(
    conn: multiprocessing.connection.Connection,
    receivers: list[socket.socket],
    index_of: Callable[[int, bytes], int | None],
) -> None:
    """Counts what every receiver but flow 0's (the probe's) gets."""
    selector = selectors.DefaultSelector()
    for flow, sock in enumerate(receivers):
        if flow == 0:
            continue
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, flow)
    selector.register(conn, selectors.EVENT_READ, -1)
    count = 0
    stopping_at: float | None = None
    conn.send("ready")
    while stopping_at is None or time.monotonic() < stopping_at:
        for key, _ in selector.select(timeout=0.05):
            flow = key.data
            if flow == -1:
                conn.recv()
                stopping_at = time.monotonic() + 0.5  # what is still queued arrives
                selector.unregister(conn)
                continue
            ready = cast(socket.socket, key.fileobj)
            while True:
                try:
                    ready.recv(2048)
                except BlockingIOError:
                    break
                count += 1
    conn.send(count)


@dataclass(frozen=True)
class RelayRun:
    rate: float | None  # None: flat out
    sent: int
    delivered: int
    seconds: float
    cpu: float
    p99_us: float | None
    p50_us: float | None

    @property
    def offered_pps(self) -> float:
        return self.sent / self.seconds

    @property
    def delivered_pps(self) -> float:
        return self.delivered / self.seconds

    @property
    def loss(self) -> float:
        return (self.sent - self.delivered) / self.sent if self.sent else 1.0


RUN_COUNTER = iter(range(1, 1_000_000))


def relay_run(
    relay: Relay, flows: int, seconds: float, rate: float | None, count: bool = True
) -> RelayRun:
    """Send 172-byte packets on `flows` flows through `relay`, paced at `rate`/s or flat out.

    `count=False` (the delay runs) leaves flows 1.. to the kernel's receive buffers instead of a
    draining process, so that the probe's receiver and the relay have the CPUs to themselves.
    """
    run = next(RUN_COUNTER)
    relay.prepare(run, flows)
    senders, receivers = [], []
    for flow in range(flows):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind((LOOPBACK, 0))
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        receiver.bind((LOOPBACK, 0))
        relay.latch(flow, sender, receiver)
        senders.append(sender)
        receivers.append(receiver)
    # A flat-out run offers at most what this sender manages; cap what we build in advance.
    total = int((rate if rate is not None else 120_000) * seconds)
    # Every PROBE_EVERY-th packet is flow 0's (the probe's): enough samples for a p99 in a
    # short run; the others go round-robin over flows 1.., as unsynchronised phones would.
    order: list[tuple[socket.socket, bytes, tuple[str, int]]] = []
    counters = [0] * flows
    address = relay.address
    for i in range(max(flows, total)):
        flow = 0 if i % PROBE_EVERY == 0 else 1 + (i - i // PROBE_EVERY - 1) % (flows - 1)
        order.append((senders[flow], relay.packet(flow, counters[flow], i), address))
        counters[flow] += 1
    try:
        return send_and_measure(
            order, rate, seconds, receivers if count else receivers[:1], relay.index_of, relay.pid
        )
    finally:
        for sock in senders + receivers:
            sock.close()


def send_and_measure(
    order: list[tuple[socket.socket, bytes, tuple[str, int]]],
    rate: float | None,
    seconds: float,
    receivers: list[socket.socket],
    index_of: Callable[[int, bytes], int | None],
    pid: int,
) -> RelayRun:
    """Send `order` (socket, packet, destination) paced at `rate`/s or flat out for `seconds`,
    while a counter process drains `receivers` and a probe process times flow 0's packets
    (on `receivers[0]`); the delivered count, the CPU `pid` used and the probe's delays."""
    context = multiprocessing.get_context("fork")
    conn, child = context.Pipe()
    counter = context.Process(
        target=counter_process, args=(child, receivers, index_of), daemon=True
    )
    counter.start()
    probe_conn, probe_child = context.Pipe()
    prober = context.Process(
        target=probe_process, args=(probe_child, receivers[0], index_of), daemon=True
    )
    prober.start()
    assert conn.recv() == "ready"
    assert probe_conn.recv() == "ready"
    time.sleep(0.1)
    send_times: dict[int, int] = {}
    cpu_before = cpu_seconds(pid)
    start = time.monotonic()
    sent = 0
    clock = time.perf_counter_ns
    interval = 1.0 / rate if rate is not None else 0.0
    end = start + seconds
    for i, (sock, data, address) in enumerate(order):
        if rate is None:
            if i & 63 == 0 and time.monotonic() > end:
                break
        else:
            # Sleep, never spin, when ahead: a spinning sender would take a CPU from the relay
            # and the probe's receiver, and the delay measured would be the scheduler's.
            ahead = start + i * interval - time.monotonic()
            if ahead > 0.0002:
                time.sleep(ahead)
        if i % PROBE_EVERY == 0:
            send_times[i] = clock()
        try:
            sock.sendto(data, address)
            sent += 1
        except OSError:
            pass
    elapsed = time.monotonic() - start
    conn.send("stop")
    probe_conn.send("stop")
    delivered = conn.recv()
    probed, arrivals = probe_conn.recv()
    delivered += probed
    cpu = cpu_seconds(pid) - cpu_before
    counter.join(5)
    prober.join(5)
    delays = sorted((arrivals[i] - t) / 1000 for i, t in send_times.items() if i in arrivals)
    p99 = delays[min(len(delays) - 1, int(0.99 * len(delays)))] if delays else None
    p50 = delays[len(delays) // 2] if delays else None
    return RelayRun(rate, sent, delivered, elapsed, cpu, p99, p50)


def relay_capacity(
    relay: Relay, mode: Mode, previous: RelayRun | None
) -> tuple[RelayRun | None, RelayRun]:
    """`find_capacity` of `relay` with `relay_run`."""
    return find_capacity(
        relay.name, lambda rate: relay_run(relay, FLOWS, mode.relay_seconds, rate), previous
    )


def find_capacity(
    name: str, run_at: Callable[[float | None], RelayRun], previous: RelayRun | None
) -> tuple[RelayRun | None, RelayRun]:
    """Flat out (first repeat only), then paced from 90 % of what got through (later repeats:
    110 % of the previous repeat's highest good rate) down by 25 % steps until loss < 0.1 %.
    `run_at(rate)` is one run at `rate`/s (None: flat out)."""
    flat = None
    if previous is not None and previous.rate:
        rate = 1.1 * previous.rate
    else:
        flat = run_at(None)
        rate = 0.9 * flat.delivered_pps
        log(
            f"  {name} flat out: offered {flat.offered_pps:.0f}/s,"
            f" delivered {flat.delivered_pps:.0f}/s"
        )
    best = None
    for _ in range(4):
        run = run_at(rate)
        log(f"  {name} paced {rate:.0f}/s: loss {100 * run.loss:.3f} %")
        if run.loss < 0.001 and run.offered_pps >= 0.95 * rate:
            best = run
            break
        rate *= 0.75
    if best is None:
        best = RelayRun(rate, 0, 0, 1.0, 0.0, None, None)
    return flat, best


def bench_relay(mode: Mode, work: Path | None = None) -> list[Figure]:
    """Figures 2 and 3; with `work` (a directory) also a py-spy profile of our relay at 90 % of
    the rate it kept up with."""
    packets = Figure(
        "relay",
        f"Media packets/s relayed by the main host ({PACKET_SIZE}-byte packets, {FLOWS} flows,"
        " < 0.1 % loss)",
        "packets/s",
        ">= 100,000/s (or half the C relay)",
        anchor_name="C relay, recvmmsg/sendmmsg",
        cpu_unit="us CPU per packet",
    )
    delay = Figure(
        "relay_p99",
        "Delay added by one relay hop at half its capacity (p99, incl. the Python sender/receiver)",
        "us",
        "< 1 ms (1000 us)",
        anchor_name="C relay",
        higher_is_better=False,
    )
    c_binary = ensure_c_relay()
    results: dict[str, list[tuple[RelayRun | None, RelayRun, RelayRun]]] = {"ours": [], "c": []}
    profiled = ""
    relays: dict[str, Relay] = {"ours": OurRelay(), "c": CRelay(c_binary)}
    try:
        for n in range(mode.repeats):
            for side, relay in relays.items():
                log(f"relay, {relay.name}, repeat {n + 1}")
                previous = results[side][-1][1] if results[side] else None
                flat, best = relay_capacity(relay, mode, previous)
                half_rate = max(best.delivered_pps / 2, 1000)
                half = relay_run(relay, FLOWS, mode.relay_seconds, half_rate, count=False)
                log(f"  {relay.name} at half ({half.rate:.0f}/s): p99 {half.p99_us} us")
                results[side].append((flat, best, half))
                for what, run in (
                    ("flat out", flat),
                    ("highest < 0.1 % loss", best),
                    ("half", half),
                ):
                    if run is None:
                        continue
                    packets.runs.append(
                        {
                            "side": side,
                            "run": what,
                            **dataclasses.asdict(run),
                            "offered_pps": run.offered_pps,
                            "delivered_pps": run.delivered_pps,
                            "loss": run.loss,
                        }
                    )
        if work is not None:
            ours = relays["ours"]
            rate = 0.9 * median([b.delivered_pps for _, b, _ in results["ours"]])
            work.mkdir(parents=True, exist_ok=True)
            profiled = profile_process(
                "relay",
                "the main host's relay at 90 % of its capacity",
                ours.pid,
                work,
                lambda seconds: relay_run(ours, FLOWS, min(seconds, 3.0), rate),
                f"{rate:,.0f} packets/s offered",
            )
    finally:
        for relay in relays.values():
            relay.close()

    def cpu_us(runs: list[tuple[RelayRun | None, RelayRun, RelayRun]]) -> float:
        return median([1e6 * b.cpu / b.delivered for _, b, _ in runs if b.delivered] or [0.0])

    packets.ours = median([b.delivered_pps for _, b, _ in results["ours"]])
    packets.anchor = median([b.delivered_pps for _, b, _ in results["c"]])
    packets.ours_cpu = cpu_us(results["ours"])
    packets.anchor_cpu = cpu_us(results["c"])
    packets.target_met = packets.ours >= 100_000 or packets.ours >= packets.anchor / 2
    flats = [f for f, _, _ in results["c"] if f is not None]
    sender_max = median([f.offered_pps for f in flats] or [0.0])
    c_flat = median([f.delivered_pps for f in flats] or [0.0])
    if flats and c_flat >= 0.95 * sender_max:
        packets.note = (
            f"The C relay kept up with everything the Python sender offered ({sender_max:.0f}/s):"
            " its figure is the sender's limit, not the relay's, so 'half the C relay' is"
            " measured against a lower bound."
        )
    packets.note += profiled
    p99s = [h.p99_us for _, _, h in results["ours"] if h.p99_us is not None]
    c_p99s = [h.p99_us for _, _, h in results["c"] if h.p99_us is not None]
    delay.ours = median(p99s) if p99s else None
    delay.anchor = median(c_p99s) if c_p99s else None
    delay.target_met = delay.ours is not None and delay.ours < 1000
    p50s = [h.p50_us for _, _, h in results["ours"] if h.p50_us is not None]
    c_p50s = [h.p50_us for _, _, h in results["c"] if h.p50_us is not None]
    delay.note = (
        f"Medians of p50: ours {median(p50s) if p50s else 0:.0f} us, C relay"
        f" {median(c_p50s) if c_p50s else 0:.0f} us. When ours is close to the C relay's, the"
        " measurement cannot resolve what the hop adds: both are mostly the floor. "
    )
    delay.note += (
        "p99 of each repeat, ours: "
        + ", ".join(f"{v:.0f}" for v in p99s)
        + " us; C relay: "
        + ", ".join(f"{v:.0f}" for v in c_p99s)
        + " us. "
    )
    delay.note += (
        "Send to receive on loopback of one probe flow of the 200, at half of each relay's own"
        " capacity (figure 2); the C relay's figure is close to the measuring floor (a Python"
        " sender and a Python receiver sharing the CPUs with the relay)."
    )
    return [packets, delay]


def not_measured(key: str, name: str, unit: str, target: str, why: str) -> Figure:
    return Figure(key, name, unit, target, note=f"not measured: {why}")


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "not measured"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


SEVERAL_PROCESSES = {"calls_between"}


def explain_limits(figures: list[Figure]) -> None:
    """For a target not reached: what the CPU time per unit says about where the limit is."""
    per_unit_seconds = {"ms": 1e-3, "us": 1e-6}
    for f in figures:
        if f.target_met is not False or f.ours is None or not f.ours_cpu or not f.higher_is_better:
            continue
        if f.key in SEVERAL_PROCESSES:
            # CPU per unit is summed over the processes: its note says which one limits.
            f.note += " Target not reached."
            continue
        scale = per_unit_seconds.get(f.cpu_unit.split()[0], 1.0)
        ceiling = 1 / (f.ours_cpu * scale)
        share = f.ours / ceiling
        f.note += (
            f" Target not reached. At {f.ours_cpu:.3g} {f.cpu_unit}, one CPU allows at most"
            f" {ceiling:,.0f}/s; measured {f.ours:,.0f}/s ({100 * share:.0f} % of that)"
        )
        if share >= 0.7:
            f.note += (
                ", so the limit is CPU time in our single Python process (one trio thread, one"
                " core), not the network or the peer."
            )
        else:
            f.note += (
                ": the process was not CPU-bound, something else limits it (see the steps in"
                " report.json: failures at rates it managed before point at state an earlier"
                " overload left behind)."
            )


def write_report(figures: list[Figure], out: Path, args: argparse.Namespace, wall: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    repeats = QUICK.repeats if args.quick else FULL.repeats
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"# Benchmarks ({mode}: median of {repeats}, {when})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs,"
        f" Python {platform.python_version()}; everything on loopback; {wall:.0f} s in all.",
        "",
        "| figure | ours | anchor | anchor value | ours / anchor | CPU per unit (ours) |"
        " CPU per unit (anchor) | target | target met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        digits = 1 if f.unit.startswith("MB") else 0
        ours = f"{fmt(f.ours, digits)} {f.unit}" if f.ours is not None else "not measured"
        ratio = f"{f.ratio:.2f}" if f.ratio is not None else "-"
        cpu = f"{f.ours_cpu:.3g} {f.cpu_unit}" if f.ours_cpu is not None else "-"
        acpu = f"{f.anchor_cpu:.3g} {f.cpu_unit}" if f.anchor_cpu is not None else "-"
        met = {True: "yes", False: "**no**", None: "-"}[f.target_met]
        anchor = fmt(f.anchor, digits) if f.anchor is not None else "-"
        lines.append(
            f"| {f.name} | {ours} | {f.anchor_name or '-'} | {anchor} | {ratio} | {cpu} |"
            f" {acpu} | {f.target} | {met} |"
        )
    lines += ["", "## Notes", ""]
    for f in figures:
        if f.note:
            lines.append(f"- **{f.key}**: {f.note.strip()}")
    for profile in PROFILES.values():
        lines += ["", f"## Profile of {profile.title} (py-spy --gil)", ""]
        lines += ["| function (own time) | % of samples |", "|---|---|"]
        lines += [f"| `{p['function']}` | {p['self_percent']} |" for p in profile.self_time]
        lines += ["", "| function (inclusive time) | % of samples |", "|---|---|"]
        lines += [f"| `{p['function']}` | {p['total_percent']} |" for p in profile.inclusive[:15]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    data = {
        "mode": mode,
        "repeats": repeats,
        "cpus": os.cpu_count(),
        "seconds": round(wall, 1),
        "figures": [{**dataclasses.asdict(f), "ratio": f.ratio} for f in figures],
        "profiles": {key: dataclasses.asdict(p) for key, p in PROFILES.items()},
    }
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, short steps (< 2 min)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the report goes")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the remote host (REGISTER, calls), the relay and the media anchor",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=["register", "relay", "trunk", "calls", "memory"],
        help="just these",
    )
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    RESULTS.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    only = set(args.only or ["register", "relay", "trunk", "calls", "memory"])
    wall = time.monotonic()
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)

        def profiled(name: str) -> Path | None:
            return work / name if args.profile else None

        def measured(key: str) -> Figure | None:
            return next((f for f in figures if f.key == key), None)

        def relay_remote() -> list[Figure]:
            from remote_relay import bench_relay_remote

            return [bench_relay_remote(mode, measured("relay"), profiled("relay_remote"))]

        def trunk() -> list[Figure]:
            from trunk_figure import bench_trunk

            return [bench_trunk(mode)]

        def calls_between() -> list[Figure]:
            from calls_between import bench_calls_between

            return [bench_calls_between(mode)]

        def memory() -> list[Figure]:
            from memory_calls import bench_memory

            return [bench_memory(mode)]

        # (group, what a failure is reported as: key, name, unit, target; the measurement)
        plan: list[tuple[str, tuple[str, str, str, str], Callable[[], list[Figure]]]] = [
            ("register", ("register", "REGISTER/s", "registrations/s", ">= 5,000/s"),
             lambda: bench_register(mode, work / "register", args.profile)),
            ("relay", ("relay", "Relayed packets/s", "packets/s", ">= 100,000/s"),
             lambda: bench_relay(mode, profiled("relay"))),
            ("relay", ("relay_remote", "Packets/s through a remote host", "packets/s",
                       ">= 60,000/s"), relay_remote),
            ("trunk", ("trunk", "Trunk messages/s", "messages/s", ">= 100,000/s"), trunk),
            ("calls", ("calls_office", "Calls/s inside one office", "calls/s", ">= 1,000/s"),
             lambda: [bench_calls(mode, work / "calls", args.profile)]),
            ("calls", ("calls_between", "Calls/s between offices", "calls/s", ">= 500/s"),
             calls_between),
            ("memory", ("memory", "Remote host memory, 500 phones and 100 calls", "MB RSS",
                        "<= 80 MB"), memory),
        ]  # fmt: skip
        for group, (key, name, unit, target), measure in plan:
            if group not in only:
                continue
            try:
                figures += measure()
            except Exception as exc:  # a figure that fails is reported, the rest still runs
                figures.append(not_measured(key, name, unit, target, repr(exc)))
    explain_limits(figures)
    write_report(figures, args.out, args, time.monotonic() - wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
