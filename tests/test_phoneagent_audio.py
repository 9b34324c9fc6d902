"""Tones, the Goertzel detector, WAV reading (resampling, stereo, refusals) and audio sources."""

from __future__ import annotations

import io
import wave
from array import array
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phoneagent.audio import (
    SILENCE_FRAME,
    AudioFileError,
    PcmSource,
    SilenceSource,
    ToneSource,
    WavRecorder,
    open_source,
    read_wav,
    resample,
    write_wav,
)
from phoneagent.tone import (
    FRAME_SAMPLES,
    ToneGenerator,
    detect_tone,
    dominant_frequency,
    goertzel_power,
    pcm_samples,
)
from tests.phonehelpers import write_tone_wav


def samples_of(frequency: float, seconds: float = 0.2, rate: int = 8000) -> array[int]:
    return pcm_samples(ToneGenerator(frequency, sample_rate=rate).frame(int(seconds * rate)))


@pytest.mark.parametrize("frequency", [300, 440, 697, 1000, 1633, 2500, 3300])
def test_detect_tone_picks_the_played_frequency(frequency: int) -> None:
    candidates = [300, 440, 697, 1000, 1633, 2500, 3300]
    assert detect_tone(samples_of(frequency), candidates) == frequency


def test_detect_tone_on_silence_is_none() -> None:
    assert detect_tone(array("h", bytes(3200)), [440, 1000]) is None
    assert detect_tone(samples_of(440), []) is None


def test_goertzel_power_is_high_on_the_frequency_and_low_off_it() -> None:
    tone = samples_of(1000)
    assert goertzel_power(tone, 1000) > 100 * goertzel_power(tone, 1500)
    assert goertzel_power([], 1000) == 0.0


def test_tone_generator_frames_join_without_a_jump() -> None:
    generator = ToneGenerator(440)
    joined = pcm_samples(generator.frame() + generator.frame())
    whole = samples_of(440, seconds=2 * FRAME_SAMPLES / 8000)
    assert joined == whole


@pytest.mark.parametrize("frequency", [0, -5, 4000, 10_000])
def test_tone_generator_refuses_impossible_tones(frequency: float) -> None:
    with pytest.raises(ValueError):
        ToneGenerator(frequency)


@pytest.mark.parametrize("frequency", [440, 1000, 2000])
def test_dominant_frequency_of_a_wav(tmp_path: Path, frequency: int) -> None:
    path = write_tone_wav(tmp_path / "t.wav", frequency, seconds=1.0)
    assert dominant_frequency(path) == frequency


def test_dominant_frequency_finds_the_tone_after_leading_silence(tmp_path: Path) -> None:
    pcm = bytes(2 * 8000 * 3) + ToneGenerator(700).frame(8000)
    path = tmp_path / "late.wav"
    write_wav(path, pcm)
    assert dominant_frequency(path) == 700


def test_dominant_frequency_of_silence_is_none(tmp_path: Path) -> None:
    path = tmp_path / "quiet.wav"
    write_wav(path, bytes(1600))
    assert dominant_frequency(path) is None


def test_read_wav_resamples_16k_to_8k(tmp_path: Path) -> None:
    path = write_tone_wav(tmp_path / "wide.wav", 500, seconds=1.0, rate=16000)
    pcm = read_wav(path)
    assert len(pcm) == 2 * 8000
    assert detect_tone(pcm_samples(pcm), [250, 500, 1000]) == 500


def test_read_wav_downmixes_stereo(tmp_path: Path) -> None:
    path = write_tone_wav(tmp_path / "stereo.wav", 800, seconds=0.5, channels=2)
    pcm = read_wav(path)
    assert len(pcm) == 2 * 4000
    assert detect_tone(pcm_samples(pcm), [400, 800, 1600]) == 800


