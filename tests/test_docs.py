"""The documents' claims point at tests that exist: every row of docs/RELIABILITY.md's tables
(except the list of what is not covered) and every promise under the README's "Nothing lost"
names at least one test, and every test named is defined where it says."""

from __future__ import annotations

import re

import pytest
from as_user import REPO

TEST_REFERENCE = re.compile(r"tests/(\w+\.py)::(\w+)")


def section(text: str, heading: str, until: str = "\n## ") -> str:
    start = text.index(heading)
    end = text.find(until, start + len(heading))
    return text[start : end if end != -1 else None]


def table_rows(text: str) -> list[str]:
    """Body rows of the Markdown tables in `text` (no header or separator rows)."""
    rows, previous = [], ""
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            if not previous.startswith("|"):
                previous = line  # a header row
                continue
            rows.append(line)
        previous = line
    return rows


def bullets(text: str) -> list[str]:
    """Top-level '- ' bullets with their continuation lines."""
    return [b for b in re.split(r"\n(?=- )", text) if b.startswith("- ")]


RELIABILITY = (REPO / "docs" / "RELIABILITY.md").read_text(encoding="utf-8")
README = (REPO / "README.md").read_text(encoding="utf-8")
CLAIMS = [
    *table_rows(RELIABILITY.split("## Not covered by tests")[0]),
    *bullets(section(README, "## Nothing lost when things go wrong").split("\n\nSee ")[0]),
]


@pytest.mark.parametrize("claim", CLAIMS, ids=[c[:40] for c in CLAIMS])
def test_every_claim_names_a_test(claim):
    assert TEST_REFERENCE.search(claim), f"names no test: {claim[:200]}"


def test_every_named_test_exists():
    named = {m.groups() for text in (RELIABILITY, README) for m in TEST_REFERENCE.finditer(text)}
    missing = [
        f"{file}::{name}"
        for file, name in sorted(named)
        if not (REPO / "tests" / file).is_file()
        or not re.search(rf"^def {name}\(", (REPO / "tests" / file).read_text(), re.M)
    ]
    assert not missing, missing
    assert len(named) > 100  # the documents really were read


def test_the_claims_were_found():
    assert len(table_rows(RELIABILITY)) > 100 and len(CLAIMS) > 100
    assert sum(c.startswith("- ") for c in CLAIMS) >= 8  # the README's promises
