"""`d2v2-prep image|audio|text ...`: prepare Arrow shards + manifest for d2v2-scale.
The same shards feed every system it trains (data2vec 2.0, data2vec 1.0, data2vec-aqc); prepare
each source once and mix them per run with data.manifests (docs/DATA.md).
`d2v2-prep verify MANIFEST`: check a prepared corpus offline (every shard and every row).

Every prepare subcommand shares --out, --shard-size-mb, --workers, --overwrite.  Re-running the
same command after an interruption resumes it (see docs/DATA.md).
"""

from __future__ import annotations

import argparse
import os
import sys

from d2v2_scale.data.manifest import DataError
from d2v2_scale.data.shards import ShardSet
from . import audio, image, text
from .pipeline import check_out


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Docstrings as written, and every option's default in --help."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2v2-prep", description=__doc__, formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="modality", required=True, metavar="{image,audio,text,verify}")
    for name, mod in (("image", image), ("audio", audio), ("text", text)):
        sp = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0],
                            description=mod.__doc__, formatter_class=_HelpFormatter)
        mod.add_args(sp)
        sp.add_argument("--out", required=True, default=argparse.SUPPRESS,
                        help="output folder (shards, manifest.json, report.json); required")
        sp.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size (MiB)")
        sp.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="worker processes (CPUs - 1 on this machine)")
        sp.add_argument("--overwrite", action="store_true",
                        help="start over even if --out holds a finished or interrupted run, or other files")
        sp.set_defaults(main=mod.main, out_checked=True)
    vp = sub.add_parser("verify", help="check every shard and row of a prepared corpus; exit 1 on any problem",
                        description=verify.__doc__, formatter_class=_HelpFormatter)
    vp.add_argument("manifest", help="manifest.json of a prepared corpus, or its folder")
    vp.set_defaults(main=verify)
    return p


def verify(args: argparse.Namespace) -> int:
    """Read the whole corpus: each shard's size, footer hash and sha256, and each row's checksum.
    Prints one line per problem (shard, row, source path, reason) and exits 1 if there is any."""

    try:
        s = ShardSet(args.manifest, verify="none")
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    problems = s.scan()
    for b in problems:
        where = b["shard"] if b["row"] is None else f"{b['shard']} row {b['row']} ({b['source']})"
        print(f"{where}: {b['reason']}")
    rows = "every row's checksum" if s.has_row_crc else "no rows (no per-row checksums in this manifest)"
    print(f"{s.manifest_path}: {len(problems)} problems; checked {len(s.shard_rows)} shards and {rows} "
          f"({len(s)} rows)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "out_checked", False):  # before any work (text trains sentencepiece into --out)

        check_out(args.out, args.overwrite)
    from .pipeline import release_out

    try:
        rc = args.main(args)  # locks --out before its first write (pipeline.lock_out)
    finally:
        release_out()  # for callers in this process (tests, the quickstart); an exit releases it too
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
