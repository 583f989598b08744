"""tools/report.py: exact table cells from hand-written results, de-duplication, plots, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import REPO, call_main
from tools import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rec(script: str, name: str, split: int, metric: str, value: float, seed: int, **extra) -> dict:
    """One result line as the scripts write it (cifar10, resnet18/compress unless overridden)."""
    record = {"script": script, "dataset": "cifar10", "name": name, "split": split, "metric": metric,
              "value": value, "seed": seed, "arch": "resnet18", "backbone": "compress"}
    record.update(extra)
    if script == "eval_knn":
        record.setdefault("k", 1)
    if script == "eval_lincls":
        record.setdefault("mode", "cached")
        record.setdefault("epochs", 40)
    return record


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def coverage_everywhere(name: str, split: int, value: float, seed: int) -> list[dict]:
    """The same pool's coverage as sampler.py, eval_knn.py and eval_lincls.py all write it."""
    return [rec(script, name, split, "coverage", value, seed) for script in ("sampler", "eval_knn", "eval_lincls")]


def demo_records() -> list[dict]:
    """2 methods x 2 budgets x 2 seeds of 1-NN top-1 (file order kmeans first), plus coverage and linear top-1."""
    knn = {("kmeans", 10): (50.0, 55.0), ("kmeans", 20): (60.0, 64.0),
           ("random", 10): (40.0, 42.0), ("random", 20): (70.0, 70.0)}
    records = [rec("eval_knn", "kmeans", 10, "knn_top1", 1.0, 0)]  # re-run below: this one must lose
    for (name, split), values in knn.items():
        records += [rec("eval_knn", name, split, "knn_top1", v, seed) for seed, v in enumerate(values)]
    records += coverage_everywhere("kmeans", 10, 90.0, 0) + coverage_everywhere("kmeans", 10, 100.0, 1)
    records += coverage_everywhere("random", 10, 100.0, 0) + coverage_everywhere("random", 10, 100.0, 1)
    records += [rec("eval_lincls", "kmeans", 10, "lincls_top1", 30.0, 0),
                rec("eval_lincls", "kmeans", 10, "lincls_top5", 80.0, 0),
                rec("eval_lincls", "random", 20, "lincls_top1", 35.0, 0),
                rec("active_sampler", "entropy", 20, "active_top1", 12.0, 0, mode="cached")]
    return records


def table_after(markdown: str, heading: str) -> list[str]:
    """The lines of the Markdown table (and its caption) under `### heading`."""
    lines = markdown.splitlines()
    start = lines.index(f"### {heading}") + 2
    end = lines.index("", start)
    return lines[start:end] + [lines[end + 1]]


def run_report(args, capsys) -> tuple[int, str, str]:
    return call_main(report.main, args, capsys)


def test_cells_are_mean_and_sample_std_best_in_bold(tmp_path, capsys):
    results = write_jsonl(tmp_path / "run" / "results.jsonl", demo_records())
    status, out, err = run_report([results], capsys)
    assert (status, err) == (0, "")
    assert table_after(out, "1-NN top-1 (%)") == [
        "| Method | 10 | 20 |",
        "|---|---:|---:|",
        "| Random | 41.00 ± 1.41 | **70.00 ± 0.00** |",
        "| K-means | **52.50 ± 3.54** | 62.00 ± 2.83 |",
        "| *K-means − Random* | +11.50 | -8.00 |",
        "Mean ± std over 2 seeds.",
    ]


def test_coverage_counts_each_pool_and_seed_once_across_scripts_ties_all_bold(tmp_path, capsys):
    status, out, _ = run_report([write_jsonl(tmp_path / "results.jsonl", demo_records())], capsys)
    assert status == 0
    # Counted three times, kmeans would read 95.00 ± 5.48.
    assert table_after(out, "Class coverage (%)") == [
        "| Method | 10 |",
        "|---|---:|",
        "| Random | **100.00 ± 0.00** |",
        "| K-means | 95.00 ± 7.07 |",
        "| *K-means − Random* | -5.00 |",
        "Mean ± std over 2 seeds.",
    ]


