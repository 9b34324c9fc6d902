"""`phoneagent` as scripts run it: subprocesses on loopback, exit statuses, one-line errors."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from phoneagent.tone import dominant_frequency
from tests.phonehelpers import write_tone_wav

TIMEOUT = 60.0


def env() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONUNBUFFERED"] = "1"
    environment["COLUMNS"] = "200"
    return environment


def phoneagent(*args: str | Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phoneagent", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        check=False,
        stdin=subprocess.DEVNULL,
    )


@contextmanager
def answering(*args: str | Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`phoneagent answer ...` in the background; yields its SIP URI and the process."""
    process = subprocess.Popen(
        [sys.executable, "-m", "phoneagent", "--ext", "2002", "answer", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env(),
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        match = re.search(r"listening on (sip:\S+)", line)
        assert match, f"no address announced: {line!r}"
        yield match.group(1), process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(TIMEOUT)


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=TIMEOUT)
    return process.returncode, out, err


def one_json(text: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    result: dict[str, Any] = json.loads(lines[0])
    return result


def test_call_and_answer_with_tones_dtmf_and_json(tmp_path: Path) -> None:
    heard_by_callee = tmp_path / "callee.wav"
    heard_by_caller = tmp_path / "caller.wav"
    with answering("--tone", "1000", "--record", heard_by_callee, "--json") as (uri, callee):
        result = phoneagent(
            "call", uri, "--tone", "440", "--duration", "1.5", "--dtmf", "159#",
            "--record", heard_by_caller, "--json",
        )  # fmt: skip
        status, out, err = finish(callee)
    assert result.returncode == 0, result.stderr
    caller_stats = one_json(result.stdout)
    callee_stats = one_json(out)
    assert status == 0, err
    assert caller_stats["answered"] and callee_stats["answered"]
    assert caller_stats["codec"] == "PCMU"
    assert callee_stats["dtmf_received"] == "159#"
    assert caller_stats["packets_sent"] > 0 and callee_stats["packets_received"] > 0
    assert callee_stats["ended_by"] == "remote"
    assert dominant_frequency(heard_by_callee) == 440
    assert dominant_frequency(heard_by_caller) == 1000


def test_play_a_wav_file(tmp_path: Path) -> None:
    prompt = write_tone_wav(tmp_path / "prompt.wav", 660, seconds=2.0, rate=16000)
    heard = tmp_path / "heard.wav"
    with answering("--record", heard) as (uri, callee):
        result = phoneagent("call", uri, "--play", prompt, "--duration", "1")
        status, out, _ = finish(callee)
    assert result.returncode == 0, result.stderr
    assert status == 0
    assert "PCMU" in result.stdout and "received" in out  # the human summary
    assert dominant_frequency(heard) == 660


def test_busy_callee_makes_the_caller_fail_with_the_status() -> None:
    with answering("--busy") as (uri, callee):
        result = phoneagent("call", uri, "--duration", "1")
        status, _, _ = finish(callee)
    assert result.returncode == 1
    assert "486 Busy Here" in result.stderr
    assert "Traceback" not in result.stderr
    assert status == 0  # the busy side did what it was told


def test_json_of_a_failed_call_carries_the_status() -> None:
    with answering("--busy") as (uri, callee):
        result = phoneagent("call", uri, "--json")
        finish(callee)
    assert result.returncode == 1
    stats = one_json(result.stdout)
    assert stats["status"] == 486 and stats["reason"] == "Busy Here" and not stats["answered"]


def test_answer_takes_count_calls(tmp_path: Path) -> None:
    with answering("--count", "2", "--json", "--tone", "300") as (uri, callee):
        first = phoneagent("call", uri, "--duration", "0.5")
        second = phoneagent("call", uri, "--duration", "0.5")
        status, out, _ = finish(callee)
    assert first.returncode == second.returncode == status == 0
    assert len(out.strip().splitlines()) == 2


def test_callee_duration_hangs_up_itself() -> None:
    with answering("--duration", "0.5", "--json") as (uri, callee):
        result = phoneagent("call", uri, "--duration", "20", "--json")
        status, out, _ = finish(callee)
    assert result.returncode == 0 and status == 0
    assert one_json(result.stdout)["ended_by"] == "remote"
    assert one_json(out)["ended_by"] == "local"


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("phoneagent: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_bad_server_is_one_line() -> None:
    assert_one_line_error(phoneagent("--server", "pbx..example", "call", "2002"), "bad server")


def test_unreachable_server_is_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        result = phoneagent("--server", f"127.0.0.1:{port}", "--ext", "2001", "call", "2002")
    assert_one_line_error(result, "no answer from", f"127.0.0.1:{port}")


def test_port_in_use_is_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = phoneagent("--sip-port", str(port), "call", "sip:x@127.0.0.1:9")
    assert_one_line_error(result, f"127.0.0.1:{port}", "in use")


def test_bad_local_ip_is_one_line() -> None:
    assert_one_line_error(phoneagent("--local-ip", "localhost", "call", "sip:x@127.0.0.1:9"))


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: write_tone_wav(p / "u8.wav", 400, 0.1, width=1), "16-bit"),
        (lambda p: p / "missing.wav", "no such file"),
    ],
)
def test_unplayable_wav_is_one_line(tmp_path: Path, make: Any, needle: str) -> None:
    path = make(tmp_path)
    assert_one_line_error(phoneagent("call", "sip:x@127.0.0.1:9", "--play", path), needle)


