"""The README and the write-ups under docs/ and benchmarks/ point at things that exist: every relative link
resolves to a committed file (and, for `file.md#anchor`, to one of its headings), and every `--recipe` or
`--model` in a shown command names a registered recipe or model, so a copied command does not stop with an
unknown name."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from resnetlab.experiments.recipes import list_recipes
from resnetlab.models import list_models

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
NAMED = re.compile(r"--(recipe|model) ([a-z][\w.-]*)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces become hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(markdown: Path) -> set[str]:
    return {github_anchor(line.lstrip("#")) for line in markdown.read_text().splitlines() if line.startswith("#")}


def relative_links(document: Path) -> list[str]:
    return [link for link in LINK.findall(document.read_text()) if not re.match(r"[a-z]+:", link)]


def test_github_anchor_follows_githubs_rule():
    assert github_anchor(" At 15 epochs") == "at-15-epochs"
    assert github_anchor("fast-cifar (the default), 30 epochs") == "fast-cifar-the-default-30-epochs"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document):
    for link in relative_links(document):
        path, _, anchor = link.partition("#")
        target = (document.parent / path).resolve() if path else document
        assert target.exists(), f"{document.name}: link to missing {link}"
        if anchor and target.suffix == ".md":
            assert anchor in headings(target), f"{document.name}: no heading #{anchor} in {path or document.name}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_recipes_and_models_exist(document):
    recipes = {recipe.name for recipe in list_recipes()}
    models = set(list_models())
    for kind, name in NAMED.findall(document.read_text()):
        assert name in (recipes if kind == "recipe" else models), f"{document.name}: unknown {kind} {name!r}"
