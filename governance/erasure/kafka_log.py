"""Read a Kafka broker's log segments (``<topic>-<partition>/<base offset>.log``) record by record.

The erasure scanner reads every file as raw bytes, but a broker compresses record batches
(gzip, snappy, lz4, zstd, set by the producer or the topic), so a person's email in a zstd
batch is not in the file's bytes. This module decodes the on-disk format (record batch v2,
the only one Kafka 3 and 4 write; see the protocol's "Record Batch" section) and yields each
record's key, value and header values, decompressed, so the scanner searches what a consumer
would read. Transaction markers (control batches) hold no data and are skipped.

Nothing here trusts the file: a truncated or corrupt batch ends the segment's reading and is
counted (``SegmentStats.undecoded``) so the scan report says what it could not read.
"""

from __future__ import annotations

import gzip
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SEGMENT = re.compile(r"^\d{20}\.log$")
_HEADER = struct.Struct(">qiibIhiqqqhii")  # base offset .. records count: 61 bytes
_XERIAL = b"\x82SNAPPY\x00"
CODECS = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


@dataclass(slots=True)
class SegmentStats:
    batches: int = 0
    records: int = 0
    undecoded: int = 0  # batches (or a truncated tail) that could not be read
    why: str = ""


def is_segment(path: Path) -> bool:
    """A Kafka log segment: ``<20 digits>.log`` in a ``<topic>-<partition>`` folder."""
    return bool(SEGMENT.match(path.name)) and bool(re.match(r"^.+-\d+$", path.parent.name))


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _bytes(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    n, pos = _varint(buf, pos)
    if n < 0:
        return None, pos
    if pos + n > len(buf):
        raise ValueError("field runs past its batch")
    return buf[pos:pos + n], pos + n


def _decompress(codec: int, data: bytes) -> bytes:
    if codec == 0:
        return data
    if codec == 1:
        return gzip.decompress(data)
    import cramjam

    if codec == 2:
        if data.startswith(_XERIAL):  # the Java client's framing: 16-byte header, then [len][raw block]...
            out, pos = bytearray(), 16
            while pos + 4 <= len(data):
                (n,) = struct.unpack_from(">i", data, pos)
                out += bytes(cramjam.snappy.decompress_raw(data[pos + 4:pos + 4 + n]))
                pos += 4 + n
            return bytes(out)
        return bytes(cramjam.snappy.decompress_raw(data))
    if codec == 3:
        return bytes(cramjam.lz4.decompress(data))
    if codec == 4:
        return bytes(cramjam.zstd.decompress(data))
    raise ValueError(f"unknown compression codec {codec}")


def records(path: Path, stats: SegmentStats | None = None) -> Iterator[tuple[int, list[bytes]]]:
    """``(offset, [key, value, header values...])`` for every data record of a segment."""
    stats = stats if stats is not None else SegmentStats()
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
        base, length = struct.unpack_from(">qi", data, pos)
        if length <= 0:  # preallocated, zero-filled tail of an active segment
            break
        end = pos + 12 + length
        if end > len(data) or length < _HEADER.size - 12:
            stats.undecoded += 1
            stats.why = stats.why or "a batch runs past the end of the file"
            break
        fields = _HEADER.unpack_from(data, pos)
        magic, attrs, count = fields[3], fields[5], fields[12]
        body = data[pos + _HEADER.size:end]
        pos = end
        if magic != 2:
            stats.undecoded += 1
            stats.why = stats.why or f"message format v{magic} (only v2 is decoded)"
            continue
        stats.batches += 1
        if attrs & 0x20:  # control batch: transaction markers
            continue
        try:
            buf = _decompress(attrs & 0x07, body)
            rp = 0
            for _ in range(count):
                n, rp = _varint(buf, rp)
                rec_end = rp + n
                rp += 1  # attributes
                _ts, rp = _varint(buf, rp)
                delta, rp = _varint(buf, rp)
                key, rp = _bytes(buf, rp)
                value, rp = _bytes(buf, rp)
                nh, rp = _varint(buf, rp)
                parts = [b for b in (key, value) if b is not None]
                for _h in range(max(nh, 0)):
                    hk, rp = _bytes(buf, rp)
                    hv, rp = _bytes(buf, rp)
                    parts += [b for b in (hk, hv) if b is not None]
                rp = rec_end
                stats.records += 1
                yield base + delta, parts
        except Exception as exc:  # noqa: BLE001 - a corrupt batch is counted, never trusted
            stats.undecoded += 1
            stats.why = stats.why or f"a {CODECS.get(attrs & 0x07, '?')} batch could not be decoded ({type(exc).__name__})"


__all__ = ["CODECS", "SegmentStats", "is_segment", "records"]
