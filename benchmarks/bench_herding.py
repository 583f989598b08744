"""One UHerding round against its floor, one full pass of the kernel, on synthetic features.

Run from the repository root:

    .venv/bin/python benchmarks/bench_herding.py [--quick] [--rows N] [--dim D] [--large] [--old-picks P]

Features are bench_strategies.py's seeded Gaussian mixture of unit rows (60,000 x 1,280; 20,000 x 512
with --quick). Printed, each timed in this process:

1. the floor: HerdingKernel.rows over every row, block by block, each block discarded (a round must read
   every kernel row once for its first gains, so it cannot be faster);
2. one UHerding-like round: HerdingGreedy with seeded random weights in (0, 1] from a labelled pool of 10
   rows taking 30 picks, the kernel rows it read, and its ratio to the floor (target <= 2); with --large
   also 500 picks from a 500-row pool;
3. the implementation before the lazy greedy (lowbudget/herding.py at --old, read with git show), from the
   same pool: its first gains pass and its first --old-picks picks, extrapolated linearly to the round's
   picks (its later picks cost less: an estimate), and whether its picks equal the round's first picks.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from bench_strategies import synthetic_features  # this folder: the script's own

from lowbudget import herding

OLD = "763a9e8622012cf5b473bef560c1f0eb8b1cb7e3"  # the last lowbudget/herding.py that updated every gain


class CountingKernel(herding.HerdingKernel):
    """The herding kernel, counting the kernel rows it computes."""

    read = 0

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        CountingKernel.read += len(rows)
        return super().rows(rows)


def floor(kernel: herding.HerdingKernel) -> float:
    """Seconds for one full blocked pass of the kernel, every block discarded."""
    start = time.perf_counter()
    for block in kernel.blocks(torch.arange(kernel.num_rows)):
        kernel.rows(block)
    return time.perf_counter() - start


def round_picks(greedy_class: type, kernel: herding.HerdingKernel, labeled: np.ndarray, weights: np.ndarray,
                picks: int) -> tuple[np.ndarray, float, float]:
    """(picks, seconds of the first gains pass, seconds of the picks) of one round of `greedy_class`."""
    start = time.perf_counter()
    greedy = greedy_class(kernel, labeled, weights)
    middle = time.perf_counter()
    chosen = greedy.take(picks).indices
    return chosen, middle - start, time.perf_counter() - middle


def old_module(revision: str) -> types.ModuleType:
    """lowbudget/herding.py as it was at `revision`, as a module."""
    source = subprocess.run(["git", "show", f"{revision}:lowbudget/herding.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    module = sys.modules["old_herding"] = types.ModuleType("old_herding")
    exec(compile(source, "old_herding.py", "exec"), module.__dict__)
    return module


def bench_round(kernel: herding.HerdingKernel, pool: int, picks: int, floor_s: float, old: types.ModuleType | None,
                old_picks: int, seed: int) -> None:
    """Time one round of `picks` from a random `pool`, the old implementation's estimate, compare picks."""
    rng = np.random.default_rng(seed)
    labeled = rng.choice(kernel.num_rows, pool, replace=False)
    weights = 1 - rng.uniform(0, 1, kernel.num_rows)  # in (0, 1], as margin uncertainties are
    counting = CountingKernel(kernel.feats, kernel.sq_norms, kernel.bandwidth, kernel.block_elements)
    CountingKernel.read = 0
    chosen, first, rest = round_picks(herding.HerdingGreedy, counting, labeled, weights, picks)
    total = first + rest
    print(f"round, {picks} picks from {pool}: {total:.1f} s (first gains {first:.1f} s, picks {rest:.1f} s), "
          f"{CountingKernel.read / kernel.num_rows:.2f} kernel passes read, "
          f"{(CountingKernel.read - kernel.num_rows) / picks:.0f} rows a pick; "
          f"ratio to the floor {total / floor_s:.2f} (target <= 2)", flush=True)
    if old is None or old_picks == 0:
        return
    taken = min(old_picks, picks)
    old_chosen, old_first, old_rest = round_picks(old.HerdingGreedy, kernel, labeled, weights, taken)
    estimate = old_first + old_rest / taken * picks
    same = np.array_equal(old_chosen, chosen[:taken])
    print(f"  old: first gains {old_first:.1f} s, {taken} picks {old_rest:.1f} s; round "
          f"{'' if taken == picks else '~'}{estimate:.1f} s{'' if taken == picks else ' (extrapolated)'}: "
          f"{estimate / total:.1f}x the new round, {estimate / floor_s:.2f}x the floor; first {taken} picks "
          f"{'the same' if same else 'DIFFER: ' + str(old_chosen.tolist()) + ' vs ' + str(chosen[:taken].tolist())}",
          flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 x 512 (unless --rows/--dim say otherwise)")
    parser.add_argument("--rows", type=int, help="pool rows (default 60,000; 20,000 with --quick)")
    parser.add_argument("--dim", type=int, help="feature dimension (default 1,280; 512 with --quick)")
    parser.add_argument("--bandwidth", type=float, default=0.5, help="kernel bandwidth h (strategies' default)")
    parser.add_argument("--large", action="store_true", help="also 500 picks from a 500-row pool")
    parser.add_argument("--old", default=OLD, help="git revision of the implementation to compare with")
    parser.add_argument("--old-picks", type=int, help="picks the old implementation runs (default: all with "
                        "--quick, else 3; 0: skip it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the features, the pool and the weights")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rows = args.rows or (20_000 if args.quick else 60_000)
    dim = args.dim or (512 if args.quick else 1280)
    old_picks = args.old_picks if args.old_picks is not None else (30 if args.quick else 3)
    print(f"{rows:,} x {dim:,}, h {args.bandwidth}; torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}", flush=True)
    kernel = herding.herding_kernel(synthetic_features(rows, args.seed, dim), args.bandwidth)
    floor_s = floor(kernel)
    print(f"floor, one full kernel pass: {floor_s:.1f} s", flush=True)
    old = old_module(args.old) if old_picks else None
    bench_round(kernel, 10, 30, floor_s, old, old_picks, args.seed)
    if args.large:
        bench_round(kernel, 500, 500, floor_s, old, min(old_picks, 3), args.seed + 1)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
