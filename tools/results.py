"""Results as JSON lines: one object per measured value, appended, so that runs can be tabulated later."""
from __future__ import annotations

import json
import os
import time

from tools import distributed


def append_result(path: str, **record) -> None:
    """Append one result line (script, dataset, name, split, metric, value, seed, arch, backbone, time);
    under torchrun rank 0 alone writes."""
    if not distributed.is_main():
        return
    record.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")
