"""Markdown tables and PNG plots of results files: class coverage, linear top-1 and k-NN top-1 per budget.

Usage, from the repository root:

    python tools/report.py RESULTS.jsonl [RESULTS2.jsonl ...] [--out DIR] [--paper]

The results files are the JSON lines that sampler.py, active_sampler.py, eval_knn.py and eval_lincls.py
append (tools/results.py). Each table has one row per method (`name`) and one column per budget
(`split`); a cell is the mean ± sample std over seeds, the best mean of each column in bold. Tables are
made per dataset (and per arch/backbone when a dataset has several), linear top-1 per mode and epochs,
k-NN top-1 per k. A record written again for the same key (a re-run, or the coverage every script
writes for the same pool) counts once: the last one wins. Writes {out}/report.md, which it also prints,
and one PNG per table (metric against budget on a log axis, mean ± std shaded); out defaults to the
folder of the first results file. Rows carry the paper's names in the paper's order (Uniform, Random,
Max-Entropy, Core-set, VAAL, Multi k-means, K-means), then the newer methods; a last row gives, per
budget, K-means − Random. --paper puts the paper's own ImageNet table of the same metric under each
table (CompRess ResNet-18 features, as in the original README), so the two patterns read side by side.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, NullLocator

from lowbudget import cli
from lowbudget.cli import UsageError
from lowbudget.fileio import atomic_write_folder
from lowbudget.strategy_table import STRATEGIES

# Tabulated metric -> the record fields that split it into separate tables.
TABLE_METRICS = {"coverage": (), "lincls_top1": ("mode", "epochs"), "knn_top1": ("k",)}
FIELD_DEFAULTS = {"k": 1}  # eval_knn.py's default: in file names only when another value (others when they vary)
FIELD_SUFFIX = {"mode": "{}", "epochs": "{}ep", "k": "k{}"}
REQUIRED_FIELDS = {"dataset": str, "name": str, "metric": str, "split": int, "seed": int}
OPTIONAL_FIELDS = {"arch": str, "backbone": str, "mode": str, "epochs": int, "k": int}  # each may be null

Group = tuple[str, str | None, str | None]       # dataset, arch, backbone
TableKey = tuple[str, tuple]                     # metric, ((field, value), ...) of its variant
Values = dict[str, dict[int, list[float]]]       # name -> split -> one value per seed

# The rows of the paper's tables, in its order; the other strategies follow in the strategy table's order.
PAPER_ROWS = ("uniform", "random", "entropy", "coreset", "vaal", "accu_kmeans", "kmeans")
# The paper's ImageNet results (its README; CompRess ResNet-18 features): metric -> (columns, {name: row}).
IMAGENET_BUDGETS = ("0.08% (1K)", "0.2% (3K)", "0.5% (7K)", "1% (13K)", "2% (26K)", "5% (64K)", "10% (128K)",
                    "15% (192K)")
PAPER_IMAGENET: dict[str, tuple[tuple[str, ...], dict[str, tuple[float, ...]]]] = {
    "coverage": (("0.08%", "0.2%", "0.5%", "≥ 1%"), {
        "uniform": (100, 100, 100, 100), "random": (62.9, 94.6, 100, 100), "entropy": (62.9, 84.3, 94.8, 100),
        "coreset": (62.9, 87.9, 97.0, 100), "vaal": (62.9, 94.6, 98.1, 100), "accu_kmeans": (72.2, 97.0, 99.8, 100),
        "kmeans": (72.2, 97.8, 99.9, 100)}),
    "lincls_top1": (IMAGENET_BUDGETS, {
        "uniform": (19.2, 31.9, 41.0, 46.0, 49.9, 54.2, 56.7, 57.9),
        "random": (15.8, 28.0, 39.2, 45.1, 49.7, 54.0, 56.6, 57.9),
        "entropy": (15.8, 19.4, 25.6, 33.7, 41.3, 48.9, 51.9, 54.3),
        "coreset": (15.8, 25.6, 33.3, 39.6, 45.7, 51.3, 54.9, 56.6),
        "vaal": (15.8, 27.7, 34.9, 42.8, 49.2, 53.6, 56.0, 57.4),
        "accu_kmeans": (24.6, 34.1, 41.1, 45.3, 49.5, 53.9, 56.3, 57.5),
        "kmeans": (24.6, 35.7, 42.6, 46.9, 50.7, 54.0, 56.6, 58.0)}),
    "knn_top1": (IMAGENET_BUDGETS, {
        "uniform": (29.5, 35.7, 38.9, 41.1, 43.2, 45.6, 47.6, 48.6),
        "random": (22.8, 33.2, 38.4, 40.8, 42.2, 45.4, 47.3, 48.3),
        "entropy": (22.8, 24.5, 27.2, 30.3, 33.3, 36.2, 37.6, 38.6),
        "coreset": (22.8, 30.7, 34.8, 37.5, 39.7, 42.0, 43.7, 44.6),
        "vaal": (22.8, 32.8, 36.2, 39.7, 42.6, 45.3, 46.7, 47.9),
        "accu_kmeans": (31.6, 38.2, 41.4, 43.3, 45.2, 47.2, 48.6, 49.4),
        "kmeans": (31.6, 39.9, 42.7, 44.0, 45.5, 46.8, 48.1, 48.8)}),
}


def build_parser() -> cli.Parser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", metavar="RESULTS.jsonl", help="results files, read in order")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for report.md and the plots (default: the first results file's folder)")
    parser.add_argument("--paper", action="store_true",
                        help="under each table, the paper's ImageNet table of the same metric (linear top-1, "
                             "1-NN, class coverage; CompRess ResNet-18 features)")
    parser.add_argument("--note", default="", help="a paragraph under the report's title (e.g. how the pools "
                        "were chosen)")
    return parser


def record_problem(record: object) -> str | None:
    """Why a parsed line cannot be tabulated, or None when it can (records of other metrics are fine)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if not isinstance(record.get("metric"), str):
        return f"'metric' must be a string, got {record.get('metric')!r}"
    if record["metric"] not in TABLE_METRICS:
        return None
    for field, kind in REQUIRED_FIELDS.items():
        if type(record.get(field)) is not kind:
            return f"{field!r} must be {kind_name(kind)}, got {record.get(field)!r}"
    value = record.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"'value' must be a finite number, got {value!r}"
    for field in ("arch", "backbone", *TABLE_METRICS[record["metric"]]):
        kind = OPTIONAL_FIELDS[field]
        if record.get(field) is not None and type(record[field]) is not kind:
            return f"{field!r} must be {kind_name(kind)} or null, got {record[field]!r}"
    return None


