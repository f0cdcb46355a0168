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


def numpy_globals() -> list:
    """numpy arrays, scalars and dtypes (RNG state; fairseq's meters and trainer state).  Files
    written under numpy 1.x name them `numpy.core.multiarray.*` (numpy 2: `numpy._core`): both names
    are allowed, for the same two reconstruction functions."""
    import numpy as np

    try:
        from numpy._core import multiarray as ma
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray as ma
    allowed: list = [np.dtype, np.ndarray]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed += [(ma._reconstruct, f"{mod}._reconstruct"), (ma.scalar, f"{mod}.scalar")]
    allowed += [type(np.dtype(t)) for t in
                ("uint8", "uint32", "int32", "int64", "float16", "float32", "float64", "bool")]
    return allowed


def allowed_globals() -> list:
    """numpy's, plus what DeepSpeed's optimizer files hold (imported only when a run file is read)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return numpy_globals() + [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load(path: str | os.PathLike, map_location="cpu", allow: list | None = None, **kw):
    """torch.load(weights_only=True) with the allowlist (`allow`, default allowed_globals());
    UnsafeCheckpointError naming the file and the refused global otherwise (its `.refused`: the
    global's dotted name)."""
    try:
        with torch.serialization.safe_globals(allowed_globals() if allow is None else allow):
            return torch.load(path, map_location=map_location, weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        # torch: "... Unsupported global: GLOBAL posix.system was not an allowed global ..."
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = m.group(1) if m else str(e).strip().splitlines()[0]
        err = UnsafeCheckpointError(
            f"{Path(path)}: refusing to unpickle {what}: a checkpoint file of this project holds only "
            f"tensors, plain containers, numpy RNG state and DeepSpeed's optimizer metadata; this file "
            f"would run code or was not written by d2v2-train (do not load it)")
        err.refused = what
        raise err from None


def install(engine) -> None:
    """Make DeepSpeed's engine read its checkpoint files through `load` (no-op for engines
    without a checkpoint engine, e.g. parallel.engine=flat, which reads through `load` itself)."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        return

    def safe(path, map_location=None):
        return load(path, map_location=map_location)

    ce.load = safe
