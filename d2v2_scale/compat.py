"""CPU compatibility for DeepSpeed and Megatron-core, in one place.

CI and developer machines have no GPU, so every distributed path is exercised on CPU with gloo.
The measured facts behind each patch are in docs/REFERENCE.md §5; each
function here applies one of them and does nothing on a CUDA machine.  Nothing else in the
project patches third-party libraries.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings

import torch

_applied = False


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_compat() -> None:
    """Apply the CPU patches once per process (no-op with CUDA)."""
    global _applied
    if _applied or not on_cpu():
        return
    _skip_deepspeed_shm_build()
    # 2-core machines: several ranks each spinning OMP threads run 5-10x slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _applied = True


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed's comm backend JIT-compiles a shared-memory op (40-75 s of g++) that only
    inference all-reduce uses.  Patch the function through importlib: `import deepspeed.comm.torch
    as m` binds `torch` itself, so a patch through that name would not take."""
    mod = importlib.import_module("deepspeed.comm.torch")
    mod.build_shm_op = lambda: None


def quiet_known_warnings() -> None:
    """Silence third-party warnings a user can do nothing about, which otherwise repeat every
    step and bury the training log: torch's deprecation notices for the collectives DeepSpeed
    calls, and Megatron's notes that Transformer Engine / Apex are absent (we use neither)."""

    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
    warnings.filterwarnings("ignore", category=UserWarning, message=r"Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", category=UserWarning, message=r"full scope is deprecated")
    warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated")
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"Warning: tp_group is None")
    # DeepSpeed's logger: on every CPU command "Setting accelerator to CPU. If you have GPU ..."
    # (a CPU run is what the user asked for), and at start "Attempting to get learning rate from
    # scheduler before it has started" (DeepSpeed's own query at engine creation).

    noise = ("Setting accelerator to CPU", "Attempting to get learning rate from scheduler before it has started")
    logging.getLogger("DeepSpeed").addFilter(lambda record: not str(record.msg).startswith(noise))


@contextlib.contextmanager
def cuda_calls_on_cpu():
    """Megatron-core's pipeline schedules and p2p code hard-code CUDA: `torch.cuda.current_device()`
    for receive buffers, `torch.cuda.synchronize()` after the shape exchange, and
    `torch.zeros(..., device="cuda")` for the token counter.  On a CPU-only run, point all three at
    the CPU for the duration of one schedule call (no-op with CUDA)."""
    if not on_cpu():
        yield
        return
    from torch.overrides import TorchFunctionMode

    def _cpu(dev):
        if isinstance(dev, int) or (isinstance(dev, str) and dev.startswith("cuda")) or \
                (isinstance(dev, torch.device) and dev.type == "cuda"):
            return torch.device("cpu")
        return dev

    class _CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if "device" in kwargs:
                kwargs["device"] = _cpu(kwargs["device"])
            return func(*args, **kwargs)

    saved = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        with _CudaToCpu():
            yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = saved