def kind_name(kind: type) -> str:
    return "an integer" if kind is int else "a string"


def parse_line(line: str, where: str) -> Any:
    """One line's JSON value; a UsageError naming `where` (file:line) for anything Python's parser refuses:
    bad syntax, nesting deeper than the interpreter's stack, an integer longer than int() converts."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise UsageError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as err:  # "Exceeds the limit (4300 digits) for integer string conversion: ..."
        raise UsageError(f"{where}: not valid JSON ({str(err).split(':')[0]})") from None


def read_records(path: str) -> list[dict]:
    """The tabulated records of one results file, in file order; a UsageError naming file:line otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read results file ({getattr(err, 'strerror', None) or err})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = parse_line(line, f"{path}:{number}")
        problem = record_problem(record)
        if problem:
            raise UsageError(f"{path}:{number}: {problem}")
        if record["metric"] in TABLE_METRICS:
            records.append(record)
    if not records:
        raise UsageError(f"{path}: no coverage, lincls_top1 or knn_top1 records to tabulate")
    return records


def load_records(paths: Sequence[str]) -> list[dict]:
    """The tabulated records of all files, in the order given (later files win over earlier ones)."""
    return [record for path in paths for record in read_records(path)]


def table_key(record: dict) -> TableKey:
    """The table a record belongs to: its metric and the values of the fields that split that metric."""
    fields = TABLE_METRICS[record["metric"]]
    return record["metric"], tuple((field, record.get(field, FIELD_DEFAULTS.get(field))) for field in fields)


def aggregate(records: Sequence[dict]) -> dict[Group, dict[TableKey, Values]]:
    """{(dataset, arch, backbone): {table: {name: {split: [value per seed]}}}}, one value per seed, last wins."""
    latest: dict[tuple, float] = {}
    for r in records:
        group = r["dataset"], r.get("arch"), r.get("backbone")
        latest[group, table_key(r), r["name"], r["split"], r["seed"]] = float(r["value"])
    groups: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for (group, key, name, split, _seed), value in sorted(latest.items(), key=lambda item: item[0][4]):
        groups[group][key][name][split].append(value)
    return groups


def sort_key(value: object) -> tuple:
    """Orders None last and numbers numerically, without comparing unlike types."""
    return value is None, isinstance(value, str), value


def method_order(names: Sequence[str]) -> list[str]:
    """The paper's rows in its order, the other strategies in the strategy table's order, then any others
    alphabetically."""
    known = [name for name in dict.fromkeys((*PAPER_ROWS, *STRATEGIES)) if name in names]
    return known + sorted(set(names) - set(known))


