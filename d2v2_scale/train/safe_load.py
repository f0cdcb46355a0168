"""Reading the run's own checkpoint files without executing code from them.

A run folder may come from elsewhere (people download and convert each other's runs), so every
`.pt` file of a checkpoint (our client files, the flat engine's file, and DeepSpeed's model and
optimizer files) is read with `torch.load(weights_only=True)` and an allowlist of exactly the
classes these files hold: numpy's RNG state (an ndarray and its dtype), and DeepSpeed's ZeRO
stage enum, loss scaler and fragment addresses in its optimizer files.  Anything else in the
pickle (a payload that would run a command) is refused with one line naming the file.

DeepSpeed reads its files through its checkpoint engine: `install(engine)` replaces that engine's
`load` (torch_checkpoint_engine.py: `weights_only=False`) with this one.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than tensors, plain containers and the allowlist."""


def allowed_globals() -> list:
    import numpy as np

    try:
        from numpy._core import multiarray as ma
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray as ma
    allowed: list = [np.dtype, np.ndarray]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):  # files written under numpy 2 / 1
        allowed += [(ma._reconstruct, f"{mod}._reconstruct"), (ma.scalar, f"{mod}.scalar")]
    allowed += [type(np.dtype(t)) for t in ("uint8", "uint32", "int32", "int64", "float32", "float64", "bool")]
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    return allowed


def load(path: str | os.PathLike, map_location="cpu", **kw):
    """torch.load(weights_only=True) with the allowlist; UnsafeCheckpointError naming the file and
    the refused global otherwise."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        # torch: "... Unsupported global: GLOBAL posix.system was not an allowed global ..."
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = m.group(1) if m else str(e).strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"{Path(path)}: refusing to unpickle {what}: a checkpoint file of this project holds only "
            f"tensors, plain containers, numpy RNG state and DeepSpeed's optimizer metadata; this file "
            f"would run code or was not written by d2v2-train (do not load it)") from None


def install(engine) -> None:
    """Make DeepSpeed's engine read its checkpoint files through `load` (no-op for engines
    without a checkpoint engine, e.g. parallel.engine=flat, which reads through `load` itself)."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        return

    def safe(path, map_location=None):
        return load(path, map_location=map_location)

    ce.load = safe
