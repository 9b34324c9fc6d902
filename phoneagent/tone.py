"""Tones: generating a sine for `--tone HZ` and finding which tone a recording holds.

This module owns a phase-continuous sine generator (20 ms frames of 16-bit PCM that join
without clicks) and a Goertzel detector in pure Python (no numpy): `detect_tone` tells which
of some candidate frequencies is strongest in a block of samples, `dominant_frequency` finds
the strongest frequency of a WAV file on a 10 Hz grid. Tests use it to check that the right
tone came through a call. It does not read or write sockets, and reads files only in
`dominant_frequency`.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Sequence
from pathlib import Path

SAMPLE_RATE = 8000
FRAME_SAMPLES = 160  # 20 ms at 8 kHz
_AMPLITUDE = 8000  # about -12 dBFS: loud enough to detect, far from clipping after G.711


class ToneGenerator:
    """A sine of `frequency` Hz, handed out frame by frame with a continuous phase.

    For a whole number of Hz the wave repeats exactly every sample_rate / gcd(frequency,
    sample_rate) samples (at most one second): that cycle is computed once and frames are
    slices of it, so a load test with a hundred tone-playing calls does not spend its CPU on
    `math.sin`. Other frequencies are computed sample by sample.
    """

    def __init__(
        self, frequency: float, *, sample_rate: int = SAMPLE_RATE, amplitude: int = _AMPLITUDE
    ) -> None:
        if not 0 < frequency < sample_rate / 2:
            raise ValueError(f"a tone must be between 0 and {sample_rate // 2} Hz")
        self.frequency = frequency
        self.sample_rate = sample_rate
        self.amplitude = amplitude
        self._n = 0
        self._cycle: bytes | None = None
        if float(frequency).is_integer():
            period = sample_rate // math.gcd(int(frequency), sample_rate)
            self._cycle = self._compute(0, period)

    def _compute(self, start: int, samples: int) -> bytes:
        step = 2 * math.pi * self.frequency / self.sample_rate
        out = array(
            "h", (round(self.amplitude * math.sin(step * (start + i))) for i in range(samples))
        )
        return pcm_bytes(out)

    def frame(self, samples: int = FRAME_SAMPLES) -> bytes:
        """The next `samples` samples as little-endian signed 16-bit PCM."""
        start = self._n
        cycle = self._cycle
        if cycle is None:
            # Keep the index small; exactness over hours does not matter for a test tone.
            self._n = (start + samples) % (self.sample_rate * 1000)
            return self._compute(start, samples)
        period = len(cycle) // 2
        self._n = (start + samples) % period
        offset = 2 * start
        wanted = 2 * samples
        chunks = [cycle[offset : offset + wanted]]
        have = len(chunks[0])
        while have < wanted:
            chunks.append(cycle[: wanted - have])
            have += len(chunks[-1])
        return b"".join(chunks)


def pcm_bytes(samples: array[int]) -> bytes:
    """Little-endian bytes of a signed 16-bit array, whatever the machine's byte order."""
    if samples.itemsize != 2:
        raise ValueError("16-bit samples expected")
    if sys.byteorder == "big":
        samples = array("h", samples)
        samples.byteswap()
    return samples.tobytes()


def pcm_samples(pcm: bytes) -> array[int]:
    """Signed 16-bit samples of little-endian PCM bytes (an odd last byte is dropped)."""
    samples = array("h")
    samples.frombytes(pcm[: len(pcm) - len(pcm) % 2])
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def goertzel_power(
    samples: Sequence[int], frequency: float, sample_rate: int = SAMPLE_RATE
) -> float:
    """The power of `frequency` in `samples` (Goertzel's algorithm: one DFT bin, O(n))."""
    n = len(samples)
    if n == 0:
        return 0.0
    coefficient = 2 * math.cos(2 * math.pi * frequency / sample_rate)
    s_prev = s_prev2 = 0.0
    for sample in samples:
        s = sample + coefficient * s_prev - s_prev2
        s_prev2, s_prev = s_prev, s
    return (s_prev2 * s_prev2 + s_prev * s_prev - coefficient * s_prev * s_prev2) / n


def detect_tone(
    samples: Sequence[int], candidates: Sequence[float], sample_rate: int = SAMPLE_RATE
) -> float | None:
    """Which of `candidates` is strongest in `samples`, or None for silence (no power at all)
    or no candidates."""
    best: float | None = None
    best_power = 0.0
    for frequency in candidates:
        power = goertzel_power(samples, frequency, sample_rate)
        if power > best_power:
            best, best_power = frequency, power
    return best


def _analysis_window(samples: Sequence[int], limit: int) -> Sequence[int]:
    """The loudest `limit`-sample stretch (by mean absolute value in blocks): silence at
    the start of a recording (before answer, jitter-buffer prefill) would dilute the tone."""
    if len(samples) <= limit:
        return samples
    block = FRAME_SAMPLES
    energies = [
        sum(abs(s) for s in samples[i : i + block]) for i in range(0, len(samples) - block, block)
    ]
    span = limit // block
    best_start, best = 0, -1
    running = sum(energies[:span])
    for start in range(len(energies) - span + 1):
        if start:
            running += energies[start + span - 1] - energies[start - 1]
        if running > best:
            best, best_start = running, start
    offset = best_start * block
    return samples[offset : offset + limit]


def dominant_frequency(
    wav_path: str | Path,
    *,
    low: float = 100.0,
    high: float = 3400.0,
    step: float = 10.0,
    max_samples: int = 8000,
) -> float | None:
    """The strongest frequency (on a `step` Hz grid between `low` and `high`) in a 16-bit mono
    WAV file, looking at its loudest `max_samples` samples; None for a silent file."""
    from phoneagent.audio import read_wav

    samples = pcm_samples(read_wav(wav_path))
    window = _analysis_window(samples, max_samples)
    if not any(window):
        return None
    count = int((high - low) / step) + 1
    return detect_tone(window, [low + i * step for i in range(count)])
