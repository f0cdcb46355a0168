"""d2v2-prep on small real corpora: round trips, bad inputs, kill-and-restart."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from scipy.signal import resample_poly

sys.path.insert(0, str(Path(__file__).parent))
import data_fixtures as fx  # noqa: E402

from d2v2_scale.data.manifest import sha256_file  # noqa: E402
from d2v2_scale.data.shards import ShardSet  # noqa: E402
from data_prep.audio import to_int16  # noqa: E402
from data_prep.cli import main as prep  # noqa: E402

os.environ["D2V2_PREP_NO_PROGRESS"] = "1"


def _rows(out):
    s = ShardSet(out, verify="full")
    return s, [s.get(i) for i in range(len(s))]


def test_cli_help():
    for sub in ("image", "audio", "text"):
        r = subprocess.run([sys.executable, "-m", "data_prep.cli", sub, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "--out" in r.stdout and "--shard-size-mb" in r.stdout
        assert "(default: 256.0)" in " ".join(r.stdout.split())
    # every option of every subcommand shows its default (required --out says "required")
    from data_prep.cli import build_parser

    subs = next(a for a in build_parser()._actions if a.dest == "modality").choices
    for name, sp in subs.items():
        fmt = sp._get_formatter()
        for a in sp._actions:
            if a.option_strings and a.dest not in ("help", "out"):
                assert "%(default)" in fmt._get_help_string(a), (name, a.option_strings)


def test_image_round_trip():
    out = fx.prepared("image")
    raw = fx.raw("image")
    s, rows = _rows(out)
    m = s.manifest
    assert m["modality"] == "image" and m["classes"] == [str(i) for i in range(10)]
    assert len(m["shards"]) > 1 and sum(x["rows"] for x in m["shards"]) == len(rows) == 200
    files = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*.png"))
    assert [r["path"] for r in rows] == files  # sorted, deterministic order
    for r in rows:
        src = raw / r["path"]
        assert bytes(r["image"]) == src.read_bytes()  # stored as found
        assert r["label"] == int(Path(r["path"]).parts[0])
        im = np.asarray(Image.open(src))
        assert (r["width"], r["height"]) == (im.shape[1], im.shape[0])
        assert (np.asarray(r["pixels"]).reshape(r["pix_height"], r["pix_width"]) == im).all()


def test_audio_round_trip_resampled():
    out = fx.prepared("audio")
    s, rows = _rows(out)
    assert s.manifest["sample_rate"] == 16000
    by_path = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    assert len(by_path) >= 30
    for path, segs in list(by_path.items())[:10]:
        x, sr = sf.read(fx.raw("audio") / path, dtype="float64")
        assert sr == 8000  # the asterisk prompts are 8 kHz: they went through the resampler
        y = to_int16(resample_poly(x, 2, 1))
        got = np.concatenate([np.asarray(r["audio"]) for r in sorted(segs, key=lambda r: r["segment"])])
        assert (got == y[:len(got)]).all()
        assert all(r["n_samples"] == len(r["audio"]) <= 3 * 16000 for r in segs)


def test_audio_int16_at_16k_is_bit_exact(tmp_path):
    src = tmp_path / "wav16"
    src.mkdir()
    originals = {}
    for p in fx.asterisk_wavs(6):
        x, _ = sf.read(p, dtype="float64")
        y = to_int16(resample_poly(x, 2, 1))
        sf.write(src / p.name, y, 16000, subtype="PCM_16")
        originals[p.name] = y
    prep(["audio", str(src), "--out", str(tmp_path / "o"), "--no-resample", "--min-seconds", "0.1",
          "--max-seconds", "60", "--workers", "1"])
    _, rows = _rows(tmp_path / "o")
    assert len(rows) == len(originals)
    for r in rows:
        assert (np.asarray(r["audio"]) == originals[r["path"]]).all()


def test_text_round_trip_doc_and_pack(tmp_path):
    import sentencepiece as spm

    out = fx.prepared("text")
    s, rows = _rows(out)
    m = s.manifest
    assert m["vocab_size"] == 1000 and m["pad_id"] == 1 and m["eos_id"] == 2
    assert m["spm_model"]["sha256"] == sha256_file(out / m["spm_model"]["path"])
    assert all(r["n_tokens"] == len(r["tokens"]) <= 64 for r in rows)
    # the same corpus, one row per document, with the same sentencepiece model
    prep(["text", str(fx.raw("text")), "--out", str(tmp_path / "doc"), "--mode", "doc", "--workers", "2",
          "--spm-model", str(out / "spm.model")])
    _, docs = _rows(tmp_path / "doc")
    packed = np.concatenate([np.asarray(r["tokens"]) for r in rows])
    assert (packed == np.concatenate([np.asarray(d["tokens"]) for d in docs])).all()
    # doc offsets of the packed blocks point at document starts
    starts = np.cumsum([0] + [len(d["tokens"]) for d in docs])[:-1]
    block_starts = np.concatenate([np.asarray(r["doc_offsets"]) + 64 * i for i, r in enumerate(rows)])
    assert (block_starts == starts).all()
    # decoded text equals the input documents (sentencepiece only normalizes whitespace here)
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    text = [line for f in sorted(fx.raw("text").glob("*.txt")) for line in f.read_text().splitlines() if line]
    decoded = [sp.decode([int(t) for t in d["tokens"][:-1]]) for d in docs]
    same = sum(a == " ".join(b.split()) for a, b in zip(decoded, text))
    assert len(decoded) == len(text) and same / len(text) > 0.98, same / len(text)


def test_bad_inputs_are_skipped_and_reported(tmp_path):
    # images: corrupt, empty, truncated, plus good ones
    img = tmp_path / "img"
    (img / "a").mkdir(parents=True)
    good = sorted(fx.raw("image").rglob("*.png"))[:3]
    for p in good:
        (img / "a" / p.name).write_bytes(p.read_bytes())
    (img / "a" / "corrupt.png").write_bytes(b"\x89PNG not really an image" * 10)
    (img / "a" / "empty.jpg").write_bytes(b"")
    (img / "a" / "truncated.png").write_bytes(good[0].read_bytes()[:60])
    prep(["image", str(img), "--out", str(tmp_path / "io"), "--workers", "2"])
    rep = json.loads((tmp_path / "io" / "report.json").read_text())
    reasons = {s["source"]: s["reason"] for s in rep["skips"]}
    assert set(reasons) == {"a/corrupt.png", "a/empty.jpg", "a/truncated.png"}
    assert reasons["a/empty.jpg"] == "empty file" and reasons["a/corrupt.png"].startswith("cannot decode")
    assert json.loads((tmp_path / "io" / "manifest.json").read_text())["num_rows"] == 3

    # audio: empty, garbage, too short, 44.1 kHz stereo (fine with resampling, skipped without)
    wav = tmp_path / "wav"
    wav.mkdir()
    for p in fx.asterisk_wavs(3):
        (wav / p.name).write_bytes(p.read_bytes())
    (wav / "empty.wav").write_bytes(b"")
    (wav / "garbage.wav").write_bytes(os.urandom(5000))
    sf.write(wav / "short.wav", np.zeros(800, np.int16), 16000)
    t = np.arange(44100 * 2) / 44100
    sf.write(wav / "stereo44k.flac", np.stack([np.sin(2 * np.pi * 440 * t)] * 2, 1) * 0.3, 44100)
    prep(["audio", str(wav), "--out", str(tmp_path / "ao"), "--min-seconds", "0.5", "--workers", "2"])
    rep = json.loads((tmp_path / "ao" / "report.json").read_text())
    reasons = {s["source"]: s["reason"] for s in rep["skips"]}
    assert set(reasons) == {"empty.wav", "garbage.wav", "short.wav"}
    assert reasons["empty.wav"] == "empty file" and reasons["garbage.wav"].startswith("unreadable")
    assert reasons["short.wav"].startswith("too short")
    s = ShardSet(tmp_path / "ao")
    st = [s.get(i) for i in range(len(s)) if s.get(i)["path"] == "stereo44k.flac"]
    assert len(st) == 1 and st[0]["n_samples"] == 32000
    with pytest.raises(SystemExit, match="no rows written: all 7 inputs were skipped"):  # nothing at 16 kHz
        prep(["audio", str(wav), "--out", str(tmp_path / "ao2"), "--no-resample", "--min-seconds", "0.5"])
    rep = json.loads((tmp_path / "ao2" / "report.json").read_text())
    assert rep["skipped_by_reason"]["wrong sample rate"] == 4  # three 8 kHz prompts + the 44.1 kHz file

    # text: a non-UTF-8 line, an empty file
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "a.txt").write_bytes("good line one\n".encode() + b"bad \xff\xfe line\n" + "caf\u00e9 ok\n".encode())
    (txt / "empty.txt").write_bytes(b"")
    (txt / "b.txt").write_text("\n".join(fx.wordnet_glosses(300)) + "\n")
    prep(["text", str(txt), "--out", str(tmp_path / "to"), "--vocab-size", "300", "--mode", "doc"])
    rep = json.loads((tmp_path / "to" / "report.json").read_text())
    reasons = {s["source"]: s["reason"] for s in rep["skips"]}
    assert reasons == {"txt/a.txt@14": "not UTF-8: invalid start byte at byte 4", "txt/empty.txt": "empty file"}
    assert json.loads((tmp_path / "to" / "manifest.json").read_text())["num_rows"] == 302


@pytest.mark.parametrize("kind", ["image", "audio", "text"])
def test_kill_and_restart_gives_identical_shards(kind, tmp_path):
    ref = fx.prepared(kind)
    n_ref = len(json.loads((ref / "manifest.json").read_text())["shards"])
    assert n_ref >= 3
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_prep.cli", *fx.prep_argv(kind, out)]
    env = dict(os.environ, D2V2_PREP_EXIT_AFTER_SHARDS="2", D2V2_PREP_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 75, r.stderr  # died abruptly after 2 shards
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("shard-*.arrow")) == ["shard-00000.arrow", "shard-00001.arrow"]
    assert not list(out.glob(".*.tmp"))
    env.pop("D2V2_PREP_EXIT_AFTER_SHARDS")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    m_ref = json.loads((ref / "manifest.json").read_text())
    m_new = json.loads((out / "manifest.json").read_text())
    assert m_new["shards"] == m_ref["shards"]  # names, rows, sizes, sha256 all equal
    assert ShardSet(out).scan() == []  # every row matches the checksum written with it
    for sh in m_ref["shards"]:
        assert (out / sh["file"]).read_bytes() == (ref / sh["file"]).read_bytes()
    assert json.loads((out / "report.json").read_text())["skips"] == \
        json.loads((ref / "report.json").read_text())["skips"]
    # running again is a no-op
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "nothing to do" in r.stderr


# ---- prep papercuts -----------------------------------------------------------------------------

def _text_spm():
    return str(fx.prepared("text") / "spm.model")  # a trained model: these tests need no training


def test_text_symlink_aliases_are_read_once_and_reported(tmp_path):
    d = tmp_path / "fortunes"
    d.mkdir()
    g = fx.wordnet_glosses(60)
    (d / "art").write_text("\n".join(g[:40]) + "\n")
    (d / "zen").write_text("\n".join(g[40:]) + "\n")
    (d / "art.u8").symlink_to("art")  # the fortunes package's layout
    (d / "zen.u8").symlink_to(d / "zen")
    (d / ".hidden").write_text("not a document\n")
    # a folder linked in (os.walk alone skips it silently), linked twice, and a link back up (a loop)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "tao").write_text("\n".join(fx.wordnet_glosses(70)[60:]) + "\n")
    (d / "more").symlink_to(tmp_path / "extra")
    (d / "more2").symlink_to("more")
    (d / "loop").symlink_to(".")
    prep(["text", str(d), "--out", str(tmp_path / "o"), "--mode", "doc", "--spm-model", _text_spm(),
          "--workers", "1"])
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["num_rows"] == 70 and m["source"] == ["fortunes/art", "fortunes/more/tao", "fortunes/zen"]
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["ignored_files"] == [
        {"source": "fortunes/.hidden", "reason": "hidden file"},
        {"source": "fortunes/art.u8", "reason": "alias of fortunes/art (same file, read once)"},
        {"source": "fortunes/more2/tao", "reason": "alias of fortunes/more/tao (same file, read once)"},
        {"source": "fortunes/zen.u8", "reason": "alias of fortunes/zen (same file, read once)"}]
    assert rep["ignored_by_reason"] == {"hidden file": 1, "alias": 3}


def test_image_unsupported_files_listed_and_report_is_reproducible(tmp_path):
    src = tmp_path / "img"
    (src / "a").mkdir(parents=True)
    for p in sorted(fx.raw("image").rglob("*.png"))[:3]:
        (src / "a" / p.name).write_bytes(p.read_bytes())
    (src / "a" / "notes.txt").write_text("x")
    (src / "a" / "scan.heic").write_bytes(b"x")
    (src / "a" / "alias.png").symlink_to(src / "a" / p.name)
    (src / "a" / "corrupt.png").write_bytes(b"not an image at all" * 8)  # PIL names a BytesIO at 0x...
    (src / "a" / "loop").symlink_to("..")  # a link back up: not walked again (nor forever)
    outs = [tmp_path / "o1", tmp_path / "o2"]
    for o in outs:
        prep(["image", str(src), "--out", str(o), "--workers", "1"])
    rep = json.loads((outs[0] / "report.json").read_text())
    assert {(x["source"], x["reason"].split(" (")[0]) for x in rep["ignored_files"]} == {
        ("a/notes.txt", "unsupported extension '.txt'"), ("a/scan.heic", "unsupported extension '.heic'"),
        ("a/alias.png", f"alias of a/{p.name}")}
    assert rep["rows"] == 3 and [x["source"] for x in rep["skips"]] == ["a/corrupt.png"]
    assert (outs[0] / "report.json").read_bytes() == (outs[1] / "report.json").read_bytes()
    assert "0x" not in (outs[0] / "report.json").read_text()


def test_out_and_source_errors(tmp_path, capsys):
    txt = tmp_path / "t.txt"
    txt.write_text("\n".join(fx.wordnet_glosses(20)) + "\n")
    base = ["text", str(txt), "--spm-model", _text_spm(), "--workers", "1", "--mode", "doc"]

    def fails(argv, match):
        with pytest.raises(SystemExit) as e:
            prep(argv)
        msg = str(e.value.code)
        assert "\n" not in msg and msg.startswith("error:"), msg
        assert re.search(match, msg), msg

    fails(base + ["--out", str(txt)], rf"--out {re.escape(str(txt))} is a file, not a folder")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("x")
    fails(base + ["--out", str(busy)], r"holds files d2v2-prep did not write \(thesis.tex\).*--overwrite")
    assert sorted(p.name for p in busy.iterdir()) == ["thesis.tex"]  # nothing written
    prep(base + ["--out", str(busy), "--overwrite"])
    assert (busy / "manifest.json").exists() and (busy / "thesis.tex").exists()
    prep(base + ["--out", str(busy)])  # only its own files now: a re-run is fine
    fails(["text", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")], r"nope.txt does not exist")
    fails(["text", str(txt), "--spm-model", str(tmp_path / "nope.model"), "--out", str(tmp_path / "o")],
          r"--spm-model .*nope.model does not exist")
    fails(["text", str(txt), "--spm-model", str(txt), "--out", str(tmp_path / "o")],
          r"--spm-model .*t.txt is not a sentencepiece model")
    assert not (tmp_path / "o").exists()
    fails(["image", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], r"nope does not exist")
    fails(["audio", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], r"nope does not exist")
    # all inputs bad: a non-zero exit (report written, no manifest)
    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    (bad / "a" / "x.png").write_bytes(b"junk")
    (bad / "a" / "y.jpg").write_bytes(b"")
    fails(["image", str(bad), "--out", str(tmp_path / "bo"), "--workers", "1"], r"no rows written: all 2 inputs")
    assert (tmp_path / "bo" / "report.json").exists() and not (tmp_path / "bo" / "manifest.json").exists()
    r = subprocess.run([sys.executable, "-m", "data_prep.cli", "image", str(bad), "--out", str(tmp_path / "bo2"),
                        "--workers", "1"], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: no rows written")
