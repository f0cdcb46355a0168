"""d2v2-finetune text (d2v2_scale/finetune/text.py): the reference's schedule and optimizer
against fairseq's own code, and bad input (one line, exit 2, before any model loads).  The
fine-tuning runs themselves are in tests/test_export_hf.py (test_finetune_text_on_exports: they
reuse its text exports)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tests import data_fixtures


def labelled_glosses(labels, n: int) -> list[tuple[str, str]]:
    """(lexname, WordNet definition): the first n of each label, interleaved (data_prep/demo.py)."""
    from data_prep.demo import wordnet_lexname_docs

    data_fixtures.wordnet_glosses(1)  # installs wordnet-base when missing
    docs = wordnet_lexname_docs(data_fixtures.WORDNET_DIR, ("noun",))
    by = {lab: [d for d in docs if d[0] == lab][:n] for lab in labels}
    return [by[lab][i] for i in range(n) for lab in labels]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """rows -> .jsonl, .csv or .tsv (with a header row) by the suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",",
                           **({"quoting": csv.QUOTE_NONE} if path.suffix == ".tsv" else {}))
        w.writeheader()
        w.writerows(rows)
    return path