def test_read_wav_refuses_8_bit(tmp_path: Path) -> None:
    path = write_tone_wav(tmp_path / "u8.wav", 800, seconds=0.1, width=1)
    with pytest.raises(AudioFileError, match=r"8-bit.*16-bit"):
        read_wav(path)


def test_read_wav_refuses_what_is_not_wav(tmp_path: Path) -> None:
    path = tmp_path / "song.mp3"
    path.write_bytes(b"ID3\x03\x00" + bytes(100))
    with pytest.raises(AudioFileError, match=r"song\.mp3: not a PCM WAV file"):
        read_wav(path)
    with pytest.raises(AudioFileError, match="no such file"):
        read_wav(tmp_path / "missing.wav")


def test_read_wav_refuses_many_channels(tmp_path: Path) -> None:
    path = tmp_path / "surround.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(6)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(bytes(12 * 10))
    with pytest.raises(AudioFileError, match="6 channels"):
        read_wav(path)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(-32768, 32767), max_size=400),
    st.sampled_from([8000, 11025, 16000, 44100, 48000]),
)
def test_resample_keeps_length_ratio_and_range(samples: list[int], rate: int) -> None:
    out = resample(array("h", samples), rate)
    if not samples:
        assert len(out) == 0
        return
    assert len(out) == max(1, len(samples) * 8000 // rate)
    assert min(samples) <= min(out) and max(out) <= max(samples)


def test_recorder_writes_what_it_heard(tmp_path: Path) -> None:
    path = tmp_path / "rec.wav"
    recorder = WavRecorder(path)
    recorder.write(ToneGenerator(600).frame(8000))
    assert recorder.samples == 8000
    recorder.close()
    assert dominant_frequency(path) == 600
    with wave.open(str(path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 8000)


def test_recorder_refuses_an_unwritable_path_at_once(tmp_path: Path) -> None:
    with pytest.raises(AudioFileError, match="cannot write"):
        WavRecorder(tmp_path / "no" / "such" / "dir.wav")


def test_sources_hand_out_20ms_frames(tmp_path: Path) -> None:
    assert SilenceSource().frame() == SILENCE_FRAME
    assert len(ToneSource(440).frame()) == 2 * FRAME_SAMPLES
    short = PcmSource(b"\x01\x00" * 200)
    first, second, third = short.frame(), short.frame(), short.frame()
    assert len(first) == len(second) == 2 * FRAME_SAMPLES
    assert second[80:] == bytes(len(second) - 80)  # the rest padded with silence
    assert third == SILENCE_FRAME
    looped = PcmSource(b"\x01\x00" * 160, loop=True)
    assert looped.frame() == looped.frame() == b"\x01\x00" * 160
    path = write_tone_wav(tmp_path / "p.wav", 900, seconds=0.1)
    assert len(open_source(play=path).frame()) == 2 * FRAME_SAMPLES
    assert isinstance(open_source(), SilenceSource)
    with pytest.raises(ValueError):
        open_source(play=path, tone=440)


def test_recorder_streams_to_disk_and_closes_once(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    recorder = WavRecorder(path)
    frame = ToneGenerator(500).frame()
    for _ in range(100):
        recorder.write(frame)
    # On disk already (but for the file's write buffer), not held in memory.
    assert path.stat().st_size >= 100 * len(frame) - io.DEFAULT_BUFFER_SIZE
    recorder.close()
    recorder.close()
    recorder.write(frame)  # after close: ignored
    with wave.open(str(path)) as wav:
        assert wav.getnframes() == 100 * 160
    assert dominant_frequency(path) == 500


@pytest.mark.parametrize("frequency", [440, 1000, 3999, 7])
def test_cached_cycle_equals_the_computed_wave(frequency: int) -> None:
    cached = ToneGenerator(frequency)
    assert cached._cycle is not None
    for start in (0, 160, 7919):
        cached._n = start % (len(cached._cycle) // 2)
        assert cached.frame(2000) == cached._compute(start, 2000)
    assert ToneGenerator(440.5)._cycle is None
