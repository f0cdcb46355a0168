"""What one training update asks of the host: dispatched operators, host synchronisations,
collectives, and the Python time spent outside the operators (`d2v2-bench --count-ops`).

On a GPU the step is host-bound at the reference batch (docs/BENCHMARKS.md): the device waits
while Python walks modules, DeepSpeed walks parameters and thousands of small kernels are
launched one by one.  These counts are properties of the program, not of the machine, so they are
measured on the CPU and compared before/after a change:

* operators: every ATen operator call that reaches the dispatcher (a `TorchDispatchMode` sees each
  one, forward and backward), by phase of the update and by name;
* host synchronisations: the operators that make the host wait for the device's result on a GPU:
  `aten._local_scalar_dense` (`.item()`, `float(t)`, `bool(t)`, `if t:`), operators whose output
  shape depends on data (`nonzero`, boolean-mask indexing, `masked_select`, `unique`,
  `repeat_interleave` without an output size, the gradient of `masked_scatter`), copies from the
  device to the host and `Tensor.tolist()` (on the CPU it reads memory without the dispatcher, so
  it is counted by wrapping it).  On the CPU nothing waits, but each of these is a sync on a GPU.
  The one exception is `host_scalar(t)`: a read of a tensor that is on the host on every machine
  (a draw from the CPU generator), refused for any other;
* collectives: calls into `torch.distributed` (DeepSpeed's communication goes through it);
* Python time outside operators: wall time of the update minus the time inside operators.

Phases follow the trainer's structure: `teacher` (targets), `student_fwd` (student forward with the
loss, teacher excluded), `backward`, `optimizer` (DeepSpeed's step: ZeRO reduce, clip, AdamW),
`ema` (the teacher update) and `other` (guards, statistics, logging reduction).
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

PHASES = ("teacher", "student_fwd", "backward", "optimizer", "ema", "other")

# operators after which the host must know a device value (a sync on a GPU)
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::masked_select",
             "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim",
             "aten::is_nonzero", "aten::equal", "aten::allclose",
             "aten::masked_scatter_backward"}  # its gradient is a boolean-mask select

# torch.distributed entry points that start a collective
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
                "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_to_all",
                "all_to_all_single", "barrier", "all_gather_object", "broadcast_object_list", "send", "recv",
                "isend", "irecv", "batch_isend_irecv")


_HOST_READS = [0]  # > 0 while host_scalar reads a host tensor


def host_scalar(t: torch.Tensor):
    """t.item() for a tensor that lives on the host on every machine (made without a device, e.g.
    `torch.rand(())` from the CPU generator): no device sync, so the counter does not file it as
    one (on the CPU it cannot tell host from device tensors by itself).  A tensor on an
    accelerator is refused: reading it would be a sync."""
    if t.device.type != "cpu":
        raise ValueError(f"host_scalar reads host tensors only, got one on {t.device}: reading it is a host sync")
    _HOST_READS[0] += 1
    try:
        return t.item()
    finally:
        _HOST_READS[0] -= 1


def _op_name(func) -> str:
    return func._schema.name if hasattr(func, "_schema") else str(func)


def _is_sync(name: str, func, args, kwargs) -> bool:
    if name in _SYNC_OPS:
        return True
    if name == "aten::repeat_interleave" and kwargs.get("output_size") is None and len(args) >= 1 \
            and isinstance(args[0], torch.Tensor) and len(args) >= 2 and isinstance(args[1], torch.Tensor):
        return True  # repeats given as a tensor: the output length is data-dependent
    if name in ("aten::index", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"):
        idx = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx or ())
    if name in ("aten::_to_copy", "aten::copy_"):
        src = args[1] if name == "aten::copy_" else args[0]
        dst_dev = args[0].device if name == "aten::copy_" else kwargs.get("device")
        return (isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_dev is not None
                and torch.device(dst_dev).type == "cpu")
    return False


class OpCounter(TorchDispatchMode):
    """Counts operators (and the time inside them) per phase while active."""

    def __init__(self):
        super().__init__()
        self.phase = "other"
        self.ops: Counter = Counter()  # (phase, op) -> calls
        self.syncs: Counter = Counter()  # (phase, op) -> calls
        self.op_time = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        self.ops[(self.phase, name)] += 1
        if _is_sync(name, func, args, kwargs) and not (_HOST_READS[0] and name == "aten::_local_scalar_dense"):
            self.syncs[(self.phase, name)] += 1
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        self.op_time += time.perf_counter() - t0
        return out

    @contextmanager
    def in_phase(self, phase: str):
        prev, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = prev


@contextmanager
def count_collectives(counter: OpCounter, calls: Counter):
    """Wrap torch.distributed's collective entry points so each call is counted under the counter's
    current phase.  Restored on exit."""
    saved = {}
    for name in _COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def wrapped(*a, __fn=fn, __name=name, **k):
            calls[(counter.phase, __name)] += 1
            return __fn(*a, **k)

        setattr(dist, name, wrapped)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


@contextmanager
def count_tolist(counter: OpCounter):
    """Count `Tensor.tolist()` as a host sync under the counter's phase (a device-to-host copy on
    a GPU; on the CPU it bypasses the dispatcher).  Restored on exit."""
    saved = torch.Tensor.tolist

    def tolist(self):
        counter.syncs[(counter.phase, "Tensor.tolist")] += 1
        return saved(self)

    torch.Tensor.tolist = tolist
    try:
        yield
    finally:
        torch.Tensor.tolist = saved


def _phase_wrap(counter: OpCounter, phase: str, fn):
    def wrapper(*a, **k):
        with counter.in_phase(phase):
            return fn(*a, **k)
    return wrapper


class _PhasedTeacher:
    def __init__(self, teacher, counter: OpCounter):
        self._t, self._c = teacher, counter
        self.update = _phase_wrap(counter, "ema", teacher.update)

    def __call__(self, *a, **k):
        with self._c.in_phase("teacher"):
            return self._t(*a, **k)

    def __getattr__(self, name):
        return getattr(self._t, name)


def instrument_phases(trainer, counter: OpCounter) -> None:
    """Label what the trainer runs with phases (the teacher, the engine's forward, backward and
    step); everything else counts as `other`."""
    eng = trainer.engine
    trainer.teacher = _PhasedTeacher(trainer.teacher, counter)
    outer = []

    def pre(*_):
        outer.append(counter.phase)
        counter.phase = "student_fwd"

    def post(*_):
        counter.phase = outer.pop()

    eng.register_forward_pre_hook(pre)
    eng.register_forward_hook(post)
    eng.backward = _phase_wrap(counter, "backward", eng.backward)
    eng.step = _phase_wrap(counter, "optimizer", eng.step)


def count_update(trainer, batches: list[dict]) -> dict:
    """Run one training update under the counter; -> the row (totals, per phase, top operators)."""
    counter = OpCounter()
    instrument_phases(trainer, counter)
    calls: Counter = Counter()
    with count_collectives(counter, calls), count_tolist(counter), counter:
        t0 = time.perf_counter()
        trainer.train_step(batches)
        wall = time.perf_counter() - t0

    def per_phase(c: Counter) -> dict:
        out = {p: 0 for p in PHASES}
        for (p, _), n in c.items():
            out[p] = out.get(p, 0) + n
        return out

    def top(c: Counter, k: int = 15) -> list:
        by_name: Counter = Counter()
        for (_, name), n in c.items():
            by_name[name] += n
        return by_name.most_common(k)

    return {
        "ops_total": sum(counter.ops.values()), "ops_per_phase": per_phase(counter.ops),
        "syncs_total": sum(counter.syncs.values()), "syncs_per_phase": per_phase(counter.syncs),
        "sync_ops": {f"{p}:{n}": c for (p, n), c in sorted(counter.syncs.items())},
        "collectives_total": sum(calls.values()), "collectives_per_phase": per_phase(calls),
        "collective_calls": {f"{p}:{n}": c for (p, n), c in sorted(calls.items())},
        "wall_s": wall, "op_s": counter.op_time, "python_outside_ops_s": wall - counter.op_time,
        "top_ops": top(counter.ops),
    }


def format_counts(row: dict) -> str:
    c = row["counts"]
    head = "| | " + " | ".join(PHASES) + " | total |"
    sep = "|---" * (len(PHASES) + 2) + "|"

    def line(label, d, tot):
        return f"| {label} | " + " | ".join(str(d.get(p, 0)) for p in PHASES) + f" | {tot} |"

    return "\n".join([
        f"d2v2-bench --count-ops  preset={row['preset']}  overrides={' '.join(row['overrides']) or '-'}  "
        f"(one update after {row['warmup']} warmup)",
        "", head, sep,
        line("operators", c["ops_per_phase"], c["ops_total"]),
        line("host syncs", c["syncs_per_phase"], c["syncs_total"]),
        line("collectives", c["collectives_per_phase"], c["collectives_total"]),
        "",
        f"wall {c['wall_s']:.3f} s, inside operators {c['op_s']:.3f} s, Python outside operators "
        f"{c['python_outside_ops_s']:.3f} s (under the counter's own overhead)",
        "sync operators: " + (", ".join(f"{k} x{v}" for k, v in c["sync_ops"].items()) or "none"),
        "collective calls: " + (", ".join(f"{k} x{v}" for k, v in c["collective_calls"].items()) or "none"),
        "top operators: " + ", ".join(f"{n} x{k}" for n, k in c["top_ops"]),
    ])
