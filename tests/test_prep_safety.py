"""d2v2-prep against inputs the round-trip tests do not use: every PIL image mode (what the loader
yields), two preps into one --out, very long text documents, manifests naming files outside
their folder (docs/DATA.md)."""

import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import data_fixtures as fx  # noqa: E402

from d2v2_scale.data import augment  # noqa: E402
from d2v2_scale.data.manifest import DataError  # noqa: E402
from d2v2_scale.data.shards import ShardSet  # noqa: E402
from data_prep.cli import main as prep  # noqa: E402

os.environ["D2V2_PREP_NO_PROGRESS"] = "1"
ENV = dict(os.environ, OMP_NUM_THREADS="1", D2V2_PREP_NO_PROGRESS="1")


# ---- image modes ---------------------------------------------------------------------------------

def _png(arr: np.ndarray, color_type: int, bit_depth: int = 16) -> bytes:
    """A PNG written by hand (PIL writes no 16-bit colour PNG): color_type 0 grey, 2 RGB, 4 grey+alpha,
    6 RGBA; arr [H, W] or [H, W, C] of sample values."""
    h = arr.shape[0]
    raw = np.ascontiguousarray(arr.astype(">u2" if bit_depth == 16 else "u1")).reshape(h, -1)
    data = b"".join(b"\0" + raw[i].tobytes() for i in range(h))

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    ihdr = struct.pack(">IIBBBBB", arr.shape[1], h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt, **kw)
    return b.getvalue()


S = 48  # image side
HALF = np.zeros((S, S), bool)
HALF[:, S // 2:] = True  # right half


def _mode_images() -> dict[str, tuple[bytes, str, float | None]]:
    """file name -> (file bytes, PIL mode it opens as, mean pixel value (0..255) a viewer shows, or None
    when d2v2-prep must skip it)."""
    g16 = np.full((S, S), 32896, np.uint16)  # 128 * 257: mid grey in 16 bits
    cmyk = Image.new("CMYK", (S, S), (0, 0, 0, 128))  # 50 % black ink: grey 127
    la = np.dstack([np.zeros((S, S), np.uint8), np.where(HALF, 255, 0).astype(np.uint8)])  # black, left transparent
    rgba = np.dstack([np.zeros((S, S, 3), np.uint8), np.where(HALF, 255, 0).astype(np.uint8)])
    pal = Image.fromarray(HALF.astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 0, 0, 0])  # index 0 (left) and 1 (right) both black, index 0 transparent
    bits = Image.fromarray((np.indices((S, S)).sum(0) % 2).astype(bool))  # a 1-bit checkerboard
    return {
        "gray16.png": (_png(g16, 0), "I;16", 128.0),
        "gray16be.tif": (_save(Image.frombytes("I;16B", (S, S), g16.astype(">u2").tobytes()), "TIFF"),
                         "I;16B", 128.0),
        "gray16.pgm": (b"P5\n%d %d\n65535\n" % (S, S) + g16.astype(">u2").tobytes(), "I", 128.0),
        "rgb16.png": (_png(np.dstack([g16] * 3), 2), "RGB", 128.0),
        "gray_alpha16.png": (_png(np.dstack([np.zeros((S, S)), np.where(HALF, 65535, 0)]), 4), "RGBA", 127.5),
        "la.png": (_save(Image.fromarray(la, "LA"), "PNG"), "LA", 127.5),
        "rgba.png": (_save(Image.fromarray(rgba, "RGBA"), "PNG"), "RGBA", 127.5),
        "palette_transparent.png": (_save(pal, "PNG", transparency=0), "P", 127.5),
        "palette_transparent.gif": (_save(pal, "GIF", transparency=0), "P", 127.5),
        "cmyk.jpg": (_save(cmyk, "JPEG", quality=95), "CMYK", 127.0),
        "bits.png": (_save(bits, "PNG"), "1", 127.5),
        "int32.tif": (_save(Image.fromarray(np.full((S, S), 1 << 20, np.int32)), "TIFF"), "I", None),
        "float.tif": (_save(Image.fromarray(np.full((S, S), 0.5, np.float32)), "TIFF"), "F", None),
    }


