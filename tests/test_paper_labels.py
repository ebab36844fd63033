"""The paper is the table of contents: every equation of Sec. 3.2.2-3.2.3 (Eq. 1-8) is cited
in the module that the table of docs/design.md names for it, and every module the table
names exists and cites its section."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "di_maskdino")


def readme_table():
    """(paper cell, [module paths]) of every row of the table headed | paper | what | module |."""
    text = open(os.path.join(ROOT, "docs", "design.md")).read()
    start = text.index("| paper | what | module |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((cells[0], re.findall(r"`([^`]+\.py)`", cells[2])))
    return rows


def equations(text):
    """Numbers cited as "Eq. n" or "Eq. a-b"."""
    found = set()
    for first, last in re.findall(r"Eq\. (\d+)(?:-(\d+))?", text):
        found.update(range(int(first), int(last or first) + 1))
    return found


def module_text(path):
    full = os.path.join(PACKAGE, path)
    assert os.path.isfile(full), f"docs/design.md names {path}, which does not exist"
    return open(full).read()


def test_every_equation_of_di_and_bato_has_a_row():
    cited = set()
    for paper, _ in readme_table():
        cited |= equations(paper)
    assert set(range(1, 9)) <= cited


@pytest.mark.parametrize("paper,modules", [row for row in readme_table() if row[0]])
def test_the_named_modules_cite_their_equations_and_section(paper, modules):
    texts = [module_text(m) for m in modules]
    for number in equations(paper):
        assert any(number in equations(t) for t in texts), f"Eq. {number} is cited in none of {modules}"
    section = re.search(r"Sec\. (3\.2(?:\.\d)?)", paper)
    if section:
        assert any(f"Sec. {section.group(1)}" in t for t in texts), (
            f"Sec. {section.group(1)} is cited in none of {modules}"
        )


def test_no_module_cites_a_section_the_paper_does_not_have():
    """Sec. 3.2.1-3.2.4 are the model's parts; nothing in the package cites 3.3 or later as a part of the model."""
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name)).read()
                for section in re.findall(r"Sec\. (3\.\d+(?:\.\d+)?)", text):
                    assert section.startswith("3.2"), f"{name} cites Sec. {section}"
