"""Results as JSON lines: one object per measured value, appended, so that runs can be tabulated later."""
from __future__ import annotations

import argparse
import os
import time
from typing import Any

import lowbudget
from lowbudget import distributed
from lowbudget.features import embedding_provenance
from lowbudget.fileio import json_text


def provenance(args: argparse.Namespace, *, embedded: bool = True) -> dict[str, Any]:
    """How a result was made, for results lines and index sidecars: arch and backbone (None when --feats
    gave the features ready-made; no backbone for a network trained from scratch), the backbone's weights
    (tag or file digest), input size and transform, the mode of the scripts that have --cached, and this
    suite's version. `embedded=False` (a strategy that ran no backbone) leaves the backbone unbuilt and its
    weights unread."""
    from_file = bool(getattr(args, "feats", None))
    record: dict[str, Any] = {"arch": None if from_file else args.arch,
                              "backbone": None if from_file else getattr(args, "backbone", None)}
    if embedded and record["backbone"] is not None:
        record.update(embedding_provenance(args))
    if hasattr(args, "cached"):
        record["mode"] = "cached" if args.cached else "images"
    return {**record, "version": lowbudget.__version__}


def append_result(path: str, **record: Any) -> None:
    """Append one result line (script, dataset, name, split, metric, value, seed, provenance, time) of strict
    JSON (a NaN is written as null); under torchrun rank 0 alone writes."""
    if not distributed.is_main():
        return
    record.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json_text(record) + "\n")
