"""`d2v2-prep image|audio|text ...`: prepare Arrow shards + manifest for d2v2-scale.

Every subcommand shares --out, --shard-size-mb, --workers, --overwrite.  Re-running the same
command after an interruption resumes it (see docs/DATA.md).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import audio, image, text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2v2-prep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="modality", required=True, metavar="{image,audio,text}")
    for name, mod in (("image", image), ("audio", audio), ("text", text)):
        sp = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0],
                            description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(sp)
        sp.add_argument("--out", required=True, help="output folder (shards, manifest.json, report.json)")
        sp.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size (MiB)")
        sp.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="worker processes (default: CPUs - 1)")
        sp.add_argument("--overwrite", action="store_true",
                        help="start over even if --out holds a finished or interrupted run")
        sp.set_defaults(main=mod.main)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
