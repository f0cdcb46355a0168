"""`d2v2-prep image`: ImageFolder tree or file list -> Arrow shards of encoded images.

Columns: image (encoded bytes: as found, or re-encoded when larger than --max-side), label
(int64, -1 if none), path (source, relative to the input root), width, height (of the stored
image), and with --pixels SIDE also pixels (uint8 HWC bytes, shorter side resized to SIDE)
plus pix_height, pix_width, pix_channels, so the loader can skip decoding.
"""

from __future__ import annotations

import argparse
import functools
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from . import pipeline
from .pipeline import ItemResult, Skip

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


def schema(pixels: bool) -> pa.Schema:
    fields = [("image", pa.binary()), ("label", pa.int64()), ("path", pa.string()),
              ("width", pa.int32()), ("height", pa.int32())]
    if pixels:
        fields += [("pixels", pa.binary()), ("pix_height", pa.int32()), ("pix_width", pa.int32()),
                   ("pix_channels", pa.int32())]
    return pa.schema(fields)


def list_inputs(src: str | None, file_list: str | None) -> tuple[list[tuple[str, str, int]], list[str]]:
    """Sorted (absolute path, display path, label) items and the class names (may be empty)."""
    if file_list:
        if not Path(file_list).is_file():
            raise SystemExit(f"error: --file-list {file_list} does not exist")
        base = Path(file_list).parent
        items, labels = [], {}
        for line in Path(file_list).read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            p = Path(parts[0])
            p = p if p.is_absolute() else base / p
            lab = parts[1] if len(parts) > 1 else None
            items.append((str(p), parts[0], lab))
        # labels in a file list may be names or integers; names are numbered in sorted order
        names = sorted({lab for *_, lab in items if lab is not None and not lab.lstrip("-").isdigit()})
        labels = {n: i for i, n in enumerate(names)}
        out = [(p, d, -1 if lab is None else (int(lab) if lab.lstrip("-").isdigit() else labels[lab]))
               for p, d, lab in items]
        return sorted(out, key=lambda t: t[1]), names
    root = Path(src)
    if not root.exists():
        raise SystemExit(f"error: image input {root} does not exist")
    if not root.is_dir():
        raise SystemExit(f"error: image input {root} is not a directory (give an ImageFolder-style tree "
                         "or --file-list)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    out = []
    if classes:
        for ci, c in enumerate(classes):
            for dirpath, files in pipeline.walk(root / c):
                for f in files:
                    if Path(f).suffix.lower() in IMAGE_EXTS:
                        p = Path(dirpath) / f
                        out.append((str(p), str(p.relative_to(root)), ci))
    for f in root.iterdir():  # loose files at the top level are unlabelled
        if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
            out.append((str(f), f.name, -1))
    return sorted(out, key=lambda t: t[1]), classes


def process(item: tuple[str, str, int], max_side: int | None, pixels: int | None, quality: int) -> ItemResult:
    path, disp, label = item
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return ItemResult(skips=[Skip(disp, f"unreadable: {e.strerror or e}")])
    if not data:
        return ItemResult(skips=[Skip(disp, "empty file")])
    try:
        im = Image.open(io.BytesIO(data))
        fmt = im.format
        im.load()
    except Exception as e:  # PIL raises many types for corrupt data
        return ItemResult(skips=[Skip(disp, f"cannot decode: {type(e).__name__}: {e}")])
    if im.width == 0 or im.height == 0:
        return ItemResult(skips=[Skip(disp, "cannot decode: zero-size image")])
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    if max_side and max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BICUBIC)
        b = io.BytesIO()
        if fmt == "JPEG":
            im.save(b, format="JPEG", quality=quality)
        else:
            im.save(b, format="PNG")
        data = b.getvalue()
    row = {"image": data, "label": int(label), "path": disp, "width": im.width, "height": im.height}
    if pixels:
        s = pixels / min(im.size)
        pim = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BICUBIC) \
            if s != 1 else im
        arr = np.asarray(pim, dtype=np.uint8)
        row.update(pixels=arr.tobytes(), pix_height=arr.shape[0], pix_width=arr.shape[1],
                   pix_channels=1 if arr.ndim == 2 else arr.shape[2])
    return ItemResult(rows=[row])


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", nargs="?", help="ImageFolder-style root: one subfolder per class (loose files: label -1)")
    p.add_argument("--file-list", default=None, help="text file of 'path[<TAB>label]' lines instead of a folder")
    p.add_argument("--max-side", type=int, default=None,
                   help="re-encode images whose longer side exceeds this (JPEG stays JPEG, others become PNG)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality when re-encoding (--max-side)")
    p.add_argument("--pixels", type=int, default=None, metavar="SIDE",
                   help="also store decoded uint8 pixels resized to shorter side SIDE (faster loading, bigger)")


def main(args: argparse.Namespace) -> dict:
    if not args.src and not args.file_list:
        raise SystemExit("error: give an image folder or --file-list")
    items, classes = list_inputs(args.src, args.file_list)
    items, ignored = pipeline.real_files_once(items)
    if not args.file_list:
        ignored = sorted(ignored + pipeline.unsupported_files(args.src, IMAGE_EXTS), key=lambda s: s.source)
    if not items:
        raise SystemExit(f"error: no images found under {args.src or args.file_list}"
                         + (f" ({len(ignored)} files with other extensions)" if ignored else ""))
    proc = functools.partial(process, max_side=args.max_side, pixels=args.pixels, quality=args.jpeg_quality)
    fp = {"modality": "image", "items": [(d, lab) for _, d, lab in items], "max_side": args.max_side,
          "pixels": args.pixels, "quality": args.jpeg_quality, "shard_size_mb": args.shard_size_mb}
    return pipeline.run(args.out, modality="image", items=items, process=proc, schema=schema(bool(args.pixels)),
                        shard_size_mb=args.shard_size_mb, workers=args.workers, args_fingerprint=fp,
                        manifest_extra={"classes": classes, "num_classes": len(classes),
                                        "source": str(args.src or args.file_list), "pixels_side": args.pixels},
                        desc="image", overwrite=args.overwrite, ignored=ignored)