def test_missing_cells_are_dashes_single_seed_shows_the_mean(tmp_path, capsys):
    status, out, _ = run_report([write_jsonl(tmp_path / "results.jsonl", demo_records())], capsys)
    assert status == 0
    assert table_after(out, "Linear top-1 (%), cached features, 40 epochs") == [
        "| Method | 10 | 20 |",
        "|---|---:|---:|",
        "| Random | – | **35.00** |",
        "| K-means | **30.00** | – |",
        "| *K-means − Random* | – | – |",
        "One seed.",
    ]
    assert "lincls_top5" not in out and "entropy" not in out  # other metrics are not tabulated


def test_rerun_in_a_later_file_wins(tmp_path, capsys):
    first = write_jsonl(tmp_path / "a" / "results.jsonl", demo_records())
    second = write_jsonl(tmp_path / "b" / "results.jsonl", [rec("eval_knn", "random", 20, "knn_top1", 10.0, 1)])
    status, out, _ = run_report([first, second, "--out", tmp_path / "out"], capsys)
    assert status == 0
    rows = table_after(out, "1-NN top-1 (%)")
    assert rows[2:4] == ["| Random | 41.00 ± 1.41 | 40.00 ± 42.43 |",
                         "| K-means | **52.50 ± 3.54** | **62.00 ± 2.83** |"]
    assert out.startswith(f"# Results\n\nFrom `{first}`, `{second}`.\n")


def test_seed_counts_that_differ_are_shown(tmp_path, capsys):
    records = [rec("eval_knn", "kmeans", 10, "knn_top1", v, seed) for seed, v in enumerate((50.0, 55.0, 60.0))]
    records += [rec("eval_knn", "random", 10, "knn_top1", 40.0, 0), rec("eval_knn", "random", 20, "knn_top1", 45.0, 0),
                rec("eval_knn", "random", 20, "knn_top1", 47.0, 1), rec("eval_knn", "kmeans", 20, "knn_top1", 44.0, 0),
                rec("eval_knn", "kmeans", 20, "knn_top1", 46.0, 1)]
    status, out, _ = run_report([write_jsonl(tmp_path / "results.jsonl", records)], capsys)
    assert status == 0
    assert table_after(out, "1-NN top-1 (%)")[2:] == [
        "| Random | 40.00 (n=1) | **46.00 ± 1.41** |",
        "| K-means | **55.00 ± 5.00** (n=3) | 45.00 ± 1.41 |",
        "| *K-means − Random* | +15.00 | -1.00 |",
        "Mean ± std over seeds: 2 per cell, except where (n=…) says otherwise.",
    ]


def test_methods_in_the_papers_order_then_alphabetical_budgets_ascending():
    values = {name: {split: [1.0] for split in (1000, 192000, 3000)}
              for name in ("zeta", "margin", "alpha", "kmeans", "uniform", "coreset", "entropy", "accu_kmeans",
                           "typiclust")}
    lines = report.markdown_table(values)
    assert lines[0] == "| Method | 1000 | 3000 | 192000 |"
    assert [line.split(" | ")[0] for line in lines[2:11]] == [
        "| Uniform", "| Max-Entropy", "| Core-set", "| Multi k-means", "| K-means", "| TypiClust", "| Margin",
        "| alpha", "| zeta"]
    assert lines[11] == ""  # no K-means − Random row without a Random row


def test_format_cell():
    assert report.format_cell([50.0, 55.0]) == "52.50 ± 3.54"
    assert report.format_cell([50.0, 55.0], bold=True, show_n=True) == "**52.50 ± 3.54** (n=2)"
    assert report.format_cell([97.0]) == "97.00"


