"""Atomic writes and content fingerprints: no reader ever sees a half-written file."""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Write through `write(file)` (its return value unused) to a temporary file beside `path`, then
    rename it into place, with the permissions a plain open() would give (mkstemp's are owner-only)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """atomic_write() of `data`."""
    atomic_write(path, lambda f: f.write(data))


def file_digest(path: str, length: int = 10) -> str:
    """First `length` hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def text_digest(text: str, length: int = 10) -> str:
    """First `length` hex digits of the text's SHA-256."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]
