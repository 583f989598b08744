"""The tables of docs/ that copy the code are what the code says."""
from __future__ import annotations

from tools import make_docs


def test_flag_and_strategy_tables_in_docs_are_generated_from_the_code(capsys):
    assert make_docs.main(["--check"]) == 0, capsys.readouterr().err


def test_every_program_and_strategy_has_its_generated_block():
    flags = (make_docs.DOCS / "flags.md").read_text()
    keys = {m.group("key") for m in make_docs.BLOCK.finditer(flags)}
    assert keys == {f"flags {program}" for program in make_docs.PROGRAMS}
    strategies = make_docs.generated("strategies")
    assert all(f"| `{name}` |" in strategies for name in make_docs.STRATEGIES)
    assert "<!-- generated: strategies -->" in (make_docs.DOCS / "strategies.md").read_text()
