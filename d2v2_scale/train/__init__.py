"""`d2v2-train`: pretraining with DeepSpeed (see trainer.py for the loop)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..compat import quiet_known_warnings
from ..config import ConfigError, build_config, match_reference_batch, preset_names
from ..data.manifest import DataError
from ..runlock import RunLock, RunLockedError, die_with_launcher
from . import preempt

# The modules that import torch, DeepSpeed and Megatron-core (data.loader, distributed,
# checkpoint, guards, trainer) are imported inside the functions below, on purpose: `d2v2-train`
# ties itself to its launcher (die_with_launcher) and answers a bad config or --print-config in
# a fraction of a second, before that multi-second import.

USAGE = """d2v2-train --preset PRESET [--config FILE.yaml] [--resume auto|DIR] [section.key=VALUE ...]

Pretrain a model of the data2vec family on images, speech or text.  The preset picks the system:
  data2vec 2.0   image-*, audio-*, text-*        (fast targets, decoder, multi-mask; the default)
  data2vec 1.0   d2v1-image-*, d2v1-audio-*, d2v1-text-*   (one mask per sample, regression head)
  data2vec-aqc   aqc-*                           (speech: data2vec 1.0 + augmented view, quantizer,
                                                  contrastive loss; docs/AQC.md)
Start it under torchrun, the deepspeed launcher or SLURM srun (one process per GPU);
rank/world/master come from the launcher.  Data: one corpus as data.manifest, or a mix as
data.manifests=[A,B] data.manifest_weights=[wA,wB] (docs/DATA.md).  Logs: TensorBoard, the run
record OUTPUT_DIR/run_record.json, and Weights & Biases with logging.wandb=true.

examples:
  torchrun --nproc_per_node 8 -m d2v2_scale.train --preset image-base \\
      --data.manifest shards/imagenet/manifest.json --output_dir runs/vitb
  d2v2-train --preset image-tiny data.manifest=demo/manifest.json max_steps=50
  d2v2-train --preset d2v1-text-base data.manifests=[books/manifest.json,wiki/manifest.json] \\
      data.manifest_weights=[1,3] logging.wandb=true logging.wandb_project=roberta-mix
  d2v2-train --preset aqc-base data.manifest=librispeech/manifest.json data.noise_dir=musan/noise
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="d2v2-train", usage=USAGE,
                                description="data2vec 2.0, data2vec 1.0 and data2vec-aqc pretraining on DeepSpeed + Megatron-core")
    p.add_argument("--preset", help=f"one of: {', '.join(preset_names())}")
    p.add_argument("--config", help="YAML config (may name a preset itself)")
    p.add_argument("--resume", help="'auto' (newest complete checkpoint in the output dir) or a checkpoint dir")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", help="where logs and checkpoints go")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output dir that holds another run's checkpoints: delete them (and its "
                        "losses.json) first; without it such a dir is refused unless --resume is given")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # the deepspeed launcher appends --local_rank=N (it also sets LOCAL_RANK, which is what we read)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args(argv)
    if not args.preset and not args.config:
        p.error("give --preset or --config")
    return args, overrides


def earlier_run(cfg) -> str | None:
    """A run without --resume into an output dir that holds complete checkpoints would mix two
    runs (its steps among the old ones, rotation by step, losses.json replaced, d2v2-export taking
    the newest step of either): -> the one-line refusal naming the newest checkpoint, or None."""
    from pathlib import Path

    from .checkpoint import complete_checkpoints

    if cfg.checkpoint.resume:
        return None
    done = complete_checkpoints(Path(cfg.output_dir) / "checkpoints")
    if not done:
        return None
    return (f"{cfg.output_dir} holds {len(done)} checkpoint(s) of an earlier run (the newest: {done[-1]}): continue "
            f"that run with --resume auto, or start this one in a new --output-dir, or pass --overwrite to delete "
            f"its checkpoints and losses.json and start over here")


def _overwrite(cfg) -> None:
    """--overwrite, by rank 0 holding the run lock: the earlier run's step folders, DeepSpeed's
    `latest` and losses.json go; nothing else (an `imported` start point stays)."""
    import shutil
    from pathlib import Path

    from .checkpoint import _TAG

    out = Path(cfg.output_dir)
    ck = out / "checkpoints"
    if ck.is_dir():
        for p in ck.iterdir():
            if p.is_dir() and _TAG.match(p.name):
                shutil.rmtree(p)
        (ck / "latest").unlink(missing_ok=True)
    (out / "losses.json").unlink(missing_ok=True)