def row_name(name: str) -> str:
    """A method as the tables name it: the paper's names (Max-Entropy, Multi k-means, …), else the strategy's."""
    row = STRATEGIES.get(name)
    return row.title if row is not None else name


def difference_row(means: dict[str, dict[int, float]], columns: Sequence) -> list[str]:
    """'| *K-means − Random* | +8.80 | … |' from per-method column means, or nothing without both rows."""
    kmeans, random = means.get("kmeans", {}), means.get("random", {})
    if not kmeans or not random:
        return []
    cells = [f"{kmeans[c] - random[c]:+.2f}" if c in kmeans and c in random else "–" for c in columns]
    return [f"| *{row_name('kmeans')} − {row_name('random')}* | " + " | ".join(cells) + " |"]


def seed_stats(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1) over seeds; std is None for a single seed."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None


def format_cell(values: Sequence[float], bold: bool = False, show_n: bool = False) -> str:
    """'52.50 ± 3.54' (bold: '**52.50 ± 3.54**'), '52.50' for one seed, ' (n=2)' appended when asked."""
    mean, std = seed_stats(values)
    text = f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"
    return (f"**{text}**" if bold else text) + (f" (n={len(values)})" if show_n else "")


def table_title(key: TableKey) -> str:
    """'Class coverage (%)', 'Linear top-1 (%), cached features, 40 epochs', '1-NN top-1 (%)'."""
    metric, variant = key
    fields = dict(variant)
    if metric == "coverage":
        return "Class coverage (%)"
    if metric == "knn_top1":
        return f"{fields['k']}-NN top-1 (%)"
    details = {"cached": "cached features", "images": "images"}.get(fields["mode"], fields["mode"])
    epochs = None if fields["epochs"] is None else f"{fields['epochs']} epochs"
    return ", ".join(["Linear top-1 (%)"] + [part for part in (details, epochs) if part])


def seeds_caption(counts: Counter) -> tuple[str, int]:
    """The line under a table about seeds, and the usual number of seeds (cells with another get '(n=…)')."""
    usual = max(counts, key=lambda n: (counts[n], n))
    if len(counts) > 1:
        return f"Mean ± std over seeds: {usual} per cell, except where (n=…) says otherwise.", usual
    return ("One seed." if usual == 1 else f"Mean ± std over {usual} seeds."), usual


def markdown_table(values: Values) -> list[str]:
    """Rows = methods, columns = budgets ascending, best mean per column in bold, '–' where missing."""
    names, splits = method_order(list(values)), sorted({split for per in values.values() for split in per})
    shown = {(name, split): round(seed_stats(seeds)[0], 2) for name in names for split, seeds in values[name].items()}
    best = {split: max(mean for (_, s), mean in shown.items() if s == split) for split in splits}
    caption, usual = seeds_caption(Counter(len(seeds) for per in values.values() for seeds in per.values()))
    lines = ["| Method | " + " | ".join(str(split) for split in splits) + " |",
             "|---|" + "---:|" * len(splits)]
    for name in names:
        cells = [format_cell(values[name][split], shown[name, split] == best[split], len(values[name][split]) != usual)
                 if split in values[name] else "–" for split in splits]
        lines.append(f"| {row_name(name)} | " + " | ".join(cells) + " |")
    means = {name: {split: seed_stats(seeds)[0] for split, seeds in per.items()} for name, per in values.items()}
    return lines + difference_row(means, splits) + ["", caption]


