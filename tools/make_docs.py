"""Write the tables of docs/ that copy the code: every program's flags (docs/flags.md, from its parser) and
the strategy table (docs/strategies.md, from lowbudget/strategy_table.py).

    python tools/make_docs.py           # rewrite the generated blocks in place
    python tools/make_docs.py --check   # exit 1 and name the stale files when a block differs (the tests run this)

A generated block sits between `<!-- generated: KEY -->` and `<!-- end generated -->`; the prose around it is
written by hand and left as it is.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import active_sampler
import eval_knn
import eval_lincls
import finetune
import sampler
import trainer_DP
from lowbudget.strategy_table import STRATEGIES, Strategy
from tools import convert_weights, demo, export, report

DOCS = Path(__file__).resolve().parents[1] / "docs"
PROGRAMS = {"sampler.py": sampler, "active_sampler.py": active_sampler, "eval_knn.py": eval_knn,
            "eval_lincls.py": eval_lincls, "finetune.py": finetune, "trainer_DP.py": trainer_DP,
            "tools/demo.py": demo, "tools/export.py": export, "tools/report.py": report,
            "tools/convert_weights.py": convert_weights}
BLOCK = re.compile(r"(<!-- generated: (?P<key>[^>]+?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def default_text(action: argparse.Action) -> str:
    """How a flag's default reads in the table."""
    if action.required or action.default in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
        return "–"
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    return f"`{action.default!r}`" if isinstance(action.default, str) else f"`{action.default}`"


def flag_names(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.dest}` (positional)"
    metavar = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
    return ", ".join(f"`{name}`" for name in action.option_strings[:-1]) + \
        (", " if len(action.option_strings) > 1 else "") + f"`{action.option_strings[-1]}{metavar}`"


def meaning(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The flag's help as --help prints it (%-placeholders expanded), with its choices."""
    text = parser._get_formatter()._expand_help(action) if action.help else ""
    if action.choices is not None and not isinstance(action.choices, range):
        listed = ", ".join(f"`{choice}`" for choice in action.choices)
        text = f"{text} (one of {listed})" if text else f"one of {listed}"
    return cell(text)


def flag_table(parser: argparse.ArgumentParser) -> str:
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    rows += [f"| {flag_names(action)} | {default_text(action)} | {meaning(parser, action)} |"
             for action in parser._actions
             if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)]
    return "\n".join(rows) + "\n"


def reads(row: Strategy) -> str:
    if row.learns_from_images:
        what = ["the images (the features with `--cached`)"]
    else:
        what = ["features" if row.needs_features else ("labels" if row.needs_labels else "the number of images")]
    if row.needs_features and row.needs_labels:
        what.append("labels")
    if row.needs_model:
        what.append("a model trained on the pool")
    return ", ".join(what)


def strategy_table() -> str:
    rows = ["| `--name` | program | `--splits` | reads | randomised by `--seed` | nested pools | options |",
            "|---|---|---|---|---|---|---|"]
    for row in STRATEGIES.values():
        program = "active_sampler.py" if row.needs_model else "sampler.py"
        splits = "increments" if row.incremental else "absolute budgets"
        nested = "yes" if row.nested else ("each round adds to the pool" if row.incremental else "no")
        options = ", ".join(f"`{option.flag}`" for option in row.options) or "–"
        rows.append(f"| `{row.name}` | {program} | {splits} | {reads(row)} | {'yes' if row.randomised else 'no'} "
                    f"| {nested} | {options} |")
    return "\n".join(rows) + "\n"


def generated(key: str) -> str:
    """The block named `key`: 'flags PROGRAM' or 'strategies'."""
    if key == "strategies":
        return strategy_table()
    kind, _, program = key.partition(" ")
    if kind != "flags" or program not in PROGRAMS:
        raise KeyError(f"unknown generated block {key!r}")
    return flag_table(PROGRAMS[program].build_parser())


def refreshed(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + generated(m.group("key")) + m.group(4), text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale files instead of rewriting them")
    args = parser.parse_args(argv)
    stale = []
    for path in (DOCS / "flags.md", DOCS / "strategies.md"):
        text = path.read_text()
        new = refreshed(text)
        if new != text:
            stale.append(path.name)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"stale generated tables in {', '.join(stale)}: run python tools/make_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
