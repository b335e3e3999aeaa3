"""Checksums that tell a damaged checkpoint or export from a good one.

Checkpoints (torch's zip format): :class:`ChecksumWriter` passes the bytes ``torch.save`` writes on to the
file, hashing them as they go, and stores the SHA-256 of everything before it as the zip archive's comment
(``nnclr-sha256:`` and 64 hex digits, the last bytes of the file). The file stays a standard zip that torch
and any zip tool read. :func:`verify_zip` hashes the file once (memory-mapped, no copy) and compares. A file
without that comment (written by an nnclr before checksums, or by another program) has nothing to compare:
it is accepted as it is, and :func:`verify_zip` says so by returning ``None`` for the stored digest.

Exports (safetensors): :func:`safetensors_digest` is the SHA-256 of the tensor bytes and of the other
metadata; ``nnclr export`` stores it in the header's metadata under :data:`SAFETENSORS_KEY` and the
loaders compare it (:func:`check_safetensors`).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

TAG = b"nnclr-sha256:"
COMMENT_LENGTH = len(TAG) + 64
EOCD = b"PK\x05\x06"  # the end-of-central-directory record of a zip file: 22 bytes, then the comment
EOCD_SIZE = 22
SAFETENSORS_KEY = "nnclr_sha256"


class ChecksumWriter:
    """A binary file for ``torch.save``: writes through to ``file`` and ends the zip with its SHA-256 as comment.

    The last 22 bytes are held back until :meth:`finish`, which sets the comment length in the
    end-of-central-directory record and appends the comment. Only ``write`` and ``flush`` are used by
    ``torch.save`` on a file object (it never seeks).
    """

    def __init__(self, file: IO[bytes] | Any) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.tail = b""

    def _emit(self, data: bytes | memoryview) -> None:
        if len(data):
            self.digest.update(data)
            self.file.write(data)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        if size >= EOCD_SIZE:
            self._emit(self.tail)
            self._emit(view[: size - EOCD_SIZE])
            self.tail = bytes(view[size - EOCD_SIZE :])
        else:
            joined = self.tail + bytes(view)
            self._emit(joined[: max(0, len(joined) - EOCD_SIZE)])
            self.tail = joined[-EOCD_SIZE:]
        return size

    def flush(self) -> None:
        self.file.flush()

    def finish(self) -> str | None:
        """Write the held-back record and the comment; the hex digest stored, or None if the stream did not end
        in a bare end-of-central-directory record (then it is written unchanged, without a checksum)."""
        tail = self.tail
        if len(tail) != EOCD_SIZE or not tail.startswith(EOCD) or tail[20:22] != b"\0\0":
            self._emit(tail)
            return None
        self._emit(tail[:20] + struct.pack("<H", COMMENT_LENGTH))
        hexdigest = self.digest.hexdigest()
        self.file.write(TAG + hexdigest.encode("ascii"))
        return hexdigest


@dataclass(frozen=True)
class Verified:
    """What :func:`verify_zip` found: the digest stored in the file (None: there is none) and the file's own SHA-256."""

    stored: str | None
    computed: str | None  # SHA-256 of the bytes the stored digest covers; None without a stored digest
    file_sha256: str | None  # SHA-256 of the whole file; None when not asked for and there is no stored digest

    @property
    def damaged(self) -> bool:
        return self.stored is not None and self.stored != self.computed


def verify_zip(file: IO[bytes], whole: bool = False) -> Verified:
    """Hash an open file once (memory-mapped) and compare with the digest :class:`ChecksumWriter` stored in it.

    ``whole``: also the SHA-256 of the whole file when it has no stored digest (with one, it costs nothing more).
    """
    file.seek(0, 2)
    size = file.tell()
    file.seek(0)
    if size == 0:
        return Verified(None, None, hashlib.sha256(b"").hexdigest())
    with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
        stored = None
        covered = size - COMMENT_LENGTH
        if covered >= EOCD_SIZE:
            comment = bytes(view[covered:])
            record = bytes(view[covered - EOCD_SIZE : covered])
            hexdigest = comment[len(TAG):]
            if (comment.startswith(TAG) and record.startswith(EOCD)
                    and record[20:22] == struct.pack("<H", COMMENT_LENGTH)
                    and all(c in b"0123456789abcdef" for c in hexdigest)):
                stored = hexdigest.decode("ascii")
        if stored is None:
            return Verified(None, None, hashlib.sha256(view).hexdigest() if whole else None)
        digest = hashlib.sha256(view[:covered])
        computed = digest.hexdigest()
        digest.update(view[covered:])
        return Verified(stored, computed, digest.hexdigest())


def safetensors_digest(data: bytes | memoryview, metadata: dict[str, str]) -> str:
    """SHA-256 (hex) of a safetensors file's tensor bytes and of its metadata but :data:`SAFETENSORS_KEY`."""
    digest = hashlib.sha256(data)
    rest = {key: value for key, value in metadata.items() if key != SAFETENSORS_KEY}
    digest.update(json.dumps(rest, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def safetensors_parts(blob: bytes | memoryview) -> tuple[dict[str, Any], memoryview]:
    """A safetensors file's bytes -> (its header as parsed JSON, the tensor bytes after it).

    Raises:
        ValueError: The bytes are not a safetensors file.
    """
    view = memoryview(blob)
    if len(view) < 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", view[:8])
    if length > len(view) - 8:
        raise ValueError("its header length runs past the end of the file")
    header = json.loads(bytes(view[8 : 8 + length]))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header, view[8 + length :]


def check_safetensors(path: Path) -> str | None:
    """Compare the digest ``nnclr export`` stored in a safetensors file with its content.

    Returns None when it matches or the file has none (an export of an older nnclr, or another program's
    file), else what is wrong, for a one-line message.
    """
    with open(path, "rb") as file:
        file.seek(0, 2)
        if file.tell() == 0:
            return None
        file.seek(0)
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
            try:
                header, data = safetensors_parts(view)
            except (ValueError, UnicodeDecodeError):
                return None  # safetensors itself reports what is wrong with it
            try:
                metadata = header.get("__metadata__") or {}
                stored = metadata.get(SAFETENSORS_KEY) if isinstance(metadata, dict) else None
                if not isinstance(stored, str):
                    return None
                computed = safetensors_digest(data, metadata)
            finally:
                data.release()
    return None if computed == stored else "its SHA-256 does not match the one `nnclr export` stored in it"
