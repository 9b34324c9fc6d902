"""G.711 μ-law (PCMU) and A-law (PCMA) companding of 16-bit linear PCM (ITU-T G.711).

This module owns the sample conversion only: little-endian signed 16-bit PCM bytes in, one
companded byte per sample out, and back. It does not packetize, resample or mix. It replaces the
stdlib ``audioop`` (deprecated, removed in Python 3.13) with tables built once at import: a
65,536-entry encode table indexed by the unsigned 16-bit sample and a 256-entry decode table, so
a 20 ms frame is one C-level ``map`` over a table.

G.711 works on 14-bit (μ-law) and 13-bit (A-law) magnitudes; 16-bit samples are scaled by
dropping the low 2 (μ-law) or 3 (A-law) bits, as the reference encoders in ITU-T G.191 do.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable

__all__ = [
    "alaw_decode",
    "alaw_encode",
    "alaw_from_linear",
    "alaw_to_linear",
    "ulaw_decode",
    "ulaw_encode",
    "ulaw_from_linear",
    "ulaw_to_linear",
]

# G.711 Table 2a: μ-law segment end points for the biased 14-bit magnitude.
_ULAW_SEGMENT_ENDS = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)
_ULAW_BIAS = 0x21  # 33 in 14-bit units (0x84 in 16-bit units)
# G.711 Table 1a: A-law segment end points for the 13-bit magnitude.
_ALAW_SEGMENT_ENDS = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def _segment(magnitude: int, ends: tuple[int, ...]) -> int:
    for segment, end in enumerate(ends):
        if magnitude <= end:
            return segment
    return len(ends)


def ulaw_from_linear(sample: int) -> int:
    """Compand one signed 16-bit sample to a μ-law code (computed, not looked up)."""
    if sample < 0:
        # G.191 ulaw_compress: one's complement keeps the two polarities symmetric.
        value = (~sample) >> 2
        mask = 0x7F  # negative codes have the sign bit clear after inversion
    else:
        value = sample >> 2
        mask = 0xFF
    value = min(value + _ULAW_BIAS, 0x1FFF)
    segment = _segment(value, _ULAW_SEGMENT_ENDS)
    # G.711 §3: the code is sign, 3-bit segment, 4-bit step, all bits inverted.
    code = (segment << 4) | ((value >> (segment + 1)) & 0x0F)
    return code ^ mask


def ulaw_to_linear(code: int) -> int:
    """The 16-bit linear value of a μ-law code (G.711 Table 2b decoder output times 4)."""
    code = ~code & 0xFF
    segment = (code >> 4) & 0x07
    value = (((code & 0x0F) << 3) + 0x84) << segment
    return 0x84 - value if code & 0x80 else value - 0x84


def alaw_from_linear(sample: int) -> int:
    """Compand one signed 16-bit sample to an A-law code (computed, not looked up)."""
    value = sample >> 3
    if value >= 0:
        mask = 0xD5  # sign bit set, even bits inverted (G.711 §2)
    else:
        mask = 0x55
        value = -value - 1
    segment = _segment(value, _ALAW_SEGMENT_ENDS)
    if segment >= 8:
        return 0x7F ^ mask
    step = (value >> 1) if segment < 2 else (value >> segment)
    return ((segment << 4) | (step & 0x0F)) ^ mask


def alaw_to_linear(code: int) -> int:
    """The 16-bit linear value of an A-law code (G.711 Table 1b decoder output times 8)."""
    code ^= 0x55
    segment = (code >> 4) & 0x07
    value = (code & 0x0F) << 4
    if segment == 0:
        value += 8
    else:
        value = (value + 0x108) << (segment - 1)
    return value if code & 0x80 else -value


def _encode_table(compand: Callable[[int], int], shift: int) -> bytes:
    """The 65,536-entry table indexed by the sample as an unsigned 16-bit number.

    Only the top ``16 - shift`` bits matter, so each computed code fills ``1 << shift`` slots.
    """
    step = 1 << shift
    codes = bytes(
        compand(index - 0x10000 if index & 0x8000 else index) for index in range(0, 65536, step)
    )
    table = bytearray(65536)
    for low in range(step):
        table[low::step] = codes
    return bytes(table)


_ULAW_ENCODE = _encode_table(ulaw_from_linear, 2)
_ALAW_ENCODE = _encode_table(alaw_from_linear, 3)
_BIG_ENDIAN = sys.byteorder == "big"


def _decode_tables(expand: Callable[[int], int]) -> tuple[bytes, bytes]:
    """Two ``bytes.translate`` tables: code -> low byte and code -> high byte of the sample."""
    values = [expand(code) & 0xFFFF for code in range(256)]
    return bytes(v & 0xFF for v in values), bytes(v >> 8 for v in values)


_ULAW_DECODE = _decode_tables(ulaw_to_linear)
_ALAW_DECODE = _decode_tables(alaw_to_linear)


def _samples(pcm: bytes) -> array[int]:
    if len(pcm) % 2:
        raise ValueError("16-bit PCM must have an even number of bytes")
    samples = array("H")
    samples.frombytes(pcm)
    if _BIG_ENDIAN:
        samples.byteswap()
    return samples


def _expand(codes: bytes, tables: tuple[bytes, bytes]) -> bytes:
    # Two C-level translations and two strided copies: no per-sample Python code.
    pcm = bytearray(2 * len(codes))
    pcm[0::2] = codes.translate(tables[0])
    pcm[1::2] = codes.translate(tables[1])
    return bytes(pcm)


def ulaw_encode(pcm: bytes) -> bytes:
    """Little-endian signed 16-bit PCM to μ-law, one byte per sample."""
    return bytes(map(_ULAW_ENCODE.__getitem__, _samples(pcm)))


def alaw_encode(pcm: bytes) -> bytes:
    """Little-endian signed 16-bit PCM to A-law, one byte per sample."""
    return bytes(map(_ALAW_ENCODE.__getitem__, _samples(pcm)))


def ulaw_decode(codes: bytes) -> bytes:
    """μ-law to little-endian signed 16-bit PCM."""
    return _expand(codes, _ULAW_DECODE)


def alaw_decode(codes: bytes) -> bytes:
    """A-law to little-endian signed 16-bit PCM."""
    return _expand(codes, _ALAW_DECODE)
