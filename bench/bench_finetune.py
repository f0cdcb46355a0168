"""Does pretraining help fine-tuning?  CPU evidence for docs/BENCHMARKS.md ("Fine-tuning").

    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_finetune.py --work /tmp/ftbench [--seeds 0 1 2]
        [--only image|speech|speech-d2v1] [--pretrain-steps 300] [--d2v1-pretrain-steps 1000]

image:  sklearn digits (1,797, 32 px PNG class folders, data_prep/demo.write_digit_folder) ->
        d2v2-prep -> image-tiny pretrained on all of them (labels unused, as the probe evidence) ->
        d2v2-export --format hf -> d2v2-finetune image --recipe small (half the rows held out,
        stratified, split seed 0) from the export and from random init (--scratch), per seed.
speech: the espeak-ng spoken digits (data_prep/demo.write_espeak_digits: 8 accents x 10 voices x
        2 speeds) -> d2v2-prep --label-from parent -> audio-tiny pretrained on the clips of the
        training speakers only -> d2v2-finetune ctc --recipe small with transcripts = the digit
        words, held-out speakers = the accents en-gb-x-rp and en-gb-x-gbcwmd (all their voices).
speech-d2v1: the same CTC evidence for data2vec 1.0 through transformers' own classes:
        d2v1-audio-tiny pretrained 1,000 updates (--d2v1-pretrain-steps) on the training speakers
        (the 1.0 probe evidence's recipe) -> d2v2-export --format hf (Data2VecAudioModel) -> d2v2-finetune ctc
        (Data2VecAudioForCTC), the same split and small recipe.
Prints one JSON line per run and a markdown table of medians (accuracy / CER) over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HELD_OUT = r"/(en-gb-x-rp|en-gb-x-gbcwmd)_"
ENV = dict(os.environ, OMP_NUM_THREADS="1", D2V2_PREP_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")


def run(argv, **kw):
    t = time.time()
    r = subprocess.run(argv, env=ENV, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, argv))}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r.stdout, time.time() - t


def py(code, *args):
    return run([sys.executable, "-c", code, *map(str, args)])


def pretrain(work: Path, manifest: Path, preset: str, steps: int, name: str) -> Path:
    run_dir, hf = work / f"run-{name}", work / f"hf-{name}"
    if hf.is_dir():  # a finished export in --work is reused, but only one of the asked length
        done = json.loads((hf / "config.json").read_text()).get("d2v2_export", {}).get("step")
        if done is not None and done != steps:
            raise SystemExit(f"{hf} was pretrained {done} steps, not {steps}: give a fresh --work (the corpora "
                             f"esp/, esp-train/, digits/ may be copied into it) or remove {hf} and {run_dir}")
    else:
        _, t = py("import sys; from d2v2_scale.train import main; sys.exit(main(sys.argv[1:]))", "--preset", preset,
                  f"data.manifest={manifest}", f"output_dir={run_dir}", f"max_steps={steps}",
                  f"optim.total_steps={steps}", "optim.warmup_steps=10", "ema.decay=0.99", "ema.end_decay=0.99",
                  "seed=1", "parallel.zero_stage=0", f"checkpoint.every_steps={steps}")
        print(f"# pretrained {preset} {steps} steps in {t:.0f} s", flush=True)
        py("import sys; from d2v2_scale.export.cli import main; sys.exit(main(sys.argv[1:]))", run_dir,
           "--out", hf, "--format", "hf")
    return hf


def finetune(task, hf, manifest, out, seed, scratch, extra=()):
    argv = [sys.executable, "-m", "d2v2_scale.finetune.cli", task, str(hf), "--data", str(manifest), "--out", str(out),
            "--recipe", "small", "--seed", str(seed), *extra] + (["--scratch"] if scratch else [])
    stdout, t = run(argv)
    res = json.loads(stdout.strip().splitlines()[-1]) | {"wall_s": round(t, 1)}
    print(json.dumps(res), flush=True)
    return res


def espeak_corpora(work: Path) -> Path:
    """The espeak-ng digits (all speakers: esp/) and the training speakers' clips (esp-train/, what
    pretraining sees) -> esp/manifest.json."""
    man = work / "esp" / "manifest.json"
    if not man.is_file():
        py("import sys; from data_prep.demo import write_espeak_digits as w; w(sys.argv[1])", work / "raw-esp")
        py("import sys; from data_prep.cli import main; main(sys.argv[1:])", "audio", work / "raw-esp", "--out",
           work / "esp", "--label-from", "parent", "--min-seconds", "0.3", "--workers", "1")
        # pretraining sees the training speakers only
        for f in sorted((work / "raw-esp").glob("*/*.wav")):
            if not re.search(HELD_OUT, "/" + f.name):
                (work / "raw-esp-train" / f.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, work / "raw-esp-train" / f.parent.name / f.name)
        py("import sys; from data_prep.cli import main; main(sys.argv[1:])", "audio", work / "raw-esp-train", "--out",
           work / "esp-train", "--label-from", "parent", "--min-seconds", "0.3", "--workers", "1")
    return man


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", choices=["image", "speech", "speech-d2v1"], default=None)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--d2v1-pretrain-steps", type=int, default=1000)
    p.add_argument("--image-eval-fraction", type=float, default=0.5,
                   help="held-out share of the digits (0.9: 180 labelled training images)")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    table = []
    if a.only in (None, "image"):
        man = work / "digits" / "manifest.json"
        if not man.is_file():
            py("import sys; from data_prep.demo import write_digit_folder as w; w(sys.argv[1], size=32)", work / "raw-digits")
            py("import sys; from data_prep.cli import main; main(sys.argv[1:])", "image", work / "raw-digits", "--out",
               work / "digits", "--pixels", "32", "--workers", "1")
        hf = pretrain(work, man, "image-tiny", a.pretrain_steps, "image")
        for scratch in (False, True):
            f = a.image_eval_fraction
            accs = [finetune("image", hf, man, work / f"ft-image-{f}-{int(scratch)}-{s}", s, scratch,
                             ["--eval-fraction", str(f)])["accuracy"] for s in a.seeds]
            table.append((f"image-tiny, digits ({1 - f:.0%} labelled), accuracy", scratch, accs))
    if a.only in (None, "speech"):
        man = espeak_corpora(work)
        hf = pretrain(work, work / "esp-train" / "manifest.json", "audio-tiny", a.pretrain_steps, "speech")
        for scratch in (False, True):
            cers = [finetune("ctc", hf, man, work / f"ft-ctc-{int(scratch)}-{s}", s, scratch,
                             ["--eval-paths", HELD_OUT])["cer"] for s in a.seeds]
            table.append(("audio-tiny, espeak digits, CER (held-out speakers)", scratch, cers))
    if a.only in (None, "speech-d2v1"):
        # data2vec 1.0 through transformers' own Data2VecAudioForCTC: the same corpora, split and
        # fine-tuning recipe as 2.0 speech above; pretraining: the 1.0 probe evidence's recipe
        # (docs/BENCHMARKS.md "data2vec 1.0: short CPU pretraining and linear probe")
        man = espeak_corpora(work)
        hf = pretrain(work, work / "esp-train" / "manifest.json", "d2v1-audio-tiny", a.d2v1_pretrain_steps,
                      "speech-d2v1")
        for scratch in (False, True):
            cers = [finetune("ctc", hf, man, work / f"ft-ctc-d2v1-{int(scratch)}-{s}", s, scratch,
                             ["--eval-paths", HELD_OUT])["cer"] for s in a.seeds]
            table.append(("d2v1-audio-tiny, espeak digits, CER (held-out speakers)", scratch, cers))
    print("\n| task | init | median | per seed |\n|---|---|---|---|")
    for name, scratch, vals in table:
        print(f"| {name} | {'random' if scratch else 'pretrained'} | {statistics.median(vals):.3f} | "
              f"{' / '.join(f'{v:.3f}' for v in vals)} |")


if __name__ == "__main__":
    main()
