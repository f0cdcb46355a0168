"""Does pretraining help fine-tuning?  CPU evidence for docs/BENCHMARKS.md ("Fine-tuning").

    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_finetune.py --work /tmp/ftbench [--seeds 0 1 2]
        [--only image|speech|speech-d2v1] [--jobs 2] [--pretrain-steps 300 (speech)] [--d2v1-pretrain-steps 1000]
        [--ctc-train-rows 100] [--ctc-ft='--freeze-steps 1150']
        [--image-eval-fraction 0.5] [--image-pretrain-steps 4000] [--image-pretrain-schedule preset|fast-ema]
        [--image-pretrain-batch 16] [--image-ft='--lr 5e-4 ...']

image:  sklearn digits (1,797, 32 px PNG class folders, data_prep/demo.write_digit_folder) ->
        d2v2-prep -> image-tiny pretrained on all of them (labels unused, as the probe evidence; by
        default 4,000 updates of 16 images with the preset's EMA schedule, 1 process) ->
        d2v2-export --format hf -> d2v2-finetune image --recipe small (--image-eval-fraction of the
        rows held out, stratified, split seed 0) from the export and from random init (--scratch),
        per seed; --image-ft arguments go to both inits alike.
speech: the espeak-ng spoken digits (data_prep/demo.write_espeak_digits: 8 accents x 10 voices x
        2 speeds) -> d2v2-prep --label-from parent -> audio-tiny pretrained on the clips of the
        training speakers only -> d2v2-finetune ctc --recipe small with transcripts = the digit
        words, held-out speakers = the accents en-gb-x-rp and en-gb-x-gbcwmd (all their voices).
speech-d2v1: the same CTC evidence for data2vec 1.0 through transformers' own classes:
        d2v1-audio-tiny pretrained 1,000 updates (--d2v1-pretrain-steps) on the training speakers
        (the 1.0 probe evidence's recipe) -> d2v2-export --format hf (Data2VecAudioModel) -> d2v2-finetune ctc
        (Data2VecAudioForCTC), the same split and small recipe.
A run whose folder under --work already holds its result is reused, not rerun.
Prints one JSON line per run and a markdown table of medians (accuracy / CER) over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HELD_OUT = r"/(en-gb-x-rp|en-gb-x-gbcwmd)_"
CPU_S: list[float] = []  # list.append/pop are atomic: safe from the --jobs threads
ENV = dict(os.environ, OMP_NUM_THREADS="1", D2V2_PREP_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")


def run(argv):
    """(stdout, wall seconds); the child's own CPU seconds (user + system, from its wait4 rusage:
    correct with --jobs > 1, where os.times() would mix children) go to CPU_S."""
    t = time.time()
    with tempfile.TemporaryFile("w+") as o, tempfile.TemporaryFile("w+") as e:
        p = subprocess.Popen(argv, env=ENV, stdout=o, stderr=e, text=True)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        o.seek(0), e.seek(0)
        out, err = o.read(), e.read()
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, argv))}\n{out[-2000:]}\n{err[-4000:]}")
    CPU_S.append(ru.ru_utime + ru.ru_stime)
    return out, time.time() - t


def py(code, *args):
    return run([sys.executable, "-c", code, *map(str, args)])


def pretrain_overrides(steps: int, schedule: str, batch: int | None = None) -> list[str]:
    """d2v2-train overrides: "fast-ema" = 10 warm-up updates and a constant EMA 0.99 (the CI
    probe test's short-run setting); "preset" = the preset's EMA ramp 0.998 -> 0.9999 annealed
    over the run and 100 warm-up updates (the 4,000-update linear-probe evidence in
    docs/BENCHMARKS.md "Linear probe (CPU)")."""
    ov = [f"max_steps={steps}", f"optim.total_steps={steps}", "seed=1", "parallel.zero_stage=0",
          f"checkpoint.every_steps={steps}"]
    if schedule == "fast-ema":
        ov += ["optim.warmup_steps=10", "ema.decay=0.99", "ema.end_decay=0.99"]
    else:
        ov += ["optim.warmup_steps=100", f"ema.anneal_end_step={steps}"]
    return ov + ([f"data.batch_size={batch}"] if batch else [])


def pretrain(work: Path, manifest: Path, preset: str, steps: int, name: str, schedule: str = "fast-ema",
             batch: int | None = None) -> Path:
    run_dir, hf = work / f"run-{name}", work / f"hf-{name}"
    if hf.is_dir():  # a finished export in --work is reused, but only one of the asked length
        done = json.loads((hf / "config.json").read_text()).get("d2v2_export", {}).get("step")
        if done is not None and done != steps:
            raise SystemExit(f"{hf} was pretrained {done} steps, not {steps}: give a fresh --work (the corpora "
                             f"esp/, esp-train/, digits/ may be copied into it) or remove {hf} and {run_dir}")
    else:
        if (run_dir / "checkpoints" / f"step_{steps:08d}" / "COMPLETE").is_file():  # pretrained, not exported
            print(f"# reusing {run_dir} ({steps} steps)", flush=True)
        else:
            _, t = py("import sys; from d2v2_scale.train import main; sys.exit(main(sys.argv[1:]))", "--preset", preset,
                      f"data.manifest={manifest}", f"output_dir={run_dir}", *pretrain_overrides(steps, schedule, batch))
            print(f"# pretrained {preset} {steps} steps ({schedule}) in {t:.0f} s wall, {CPU_S.pop():.0f} s CPU",
                  flush=True)
        py("import sys; from d2v2_scale.export.cli import main; sys.exit(main(sys.argv[1:]))", run_dir,
           "--out", hf, "--format", "hf")
    return hf


def finetune(task, hf, manifest, out, seed, scratch, extra=()):
    if (Path(out) / "metrics.json").is_file() and (Path(out) / "bench.json").is_file():  # an earlier run of this bench
        res = json.loads((Path(out) / "bench.json").read_text())
        print(json.dumps(res | {"reused": True}), flush=True)
        return res
    argv = [sys.executable, "-m", "d2v2_scale.finetune.cli", task, str(hf), "--data", str(manifest), "--out", str(out),
            "--recipe", "small", "--seed", str(seed), *extra] + (["--scratch"] if scratch else [])
    stdout, t = run(argv)
    res = json.loads(stdout.strip().splitlines()[-1]) | {"wall_s": round(t, 1), "cpu_s": round(CPU_S.pop(), 1)}
    (Path(out) / "bench.json").write_text(json.dumps(res))
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


def ctc_rows(a, hf, man, work: Path, prefix: str, preset: str) -> list:
    """Pretrained and random-init CTC runs per seed (a.jobs at once) -> table rows."""
    n, tag = a.ctc_train_rows, "-".join(a.ctc_ft).replace("--", "")
    extra = ["--eval-paths", HELD_OUT] + (["--train-rows", str(n)] if n else []) + a.ctc_ft
    name = prefix + (f"-r{n}" if n else "") + (f"-{tag}" if tag else "")
    jobs = [(scratch, s) for scratch in (False, True) for s in a.seeds]
    with ThreadPoolExecutor(a.jobs) as ex:  # each job is a subprocess: threads only wait
        res = list(ex.map(lambda j: finetune("ctc", hf, man, work / f"{name}-{int(j[0])}-{j[1]}", j[1], j[0], extra),
                          jobs))
    labelled = f"{res[0]['n_train']} labelled clips" + (f", {' '.join(a.ctc_ft)}" if a.ctc_ft else "")
    return [(f"{preset}, espeak digits ({labelled}), CER (held-out speakers)", scratch,
             [r["cer"] for (sc, _), r in zip(jobs, res) if sc == scratch]) for scratch in (False, True)]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", choices=["image", "speech", "speech-d2v1"], default=None)
    p.add_argument("--pretrain-steps", type=int, default=300, help="speech")
    p.add_argument("--d2v1-pretrain-steps", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=1, help="fine-tuning runs at once")
    p.add_argument("--ctc-train-rows", type=int, default=None, metavar="N",
                   help="speech, speech-d2v1: fine-tune on N labelled clips of the training speakers "
                        "(d2v2-finetune --train-rows; pretraining still sees all of their clips)")
    p.add_argument("--image-eval-fraction", type=float, default=0.5,
                   help="held-out share of the digits (0.9: 180 labelled training images)")
    p.add_argument("--image-pretrain-steps", type=int, default=4000)
    p.add_argument("--image-pretrain-schedule", choices=["preset", "fast-ema"], default="preset")
    p.add_argument("--image-pretrain-batch", type=int, default=16,
                   help="samples per update in the 1-process run (the probe evidence: 2 ranks x 8)")
    p.add_argument("--image-ft", type=shlex.split, default=[], metavar="'ARGS'",
                   help="extra d2v2-finetune image arguments, the same for both inits (e.g. --image-ft='--lr 5e-4')")
    p.add_argument("--ctc-ft", type=shlex.split, default=[], metavar="'ARGS'",
                   help="extra d2v2-finetune ctc arguments, the same for both inits (e.g. --ctc-ft='--freeze-steps 1150')")
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
        st, sc = a.image_pretrain_steps, a.image_pretrain_schedule
        hf = pretrain(work, man, "image-tiny", st, f"image-{st}-{sc}-b{a.image_pretrain_batch}", sc,
                      a.image_pretrain_batch)
        f, tag = a.image_eval_fraction, "-".join(a.image_ft).replace("--", "")
        jobs = [(scratch, s) for scratch in (False, True) for s in a.seeds]

        def one(job):
            scratch, seed = job
            # random-init runs depend on the architecture only: shared by every --image-pretrain-*
            out = work / f"ft-{'scratch' if scratch else hf.name}-{f}{'-' + tag if tag else ''}-{seed}"
            return finetune("image", hf, man, out, seed, scratch, ["--eval-fraction", str(f), *a.image_ft])

        with ThreadPoolExecutor(a.jobs) as ex:  # each job is a subprocess: threads only wait
            res = list(ex.map(one, jobs))
        for scratch in (False, True):
            accs = [r["accuracy"] for (was_scratch, _), r in zip(jobs, res) if was_scratch == scratch]
            n = res[0]["n_train"]
            table.append((f"image-tiny ({st} updates, {sc}), digits ({n} labelled"
                          f"{', ' + ' '.join(a.image_ft) if a.image_ft else ''}), accuracy", scratch, accs))
    if a.only in (None, "speech"):
        man = espeak_corpora(work)
        hf = pretrain(work, work / "esp-train" / "manifest.json", "audio-tiny", a.pretrain_steps, "speech")
        table += ctc_rows(a, hf, man, work, "ft-ctc", "audio-tiny")
    if a.only in (None, "speech-d2v1"):
        # data2vec 1.0 through transformers' own Data2VecAudioForCTC: the same corpora, split and
        # fine-tuning recipe as 2.0 speech above; pretraining: the 1.0 probe evidence's recipe
        # (docs/BENCHMARKS.md "data2vec 1.0: short CPU pretraining and linear probe")
        man = espeak_corpora(work)
        hf = pretrain(work, work / "esp-train" / "manifest.json", "d2v1-audio-tiny", a.d2v1_pretrain_steps,
                      "speech-d2v1")
        table += ctc_rows(a, hf, man, work, "ft-ctc-d2v1", "d2v1-audio-tiny")
    print("\n| task | init | median | per seed |\n|---|---|---|---|")
    for name, scratch, vals in table:
        print(f"| {name} | {'random' if scratch else 'pretrained'} | {statistics.median(vals):.3f} | "
              f"{' / '.join(f'{v:.3f}' for v in vals)} |")


if __name__ == "__main__":
    main()
