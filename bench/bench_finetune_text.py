"""Does pretraining help text fine-tuning?  CPU evidence for docs/BENCHMARKS.md ("Fine-tuning: text").

    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_finetune_text.py --work /tmp/fttext [--seeds 0 1 2]
        [--pretrain-steps 2000] [--every 6]

WordNet definitions labelled with their lexicographer file (45 topics, data_prep/demo.
write_wordnet_lexnames; `wordnet-base`) -> d2v2-prep text --mode pack (labels dropped, 64-token
blocks, sentencepiece 1000) -> text-tiny pretrained on all definitions (lr 2e-4, EMA 0.99, the
settings of docs/BENCHMARKS.md "Text: WordNet definitions") -> d2v2-export --format hf ->
d2v2-finetune text --recipe small on every `--every`-th definition (half held out, stratified,
split seed 0) from the export and from random init (--scratch), per seed.
Prints one JSON line per run and a markdown table of medians over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENV = dict(os.environ, OMP_NUM_THREADS="1", D2V2_PREP_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")


def run(argv):
    t = time.time()
    r = subprocess.run([str(a) for a in argv], env=ENV, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, argv))}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r.stdout, time.time() - t


def py(code, *args):
    return run([sys.executable, "-c", code, *args])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=6)
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: --recipe small's)")
    ap.add_argument("--lr", type=float, default=None, help="fine-tuning lr (default: --recipe small's)")
    a = ap.parse_args()
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    tsv, sub = w / "lexnames.tsv", w / f"lexnames-every{a.every}.tsv"
    if not sub.is_file():
        py("import sys; from data_prep.demo import write_wordnet_lexnames as f; f(sys.argv[1]); "
           "f(sys.argv[2], every=int(sys.argv[3]))", tsv, sub, a.every)
    pack = w / "wn_pack"
    if not (pack / "manifest.json").is_file():
        _, t = py("import sys; from data_prep.cli import main; sys.exit(main(sys.argv[1:]))", "text", tsv,
                  "--format", "tsv", "--mode", "pack", "--block-size", "64", "--vocab-size", "1000", "--out", pack)
        print(f"# prepared in {t:.0f} s", flush=True)
    run_dir, hf = w / "run", w / "hf"
    if not (hf / "config.json").is_file():
        n = a.pretrain_steps
        _, t = py("import sys; from d2v2_scale.train import main; sys.exit(main(sys.argv[1:]))", "--preset",
                  "text-tiny", f"data.manifest={pack / 'manifest.json'}", f"output_dir={run_dir}", f"max_steps={n}",
                  f"optim.total_steps={n}", "optim.warmup_steps=50", "optim.lr=2e-4", "ema.decay=0.99",
                  "ema.end_decay=0.99", "seed=1", "parallel.zero_stage=0", f"checkpoint.every_steps={n}")
        print(f"# pretrained text-tiny {n} steps in {t:.0f} s", flush=True)
        py("import sys; from d2v2_scale.export.cli import main; sys.exit(main(sys.argv[1:]))", run_dir, "--out", hf,
           "--format", "hf")
    res: dict[str, list[dict]] = {"pretrained": [], "scratch": []}
    for seed in a.seeds:
        for kind in res:
            out = w / f"ft-{kind}-{seed}"
            argv = [sys.executable, "-m", "d2v2_scale.finetune.cli", "text", hf, "--data", sub, "--out", out,
                    "--no-header", "--text-column", "1", "--label-column", "0", "--recipe", "small",
                    "--seed", seed] + (["--scratch"] if kind == "scratch" else []) + (
                        ["--steps", a.steps] if a.steps else []) + (["--lr", a.lr] if a.lr else [])
            _, t = run(argv)
            m = json.loads((out / "metrics.json").read_text())
            m = {k: v for k, v in m.items() if k != "classes"} | {"kind": kind, "wall_s": round(t)}
            print(json.dumps(m), flush=True)
            res[kind].append(m)
    print("\n| init | accuracy (median; per seed) | macro F1 (median) |\n|---|---|---|")
    for kind, ms in res.items():
        acc = [m["accuracy"] for m in ms]
        print(f"| {kind} | {statistics.median(acc):.3f} ({' / '.join(f'{x:.3f}' for x in acc)}) | "
              f"{statistics.median(m['macro_f1'] for m in ms):.3f} |")


if __name__ == "__main__":
    main()