def preflight(cfg, world_size: int = 1) -> str | None:
    """What can be checked on the files alone, before any process group or model exists (the
    same checks run again later, inside the trainer): the data's manifest against the config,
    and the --resume folder (an explicit one intact; under auto, not every checkpoint damaged;
    the one taken written by this many processes under this parallel layout).  Returns the
    one-line error, or None."""
    from ..data.loader import check_data  # lazy: torch (see the top of this file)
    from .checkpoint import MARKER, layout_problem, resolve_resume  # lazy: torch

    from .trackers import wandb_missing

    missing = wandb_missing(cfg)
    if missing:
        return missing
    try:
        check_data(cfg)
        folder = resolve_resume(cfg.checkpoint.resume, Path(cfg.output_dir) / "checkpoints")
    except (DataError, FileNotFoundError) as e:
        return str(e)
    if folder is not None:
        par = cfg.parallel
        why = layout_problem(json.loads((folder / MARKER).read_text()), world_size,
                             {"zero_stage": par.zero_stage, "tp": par.tp, "pp": par.pp, "engine": par.engine})
        if why is not None:
            return f"--resume {cfg.checkpoint.resume}: checkpoint {folder}: {why}"
    return None


def main(argv=None) -> int:
    preempt.install()  # first: a preemption signal from here on means save-and-exit, not death
    from ..distributed import resolve_launch_env  # lazy: torch.distributed (see the top of this file)

    die_with_launcher()  # a launcher killed from here on takes this rank with it
    quiet_known_warnings()
    args, overrides = parse_args(argv)
    try:
        cfg = build_config(args.preset, args.config, overrides)
        if args.resume:
            cfg.checkpoint.resume = args.resume
        if args.output_dir:
            cfg.output_dir = args.output_dir
        world = int(resolve_launch_env()[1]["WORLD_SIZE"])
        cfg.validate(world_size=world)
        match_reference_batch(cfg, world)  # its error, too, before any process group
    except ConfigError as e:
        print(f"d2v2-train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    if not cfg.data.manifest and not cfg.data.manifests:
        print("d2v2-train: data.manifest is not set: make shards with d2v2-prep and pass "
              "--data.manifest PATH/manifest.json (or data.manifests=[A,B] for a mix of corpora)", file=sys.stderr)
        return 2
    err = preflight(cfg, world) or (None if args.overwrite else earlier_run(cfg))
    if err:
        print(f"d2v2-train: {err}", file=sys.stderr)
        return 2
    lock = None
    if resolve_launch_env()[1]["RANK"] == "0":  # one owner per run; the other ranks follow it
        try:
            lock = RunLock.acquire(cfg.output_dir)
        except RunLockedError as e:
            print(f"d2v2-train: {e}", file=sys.stderr)
            return 2
        if args.overwrite and not cfg.checkpoint.resume:
            _overwrite(cfg)
    try:
        return _train(cfg)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg) -> int:
    from .checkpoint import CheckpointWriteError  # lazy: torch (see the top of this file)
    from .guards import TrainingStopped  # lazy: torch
    from .trainer import Trainer  # lazy: DeepSpeed, Megatron-core

    try:
        trainer = Trainer(cfg)
        result = trainer.fit()
    except (ConfigError, FileNotFoundError, ValueError, DataError) as e:
        print(f"d2v2-train: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"d2v2-train: {e}", file=sys.stderr)
        return 3
    except CheckpointWriteError as e:  # every rank raises it; the disk is shared: rank 0 says it
        if os.environ.get("RANK", "0") == "0":
            print(f"d2v2-train: {e}", file=sys.stderr)
        return 4
    if trainer.main and trainer.stopped_reason:
        from . import preempt

        print(f"preempted ({preempt.requested() or 'signal on another rank'}): stopped at step {result['step']} "
              f"with a checkpoint; rerun with --resume auto to continue", flush=True)
        return 0
    if trainer.main:
        print(f"done: step {result['step']}; logs in {cfg.output_dir}/tensorboard, checkpoints in "
              f"{cfg.output_dir}/checkpoints", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
