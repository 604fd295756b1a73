"""`make test`, the README's test command, runs every test: its runs of the tests marked serial and compat name the
files to collect (collecting all of them costs seconds), so every file that marks a test so must be named there; and
the main run's order (conftest.LONGEST_FILES_FIRST) names files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_files(variable: str) -> set[str]:
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    (value,) = re.findall(rf"^{variable} = (.*)$", makefile, re.M)
    return set(value.split())


def marking(mark: str) -> set[str]:
    return {
        f"tests/{path.name}"
        for path in (ROOT / "tests").glob("test_*.py")
        if re.search(rf"pytest\.mark\.{mark}\b", path.read_text())
    }


@pytest.mark.parametrize(("mark", "variable"), [("serial", "SERIAL_FILES"), ("compat", "COMPAT_FILES")])
def test_every_file_marking_a_run_s_tests_is_in_that_run(mark, variable):
    assert marking(mark), f"no test is marked {mark}"
    assert marking(mark) <= make_files(variable), f"add them to {variable} in the Makefile"


def test_the_longest_files_named_first_exist():
    from tests.conftest import LONGEST_FILES_FIRST

    missing = [name for name in LONGEST_FILES_FIRST if not (ROOT / "tests" / name).exists()]
    assert not missing, f"renamed or removed: update LONGEST_FILES_FIRST in tests/conftest.py: {missing}"
