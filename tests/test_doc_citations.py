"""Comments, docstrings, messages and docs cite the repository's own documents: no working notes
outside the repository (`../shared`, "spec 12 D3", "data2vec1-spec A.2", ...), and every
`§N.M` names a section (or a D-row) that docs/REFERENCE.md has."""

import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "REFERENCE.md"
SCANNED = ["d2v2_scale", "data_prep", "tests", "bench", "launchers", "ds_configs", "docs", "README.md"]
SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".json", ".toml", ".txt"}

# what a citation of a document outside the repository looks like
OUTSIDE = re.compile(r"""(?ix)
    \.\./shared | /work/shared | shared/docs          # the working notes' folder
  | \b[\w-]+-spec(?:\.md)?\b                         # data2vec1-spec, data2vec-aqc-spec.md
  | \bspec(?:'s)?\s+(?:\d|section|§|[A-D]\.?\d|table|test|open|default|exact|student)
  | \bspec\s*:\s | \bthe\s+spec\b | \ban?\s+(?:earlier\s+)?spec\b | \bas\s+spec\b
  | \(spec\b | \bspec\)
""")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)(?:\s+(D\d+))?")


def _text_lines(path: Path):
    """(line number, text) of what a reader sees as prose: comments and strings of Python files
    (docstrings, messages), every line of the other files."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".py":
        yield from enumerate(text.split("\n"), 1)
        return
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING) or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            for k, line in enumerate(tok.string.split("\n")):
                yield tok.start[0] + k, line


def _files():
    for name in SCANNED:
        p = ROOT / name
        for f in ([p] if p.is_file() else sorted(p.rglob("*"))):
            if f.is_file() and f.suffix in SUFFIXES and "__pycache__" not in f.parts and f != Path(__file__).resolve():
                yield f


def _reference_sections() -> tuple[set[str], set[str]]:
    text = REFERENCE.read_text(encoding="utf-8")
    heads = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M))
    rows = set(re.findall(r"^\| (\d+\.\d+) \|", text, re.M))  # the numbered rows of §4's table
    d_rows = set(re.findall(r"^\| (D\d+) \|", text, re.M))  # §1.10's D1-D10
    return heads | rows, d_rows


def test_no_citation_of_documents_outside_the_repository():
    bad = [f"{f.relative_to(ROOT)}:{n}: {line.strip()[:120]}"
           for f in _files() for n, line in _text_lines(f) if OUTSIDE.search(line)]
    assert not bad, "cite docs/REFERENCE.md sections instead of the working notes:\n" + "\n".join(bad)


def test_every_cited_reference_section_exists():
    sections, d_rows = _reference_sections()
    assert {"1.10", "2.4", "3.8", "4.4", "5"} <= sections and len(d_rows) == 10  # the parser finds them
    missing = []
    for f in list(_files()) + [REFERENCE]:
        for n, line in _text_lines(f):
            for sec, d in SECTION.findall(line):
                if sec not in sections or (d and (sec != "1.10" or d not in d_rows)):
                    missing.append(f"{f.relative_to(ROOT)}:{n}: §{sec} {d}".rstrip())
    assert not missing, "sections that docs/REFERENCE.md does not have:\n" + "\n".join(missing)
