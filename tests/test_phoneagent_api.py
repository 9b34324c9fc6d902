"""The phone agent's API contract: errors in words, the JSON a script reads, server syntax."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phoneagent.audio import open_source
from phoneagent.phone import (
    CallFailedError,
    CallStats,
    PhoneError,
    RegistrationError,
    parse_server,
)
from phoneagent.tone import detect_tone, pcm_samples
from tests.phonehelpers import write_tone_wav

# What `--json` prints per call: scripts depend on these names (add, never rename).
JSON_KEYS = {
    "call_id", "direction", "remote", "answered", "status", "reason", "warning", "ended_by",
    "duration", "codec", "packets_sent", "packets_received", "packets_lost", "duplicates",
    "jitter_ms", "late", "concealed", "dtmf_sent", "dtmf_received", "messages",
}  # fmt: skip


def test_json_contract_has_every_documented_key() -> None:
    stats = CallStats("abc", "incoming", "sip:2001@127.0.0.1", answered=True, codec="PCMU")
    encoded = json.dumps(stats.to_json())
    decoded = json.loads(encoded)
    assert set(decoded) == JSON_KEYS
    assert decoded["answered"] is True and decoded["messages"] == []


@pytest.mark.parametrize(
    ("status", "reason", "hint"),
    [
        (401, "Unauthorized", "wrong extension or password"),
        (403, "Forbidden", "not allowed to register"),
        (500, "Server Internal Error", ""),
    ],
)
def test_registration_errors_say_what_to_check(status: int, reason: str, hint: str) -> None:
    error = RegistrationError(status, reason)
    text = str(error)
    assert text.startswith(f"registration failed: {status} {reason}")
    assert hint in text
    assert isinstance(error, PhoneError) and error.status == status


def test_call_failure_text_carries_the_warning() -> None:
    assert str(CallFailedError(486, "Busy Here")) == "486 Busy Here"
    with_warning = CallFailedError(480, "Temporarily Unavailable", "2002 is not registered")
    assert str(with_warning) == "480 Temporarily Unavailable (Warning: 2002 is not registered)"
    assert with_warning.warning == "2002 is not registered"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.10", ("192.0.2.10", 5060)),
        ("192.0.2.10:5070", ("192.0.2.10", 5070)),
        ("[::1]:5070", ("::1", 5070)),
        ("[2001:db8::1]", ("2001:db8::1", 5060)),
    ],
)
def test_server_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_server(text) == expected


@pytest.mark.parametrize("text", ["", "pbx.example.com", "1.2.3.4:99999", "1.2.3.4:x", "a b"])
def test_bad_server_addresses(text: str) -> None:
    with pytest.raises(PhoneError):
        parse_server(text)


def test_a_short_prompt_is_played_in_a_loop(tmp_path: Path) -> None:
    path = write_tone_wav(tmp_path / "beep.wav", 1000, seconds=0.05)  # 400 samples
    source = open_source(play=path)
    frames = [source.frame() for _ in range(10)]  # 1600 samples: the beep four times
    assert all(any(frame) for frame in frames)
    heard = pcm_samples(b"".join(frames))
    assert detect_tone(heard, [500, 1000, 2000]) == 1000


def test_tone_source_refuses_impossible_frequencies() -> None:
    with pytest.raises(ValueError):
        open_source(tone=5000)
