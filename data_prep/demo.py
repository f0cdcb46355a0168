"""Small real corpora that install with a registry package, written out in the input formats of
`d2v2-prep`, so they go through it like any corpus:

* images: scikit-learn's bundled handwritten digits (1797 grey 8x8 images, 10 classes, from the
  UCI optical digits set) as an ImageFolder tree of PNGs (`write_digit_folder`);
* text: WordNet's definitions (Debian/Ubuntu package wordnet-base) labelled with their
  lexicographer file (45 topics: noun.animal, verb.motion, ...) as `label<TAB>text` lines for
  `d2v2-prep text --format tsv` (`write_wordnet_lexnames`);
* speech: the ten digit words spoken by espeak-ng (package espeak-ng) in 8 English accents x 10
  voice variants x 2 speeds, as a `<word>/<accent>_<variant>_<speed>.wav` tree for
  `d2v2-prep audio --label-from parent` (`write_espeak_digits`): synthetic, but many "speakers"
  per class, which the one-speaker asterisk prompts (already a labelled folder tree) lack."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def write_digit_folder(root: str | Path, n_per_class: int | None = None, size: int = 32) -> Path:
    """root/<digit>/<NNN>.png, grey, upscaled to size x size (nearest: keeps the strokes sharp).

    Deterministic (same files, same bytes on every run); returns root."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    d = load_digits()
    counts: dict[int, int] = {}
    for img, lab in zip(d.images, d.target):
        lab = int(lab)
        if n_per_class is not None and counts.get(lab, 0) >= n_per_class:
            continue
        counts[lab] = counts.get(lab, 0) + 1
        (root / str(lab)).mkdir(parents=True, exist_ok=True)
        arr = (img * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(arr, "L").resize((size, size), Image.Resampling.NEAREST).save(
            root / str(lab) / f"{counts[lab]:03d}.png")
    return root


# WordNet's lexicographer files by number (lexnames(5WN)); field 2 of every data.* line.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
    "adj.ppl").split()


def wordnet_lexname_docs(wordnet_dir: str | Path = "/usr/share/wordnet",
                         parts=("noun", "verb", "adj", "adv")) -> list[tuple[str, str]]:
    """(lexname, definition) per synset of data.<part>, in file order.

    The definition is the gloss without its quoted examples (the text after '| ' up to the first
    '; "'), so a document is the definition the lexname classifies."""
    out = []
    for line in wordnet_synset_lines(wordnet_dir, parts):
        gloss = line.split("| ", 1)[1].split('; "', 1)[0].strip()
        if gloss:
            out.append((LEXNAMES[int(line.split(" ", 3)[1])], gloss))
    return out


def wordnet_synset_lines(wordnet_dir: str | Path = "/usr/share/wordnet", parts=("noun", "verb", "adj", "adv")):
    """The synset lines of data.<part> in file order (the licence header skipped); the gloss is
    the text after '| '."""
    for part in parts:
        for line in (Path(wordnet_dir) / f"data.{part}").read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.startswith(" ") and "| " in line:
                yield line


def write_wordnet_lexnames(path: str | Path, wordnet_dir: str | Path = "/usr/share/wordnet",
                           parts=("noun", "verb", "adj", "adv"), every: int = 1) -> Path:
    """path: `lexname<TAB>definition` lines (every `every`-th synset, deterministic); returns path."""
    docs = wordnet_lexname_docs(wordnet_dir, parts)[::every]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{lab}\t{' '.join(text.split())}\n" for lab, text in docs), encoding="utf-8")
    return path


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ESPEAK_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd",
                  "en-029", "en-us-nyc")
ESPEAK_VARIANTS = ("Alex", "Andy", "Annie", "belinda", "benjamin", "boris", "caleb", "croak", "david", "ed")


def write_espeak_digits(root: str | Path, accents=ESPEAK_ACCENTS, variants=ESPEAK_VARIANTS,
                        speeds=(140, 180), words=DIGIT_WORDS, workers: int = 4) -> Path:
    """root/<word>/<accent>_<variant>_<speed>.wav spoken by espeak-ng (22.05 kHz mono wav; d2v2-prep
    resamples).  The defaults make 8 x 10 x 2 = 160 clips per word, 1600 in all, in ~20 s.

    Deterministic: espeak-ng synthesizes the same samples for the same voice, speed and text.
    Returns root.  Needs the `espeak-ng` program (Debian/Ubuntu package espeak-ng)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed: apt-get install espeak-ng")
    root = Path(root)
    for w in words:
        (root / w).mkdir(parents=True, exist_ok=True)

    def speak(job) -> None:
        accent, variant, speed, word = job
        path = root / word / f"{accent}_{variant}_{speed}.wav"
        tmp = path.with_name(path.name + ".part")  # not *.wav: d2v2-prep never reads it
        subprocess.run([exe, "-v", f"{accent}+{variant}", "-s", str(speed), "-w", str(tmp), word], check=True,
                       capture_output=True)
        tmp.rename(path)  # a finished file or none: an interrupted run leaves no half-written wav

    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(speak, itertools.product(accents, variants, speeds, words)))
    return root
