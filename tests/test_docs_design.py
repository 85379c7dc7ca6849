"""docs/design.md is the project's design document: it exists, and every citation of it names one of its sections."""

import re

from helpers import ROOT

CITATION = re.compile(r"docs/design\.md §(\d+[a-z]?)")
CITING = ["README.md", "ARCHITECTURE.md", "extsub_kernels/**/*.py", "tests/*.py", "benchmarks/**/*.py", "examples/**/*"]


# Text that can cite; never weights (examples/real_model/ writes a 540 MB base/ that git ignores).
TEXT_SUFFIXES = {".py", ".md", ".sh", ".txt", ".toml", ".yaml", ".yml", ".json", ".jsonl", ".csv"}


def _citing_files():
    for pattern in CITING:
        yield from (p for p in ROOT.glob(pattern) if p.is_file() and p.suffix in TEXT_SUFFIXES)


def test_every_citation_names_a_section_of_the_design_document():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^#{2,3} (\d+[a-z]?)\. ", design, re.MULTILINE))
    assert {"1", "3", "5", "6", "7", "8"} <= sections, sorted(sections)
    cited = {}
    for path in _citing_files():
        text = path.read_text(errors="replace")
        assert not re.search(r"\bDESIGN(\.md| §)", text), f"{path} cites a document the repository lacks"
        for section in CITATION.findall(text):
            cited.setdefault(section, path)
    assert cited, "the code cites the design by section"
    missing = {s: str(p) for s, p in cited.items() if s not in sections}
    assert not missing, f"cited sections that docs/design.md does not have: {missing}"
