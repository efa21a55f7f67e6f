"""The documents' claims point at tests that exist: every row of docs/RELIABILITY.md's tables
(except the list of what is not covered) and every promise under the README's "Nothing lost"
names at least one test, and every test named is defined where it says."""

from __future__ import annotations

import re

import pytest

from helpers.cli import REPO

TEST_REFERENCE = re.compile(r"tests/((?:\w+/)*\w+\.py)::(\w+)")  # tests/[dir/]test_x.py::name


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


# -- every command and recipe a user is shown exists ---------------------------------------------

RECIPE_NAMED = re.compile(r"recipes/[\w./-]+\.ya?ml")
COMMAND_NAMED = re.compile(r"(?:^|[`$]\s?)dltrain ([a-z][\w-]*)")


def shown_to_users(invoke) -> dict[str, str]:
    """What a user reads: the README and docs, the recipes' headers, every command's --help."""
    texts = {p.name: p.read_text(encoding="utf-8") for p in [REPO / "README.md"]}
    texts |= {f"docs/{p.name}": p.read_text(encoding="utf-8") for p in REPO.glob("docs/*.md")}
    for recipe in sorted(REPO.glob("recipes/*.yaml")):
        header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
        texts[f"recipes/{recipe.name}"] = "\n".join(h.lstrip("# ") for h in header)
    for command in COMMANDS:
        texts[f"dltrain {command} --help"] = "\n".join(
            line.strip() for line in help_of(invoke, command).splitlines()
        )
    return texts


def help_of(invoke, command: str) -> str:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    return result.output


def code_in(text: str) -> str:
    """Inline code, fenced blocks and command lines: where commands are shown, not prose."""
    fenced = re.findall(r"```.*?\n(.*?)```", text, re.S)
    inline = re.findall(r"`([^`\n]+)`", text)
    lines = [line for line in text.splitlines() if line.lstrip().startswith("dltrain ")]
    return "\n".join([*fenced, *inline, *lines])


COMMANDS = [
    "fit",
    "eval",
    "devices",
    "check",
    "list",
    "runs",
    "predict",
    "export",
    "explain",
    "sweep",
    "lr-find",
    "compare",
]


@pytest.mark.console_width(200)
def test_every_recipe_and_command_shown_to_users_exists(invoke):
    from dltrain.cli import COMMANDS as REGISTERED

    assert set(COMMANDS) == set(REGISTERED)
    shown = shown_to_users(invoke)
    missing_recipes = {
        (where, path)
        for where, text in shown.items()
        for path in RECIPE_NAMED.findall(text)
        if not (REPO / path).is_file()
    }
    assert not missing_recipes
    unknown_commands = {
        (where, name)
        for where, text in shown.items()
        for name in COMMAND_NAMED.findall(code_in(text))
        if name not in REGISTERED
    }
    assert not unknown_commands
    recipes_named = {p for text in shown.values() for p in RECIPE_NAMED.findall(text)}
    assert len(recipes_named) >= 8  # the texts really were read


@pytest.mark.slow
def test_the_package_builds_without_deprecation_warnings(tmp_path):
    import shutil
    import subprocess
    import sys

    source = tmp_path / "source"
    shutil.copytree(
        REPO / "dltrain", source / "dltrain", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "wheel"), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = build.stdout + build.stderr
    assert build.returncode == 0, output[-3000:]
    assert "deprecat" not in output.lower(), output[-3000:]
    assert [p.name for p in (tmp_path / "wheel").iterdir()] == [
        f"dltrain-{__import__('dltrain').__version__}-py3-none-any.whl"
    ]


def test_every_recipe_header_says_what_to_expect_and_how_long_it_takes():
    for recipe in sorted(REPO.glob("recipes/*.yaml")):
        header = " ".join(
            line.lstrip("# ") for line in recipe.read_text().splitlines() if line.startswith("#")
        )
        assert "dltrain fit recipes/" + recipe.name in header, recipe.name
        assert re.search(r"\b(seconds?|minutes?|hours?|a minute)\b", header), recipe.name
