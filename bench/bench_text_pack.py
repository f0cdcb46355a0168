"""`d2v2-prep text` on one very long document: time vs document length (should be linear).

    OMP_NUM_THREADS=1 python bench/bench_text_pack.py [--mb 1 2 5 10] [--repeats 3]

Each document is one line of WordNet definitions (tests/data_fixtures.py) repeated to the
length, prepared with an existing sentencepiece model (8000 pieces, trained once on the
definitions, one per line) so only the per-document work is timed:
  prep      the whole `d2v2-prep text LINE --spm-model M --workers 1 --overwrite` (its main(), in
            this process: wall s without interpreter start and imports; the first row, a 1 kB
            document, is the fixed cost of a run)
  chunk / encode / pack   the three stages in this process: finding document breaks
            (data_prep.text.chunk_file), sentencepiece encoding (process), block packing
            (BlockPacker, 511-token blocks)
Linear: s/MB stays flat as the length grows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("D2V2_PREP_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import data_fixtures as fx  # noqa: E402

from data_prep import text  # noqa: E402
from data_prep.cli import main as prep  # noqa: E402


def stages(path: Path, spm: str) -> tuple[float, float, float, int]:
    t0 = time.perf_counter()
    items = text.chunk_file(str(path), path.name, b"\n")
    t1 = time.perf_counter()
    rows = [r for it in items for r in text.process(it, "line", spm, True, False).rows]
    t2 = time.perf_counter()
    packer = text.BlockPacker(511, wide=False)
    blocks = packer.add(rows) + packer.finish()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, sum(b["n_tokens"] for b in blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, nargs="+", default=[1, 2, 5, 10], help="document lengths (MB)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per length (median reported)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-text-pack-"))
    work.mkdir(parents=True, exist_ok=True)
    glosses = fx.wordnet_glosses(None)
    (work / "glosses.txt").write_text("\n".join(glosses) + "\n")
    if not (work / "spm" / "manifest.json").exists():
        prep(["text", str(work / "glosses.txt"), "--out", str(work / "spm"), "--workers", "1"])
    spm = str(work / "spm" / "spm.model")
    one = " ".join(glosses)
    print("| document | tokens | prep (s) | s/MB | chunk (s) | encode (s) | pack (s) |")
    print("|---|---|---|---|---|---|---|")
    for mb in [0.001] + args.mb:
        n = int(mb * 1_000_000)
        line = work / f"line{mb:g}MB.txt"
        line.write_text((one * (n // len(one) + 1))[:n] + "\n")
        walls, parts = [], []
        for r in range(args.repeats):
            out = work / f"out{mb:g}-{r}"
            t = time.perf_counter()
            prep(["text", str(line), "--out", str(out), "--spm-model", spm, "--workers", "1", "--overwrite"])
            walls.append(time.perf_counter() - t)
            parts.append(stages(line, spm))
        med = [statistics.median(p[i] for p in parts) for i in range(3)]
        wall = statistics.median(walls)
        per_mb = f"{wall / mb:.2f}" if mb >= 1 else "-"
        print(f"| {mb:g} MB | {parts[0][3]:,} | {wall:.2f} | {per_mb} | {med[0]:.3f} | {med[1]:.2f} | "
              f"{med[2]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
