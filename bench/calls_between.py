"""Calls/s between two offices: remote host -> main host -> remote host (issue 6, target >= 500/s).

The figure beside `bench_calls` in bench/run.py (calls inside one office), measured the same
way: a SIPp caller (tests/sipp/call_uac.xml, pauses removed, 407 answered with digest) at
office berlin's remote host dials 3002, an extension of office munich, whose SIPp callee
(call_uas.xml, pauses removed) is registered at munich's remote host. Each call crosses the
three processes: berlin's B2BUA and media anchor, the main host's routing and relay (CallSetup,
MediaLeg, CallProgress, CallAnswer, CallEnd over both trunks), munich's B2BUA and anchor. 0 s
calls; the rate is stepped with `find_max_rate` (< 1 % failures); the CPU per call is the user +
system time of all three processes over the step, divided by the calls completed, and the
median of `mode.repeats` repeats is reported. Each process's own share is in the runs.

No anchor: Kamailio would have nothing comparable to do (two B2BUAs with media anchors and a
trunk between them).

    .venv/bin/python bench/calls_between.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project (tests.*)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/run.py, bench/offices.py

from offices import open_two_offices
from run import (
    FULL,
    QUICK,
    Figure,
    Mode,
    StepResult,
    find_max_rate,
    log,
    median,
    settle,
    sipp_call_step,
    sipp_callee,
)

from tests.peerhelpers import LOOPBACK, cpu_seconds, wait_for

CALLER = ("2001", "bench-2001-secret")
CALLEE = ("3002", "bench-3002-secret")
TARGET_RATE = 500
LINGER_GUARD = 40.0  # seconds to wait for the calls of an overloaded step to end


def bench_calls_between(mode: Mode) -> Figure:
    figure = Figure(
        "calls_between",
        "Calls/s between two offices (remote host -> main host -> remote host, 0 s calls,"
        " < 1 % failures)",
        "calls/s",
        ">= 500/s",
        cpu_unit="ms CPU per call",
    )
    phones_a = {CALLER[0]: CALLER[1]}
    phones_b = {CALLEE[0]: CALLEE[1]}
    best_runs: list[StepResult] = []
    shares: list[tuple[float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-between-") as tmp:
        work = Path(tmp)
        with open_two_offices(work / "offices", phones_a, phones_b) as offices:
            pids = offices.pids
            target = (LOOPBACK, offices.a.sip_port)

            steps: list[tuple[StepResult, tuple[float, float, float]]] = []
            lingering: list[tuple[int, float]] = []  # calls still up before a step, seconds waited

            def cpu() -> float:
                return sum(cpu_seconds(pid) for pid in pids)

            def calls_up() -> int:
                return sum(
                    len(o.remote_status().get("calls") or []) for o in (offices.a, offices.b)
                )

            def step(rate: float) -> StepResult:
                # After an overloaded step, calls that lost a message wait for a SIP timer (up
                # to 32 s) and count against the remote hosts' max_calls: the next step would
                # measure their 503s. Wait for them to end (or say that they did not).
                start = time.monotonic()
                while (left := calls_up()) and time.monotonic() - start < LINGER_GUARD:
                    time.sleep(0.5)
                lingering.append((left, time.monotonic() - start))
                settle(cpu, "calls between offices")  # as sipp_call_step does, before `before`
                before = [cpu_seconds(pid) for pid in pids]
                result = sipp_call_step(
                    work, target, CALLER, CALLEE[0], rate, mode.step_seconds, cpu
                )
                used = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
                steps.append((result, (used[0], used[1], used[2])))
                return result

            callee_target = (LOOPBACK, offices.b.sip_port)
            with sipp_callee(work, callee_target, CALLEE[0], CALLEE[1]):
                wait_for(
                    lambda: offices.b.registrations(CALLEE[0]) or None, "the callee registered"
                )
                for n in range(mode.repeats):
                    log(f"calls between offices, repeat {n + 1}")
                    steps.clear()
                    start = 0.8 * best_runs[-1].achieved if best_runs and best_runs[-1].ok else 64.0
                    best = find_max_rate(step, start, mode.bisections)
                    best_runs.append(best)
                    used = next(u for r, u in steps if r is best) if best.ok else (0.0, 0.0, 0.0)
                    shares.append(used)
                    figure.runs.append(
                        {
                            "side": "ours",
                            **dataclasses.asdict(best),
                            "achieved": best.achieved,
                            "ms_per_call": {
                                name: round(1000 * u / best.ok, 3) if best.ok else None
                                for name, u in zip(
                                    ("remote_a", "main", "remote_b"), used, strict=True
                                )
                            },
                        }
                    )
            figure.runs.append({"side": "ours", "calls_up_at_the_end": calls_up()})
    figure.ours = median([b.achieved for b in best_runs])
    figure.ours_cpu = median([1000 * b.cpu / b.ok for b in best_runs if b.ok] or [0.0])
    figure.target_met = figure.ours >= TARGET_RATE
    per_process = [
        median([1000 * s[i] / b.ok for s, b in zip(shares, best_runs, strict=True) if b.ok] or [0])
        for i in range(3)
    ]
    busiest = max(per_process)
    figure.note = (
        "SIPp caller at office berlin's remote host -> main host -> SIPp callee registered at"
        " office munich's remote host; both remote hosts anchor the call's media (no RTP is"
        " sent). CPU per call is the three processes' sum: berlin's remote host"
        f" {per_process[0]:.2f} ms, the main host {per_process[1]:.2f} ms, munich's remote host"
        f" {per_process[2]:.2f} ms (medians)."
    )
    if busiest:
        cpus = os.cpu_count() or 1
        figure.note += (
            f" Each is one trio thread: the busiest alone allows at most {1000 / busiest:,.0f}"
            f" calls/s, and the three together on this machine's {cpus} CPUs (shared"
            f" with the two SIPp processes) at most {1000 * cpus / sum(per_process):,.0f}/s."
        )
    waited = max((w for _, w in lingering), default=0.0)
    if waited > 1.0:
        figure.note += (
            f" Before some steps calls of an earlier, overloaded step were still up (waiting for"
            f" a SIP timer); the suite waited up to {waited:.0f} s for them"
            + (
                ", and some were still up after that."
                if any(left for left, _ in lingering)
                else "."
            )
        )
    return figure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 s steps")
    args = parser.parse_args()
    figure = bench_calls_between(QUICK if args.quick else FULL)
    print(f"{figure.name}: {figure.ours:,.0f} {figure.unit}, {figure.ours_cpu:.3g} ms CPU per call")
    print(figure.note)
    for run in figure.runs:
        print(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
