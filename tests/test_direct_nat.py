"""F4 system tests: direct audio between offices through real NAT, the relay as the fallback.

Two offices behind port-preserving NATs (the lab's default) punch through both and send their
audio host to host: after the switch the relay forwards nothing more for the call, and each
phone still hears the other's tone. With a symmetric NAT on one side the main host does not even
try, and the relay carries the audio both ways, as before F4.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
from labsystem import wait_until  # deploy/lab, on sys.path via labfixtures

from phoneagent.tone import dominant_frequency
from tests.calllab import REMOTE_HOST, Offices, assert_audio, finish, stats_of
from tests.labfixtures import LabFactory

pytestmark = pytest.mark.lab


def live_call(offices: Offices) -> dict[str, Any] | None:
    calls = offices.system.main_status()["calls"]
    return calls[0] if calls else None


def relay_media(call: dict[str, Any]) -> int:
    """Media packets the relay took in for the call (keepalives not counted)."""
    legs = [call["media"]["offer"], call["media"]["answer"]]
    return sum(leg["packets_in"] - leg["keepalives_in"] for leg in legs)


def nat_types_known(offices: Offices) -> None:
    """The offices' STUN probes end some seconds after their login; the main host decides by
    their outcome."""

    def known(k: int) -> bool:
        return offices.system.office_status(k)["nat_type"] not in (None, "unknown")

    for k in (1, 2):
        wait_until(partial(known, k), 30, f"office{k}'s NAT type")


def remote_call(offices: Offices, office: int) -> dict[str, Any] | None:
    calls = offices.system.remote_status(office)["calls"]
    return calls[0] if calls else None


def test_two_cone_nats_get_direct_audio_both_ways(lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory(2, hosts=[REMOTE_HOST, "p1"])
    offices = Offices(lab, tmp_path, 2)
    try:
        nat_types_known(offices)
        callee_wav, caller_wav = tmp_path / "callee.wav", tmp_path / "caller.wav"
        agent = offices.answer(2, 1, "--tone", "660", "--record", str(callee_wav))
        caller = offices.call_in_background(
            1, 1, "2001", "--tone", "440", "--record", str(caller_wav), "--duration", "10"
        )

        def direct() -> bool:
            call = live_call(offices)
            return call is not None and call["media_path"] == "direct"

        wait_until(direct, 15, "the call's audio goes direct")

        def sends_directly(office: int) -> bool:
            return (remote_call(offices, office) or {}).get("media_path") == "direct"

        for office in (1, 2):
            wait_until(partial(sends_directly, office), 5, f"office{office} sends directly")
        call = live_call(offices)
        assert call is not None and call["direct_skipped"] is None
        before = relay_media(call)
        # Two seconds of audio later the relay has carried none of it.
        stats = [remote_call(offices, o) for o in (1, 2)]
        wait_until(
            lambda: all(
                (remote_call(offices, o) or {"media": {"direct_packets_out": 0}})["media"][
                    "direct_packets_out"
                ]
                > (s or {"media": {"direct_packets_out": 0}})["media"]["direct_packets_out"] + 100
                for o, s in zip((1, 2), stats, strict=True)
            ),
            10,
            "100 more packets direct each way",
        )
        call = live_call(offices)
        assert call is not None and relay_media(call) == before
        for office in (1, 2):
            media = (remote_call(offices, office) or {})["media"]
            assert media["direct_packets_in"] > 100, media
            assert media["direct_switches"] >= 1, media
        code, out, err = finish(caller, timeout=40)
        assert code == 0, out + err
        code2, out2, err2 = finish(agent)
        assert code2 == 0, out2 + err2
        # Both phones heard the other one's tone, with under 1 % loss over the whole call
        # (relay first, then direct: no gap anyone could hear).
        assert_audio(stats_of(out), caller_wav, 660)
        assert_audio(stats_of(out2), callee_wav, 440)
    finally:
        offices.stop()
        print(offices.system.logs())


def test_a_symmetric_nat_keeps_the_call_on_the_relay(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(2, hosts=[REMOTE_HOST, "p1"], symmetric=[2])
    offices = Offices(lab, tmp_path, 2)
    try:
        nat_types_known(offices)
        callee_wav, caller_wav = tmp_path / "callee.wav", tmp_path / "caller.wav"
        agent = offices.answer(2, 1, "--tone", "660", "--record", str(callee_wav))
        caller = offices.call_in_background(
            1, 1, "2001", "--tone", "440", "--record", str(caller_wav), "--duration", "5"
        )
        wait_until(
            lambda: (live_call(offices) or {}).get("direct_skipped") is not None,
            15,
            "the main host skips the direct path",
        )
        call = live_call(offices)
        assert call is not None
        assert "office2" in call["direct_skipped"], call
        assert call["media_path"] == "relayed"
        code, out, err = finish(caller, timeout=40)
        assert code == 0, out + err
        code2, out2, err2 = finish(agent)
        assert code2 == 0, out2 + err2
        assert_audio(stats_of(out), caller_wav, 660)
        assert_audio(stats_of(out2), callee_wav, 440)
        assert offices.system.main_status()["relay"]["forwarded"] > 200
    finally:
        offices.stop()
        print(offices.system.logs())


def test_a_firewall_mid_call_sends_the_audio_back_through_the_relay(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(2, hosts=[REMOTE_HOST, "p1"])
    offices = Offices(lab, tmp_path, 2)
    try:
        nat_types_known(offices)
        callee_wav, caller_wav = tmp_path / "callee.wav", tmp_path / "caller.wav"
        agent = offices.answer(2, 1, "--tone", "660", "--record", str(callee_wav))
        caller = offices.call_in_background(
            1, 1, "2001", "--tone", "440", "--record", str(caller_wav), "--duration", "10"
        )
        wait_until(
            lambda: (live_call(offices) or {}).get("media_path") == "direct", 15, "direct audio"
        )
        call = live_call(offices)
        assert call is not None
        office1_public = call["media"]["offer"]["address"][0]
        # Office 2's router now drops whatever office 1 sends it directly (a firewall rule);
        # the relay's packets come from the main host and still pass.
        lab.run(
            lab.office(2).router_ns,
            ["iptables", "-w", "-I", "FORWARD", "-s", office1_public, "-p", "udp", "-j", "DROP"],
            check=True,
        )
        wait_until(
            lambda: (live_call(offices) or {}).get("media_path") == "relayed",
            10,
            "the relay carries the call again",
        )
        for office in (1, 2):
            media = (remote_call(offices, office) or {})["media"]
            assert media["direct_fallbacks"] >= 1, media
        code, out, err = finish(caller, timeout=40)
        assert code == 0, out + err
        code2, out2, err2 = finish(agent)
        assert code2 == 0, out2 + err2
        # Office 1's phone lost nothing (its direction was never blocked); office 2's lost
        # what was sent directly until its side fell back, about a second: far from the call.
        assert_audio(stats_of(out), caller_wav, 660)
        callee = stats_of(out2)
        assert callee["packets_received"] > 300, callee
        assert callee["packets_lost"] < 100, callee
        heard = dominant_frequency(callee_wav)
        assert heard is not None and abs(heard - 440) < 25, heard
    finally:
        offices.stop()
        print(offices.system.logs())
