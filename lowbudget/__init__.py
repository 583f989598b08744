"""What the scripts share: options, datasets, feature cache, index files, faiss, results; and `select`, the
selection of sampler.py as one Python call (lowbudget.api)."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`lowbudget.select` without importing torch and faiss for `import lowbudget` alone."""
    if name == "select":
        from lowbudget.api import select
        return select
    raise AttributeError(f"module 'lowbudget' has no attribute {name!r}")
