"""The repository's documents stand alone: every link they hold resolves to a file inside it."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted(
    p.relative_to(ROOT)
    for pattern in ("*.md", "docs/**/*.md", "benchmarks/**/*.md", "results/**/*.md")
    for p in ROOT.glob(pattern)
)
# [text](target) and ![alt](target); the target up to a space (a title) or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)")


def test_the_documents_are_found():
    assert Path("README.md") in DOCUMENTS and Path("docs/algorithm.md") in DOCUMENTS


@pytest.mark.parametrize("document", DOCUMENTS, ids=str)
def test_links_resolve_inside_the_repository(document):
    text = (ROOT / document).read_text()
    for target in LINK.findall(text):
        if target.startswith("#"):
            continue
        assert not re.match(r"[a-z]+:", target), f"{document} links outside the repository: {target}"
        path = (ROOT / document).parent / target.split("#")[0]
        assert path.resolve().is_relative_to(ROOT), f"{document} links outside the repository: {target}"
        assert path.exists(), f"{document} links to {target}, which does not exist"


@pytest.mark.parametrize("document", DOCUMENTS, ids=str)
def test_no_document_points_to_the_notes_kept_beside_the_repository(document):
    text = (ROOT / document).read_text()
    assert "PRONG.md" not in text and "shared/" not in text, document


RESULTS = sorted(p.relative_to(ROOT) for p in ROOT.glob("results/**/summary.md")) + [
    Path("benchmarks/results/results.md")
]


def test_the_results_are_found():
    assert Path("results/autoencoder/summary.md") in RESULTS and len(RESULTS) >= 6


@pytest.mark.parametrize("document", RESULTS, ids=str)
def test_every_committed_result_names_the_commit_it_ran_at(document):
    text = (ROOT / document).read_text()
    assert re.search(r"\bcommit [0-9a-f]{40}\b", text), f"{document} does not name the commit of its run"