def paper_table(metric: str) -> list[str]:
    """The paper's ImageNet table of `metric` in the same layout: best of each column in bold, K-means − Random."""
    columns, rows = PAPER_IMAGENET[metric]
    best = [max(row[i] for row in rows.values()) for i in range(len(columns))]
    lines = ["| Method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in method_order(list(rows)):
        cells = [f"**{value:g}**" if value == best[i] else f"{value:g}" for i, value in enumerate(rows[name])]
        lines.append(f"| {row_name(name)} | " + " | ".join(cells) + " |")
    means = {name: dict(enumerate(row)) for name, row in rows.items()}
    return lines + difference_row(means, range(len(columns)))


def budget_label(budget: int) -> str:
    """Tick label of a budget: 100, 1k, 2.5k, 192k."""
    return f"{budget / 1000:g}k" if budget >= 1000 else str(budget)


def plot_png(title: str, ylabel: str, values: Values) -> bytes:
    """PNG of the metric against the budget (log axis), one line per method, mean ± std shaded and as bars."""
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name in method_order(list(values)):
        splits = sorted(values[name])
        stats = np.array([seed_stats(values[name][split]) for split in splits], dtype=np.float64)
        means, stds = stats[:, 0], np.nan_to_num(stats[:, 1])
        bars = axes.errorbar(splits, means, yerr=stds, marker="o", markersize=4, capsize=3, label=row_name(name))
        axes.fill_between(splits, means - stds, means + stds, color=bars.lines[0].get_color(), alpha=0.2, linewidth=0)
    budgets = sorted({split for per in values.values() for split in per})
    axes.set_xscale("log")
    axes.xaxis.set_minor_locator(NullLocator())
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xticks(budgets, [budget_label(b) for b in budgets], fontsize="small")
    axes.set_title(title, fontsize="medium")
    axes.set(xlabel="budget (labelled images)", ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncol=2 if len(values) > 6 else 1)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def file_part(value: object) -> str:
    """A value as a safe piece of a file name."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(value)).strip("-") or "none"


def group_prefix(group: Group, several: bool) -> str:
    """'cifar10', or 'cifar10_resnet18_compress' when the dataset has several arch/backbone groups."""
    dataset, arch, backbone = group
    origin = [part for part in (arch, backbone) if part] or ["feats"]
    return "_".join(file_part(part) for part in [dataset] + (origin if several else []))


def table_slug(key: TableKey, siblings: Sequence[TableKey]) -> str:
    """'lincls_top1', plus what tells it from its siblings or differs from a default: '_cached', '_k20'."""
    metric, variant = key
    others = [other for other_metric, other in siblings if other_metric == metric]
    parts = [FIELD_SUFFIX[field].format(file_part(value)) for i, (field, value) in enumerate(variant)
             if (value != FIELD_DEFAULTS[field] if field in FIELD_DEFAULTS
                 else len({other[i][1] for other in others}) > 1)]
    return "_".join([metric] + parts)


def group_label(group: Group, several: bool) -> str:
    """'cifar10', or 'cifar10 — resnet18, compress' when the dataset has several arch/backbone groups."""
    dataset, arch, backbone = group
    origin = ", ".join(str(part) for part in (arch, backbone) if part) or "--feats features"
    return f"{dataset} — {origin}" if several else dataset


def build_report(groups: dict[Group, dict[TableKey, Values]], sources: Sequence[str], paper: bool = False,
                 note: str = "") -> tuple[str, dict[str, bytes]]:
    """The Markdown report and its plots ({file name: PNG bytes}), plot links relative to the report; with
    `paper`, the paper's ImageNet table of each metric under the run's (1-NN under the k = 1 table)."""
    lines, plots = ["# Results", "", "From " + ", ".join(f"`{source}`" for source in sources) + "."], {}
    if note:
        lines += ["", note]
    per_dataset = Counter(group[0] for group in groups)
    for group in sorted(groups, key=lambda g: tuple(sort_key(part) for part in g)):
        several = per_dataset[group[0]] > 1
        tables = groups[group]
        keys = sorted(tables, key=lambda k: (list(TABLE_METRICS).index(k[0]), [sort_key(v) for _, v in k[1]]))
        label = group_label(group, several)
        lines += ["", f"## {label}"]
        for key in keys:
            title = table_title(key)
            file_name = f"{group_prefix(group, several)}_{table_slug(key, keys)}.png"
            plots[file_name] = plot_png(f"{label}\n{title}", title.split(",")[0], tables[key])
            lines += ["", f"### {title}", "", *markdown_table(tables[key]), "", f"![{title}]({file_name})"]
            if paper and dict(key[1]).get("k", 1) == 1:
                lines += ["", f"The paper on ImageNet ({title.split(' (')[0]}, CompRess ResNet-18 features):", "",
                          *paper_table(key[0])]
    return "\n".join(lines) + "\n", plots


def write_outputs(out: str, markdown: str, plots: dict[str, bytes]) -> None:
    """The plots and report.md, written into `out` all or none."""
    try:
        atomic_write_folder(out, {**plots, "report.md": markdown.encode("utf-8")})
    except IsADirectoryError as err:
        raise UsageError(f"--out: cannot write {err.filename!r}: it is a folder") from None
    except OSError as err:
        raise UsageError(f"--out: cannot write in {out!r} ({err.strerror or err})") from None


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = args.out if args.out is not None else (os.path.dirname(args.results[0]) or ".")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out: {out!r} is not a directory")
    markdown, plots = build_report(aggregate(load_records(args.results)), args.results, args.paper, args.note)
    write_outputs(out, markdown, plots)
    print(markdown, end="")


if __name__ == "__main__":
    cli.run_main(main)
