"""Length-prefixed JSON frames: how the pool, the zygote and its supervisors talk.

Why not pickle: frames cross a privilege boundary (a supervisor that sandboxed code could
tamper with must not be able to make the pool execute anything), and JSON parsing runs no code.
Stdlib-only, because the zygote imports it under the system interpreter.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

__all__ = ["MAX_FRAME", "FrameError", "decode", "encode", "read_frame", "write_frame"]

_HEADER = struct.Struct(">I")
#: Largest frame accepted (64 MiB): bigger means a corrupt or hostile peer, not a result.
MAX_FRAME = 64 << 20


class FrameError(Exception):
    """A peer sent something that is not a frame (or closed the pipe in the middle of one)."""


#: One encoder and one scanner for every frame: ``json.dumps`` with options builds a new
#: encoder per call, and ``json.loads`` sniffs the encoding of bytes and skips whitespace
#: with a regular expression, in Python, around the C scanner. (In the zygote and the program
#: process, each object a call touches or makes is a page that process copies.)
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_SCAN = json.JSONDecoder().scan_once


def encode(obj: Any) -> bytes:
    body = _ENCODER.encode(obj).encode()
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> Any:
    """A frame's JSON body: UTF-8, one value, no surrounding whitespace (as :func:`encode` and
    :func:`encode_json` write it)."""
    try:
        text = body.decode()
        obj, end = _SCAN(text, 0)
    except StopIteration as exc:  # the C scanner's "no value here"
        raise FrameError(f"frame is not JSON: no value at offset {exc.value}") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise FrameError(f"frame is not JSON: {exc}") from exc
    if end != len(text):
        raise FrameError(f"frame is not JSON: extra data at offset {end}")
    return obj


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks: list[bytes] = []
    got = 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            if got:
                raise FrameError(f"peer closed after {got} of {n} bytes")
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> Any | None:
    """The next frame from a blocking fd; ``None`` on a clean end of stream."""
    head = _read_exact(fd, _HEADER.size)
    if head is None:
        return None
    (size,) = _HEADER.unpack(head)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
    body = _read_exact(fd, size)
    if body is None:
        raise FrameError("peer closed between header and body")
    return decode(body)


def write_frame(fd: int, obj: Any) -> None:
    """Write one frame to a blocking fd."""
    view = memoryview(encode(obj))
    while view:
        n = os.write(fd, view)
        view = view[n:]


# --- typed frames between the pool and a zygote -----------------------------------------------
#
# Each frame is a kind byte, a 4-byte length, then the body. JSON frames carry control data that
# both ends parse. Every other kind carries bytes of an execution (its job, its output, its
# files), which the zygote moves with splice(2)/sendfile(2) and never reads into its own memory.

TYPED_HEADER = struct.Struct(">cI")
JSON = b"J"
PAYLOAD = b"P"  # pool -> zygote: a job, for the program process
STDOUT = b"1"
STDERR = b"2"
SIDE = b"3"  # the program's side channel (fd 3)
FILE = b"F"
STREAMS = {STDOUT: "stdout", STDERR: "stderr", SIDE: "side"}


def encode_typed(kind: bytes, body: bytes) -> bytes:
    return TYPED_HEADER.pack(kind, len(body)) + body


def encode_json(obj: Any) -> bytes:
    return encode_typed(JSON, _ENCODER.encode(obj).encode())


def read_typed_header(fd: int) -> tuple[bytes, int] | None:
    """The next frame's kind and length; ``None`` on a clean end of stream."""
    head = _read_exact(fd, TYPED_HEADER.size)
    if head is None:
        return None
    kind, size = TYPED_HEADER.unpack(head)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
    return kind, size


def read_json_body(fd: int, size: int) -> Any:
    body = _read_exact(fd, size) if size else b""
    if body is None:
        raise FrameError("peer closed between header and body")
    return decode(body)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
