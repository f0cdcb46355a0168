"""`d2v2-quickstart`: a real, tiny data2vec 2.0 pretraining end to end on a CPU.

1. writes scikit-learn's bundled handwritten digits (1797 real images) as an image folder;
2. turns it into Arrow shards with `d2v2-prep image`;
3. pretrains the `image-tiny` preset (2 blocks, width 64, M=4 masks per image) in 2 processes
   under DeepSpeed ZeRO-3 with the sharded EMA teacher, via torchrun;
4. exports the EMA teacher (d2v2-export) and runs the linear probe (d2v2-probe) on the same
   digits, against the random-init twin (the weights pretraining started from): both accuracies;
5. prints where the TensorBoard logs, the checkpoint and the export are.

The quickstart runs data2vec 2.0; the other systems train the same way with their presets
(d2v2-train --preset d2v1-image-tiny for data2vec 1.0, --preset aqc-tiny for data2vec-aqc speech).

A few minutes on a 2-core laptop.  Everything goes under --out (default runs/quickstart).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from data_prep.cli import main as prep_main
from data_prep.demo import write_digit_folder
from .distributed import free_port
from .export import export_checkpoint
from .export.probe import run_probe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="d2v2-quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="where data, logs and checkpoints go")
    p.add_argument("--steps", type=int, default=300, help="optimizer updates (default 300)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    p.add_argument("--zero-stage", type=int, default=3, choices=(0, 1, 2, 3))
    p.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.depth=4")
    args = p.parse_args(argv)

    out = Path(args.out)
    raw, shards, run = out / "digits", out / "shards", out / "train"
    manifest = shards / "manifest.json"
    if not manifest.is_file():
        print(f"[1/4] writing sklearn's 1797 handwritten digits to {raw}", flush=True)
        write_digit_folder(raw)
        print(f"[2/4] d2v2-prep image {raw} --out {shards}", flush=True)
        prep_main(["image", str(raw), "--out", str(shards), "--shard-size-mb", "0.25", "--workers", "2"])
    else:
        print(f"[1-2/4] reusing shards in {shards}", flush=True)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "d2v2_scale.train", "--preset", "image-tiny", "--output-dir", str(run), "--resume", "auto",
           f"data.manifest={manifest}", f"parallel.zero_stage={args.zero_stage}", f"max_steps={args.steps}",
           f"optim.total_steps={max(args.steps, 300)}", "checkpoint.every_steps=100", "logging.every_steps=25",
           # a constant, faster EMA than the preset's (0.998 -> 0.9999): in a few hundred updates
           # the preset's teacher has barely left its init (docs/BENCHMARKS.md, "Linear probe")
           "ema.decay=0.99", "ema.end_decay=0.99", *args.overrides]
    print(f"[3/4] {' '.join(cmd[2:])}", flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"d2v2-quickstart: training failed (exit {rc})", file=sys.stderr)
        return rc
    export = out / "export"
    print(f"[4/4] d2v2-export {run} --out {export} --force; d2v2-probe {export} --data {manifest}", flush=True)

    export_checkpoint(run, export, force=True)
    r = run_probe(export, manifest)
    print(f"linear probe on {r['n_test']} held-out digits: pretrained teacher (step {r['step']}) "
          f"{r['accuracy']:.3f}; random-init twin {r['baseline_accuracy']:.3f}; chance {r['chance']:.3f}", flush=True)
    print(f"\nquickstart done.\n  TensorBoard logs: {run / 'tensorboard'}   (tensorboard --logdir {run / 'tensorboard'})"
          f"\n  checkpoints:      {run / 'checkpoints'}\n  resolved config:  {run / 'config.yaml'}"
          f"\n  exported encoder: {export}   (docs/EXPORT.md)"
          f"\n  next: fine-tune it on the digits' labels (docs/FINETUNE.md, 'Start here')", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