def _exif_rotated_jpeg() -> bytes:
    """A 64x32 JPEG stored sideways (left half black, right half white) with EXIF orientation 6:
    shown upright it is 32x64, black on top."""
    a = np.where(np.arange(64)[None, :] < 32, 0, 255).astype(np.uint8).repeat(32, 0)
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90 degrees clockwise to display
    return _save(Image.fromarray(a, "L").convert("RGB"), "JPEG", quality=95, exif=ex.tobytes())


def _loader_pixels(manifest: Path) -> dict[str, np.ndarray]:
    """source path -> the loader's image for that row, back in 0..255 (un-normalized), [C, H, W]:
    whole image (crop scale 1, no flip)."""
    from d2v2_scale.data.loader import BatchBuilder

    cfg = fx.tiny_cfg("image", manifest, crop_scale_min=1.0, crop_scale_max=1.0, hflip=False)
    shards = ShardSet(manifest)
    b = BatchBuilder(cfg, shards)(0, np.arange(len(shards)))
    x = b["source"].numpy() * augment.IMAGENET_STD[None, :, None, None] + augment.IMAGENET_MEAN[None, :, None, None]
    return {shards.get(int(i), ["path"])["path"]: x[k] * 255 for k, i in enumerate(b["index"].tolist())}


def test_image_modes_train_as_they_look(tmp_path):
    src = tmp_path / "modes"
    src.mkdir()
    cases = _mode_images()
    for name, (data, mode, _) in cases.items():
        (src / name).write_bytes(data)
        assert Image.open(src / name).mode == mode, name  # the mode this case is about
    (src / "rotated.jpg").write_bytes(_exif_rotated_jpeg())
    prep(["image", str(src), "--out", str(tmp_path / "o"), "--workers", "1"])
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    skipped = {s["source"]: s["reason"] for s in rep["skips"]}
    assert set(skipped) == {n for n, c in cases.items() if c[2] is None}
    assert re.fullmatch(r"unsupported pixels: 32-bit integer pixels \(mode I, values 1048576..1048576\) have no "
                        r"defined 8-bit range: convert the file to 8 or 16 bits per sample", skipped["int32.tif"])
    assert skipped["float.tif"].startswith("unsupported pixels: 32-bit float pixels (mode F)")
    px = _loader_pixels(tmp_path / "o" / "manifest.json")
    for name, (_, mode, mean) in cases.items():
        if mean is not None:
            assert abs(px[name].mean() - mean) < 1.5, (name, mode, px[name].mean(), mean)
            assert np.ptp(px[name].mean((1, 2))) < 1.5, name  # grey stays grey in every channel
    for name in ("la.png", "rgba.png", "palette_transparent.png", "gray_alpha16.png"):  # transparent = white
        im = px[name].mean(0)
        assert im[:, :10].mean() > 250 and im[:, -10:].mean() < 5, name
    rot = px["rotated.jpg"].mean(0)  # upright: black on top, white below
    top, bottom = rot[: rot.shape[0] // 2 - 2].mean(), rot[rot.shape[0] // 2 + 2:].mean()
    assert top < 10 and bottom > 245, (top, bottom)
    s = ShardSet(tmp_path / "o")
    rows = {s.get(i)["path"]: s.get(i) for i in range(len(s))}
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (32, 64)
    assert Image.open(io.BytesIO(bytes(rows["rotated.jpg"]["image"]))).format == "JPEG"  # lossy stays lossy
    for name, r in rows.items():  # what is stored decodes as 8-bit RGB or L, without transparency
        im = Image.open(io.BytesIO(bytes(r["image"])))
        assert im.mode in ("RGB", "L") and "transparency" not in im.info, (name, im.mode)


def test_loader_converts_16bit_and_alpha_rows_of_older_shards():
    """A shard written by an older d2v2-prep stores such files as found: the loader scales them too."""
    g16 = _png(np.full((8, 8), 32896, np.uint16), 0)
    assert np.asarray(augment.decode_image({"image": g16}, 3)).mean() == 128
    rgba = _save(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG")
    assert np.asarray(augment.decode_image({"image": rgba}, 3)).mean() == 255


# ---- manifests stay inside their folder ----------------------------------------------------------

def test_manifest_entries_outside_their_folder_are_refused(tmp_path):
    good = fx.prepared("image")
    outside = tmp_path / "secret.arrow"
    outside.write_bytes((good / "shard-00001.arrow").read_bytes())  # a valid shard, but not in the folder

    def corpus(name, entry=None):
        d = tmp_path / name
        d.mkdir()
        for sh in good.glob("shard-*.arrow"):
            (d / sh.name).write_bytes(sh.read_bytes())
        m = json.loads((good / "manifest.json").read_text())
        if entry is not None:
            m["shards"][1]["file"] = entry
        (d / "manifest.json").write_text(json.dumps(m))
        return d

    cases = {"../../etc/passwd": "(a .. path)", "/etc/passwd": "(an absolute path)", "a/../../x": "(a .. path)",
             "link.arrow": f"is a symlink to {outside}", 7: "is not a file name"}
    for k, (entry, why) in enumerate(cases.items()):
        d = corpus(f"m{k}", entry)
        (d / "link.arrow").symlink_to(outside)
        with pytest.raises(DataError) as e:
            ShardSet(d / "manifest.json", verify="none")
        msg = str(e.value)
        assert msg.startswith(f"{d / 'manifest.json'}: shards[1].file = {entry!r} ") and why in msg, msg
        assert "\n" not in msg and "re-run d2v2-prep" in msg
        # through the command a user types: one line, nothing opened
        if k == 0:
            r = subprocess.run([sys.executable, "-m", "data_prep.cli", "verify", str(d)], env=ENV,
                               capture_output=True, text=True)
            assert r.returncode == 1 and r.stderr.strip() == f"error: {msg}" and r.stdout == "", r
        with pytest.raises(SystemExit, match=re.escape(f"error: {msg}")):
            prep(["verify", str(d)])
    d = corpus("inside")  # a symlink that stays inside the folder is fine
    (d / "shard-00001.arrow").rename(d / "real-00001.arrow")
    (d / "shard-00001.arrow").symlink_to("real-00001.arrow")
    assert len(ShardSet(d, verify="full")) == 200
    # the text export's tokenizer path (spm_model.path) is held to the same rule
    from d2v2_scale.export import ExportError
    from d2v2_scale.export.hf import spm_tokenizer_files

    t = tmp_path / "text"
    t.mkdir()
    m = json.loads((fx.prepared("text") / "manifest.json").read_text())
    m["spm_model"]["path"] = "/etc/passwd"
    (t / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match=r"manifest.json: spm_model.path = '/etc/passwd' points outside"):
        spm_tokenizer_files({"data": {"manifest": str(t / "manifest.json")}}, {"modality": "text"})


def test_train_refuses_a_manifest_escaping_its_folder(tmp_path):
    good = fx.prepared("image")
    d = tmp_path / "evil"
    d.mkdir()
    m = json.loads((good / "manifest.json").read_text())
    m["shards"][0]["file"] = "../" * 12 + "etc/passwd"
    (d / "manifest.json").write_text(json.dumps(m))
    r = subprocess.run([sys.executable, "-m", "d2v2_scale.train", "--preset", "image-tiny",
                        f"data.manifest={d / 'manifest.json'}", "max_steps=1", f"output_dir={tmp_path / 'run'}"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "passwd" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "shards[0].file" in last and "points outside the manifest's folder" in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


# ---- text packing is linear in the document length -----------------------------------------------

def _spec_blocks(docs: list[tuple[np.ndarray, str]], block: int) -> list[tuple[list, list, int, str]]:
    """The packed rows by definition: all documents concatenated, cut every `block` tokens; a row's
    doc_offsets are the documents starting in it, its source the document running at its start."""
    toks = np.concatenate([t for t, _ in docs])
    starts = np.cumsum([0] + [len(t) for t, _ in docs[:-1]])
    out = []
    for a in range(0, len(toks), block):
        n = min(block, len(toks) - a)
        k = int(np.searchsorted(starts, a, side="right")) - 1
        src = docs[k][1] if starts[k] == a else f"{docs[k][1]}+{a - starts[k]}"
        out.append((toks[a:a + n].tolist(), [int(s - a) for s in starts if a <= s < a + n], n, src))
    return out


def test_text_packing_of_a_long_document_is_linear_and_exact():
    """One document of 300k tokens among 400 short ones, fed in random groups, with the packer's state
    saved and reloaded (a resumed run) at random points: the rows equal the definition, and the
    packer copies each token about once (the old packer re-sliced the rest of the document after
    every block: 300k tokens / 64 per block = 4700 copies of up to 300k tokens)."""
    from data_prep.text import BlockPacker

    rng = np.random.default_rng(0)
    block = 64
    docs = [(rng.integers(0, 8000, int(n)).astype(np.uint16), f"f@{i}")
            for i, n in enumerate(rng.integers(1, 3 * block, 400))]
    before = sum(len(t) for t, _ in docs[:150])
    n_long = 300_000 + (-(before + 300_000)) % block  # the next document starts on a block edge
    docs.insert(150, (rng.integers(0, 8000, n_long).astype(np.uint16), "long@0"))
    docs.insert(151, (rng.integers(0, 8000, 5 * block).astype(np.uint16), "edge@0"))
    rows, packer, copied, i = [], BlockPacker(block, wide=False), 0, 0
    while i < len(docs):
        g = int(rng.integers(1, 6))
        rows += packer.add([{"tokens": t, "source": s} for t, s in docs[i:i + g]])
        i += g
        if rng.random() < 0.3:  # a shard boundary: state to JSON and into a new packer
            copied += packer.copied
            state = json.loads(json.dumps(packer.state()))
            packer = BlockPacker(block, wide=False)
            packer.load(state)
    rows += packer.finish()
    copied += packer.copied
    got = [(r["tokens"].tolist(), r["doc_offsets"].tolist(), r["n_tokens"], r["source"]) for r in rows]
    assert got == _spec_blocks(docs, block)
    total = sum(len(t) for t, _ in docs)
    assert copied <= total + (len(docs) + 1) * block, (copied, total)  # each token once, plus carries
    for bad in ({"tokens": [1] * block, "docs": []}, {"tokens": [1], "docs": [[0, 1]]}, {"docs": "x"}, [1]):
        with pytest.raises(ValueError, match="not a text packer state"):  # a damaged progress file
            BlockPacker(block, wide=False).load(bad)


def test_text_chunking_finds_a_break_after_a_long_line(tmp_path):
    """chunk_file cuts after a separator that lies many reads (64 KiB each) past the nominal cut, and
    after a two-byte paragraph separator split across two reads."""
    from data_prep import text

    for sep, filler in ((b"\n", b"a"), (b"\n\n", b"b")):
        p = tmp_path / f"t{len(sep)}"
        first = text.CHUNK_BYTES + 3 * (1 << 16) - 1  # the separator starts on the last byte of a read
        p.write_bytes(filler * first + sep + b"tail" + sep)
        chunks = text.chunk_file(str(p), "t", sep)
        assert [(a, b) for _, _, a, b in chunks] == [(0, first + len(sep)), (first + len(sep), p.stat().st_size)]


# ---- one d2v2-prep per output folder -------------------------------------------------------------

def _images(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(2):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / str(c) / f"{i}.png")
    return root


def _prep_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_prep.cli", "image", str(src), "--out", str(out), "--workers", "1",
            "--shard-size-mb", "0.02", *extra]


def _is_exactly(out: Path, src: Path) -> None:
    """`out` holds the finished corpus of `src` and nothing of another run."""
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"] == str(src)
    assert sorted(p.name for p in out.glob("shard-*")) == [s["file"] for s in m["shards"]]
    assert ShardSet(out).scan() == []
    assert not list(out.glob(".*.tmp")) and not (out / ".progress.json").exists()


def _contents(out: Path) -> dict[str, bytes]:
    """Every file of `out` but the lock (which names the last run that held it)."""
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".d2v2-prep.lock"}


def test_two_preps_into_one_folder(tmp_path, capfd):
    a, b = _images(tmp_path / "A", 30, 0), _images(tmp_path / "B", 20, 1)
    out = tmp_path / "same"
    # 1. B starts while A holds the folder (A stopped mid-run with SIGSTOP: a real process, held there)
    pa = subprocess.Popen(_prep_cmd(a, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / ".d2v2-prep.lock"
    for _ in range(600):
        if lock.exists() and lock.read_text().startswith(f"pid {pa.pid} "):
            break
        assert pa.poll() is None, pa.communicate()
        time.sleep(0.05)
    os.kill(pa.pid, 19)  # SIGSTOP
    try:
        rb = subprocess.run(_prep_cmd(b, out), env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(pa.pid, 18)  # SIGCONT
    assert rb.returncode == 1 and rb.stdout == ""
    line = rb.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: --out {re.escape(str(out))} is being written by another d2v2-prep \(pid {pa.pid} "
                        rf"on \S+, started [^)]*: d2v2-prep image {re.escape(str(a))} --out {re.escape(str(out))} "
                        r".*\): wait for it to finish, or give another --out", line), line
    _, err = pa.communicate(timeout=300)
    assert pa.returncode == 0, err
    _is_exactly(out, a)
    # 2. another corpus into the finished folder: refused, nothing touched; the same job: nothing to do
    before = _contents(out)
    with pytest.raises(SystemExit, match="already holds a finished corpus"):
        prep(_prep_cmd(b, out)[3:])
    prep(_prep_cmd(a, out)[3:])  # nothing to do
    assert _contents(out) == before
    # 3. both started at once: one wins, the other says why; the folder is exactly the winner's corpus
    out2 = tmp_path / "race"
    procs = {src: subprocess.Popen(_prep_cmd(src, out2), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for src in (a, b)}
    res = {src: (p.wait(timeout=300), p.stderr.read()) for src, p in procs.items()}
    ok = [src for src, (rc, _) in res.items() if rc == 0]
    assert len(ok) == 1, res
    loser_msg = next(err for rc, err in res.values() if rc != 0).strip().splitlines()[-1]
    assert "is being written by another d2v2-prep" in loser_msg or "already holds a finished corpus" in loser_msg
    _is_exactly(out2, ok[0])
    # 4. --overwrite killed half-way: no manifest (the old corpus is not readable over new shards),
    #    and re-running it finishes the new corpus
    r = subprocess.run(_prep_cmd(b, out, "--overwrite"), env=dict(ENV, D2V2_PREP_EXIT_AFTER_SHARDS="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 75 and not (out / "manifest.json").exists()
    capfd.readouterr()
    prep(_prep_cmd(b, out)[3:])
    assert "resuming" in capfd.readouterr().err
    _is_exactly(out, b)
    victim = tmp_path / "victim.txt"  # a lock file planted as a symlink: refused, its target untouched
    victim.write_text("keep")
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / ".d2v2-prep.lock").symlink_to(victim)
    with pytest.raises(SystemExit, match=r"cannot create the lock file .*planted/.d2v2-prep.lock"):
        prep(_prep_cmd(a, tmp_path / "planted")[3:])
    assert victim.read_text() == "keep"


def test_text_prep_into_another_jobs_folder_changes_nothing(tmp_path):
    """A different text corpus into a finished text folder is refused before its sentencepiece model
    is trained into the folder (it replaced spm.model, and the finished corpus no longer matched its
    model); --spm-model is copied in, so the manifest names only files in its folder."""
    spm = str(fx.prepared("text") / "spm.model")
    t1, t2 = tmp_path / "t1.txt", tmp_path / "t2.txt"
    g = fx.wordnet_glosses(400)
    t1.write_text("\n".join(g[:200]) + "\n")
    t2.write_text("\n".join(g[200:]) + "\n")
    out = tmp_path / "o"
    prep(["text", str(t1), "--out", str(out), "--vocab-size", "300", "--workers", "1"])
    before = _contents(out)
    with pytest.raises(SystemExit, match="already holds a finished corpus"):
        prep(["text", str(t2), "--out", str(out), "--vocab-size", "300", "--workers", "1"])
    with pytest.raises(SystemExit, match="already holds a finished corpus"):
        prep(["text", str(t2), "--out", str(out), "--spm-model", spm, "--workers", "1"])
    assert _contents(out) == before
    prep(["text", str(t1), "--out", str(out), "--vocab-size", "300", "--workers", "1"])  # the same job: no-op
    assert _contents(out) == before
    (out / "spm.model").write_bytes(b"damaged")  # not trusted for the same job: trained again, restored
    prep(["text", str(t1), "--out", str(out), "--vocab-size", "300", "--workers", "1"])
    assert _contents(out) == before
    o2 = tmp_path / "o2"
    prep(["text", str(t2), "--out", str(o2), "--spm-model", spm, "--workers", "1", "--mode", "doc"])
    m = json.loads((o2 / "manifest.json").read_text())
    assert m["spm_model"]["path"] == "spm.model" and (o2 / "spm.model").read_bytes() == Path(spm).read_bytes()


def test_a_damaged_or_foreign_progress_file_is_not_resumed(tmp_path, capfd):
    """.progress.json is read from disk: a shard list naming other files, a shard changed since, or
    bytes that are not JSON are reported and the run starts over, ending in the right corpus."""
    import shutil

    src = _images(tmp_path / "A", 30, 0)
    ref = tmp_path / "ref"
    prep(["image", str(src), "--out", str(ref), "--workers", "1", "--shard-size-mb", "0.02"])
    killed = tmp_path / "killed"
    r = subprocess.run(_prep_cmd(src, killed), env=dict(ENV, D2V2_PREP_EXIT_AFTER_SHARDS="2"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 75 and len(json.loads((killed / ".progress.json").read_text())["shards"]) == 2
    (tmp_path / "secret.arrow").write_bytes((ref / "shard-00000.arrow").read_bytes())

    def outside(s):
        s["shards"][0]["file"] = "../secret.arrow"

    def swapped(s):  # a shard replaced after it was recorded
        s["shards"][1] = dict(s["shards"][1], footer_sha256="0" * 64)

    def bad_item(s):
        s["next_item"] = -4

    for k, (damage, why) in enumerate([(outside, "its entry for shard-00000.arrow is damaged"),
                                       (swapped, "shard-00001.arrow differs from what it recorded"),
                                       (bad_item, "it is damaged"), (None, "cannot be read")]):
        out = tmp_path / f"o{k}"
        shutil.copytree(killed, out)
        prog = out / ".progress.json"
        if damage is None:
            prog.write_bytes(b"\x00garbage")
        else:
            st = json.loads(prog.read_text())
            damage(st)
            prog.write_text(json.dumps(st))
        capfd.readouterr()
        prep(["image", str(src), "--out", str(out), "--workers", "1", "--shard-size-mb", "0.02"])
        err = capfd.readouterr().err
        assert why in err and "starting over" in err and "resuming" not in err, err
        assert json.loads((out / "manifest.json").read_text())["shards"] == \
            json.loads((ref / "manifest.json").read_text())["shards"]
    shutil.copytree(killed, tmp_path / "intact")  # the check does not stop an intact resume
    prep(["image", str(src), "--out", str(tmp_path / "intact"), "--workers", "1", "--shard-size-mb", "0.02"])
    assert "resuming" in capfd.readouterr().err
