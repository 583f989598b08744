"""The repository's runnable scripts as modules, so that the demo and the benchmarks call their `main`
in-process (one torch import, shared caches) instead of starting a Python per run."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPOSITORY = Path(__file__).resolve().parents[1]


def load_program(relative_path: str) -> ModuleType:
    """The script at `relative_path` under the repository root (e.g. 'sampler.py', 'tools/report.py'),
    imported once (kept in sys.modules under a private name)."""
    name = f"_program_{Path(relative_path).with_suffix('').as_posix().replace('/', '_')}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPOSITORY / relative_path)
        if spec is None or spec.loader is None:
            raise ImportError(f"no script at {REPOSITORY / relative_path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
