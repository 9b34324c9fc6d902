"""F3/F5/F6 system tests: real calls with real audio between phone agents, offices behind real NAT.

Every office has its remote host ("rh") and two phones ("p1", "p2") in their own namespaces on
the office LAN. Phones are our phone agent run from the command line, as a script would; audio
is checked by the tone each side hears (each side plays its own frequency and records the
other), and by the agents' RTP statistics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from labsystem import PYTHON, wait_until  # deploy/lab, on sys.path via labfixtures

from tests.calllab import REMOTE_HOST, SIGNALLING, Capture, Offices, assert_audio, finish, stats_of
from tests.labfixtures import LabFactory

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("different_subnets", [False, True], ids=["same-lan", "different-lans"])
def test_call_between_offices_has_audio_both_ways(
    lab_factory: LabFactory, tmp_path: Path, different_subnets: bool
) -> None:
    lab = lab_factory(2, hosts=[REMOTE_HOST, "p1"], different_subnets=different_subnets)
    offices = Offices(lab, tmp_path, 2)
    try:
        callee_wav, caller_wav = tmp_path / "callee.wav", tmp_path / "caller.wav"
        agent = offices.answer(2, 1, "--tone", "660", "--record", str(callee_wav))
        # Office 1's phone 1001 calls office 2's phone 2001.
        result = offices.call(
            1, 1, "2001", "--tone", "440", "--record", str(caller_wav), "--duration", "4"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        code, out, err = finish(agent)
        assert code == 0, out + err
        assert_audio(stats_of(result.stdout), caller_wav, 660)
        assert_audio(stats_of(out), callee_wav, 440)
        # The relay saw nothing forged or replayed (the audio went through it, or directly
        # once both NATs allowed it: F4).
        relay = offices.system.main_status()["relay"]
        assert relay["dropped_bad_tag"] == 0 and relay["dropped_replay"] == 0
    finally:
        offices.stop()
        print(offices.system.logs())


def test_call_inside_an_office_keeps_its_audio_on_the_lan(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(1, hosts=[REMOTE_HOST, "p1", "p2"])
    offices = Offices(lab, tmp_path, 1)
    office = lab.office(1)
    at_remote_host = Capture(lab, office.host(REMOTE_HOST).ns, "eth0", tmp_path / "rh.pcap")
    on_wan = Capture(lab, office.router_ns, "wan", tmp_path / "wan.pcap")
    try:
        callee_wav, caller_wav = tmp_path / "callee.wav", tmp_path / "caller.wav"
        agent = offices.answer(1, 2, "--tone", "660", "--record", str(callee_wav))
        result = offices.call(
            1, 1, "1002", "--tone", "440", "--record", str(caller_wav), "--duration", "3"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        code, out, err = finish(agent)
        assert code == 0, out + err
        assert_audio(stats_of(result.stdout), caller_wav, 660)
        assert_audio(stats_of(out), callee_wav, 440)
    finally:
        at_remote_host.stop()
        on_wan.stop()
        offices.stop()
        print(offices.system.logs())
    # The captures worked: the signalling went through the remote host ...
    assert at_remote_host.count("udp.port == 5060") > 4
    # ... but not one audio packet: phone to phone on the LAN (F5).
    assert at_remote_host.count(f"udp && !({SIGNALLING})") == 0
    # And nothing of the call crossed the WAN but the trunk (TCP) and STUN.
    assert on_wan.count(f"udp && !({SIGNALLING})") == 0


def test_wan_cut_local_calls_go_on_and_calls_out_fail_clearly(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(2, hosts=[REMOTE_HOST, "p1", "p2", "p3", "p4"])
    offices = Offices(lab, tmp_path, 2, phones=4)
    try:
        long_wav = tmp_path / "long.wav"
        answering = offices.answer(1, 2, "--tone", "660")
        # A call that is up when the WAN dies keeps its audio (it never needed the WAN).
        long_call = offices.call_in_background(
            1, 1, "1002", "--tone", "440", "--record", str(long_wav), "--duration", "12"
        )
        time.sleep(3)
        lab.office(1).cut_wan()
        wait_until(lambda: not offices.system.remote_status(1)["online"], 6, "WAN cut noticed")
        # A new call inside the office connects: the remote host decides alone (F6).
        offices.answer(1, 4, "--tone", "880")
        started = time.monotonic()
        local = offices.call(1, 3, "1004", "--duration", "2", "--tone", "550")
        assert local.returncode == 0, local.stdout + local.stderr
        assert stats_of(local.stdout)["packets_received"] > 50
        # A call to another office fails at once with a clear reason, instead of hanging.
        outside = offices.call(1, 3, "2001", "--duration", "2", timeout=30)
        assert outside.returncode != 0
        assert ("503" in outside.stdout + outside.stderr) or (
            "480" in outside.stdout + outside.stderr
        ), outside.stdout + outside.stderr
        assert time.monotonic() - started < 25  # a guard against hanging, not a benchmark
        code, out, err = finish(long_call, timeout=40)
        assert code == 0, out + err
        assert_audio(stats_of(out), long_wav, 660)
        finish(answering)
        lab.office(1).restore_wan()
    finally:
        offices.stop()
        print(offices.system.logs())


def test_relay_drops_packets_that_do_not_authenticate(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(1, hosts=[REMOTE_HOST])
    offices = Offices(lab, tmp_path, 1)
    try:
        before = offices.system.main_status()["relay"]
        sender = (
            "import socket, os\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for i in range(200):\n"
            "    s.sendto(os.urandom(60 + i % 100), ('203.0.113.10', 5090))\n"
        )
        # From somewhere on the internet, not an office: random bytes at the media port.
        lab.run(lab.internet_ns, [PYTHON, "-c", sender], check=True, timeout=30)

        def dropped() -> int:
            relay = offices.system.main_status()["relay"]
            return sum(v for k, v in relay.items() if k.startswith("dropped_"))

        wait_until(
            lambda: (
                dropped() - sum(v for k, v in before.items() if k.startswith("dropped_")) >= 200
            ),
            10,
            "drops counted",
        )
        after = offices.system.main_status()["relay"]
        assert after["forwarded"] == before["forwarded"]
    finally:
        offices.stop()


def call_records(offices: Offices) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(offices.system.run_main("calls", "--json").stdout)[
        "calls"
    ]
    return result


def test_a_full_wan_refuses_the_next_call_with_a_reason(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(2, hosts=[REMOTE_HOST, "p1", "p2"])
    offices = Offices(lab, tmp_path, 2)
    try:
        # Room for one G.711 call (92.8 kbit/s with headers) on office 2's WAN, not two.
        offices.system.run_main("office", "set", "office2", "--wan-kbps", "150")
        first_answer = offices.answer(2, 1)
        offices.answer(2, 2)
        first = offices.call_in_background(1, 1, "2001", "--duration", "8")
        wait_until(
            lambda: offices.system.office_status(2)["bandwidth"]["calls"] == 1,
            15,
            "the first call holds its share of office2's WAN",
        )
        second = offices.call(1, 2, "2002", "--duration", "2", timeout=30)
        assert second.returncode != 0
        output = second.stdout + second.stderr
        assert "503" in output and "office2" in output and "WAN" in output, output
        bandwidth = offices.system.office_status(2)["bandwidth"]
        assert bandwidth["refused"] == 1
        assert bandwidth["used_kbps"] == 92.8
        # The refusal is in the call records, with its cause.
        refused = wait_until(
            lambda: [c for c in call_records(offices) if c["status"] == 503] or None,
            20,
            "the refused call's record",
        )
        assert len(refused) == 1 and "WAN" in refused[0]["reason"], refused
        code, out, err = finish(first, timeout=40)
        assert code == 0, out + err
        finish(first_answer)
        # The call's end gave its share back.
        wait_until(
            lambda: offices.system.office_status(2)["bandwidth"]["used_kbps"] == 0, 10, "freed"
        )
    finally:
        offices.stop()
        print(offices.system.logs())
