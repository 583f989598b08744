"""Results as JSON lines: one object per measured value, appended, so that runs can be tabulated later."""
from __future__ import annotations

import os
import time
from typing import Any

from lowbudget import distributed
from lowbudget.fileio import json_text


def append_result(path: str, **record: Any) -> None:
    """Append one result line (script, dataset, name, split, metric, value, seed, provenance, time) of strict
    JSON (a NaN is written as null); under torchrun rank 0 alone writes."""
    if not distributed.is_main():
        return
    record.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json_text(record) + "\n")
