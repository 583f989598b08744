"""Atomic writes, strict JSON and content fingerprints: no reader ever sees a half-written file.

A write goes to a temporary file beside its target, named `.tmp-{host}-{pid}-{random}-{target}`, and is
renamed into place once complete. A write killed mid-way leaves its temporary file behind; the next
write of the same target removes it when it is stale: left by a process of this host that no longer
runs, or (another host's, or an older version's `.tmp-{random}{target}`) not modified for a day.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import numpy as np

Writer = Callable[[BinaryIO], object]  # writes a file's content (its return value unused)

TEMP_PREFIX = ".tmp-"
STALE_SECONDS = 24 * 3600  # a temporary file untouched this long belongs to no running write
_TEMP_NAME = re.compile(r"\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[a-z0-9_]{8}-(?P<target>.+)")
_OLD_TEMP_NAME = re.compile(r"\.tmp-[a-z0-9_]{8}(?P<target>.+)")  # before the host and pid were in the name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host_tag() -> str:
    return text_digest(socket.gethostname(), 8)


def _alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(name: str, target: str, age: float) -> bool:
    """Whether `name` is a temporary file of a write of `target` that nothing will finish."""
    new = _TEMP_NAME.fullmatch(name)
    if new is not None:
        if new["target"] != target:
            return False
        if new["host"] == _host_tag() and not _alive(int(new["pid"])):
            return True
    else:
        old = _OLD_TEMP_NAME.fullmatch(name)
        if old is None or old["target"] != target:
            return False
    return age > STALE_SECONDS


def stale_temporary_files(path: str) -> list[str]:
    """The temporary files that interrupted writes of `path` left beside it (see the module docstring)."""
    directory, target = os.path.split(path)
    now, stale = time.time(), []
    with contextlib.suppress(FileNotFoundError), os.scandir(directory or ".") as entries:
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    if _is_stale(entry.name, target, now - entry.stat(follow_symlinks=False).st_mtime):
                        stale.append(entry.path)
    return stale


def remove_stale_temporary_files(path: str) -> None:
    for stale in stale_temporary_files(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)


class _KeptWriteError:
    """A file that keeps the OSError its write() raised: a serialiser may report it as an error of its own
    (torch.save raises a RuntimeError that says nothing of a full disk)."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def _write_temporary(path: str, write: Writer) -> str:
    """`write` into a new temporary file beside `path`, with the permissions a plain open() would give
    (mkstemp's are owner-only): its name. On failure nothing is left behind, and a write that the file
    system refused raises its OSError."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporary_files(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-",
                               suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            kept = _KeptWriteError(f)
            try:
                write(kept)  # type: ignore[arg-type]
            except Exception as err:
                if kept.error is None or kept.error is err:
                    raise
                raise kept.error from err
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def atomic_write_files(writes: Sequence[tuple[str, Writer]]) -> None:
    """Write every (path, write) to a temporary file; only once all of them are complete, rename them into
    place in the given order. A failure while writing leaves every target as it was and no temporary file;
    a target that is a folder (which no rename could replace) is refused before anything is written. An
    OSError names the target being written, not the temporary file."""
    for path, _ in writes:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    temporary: list[str] = []
    path = ""
    try:
        for path, write in writes:
            temporary.append(_write_temporary(path, write))
        for tmp, (path, _) in zip(temporary, writes, strict=True):
            os.replace(tmp, path)
    except OSError as err:
        _remove(temporary)
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, path) from err  # write() and close() name no file
    except BaseException:
        _remove(temporary)
        raise


def _remove(paths: Sequence[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def atomic_write(path: str, write: Writer) -> None:
    """Write through `write(file)` to a temporary file beside `path`, then rename it into place."""
    atomic_write_files([(path, write)])


def bytes_writer(data: bytes) -> Writer:
    """A Writer of `data`, for atomic_write_files()."""
    return lambda f: f.write(data)


def atomic_write_folder(folder: str, files: dict[str, bytes]) -> list[str]:
    """Each named file's bytes written into `folder`, all or none (atomic_write_files()); their paths."""
    paths = [os.path.join(folder, name) for name in files]
    atomic_write_files([(path, bytes_writer(data)) for path, data in zip(paths, files.values(), strict=True)])
    return paths


def atomic_write_bytes(path: str, data: bytes) -> None:
    """atomic_write() of `data`."""
    atomic_write(path, bytes_writer(data))


def _plain(value: Any) -> Any:
    """`value` with NumPy scalars and arrays as Python numbers and lists, NaN and infinities as None."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(record: Any, indent: int | None = None) -> str:
    """JSON that every parser reads: NaN and infinities, which the standard lacks, are written as null."""
    return json.dumps(_plain(record), indent=indent, allow_nan=False)


def file_digest(path: str, length: int = 10) -> str:
    """First `length` hex digits of the file's SHA-256, computed once per version of the file (its path,
    inode, size and modification time) in a process: the demo's scripts read the same features many times."""
    status = os.stat(path)
    return _file_sha256(os.path.realpath(path), status.st_ino, status.st_size, status.st_mtime_ns)[:length]


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bytes_digest(data: bytes, length: int = 10) -> str:
    """First `length` hex digits of the SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()[:length]


def text_digest(text: str, length: int = 10) -> str:
    """First `length` hex digits of the text's SHA-256."""
    return bytes_digest(text.encode(), length)
