"""TensorBoard event files (scalars only), written without TensorFlow or the tensorboard package.

An event file is a TFRecord stream: each record is `uint64 length, uint32 masked-crc32c(length),
bytes, uint32 masked-crc32c(bytes)`, and each payload an `Event` protobuf (wall_time = 1, step = 2,
file_version = 3, summary = 5 -> Summary.value = 1 -> {tag = 1, simple_value = 2}). TensorBoard
reads files named `events.out.tfevents.*` in a log directory.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint((num << 3) | wire) + payload


def _len_field(num: int, data: bytes) -> bytes:
    return _field(num, 2, _varint(len(data)) + data)


def encode_event(wall_time: float, step: int | None = None, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    msg = _field(1, 1, struct.pack("<d", wall_time))
    if step is not None:
        msg += _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _len_field(3, file_version.encode())
    if scalars:
        summary = b"".join(_len_field(1, _len_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
                           for tag, v in scalars.items())
        msg += _len_field(5, summary)
    return msg


def record(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", _masked(crc32c(header))) + payload + struct.pack("<I", _masked(crc32c(payload)))


class EventWriter:
    """Append scalars to `<logdir>/events.out.tfevents.<time>.<host>`; flushed on every write."""

    def __init__(self, logdir: str | os.PathLike):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        self.path = Path(logdir) / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        with open(self.path, "ab") as f:
            f.write(record(encode_event(time.time(), file_version="brain.Event:2")))

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        values = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        with open(self.path, "ab") as f:
            f.write(record(encode_event(wall_time or time.time(), step, values)))


def read_scalars(path: str | os.PathLike) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an event file, checking every CRC (for tests and tools)."""
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        if struct.unpack_from("<I", data, pos + 8)[0] != _masked(crc32c(data[pos:pos + 8])):
            raise ValueError(f"bad length CRC at byte {pos}")
        payload = data[pos + 12:pos + 12 + n]
        if struct.unpack_from("<I", data, pos + 12 + n)[0] != _masked(crc32c(payload)):
            raise ValueError(f"bad data CRC at byte {pos}")
        pos += 16 + n
        fields = _parse(payload)
        step = fields.get(2, [0])[0]
        for summary in fields.get(5, []):
            for value in _parse(summary).get(1, []):
                v = _parse(value)
                out.append((step, v[1][0].decode(), struct.unpack("<f", v[2][0])[0]))
    return out


def _parse(buf: bytes) -> dict[int, list]:
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _read_varint(buf, pos)
        elif wire == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        fields.setdefault(num, []).append(val)
    return fields


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
