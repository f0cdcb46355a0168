"""Small real corpora for the data tests (explicitly imported, not a conftest).

* images: scikit-learn's bundled digits (8x8 grey, 10 classes), written as PNG class folders
  (upscaled x4 so crops have something to work with);
* speech: asterisk-core-sounds-en-wav (8 kHz wav: exercises resampling), installed with apt
  when missing;
* spoken digits: the ten digit words synthesized by espeak-ng (many voices), installed with apt
  when missing;
* text: WordNet glosses from wordnet-base, installed with apt when missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


ASTERISK_DIR = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
WORDNET_DIR = Path("/usr/share/wordnet")


def apt_install(*pkgs: str) -> None:
    """Install apt packages (only called when their files are missing)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs], env=env, check=True,
                       capture_output=True)


def make_digit_images(root: Path, n_per_class: int = 20) -> Path:
    """ImageFolder tree root/<digit>/<i>.png of 32x32 grey PNGs from sklearn's digits."""
    from data_prep.demo import write_digit_folder

    return write_digit_folder(root, n_per_class=n_per_class, size=32)


def asterisk_wavs(n: int | None = 40) -> list[Path]:
    if not ASTERISK_DIR.is_dir():
        apt_install("asterisk-core-sounds-en-wav")
    files = sorted(p for p in ASTERISK_DIR.glob("*.wav") if p.stat().st_size > 8000)
    return files[:n] if n else files


def make_speech_folder(root: Path, n: int = 40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for p in asterisk_wavs(n):
        shutil.copy(p, root / p.name)
    return root


def espeak_digits(root: Path) -> Path:
    """root/<digit word>/*.wav: 1600 clips from espeak-ng (installed with apt when missing)."""
    from data_prep.demo import write_espeak_digits

    if shutil.which("espeak-ng") is None:
        apt_install("espeak-ng")
    return write_espeak_digits(root)


def wordnet_glosses(n: int | None = 3000) -> list[str]:
    """Definitions (the text after '| ') from WordNet's data.noun/verb, in file order."""
    if not (WORDNET_DIR / "data.noun").is_file():
        apt_install("wordnet-base")
    from data_prep.demo import wordnet_synset_lines

    out = []
    for line in wordnet_synset_lines(WORDNET_DIR):
        out.append(line.split("| ", 1)[1].strip())
        if n and len(out) >= n:
            return out
    return out


def make_text_folder(root: Path, n: int = 3000, files: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    g = wordnet_glosses(n)
    for k in range(files):
        (root / f"part{k}.txt").write_text("\n".join(g[k::files]) + "\n", encoding="utf-8")
    return root


# --------------------------------------------------------------------------------------------
# Prepared corpora, built once per test process (several test modules share them)
# --------------------------------------------------------------------------------------------

_BASE: Path | None = None
_CACHE: dict[str, Path] = {}


def base_dir() -> Path:
    global _BASE
    if _BASE is None:
        import atexit
        import tempfile

        _BASE = Path(tempfile.mkdtemp(prefix="d2v2-data-tests-"))
        atexit.register(shutil.rmtree, _BASE, True)
    return _BASE


def raw(kind: str) -> Path:
    """Raw input folder for 'image' | 'audio' | 'text'."""
    key = "raw-" + kind
    if key not in _CACHE:
        d = base_dir() / key
        {"image": make_digit_images, "audio": make_speech_folder, "text": make_text_folder}[kind](d)
        _CACHE[key] = d
    return _CACHE[key]


PREP_ARGS = {
    "image": ["--shard-size-mb", "0.02", "--pixels", "32"],
    "audio": ["--shard-size-mb", "0.5", "--min-seconds", "0.5", "--max-seconds", "3"],
    "text": ["--shard-size-mb", "0.05", "--vocab-size", "1000", "--block-size", "64"],
}


def prep_argv(kind: str, out: Path, extra=()) -> list[str]:
    return [kind, str(raw(kind)), "--out", str(out), "--workers", "2", *PREP_ARGS[kind], *extra]


def prepared(kind: str) -> Path:
    """Directory of a finished d2v2-prep run over the raw corpus of `kind`."""
    key = "prep-" + kind
    if key not in _CACHE:
        from data_prep.cli import main

        out = base_dir() / key
        os.environ["D2V2_PREP_NO_PROGRESS"] = "1"
        main(prep_argv(kind, out))
        _CACHE[key] = out
    return _CACHE[key]


def tiny_cfg(kind: str, manifest: Path, prefix: str = "", **data):
    """The tiny preset of `kind` (prefix "d2v1-": the data2vec 1.0 one) pointed at `manifest`, with
    data overrides."""
    from d2v2_scale.config import load_preset

    cfg = load_preset(f"{prefix}{kind}-tiny")
    cfg.data.manifest = str(manifest)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg
