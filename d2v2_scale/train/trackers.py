"""Experiment trackers next to TensorBoard: Weights & Biases (`logging.wandb=true`).

Rank 0 only.  The tracker gets exactly the scalars TensorBoard gets (Metrics.flush) and the run
record (run_record.py) as its config.  The W&B run id is kept in the run folder (WANDB_ID_FILE),
so a run continued with `--resume` logs into the same W&B run; a fresh start in the folder (no
checkpoint resumed) begins a new one.  `wandb` is the optional extra `d2v2-scale[wandb]`; its
offline mode (WANDB_MODE=offline) writes the run under OUTPUT_DIR/wandb/ for `wandb sync` later.
"""

from __future__ import annotations

import importlib
import json
import re
import secrets
import sys
from pathlib import Path

from ..config import ConfigError
from ..data.manifest import write_json_atomic

WANDB_ID_FILE = "wandb_run.json"
def wandb_missing(cfg) -> str | None:
    """logging.wandb=true without the package: the one-line error (None when fine or not asked)."""
    if not cfg.logging.wandb:
        return None
    try:
        importlib.import_module("wandb")
    except ImportError:
        return ("logging.wandb=true but the wandb package is not installed: pip install 'd2v2-scale[wandb]' "
                "(or pip install wandb), or set logging.wandb=false")
    return None


class WandbTracker:
    """One W&B run per training run, resumed across restarts.  log() takes Metrics' scalars."""

    def __init__(self, cfg, out: Path, record: dict, resumed: bool):
        import wandb

        lg = cfg.logging
        id_file = out / WANDB_ID_FILE
        run_id = None
        if resumed and id_file.is_file():
            try:
                run_id = str(json.loads(id_file.read_text())["id"])
            except (ValueError, KeyError, TypeError):
                run_id = None  # unreadable: a new W&B run rather than no run
            if run_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
                run_id = None  # a file from elsewhere: only an id W&B itself could have made
        if run_id is None:
            run_id = secrets.token_hex(4)
            write_json_atomic(id_file, {"id": run_id, "project": lg.wandb_project, "entity": lg.wandb_entity})
        self.run_id = run_id
        try:
            self.run = wandb.init(project=lg.wandb_project, entity=lg.wandb_entity,
                                  name=lg.wandb_run_name or out.resolve().name, tags=list(lg.wandb_tags),
                                  id=run_id, resume="allow", dir=str(out), config=record,
                                  allow_val_change=True)
        except Exception as e:  # wandb raises several types (no login, network, bad entity)
            raise ConfigError(f"logging.wandb: W&B could not start the run ({type(e).__name__}: {e}); log in with "
                              "`wandb login`, run offline with WANDB_MODE=offline (then `wandb sync`), or set "
                              "logging.wandb=false") from None

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def update_record(self, record: dict) -> None:
        self.run.config.update(record, allow_val_change=True)

    def close(self) -> None:
        # called from the trainer's `finally`: an exception on its way out marks the W&B run failed
        self.run.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)
