"""Per-update agreement of the trainer with fairseq's own `Trainer.train_step` (issue #29).

For each covered system (data2vec 2.0 image / text / speech from the v2 *_only_task recipes,
data2vec 1.0 speech / text; tests/fairseq_trainer_oracle.py shrinks them to tiny sizes), fairseq's
trainer runs 40 updates from random initial weights on fixed batches and masks; `d2v2-import
--to-run` takes the same initial weights into the project's trainer, which runs the same batches
and masks under each engine (DeepSpeed ZeRO-0, ZeRO-3, the flat engine; one process).  Prints,
per system and engine, the largest relative difference over the updates of the LR, loss, pre-clip
gradient norm and EMA decay, the first update where one exceeds 1e-4, and the final student /
teacher difference (max |ours - fairseq| / max |fairseq| over the tensors).

    python bench/bench_trainer_parity.py [--options reference|none] [--engines zero0,zero3,flat]
        [--systems image,text,audio,d2v1_audio,d2v1_text] [--updates 40]

The fairseq side runs in a subprocess from the `fairseq-fixed` sdist (tests/fairseq_oracle.py's
cache, ~/.cache/d2v2-scale/fairseq-oracle; downloaded once from the package registry).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from d2v2_scale.testing import run_distributed
    from tests import fairseq_oracle
    from tests.dist_bodies_parity import KEYS, LAYOUTS, REFERENCE_OPTIONS, agreement, prepare
    from tests.test_training_parity import oracle_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--options", choices=["reference", "none"], default="reference")
    p.add_argument("--engines", default="zero0,zero3,flat")
    p.add_argument("--systems", default="image,text,audio,d2v1_audio,d2v1_text")
    p.add_argument("--updates", type=int, default=40)
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    systems = a.systems.split(",")
    oracle = oracle_dir(systems)
    options = REFERENCE_OPTIONS if a.options == "reference" else []
    print(f"fairseq trainer oracle: {oracle} ({fairseq_oracle.SDIST}); options: {options or 'defaults'}")
    print("| engine | system | LR | loss | grad norm | EMA decay | first update > 1e-4 | final student / teacher |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="d2v2-parity-") as tmp:
        for eng in a.engines.split(","):
            # a fresh import per engine: each trainer run writes into its run folder
            spec = prepare(systems, a.updates, options, Path(tmp) / eng, oracle)
            res = run_distributed("tests.dist_bodies_parity:trajectory_body", nproc=1, timeout=1800,
                                  args=[spec, *LAYOUTS[eng]], cwd=str(ROOT))[0]
            for s, row in agreement(res, oracle).items():
                first = min((row[k][1] for k in KEYS if row[k][1] is not None), default=None)
                print(f"| {eng} | {s} | " + " | ".join(f"{row[k][0]:.1e}" for k in KEYS) +
                      f" | {first or '-'} | {row['final']['student']:.1e} / {row['final']['teacher']:.1e} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
