"""What a run reports: TensorBoard scalars, a compact stdout line, throughput and MFU."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    # CPU: peak resident set size of this process (ru_maxrss is KiB on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Metrics:
    """Rank 0 writes; the others only time.  Scalars are averaged over the logging window."""

    def __init__(self, log_dir: Path, enabled: bool, tensorboard: bool, flops_per_step: float,
                 samples_per_step: int, tokens_per_step: int, world_size: int, peak_tflops: float | None):
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(log_dir))
        self.flops_per_step = flops_per_step
        self.samples_per_step = samples_per_step
        self.tokens_per_step = tokens_per_step
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self._sums: dict[str, float] = {}
        self._n = 0
        self._t0 = time.perf_counter()
        self._steps_in_window = 0
        self.trackers: list = []  # more destinations of the same scalars (trackers.py: W&B), rank 0

    def accumulate(self, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._n += 1
        self._steps_in_window += 1

    def flush(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Average the window, add throughput/MFU/memory (and `extra`, values as they are, e.g.
        running totals), write to TensorBoard and the trackers, return it."""
        dt = time.perf_counter() - self._t0
        n = max(self._n, 1)
        out = {k: v / n for k, v in self._sums.items()}
        out.update(extra or {})
        steps = max(self._steps_in_window, 1)
        step_time = dt / steps
        out["perf/step_time_s"] = step_time
        out["perf/samples_per_s"] = self.samples_per_step / step_time
        out["perf/tokens_per_s"] = self.tokens_per_step / step_time
        tflops_per_device = self.flops_per_step / step_time / self.world_size / 1e12
        out["perf/tflops_per_device"] = tflops_per_device
        if self.peak_tflops:  # None: no known peak for this device (a CPU), so no MFU
            out["perf/mfu"] = tflops_per_device / self.peak_tflops
        out["perf/memory_gib"] = peak_memory_gib()
        if self.writer is not None:
            for k, v in out.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        for t in self.trackers:
            t.log(out, step)
        self._sums, self._n, self._steps_in_window = {}, 0, 0
        self._t0 = time.perf_counter()
        return out

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []
        if self.writer is not None:
            self.writer.close()


def format_line(step: int, total: int, s: dict[str, float], progress: str = "") -> str:
    """progress: train/progress.py's "45.0% elapsed .. eta ..", at the end of the line (the line
    keeps starting with "step N/TOTAL loss X" for whoever parses it)."""
    return (f"step {step}/{total} loss {s.get('loss/total', float('nan')):.4f} "
            f"tvar {s.get('stats/target_var', float('nan')):.3f} pvar {s.get('stats/pred_var', float('nan')):.3f} "
            f"tpos {s.get('stats/target_position_share', float('nan')):.3f} "
            f"lr {s.get('opt/lr', 0):.2e} ema {s.get('opt/ema_decay', 0):.6f} gnorm {s.get('opt/grad_norm', 0):.3f} "
            f"{s['perf/samples_per_s']:.1f} samples/s {s['perf/tokens_per_s']:.0f} tok/s "
            + (f"mfu {100 * s['perf/mfu']:.3g}% " if "perf/mfu" in s else "")
            + f"data {1000 * s.get('perf/data_wait_s', 0):.0f}ms mem {s['perf/memory_gib']:.2f}GiB "
            f"skipped {int(s.get('guard/skipped_total', 0))}"
            # objective-specific losses and statistics (data2vec-aqc: loss/contrastive, aqc/*)
            + "".join(f" {k.split('/', 1)[1]} {v:.4g}" for k, v in sorted(s.items())
                      if k.startswith("aqc/") or k == "loss/contrastive")
            + (f" | {progress}" if progress else ""))