def test_writes_report_md_and_valid_pngs_next_to_the_results(tmp_path, capsys):
    records = demo_records() + [rec("eval_knn", "random", 20, "knn_top1", 71.0, 0, k=20),
                                rec("eval_lincls", "random", 20, "lincls_top1", 36.0, 0, mode="images")]
    results = write_jsonl(tmp_path / "run" / "results.jsonl", records)
    status, out, _ = run_report([results], capsys)
    assert status == 0
    folder = tmp_path / "run"
    assert (folder / "report.md").read_text() == out
    plots = {"cifar10_coverage.png": "Class coverage (%)", "cifar10_knn_top1.png": "1-NN top-1 (%)",
             "cifar10_knn_top1_k20.png": "20-NN top-1 (%)",
             "cifar10_lincls_top1_cached.png": "Linear top-1 (%), cached features, 40 epochs",
             "cifar10_lincls_top1_images.png": "Linear top-1 (%), images, 40 epochs"}
    assert sorted(p.name for p in folder.iterdir()) == sorted([*plots, "report.md", "results.jsonl"])
    for name, title in plots.items():
        assert f"![{title}]({name})" in out
        data = (folder / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
        with Image.open(folder / name) as image:
            image.verify()
            assert image.size[0] > 300 and image.size[1] > 200
    assert table_after(out, "20-NN top-1 (%)")[2] == "| Random | **71.00** |"


def test_several_backbones_get_their_own_tables_and_file_names(tmp_path, capsys):
    records = [rec("eval_knn", "kmeans", 10, "knn_top1", 50.0, 0),
               rec("eval_knn", "kmeans", 10, "knn_top1", 60.0, 0, arch="resnet50", backbone="moco"),
               rec("eval_knn", "kmeans", 10, "knn_top1", 70.0, 0, arch=None, backbone=None),
               rec("eval_knn", "kmeans", 10, "knn_top1", 80.0, 0, dataset="cifar100")]
    status, out, _ = run_report([write_jsonl(tmp_path / "r.jsonl", records), "--out", tmp_path / "out"], capsys)
    assert status == 0
    headings = [line for line in out.splitlines() if line.startswith("## ")]
    assert headings == ["## cifar10 — resnet18, compress", "## cifar10 — resnet50, moco",
                        "## cifar10 — --feats features", "## cifar100"]
    assert sorted(os.listdir(tmp_path / "out")) == [
        "cifar100_knn_top1.png", "cifar10_feats_knn_top1.png", "cifar10_resnet18_compress_knn_top1.png",
        "cifar10_resnet50_moco_knn_top1.png", "report.md"]


def error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("content, message", [
    ('{"metric": "coverage"\n', "{path}:1: not valid JSON"),
    (json.dumps(rec("sampler", "kmeans", 10, "coverage", 90.0, 0)) + "\n\nnot json\n", "{path}:3: not valid JSON"),
    ('[1, 2]\n', "{path}:1: not a JSON object"),
    (json.dumps(rec("sampler", "kmeans", "10", "coverage", 90.0, 0)) + "\n", "{path}:1: 'split' must be an integer"),
    (json.dumps(rec("sampler", "kmeans", 10, "coverage", None, 0)) + "\n", "{path}:1: 'value' must be a finite"),
    (json.dumps(rec("eval_lincls", "kmeans", 10, "lincls_top5", 90.0, 0)) + "\n",
     "{path}: no coverage, lincls_top1 or knn_top1 records to tabulate"),
    ("", "{path}: no coverage, lincls_top1 or knn_top1 records to tabulate"),
    ("{}\n", "{path}:1: 'metric' must be a string, got None"),
    ('{"metric": ["coverage"]}\n', "{path}:1: 'metric' must be a string, got ['coverage']"),
])
def test_bad_results_file_is_one_line_naming_it_and_writes_nothing(tmp_path, capsys, content, message):
    good = write_jsonl(tmp_path / "good.jsonl", demo_records())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    status, out, err = run_report([good, bad, "--out", tmp_path / "out"], capsys)
    assert (status, out) == (2, "")
    assert f"error: {message.format(path=bad)}" in error_line(err)
    assert not (tmp_path / "out").exists()


def test_missing_results_file_and_out_that_is_a_file(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    status, _, err = run_report([missing], capsys)
    assert status == 2
    assert f"error: {missing}: cannot read results file (No such file or directory)" in error_line(err)
    results = write_jsonl(tmp_path / "results.jsonl", demo_records())
    (tmp_path / "file").write_text("x")
    status, _, err = run_report([results, "--out", tmp_path / "file"], capsys)
    assert status == 2
    assert f"error: --out: '{tmp_path / 'file'}' is not a directory" in error_line(err)
    assert sorted(os.listdir(tmp_path)) == ["file", "results.jsonl"]
    status, _, err = run_report([], capsys)
    assert status == 2 and "RESULTS.jsonl" in error_line(err)


def test_an_output_that_cannot_be_written_leaves_no_other_output(tmp_path, capsys):
    results = write_jsonl(tmp_path / "results.jsonl", demo_records())
    (tmp_path / "out" / "report.md").mkdir(parents=True)
    status, _, err = run_report([results, "--out", tmp_path / "out"], capsys)
    assert status == 2
    assert f"error: --out: cannot write '{tmp_path / 'out' / 'report.md'}': it is a folder" in error_line(err)
    assert os.listdir(tmp_path / "out") == ["report.md"] and not os.listdir(tmp_path / "out" / "report.md")


@pytest.mark.slow
def test_runs_as_a_script_from_the_repository_root_without_pythonpath(tmp_path):
    results = write_jsonl(tmp_path / "results.jsonl", demo_records())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "tools/report.py", str(results), "--out", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| K-means | **52.50 ± 3.54** | 62.00 ± 2.83 |" in done.stdout
    assert (tmp_path / "out" / "report.md").read_text() == done.stdout
    bad = subprocess.run([sys.executable, "tools/report.py", str(tmp_path / "nope.jsonl")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr == f"report.py: error: {tmp_path / 'nope.jsonl'}: cannot read results file " \
                         "(No such file or directory)\n"


def test_paper_tables_sit_under_the_runs_tables_of_the_same_metric(tmp_path, capsys):
    status, out, _ = run_report([write_jsonl(tmp_path / "results.jsonl", demo_records()), "--paper"], capsys)
    assert status == 0
    lines = out.splitlines()
    for heading, paper_line in (("Class coverage (%)", "| Multi k-means | 72.2 | 97 | 99.8 | **100** |"),
                                ("Linear top-1 (%), cached features, 40 epochs",
                                 "| Max-Entropy | 15.8 | 19.4 | 25.6 | 33.7 | 41.3 | 48.9 | 51.9 | 54.3 |"),
                                ("1-NN top-1 (%)", "| K-means | **31.6** | **39.9** | **42.7** | **44** | **45.5** "
                                                   "| 46.8 | 48.1 | 48.8 |")):
        start = lines.index(f"### {heading}")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
        section = lines[start:end]
        plot = next(i for i, line in enumerate(section) if line.startswith(f"![{heading}]("))
        assert paper_line in section[plot:]  # under the run's table and plot, before the next table
    paper_rows = [line.split(" | ")[0] for line in lines if line.startswith("| ") and "72.2" in line]
    assert paper_rows == ["| Multi k-means", "| K-means"]
    assert "| *K-means − Random* | +8.80 | +7.70 | +3.40 | +1.80 | +1.00 | +0.00 | +0.00 | +0.10 |" in lines
    status, plain, _ = run_report([write_jsonl(tmp_path / "results.jsonl", demo_records())], capsys)
    assert "CompRess" not in plain and "19.4" not in plain


@pytest.mark.parametrize("line, message", [
    ("[" * 200_000 + "]" * 200_000, "not valid JSON (nested too deeply)"),
    ('{"metric": "coverage", "split": ' + "9" * 5000 + "}", "not valid JSON (Exceeds the limit ("),
    (json.dumps(rec("eval_lincls", "kmeans", 10, "lincls_top1", 50.0, 0, mode=1)),
     "'mode' must be a string or null, got 1"),
    (json.dumps(rec("eval_knn", "kmeans", 10, "knn_top1", 50.0, 0, k="1")), "'k' must be an integer or null, got '1'"),
])
def test_lines_pythons_parser_or_the_tables_cannot_take_are_one_line_naming_file_and_line(
        tmp_path, capsys, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rec("sampler", "kmeans", 10, "coverage", 90.0, 0)) + "\n" + line + "\n")
    status, out, err = run_report([bad, "--out", tmp_path / "out"], capsys)
    assert (status, out) == (2, "")
    assert f"error: {bad}:2: {message}" in error_line(err)
    assert not (tmp_path / "out").exists()