def test_number_without_server_is_one_line() -> None:
    assert_one_line_error(phoneagent("call", "2002"), "needs a server")


def test_usage_errors_exit_2() -> None:
    result = phoneagent("call", "x", "--tone", "440", "--play", "a.wav")
    assert result.returncode == 2 and "not allowed with" in result.stderr
    assert phoneagent("answer", "--count", "0").returncode == 2
    assert phoneagent("call", "x", "--duration", "-1").returncode == 2


def test_global_options_after_the_subcommand(tmp_path: Path) -> None:
    with answering("--json") as (uri, callee):
        result = phoneagent("call", uri, "--ext", "2077", "--duration", "0.3", "--json")
        _, out, _ = finish(callee)
    assert result.returncode == 0, result.stderr
    assert one_json(out)["remote"].startswith("sip:2077@")


def test_summary_line_and_record_paths() -> None:
    from phoneagent.cli import _describe, _record_path, build_parser
    from phoneagent.phone import CallStats

    answered = CallStats("c", "outgoing", "sip:2002@x", answered=True, duration=5.04,
                         codec="PCMA", packets_sent=250, packets_received=249, packets_lost=1,
                         jitter_ms=0.42, dtmf_received="12")  # fmt: skip
    assert _describe(answered) == (
        "call sip:2002@x: 5.0 s, PCMA, sent 250, received 249, lost 1, jitter 0.4 ms, "
        "DTMF received 12"
    )
    failed = CallStats("c", "outgoing", "2002", status=486, reason="Busy Here")
    assert _describe(failed) == "call 2002: not answered (486 Busy Here)"
    assert _record_path(None, 0, 3) is None
    assert _record_path("in.wav", 0, 1) == Path("in.wav")
    assert _record_path("dir/in.wav", 1, 3) == Path("dir/in-2.wav")
    args = build_parser().parse_args(["--server", "192.0.2.1", "answer", "--ext", "7", "--busy"])
    assert (args.server, args.ext, args.busy, args.count, args.local_ip) == (
        "192.0.2.1", "7", True, 1, "127.0.0.1",
    )  # fmt: skip


def test_sigterm_ends_an_answering_agent_cleanly() -> None:
    import signal

    with answering("--count", "3") as (_, callee):
        callee.send_signal(signal.SIGTERM)
        status, _, err = finish(callee)
    assert status == 128 + signal.SIGTERM
    assert "Traceback" not in err


def _call_and_text(uri: str, text: str) -> None:
    """From an API phone: call `uri`, send it a MESSAGE while the call is up, hang up."""
    import trio

    from phoneagent.phone import open_phone

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with open_phone(ext="2009") as phone:
                call = await phone.call(uri)
                await call.wait_answered()
                assert await phone.send_text(uri, text) == 200
                await trio.sleep(0.3)
                await call.hangup()

    trio.run(main)


def test_message_texts_are_printed_and_in_the_json() -> None:
    with answering("--json") as (uri, callee):
        _call_and_text(uri, "fire drill at 11")
        status, out, _ = finish(callee)
    assert status == 0
    assert one_json(out)["messages"] == ["fire drill at 11"]
    with answering() as (uri, callee):
        _call_and_text(uri, "second one")
        status, out, _ = finish(callee)
    assert status == 0
    assert "MESSAGE from sip:2009@127.0.0.1: second one" in out.splitlines()


def _call_then_give_up(uri: str) -> tuple[int, list[int]]:
    """From an API phone: call `uri`, hang up as soon as it rings; the final status and the
    provisional ones seen."""
    import trio

    from phoneagent.phone import open_phone

    async def main() -> tuple[int, list[int]]:
        with trio.fail_after(TIMEOUT):
            async with open_phone(ext="2010") as phone:
                call = await phone.call(uri)
                await call.wait_ringing()
                stats = await call.hangup()
                return stats.status or 0, call.progress

    return trio.run(main)


def test_a_caller_giving_up_while_it_rings_does_not_use_up_the_count() -> None:
    with answering("--ring", "3", "--json") as (uri, callee):
        status, progress = _call_then_give_up(uri)
        assert (status, progress) == (487, [180])
        assert callee.poll() is None  # still waiting for its one call
        answered = phoneagent("call", uri, "--duration", "0.3", "--json")
        code, out, _ = finish(callee)
    assert answered.returncode == 0 and code == 0
    assert one_json(out)["answered"]  # the one call it printed is the answered one
