"""Results as JSON lines: one object per measured value, appended, so that runs can be tabulated later.

A line is appended whole or not at all: a write that fails part-way (a full disk, the file size limit)
is cut off again, so that no half line is left for a reader to stumble on.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from lowbudget import distributed
from lowbudget.fileio import json_text


def append_result(path: str, **record: Any) -> None:
    """Append one result line (script, dataset, name, split, metric, value, seed, provenance, time) of strict
    JSON (a NaN is written as null); under torchrun rank 0 alone writes."""
    if distributed.is_main():
        _append_line(path, _line(record))


@contextlib.contextmanager
def result_kept_with(path: str, record: dict[str, Any]) -> Iterator[None]:
    """Append the result line `record` (as append_result), then run the block that writes what the line
    reports on; when the block fails, the line is taken back: the two are written together or not at all."""
    if not distributed.is_main():
        yield
        return
    line = _line(record)
    start = _append_line(path, line)
    try:
        yield
    except BaseException:
        _take_back(path, start, len(line))
        raise


def _line(record: dict[str, Any]) -> bytes:
    stamped = {**record}
    stamped.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return (json_text(stamped) + "\n").encode()


def _append_line(path: str, line: bytes) -> int:
    """Append `line` to `path` whole or not at all: the offset it starts at. An OSError names `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        except OSError as err:
            _cut(fd, start, os.fstat(fd).st_size - start)
            raise OSError(err.errno, err.strerror, path) from err
    finally:
        os.close(fd)
    return start


def _take_back(path: str, start: int, length: int) -> None:
    """Remove the line of `length` bytes appended at `start`."""
    fd = os.open(path, os.O_WRONLY)
    try:
        _cut(fd, start, length)
    finally:
        os.close(fd)


def _cut(fd: int, start: int, length: int) -> None:
    """Truncate the file back to `start` when it ends with our `length` bytes there (no other process has
    appended since); a file that cannot be truncated (a device) is left as it is."""
    if length > 0 and os.fstat(fd).st_size == start + length:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
