"""lowbudget/cli.py's checked numbers, the type of every numeric flag: what they accept, what they refuse,
and the one line a script's parser prints for a refusal."""
import argparse

import pytest

from lowbudget import cli

COUNT = cli.int_at_least(1, 100)
AUTO_RADIUS = cli.Number(0, 10, low_open=True, auto=True)


@pytest.mark.parametrize("kind, text, message", [
    (COUNT, "0", "must be at least 1, got 0"),
    (COUNT, "101", "must be at most 100, got 101"),
    (COUNT, "2.5", "must be an integer in [1, 100], got '2.5'"),
    (COUNT, "nan", "must be an integer in [1, 100], got 'nan'"),
    (cli.positive_real(), "0", "must be in (0, 1e+06], got 0"),
    (cli.positive_real(), "-1e-9", "must be in (0, 1e+06], got -1e-9"),
    (cli.positive_real(), "1e30", "must be in (0, 1e+06], got 1e30"),
    (cli.positive_real(), "inf", "must be a finite number in (0, 1e+06], got 'inf'"),
    (cli.positive_real(), "-inf", "must be a finite number in (0, 1e+06], got '-inf'"),
    (cli.positive_real(), "nan", "must be a finite number in (0, 1e+06], got 'nan'"),
    (cli.FRACTION, "1.5", "must be in [0, 1], got 1.5"),
    (cli.FRACTION, "ten", "must be a finite number in [0, 1], got 'ten'"),
    (AUTO_RADIUS, "-1", "must be auto or in (0, 10], got -1"),
    (AUTO_RADIUS, "Auto", "must be auto or a finite number in (0, 10], got 'Auto'"),
    (COUNT, "9" * 50, f"must be at most 100, got {'9' * 37}..."),
])
def test_number_refuses_with_its_bounds(kind, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        kind(text)
    assert str(refused.value) == message


def test_number_takes_its_bounds_and_auto():
    assert COUNT("1") == 1 and COUNT("100") == 100 and isinstance(COUNT("7"), int)
    assert cli.positive_real()("1e6") == 1e6 and cli.positive_real()("1e-9") == 1e-9
    assert cli.FRACTION("0") == 0 and cli.FRACTION("1") == 1 and isinstance(cli.FRACTION("1"), float)
    assert AUTO_RADIUS("auto") is None and AUTO_RADIUS("10") == 10
    assert 5 in COUNT and 0 not in COUNT and float("nan") not in cli.FRACTION


def test_a_refused_number_is_one_line_naming_the_flag(capsys):
    parser = cli.Parser(prog="prog.py")
    parser.add_argument("--epochs", type=cli.EPOCHS)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--epochs", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "prog.py: error: argument --epochs: must be at least 1, got 0\n"
