"""Audio files and sources: what the phone agent plays and how it records what it hears.

This module owns reading a WAV file into 8 kHz mono 16-bit PCM (downmixing stereo, resampling
other rates linearly; refusing what is not 16-bit PCM with a clear `AudioFileError`), writing a
recording, and the sources a call plays from (a file, a tone, silence), each handing out 20 ms
frames. It does not packetize, encode G.711 or pace anything (see `media.py`).
"""

from __future__ import annotations

import wave
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from phoneagent.tone import FRAME_SAMPLES, SAMPLE_RATE, ToneGenerator, pcm_bytes, pcm_samples

SILENCE_FRAME = bytes(2 * FRAME_SAMPLES)


class AudioFileError(Exception):
    """A WAV file we cannot play or write; the message names the file and says why."""


def resample(samples: array[int], rate: int, target: int = SAMPLE_RATE) -> array[int]:
    """Linear-interpolation resampling of 16-bit samples from `rate` to `target` Hz.

    Good enough for test tones and speech prompts on a telephone channel; no anti-alias filter
    (a 16 kHz prompt loses nothing a 3.4 kHz channel would carry anyway).
    """
    if rate == target or not samples:
        return array("h", samples)
    count = max(1, len(samples) * target // rate)
    out = array("h", bytes(2 * count))
    last = len(samples) - 1
    ratio = rate / target
    for i in range(count):
        position = i * ratio
        index = int(position)
        if index >= last:
            out[i] = samples[last]
            continue
        fraction = position - index
        out[i] = round(samples[index] * (1 - fraction) + samples[index + 1] * fraction)
    return out


def read_wav(path: str | Path) -> bytes:
    """The file's audio as 8 kHz mono little-endian 16-bit PCM."""
    try:
        with open(path, "rb") as file, wave.open(file, "rb") as wav:
            channels = wav.getnchannels()
            width = wav.getsampwidth()
            rate = wav.getframerate()
            data = wav.readframes(wav.getnframes())
    except FileNotFoundError:
        raise AudioFileError(f"{path}: no such file") from None
    except (wave.Error, EOFError) as exc:
        raise AudioFileError(f"{path}: not a PCM WAV file ({exc})") from None
    except OSError as exc:
        raise AudioFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if width != 2:
        raise AudioFileError(
            f"{path}: {8 * width}-bit samples; only 16-bit PCM WAV files can be played"
        )
    if channels not in (1, 2):
        raise AudioFileError(f"{path}: {channels} channels; only mono or stereo can be played")
    samples = pcm_samples(data)
    if channels == 2:
        samples = array(
            "h", ((samples[i] + samples[i + 1]) // 2 for i in range(0, len(samples) - 1, 2))
        )
    if rate <= 0:
        raise AudioFileError(f"{path}: sample rate {rate}")
    return pcm_bytes(resample(samples, rate))


def write_wav(path: str | Path, pcm: bytes) -> None:
    """Write 8 kHz mono 16-bit PCM as a WAV file."""
    try:
        # Open the file ourselves: wave's own open leaves a half-made writer behind on error.
        with open(path, "wb") as file, wave.open(file, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(SAMPLE_RATE)
            wav.writeframes(pcm)
    except OSError as exc:
        raise AudioFileError(f"{path}: cannot write ({exc.strerror or exc})") from None


class WavRecorder:
    """Writes what a call hears to a WAV file as it comes (a long call is not kept in memory);
    the header gets its final length when closed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.samples = 0
        try:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise AudioFileError(f"{path}: cannot write ({exc.strerror or exc})") from None
        self._wav = wave.open(self._file, "wb")  # noqa: SIM115 - closed in close()
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)

    def write(self, pcm: bytes) -> None:
        if self._file.closed:
            return
        try:
            self._wav.writeframesraw(pcm)
        except OSError as exc:
            raise AudioFileError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        self.samples += len(pcm) // 2

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._wav.close()  # patches the header with the real length
        finally:
            self._file.close()


class AudioSource(Protocol):
    def frame(self) -> bytes:
        """The next 20 ms: 160 samples of 16-bit PCM."""
        ...


class SilenceSource:
    def frame(self) -> bytes:
        return SILENCE_FRAME


class ToneSource:
    def __init__(self, frequency: float) -> None:
        self._generator = ToneGenerator(frequency)

    def frame(self) -> bytes:
        return self._generator.frame()


class PcmSource:
    """Plays PCM once (or in a loop), then silence."""

    def __init__(self, pcm: bytes, *, loop: bool = False) -> None:
        self._pcm = pcm
        self._loop = loop
        self._frames = self._iterate()

    def _iterate(self) -> Iterator[bytes]:
        size = 2 * FRAME_SAMPLES
        while True:
            for offset in range(0, len(self._pcm), size):
                yield self._pcm[offset : offset + size].ljust(size, b"\x00")
            if not self._loop or not self._pcm:
                break
        while True:
            yield SILENCE_FRAME

    def frame(self) -> bytes:
        return next(self._frames)


def open_source(
    *, play: str | Path | None = None, tone: float | None = None, loop: bool = True
) -> AudioSource:
    """The source for `--play FILE` / `--tone HZ` (errors: AudioFileError, ValueError)."""
    if play is not None and tone is not None:
        raise ValueError("play a file or a tone, not both")
    if play is not None:
        return PcmSource(read_wav(play), loop=loop)
    if tone is not None:
        return ToneSource(tone)
    return SilenceSource()
