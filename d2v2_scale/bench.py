"""d2v2-bench: time N real training steps of a preset on synthetic inputs of the right shapes
(any system: data2vec 2.0, data2vec 1.0 d2v1-*, data2vec-aqc aqc-*).

    d2v2-bench --preset image-large --steps 20 --warmup 5 [--compile | --compile-step] [--json row.json] key=value ...
    torchrun --nproc_per_node 8 -m d2v2_scale.bench --preset image-large ...   (rank 0 prints)

Each step is `Trainer.train_step` of the real harness (DeepSpeed engine, ZeRO, EMA teacher) on
a synthetic batch: random pixels / waveform / token ids with masks from the real generators of
`d2v2_scale.data.masking` (exactly the same number of kept positions per row, as the loader makes
them).  Warmup steps are excluded.  The step is split into parts by instrumentation (device
synchronized around each part): teacher forward (inside the student's forward), student
forward + backward, optimizer step (DeepSpeed: clip, AdamW, ZeRO reduce/gather), EMA update;
`other` is the rest (finiteness checks, logging all-reduce).  With `--no-breakdown` only the step
is synchronized (use it for the headline step time; the breakdown costs a few syncs per step).
Under pipeline parallelism (parallel.pp > 1) only whole steps are timed: the stages overlap.

FLOPs are the analytic count of `d2v2_scale/model/flops.py`; MFU = achieved FLOP/s per device
divided by `--peak-tflops` (default on a GPU: logging.peak_tflops, 989 = H100/H200 SXM bf16 dense;
on a CPU no peak is known, so no MFU unless --peak-tflops is given).  Memory: CUDA peak allocated after
warmup on GPU, the process's peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import torch

from .config import build_config, ConfigError
from .data import rng
from .data.layout import add_layout
from .data.masking import beit as beit_masks, data2vec1 as d2v1_masks, data2vec2 as d2v2_masks
from .model.flops import step_flops
from .model.modalities import get_modality
from .objectives import DATA2VEC2, objective_of
from .opcount import count_update, format_counts
from .train.trainer import Trainer


# --------------------------------------------------------------------------------------------
# synthetic batches
# --------------------------------------------------------------------------------------------


def _keys(seed: int, step: int, b: int, m: int) -> np.ndarray:

    return rng.make_keys(seed, step, np.repeat(np.arange(b), m), np.tile(np.arange(m), b))


def synthetic_batch(cfg, step: int = 0, seed: int = 1234) -> dict:
    """One micro-batch of cfg.data.batch_size samples, shaped as the loader makes it (with the
    index tensors it ships, data/layout.py)."""

    return add_layout(_synthetic_batch(cfg, step, seed), cfg.model)


def _synthetic_batch(cfg, step: int, seed: int) -> dict:

    m, mk = cfg.model, cfg.masking
    b, clones = cfg.data.batch_size, m.clone_batch
    g = torch.Generator().manual_seed(seed + step)
    keys = _keys(seed, step, b, clones)
    if m.modality == "image":
        src = torch.randn(b, m.in_chans, m.image_size, m.image_size, generator=g)
        grid = d2v2_masks.grid_side(m.num_patches)
        mask = d2v2_masks.inverse_block_mask(keys, grid, mk.ratio, mk.adjust, mk.length)
        return {"source": src, "mask": torch.from_numpy(mask)}
    if not objective_of(m).gathers_kept:  # data2vec 1.0: its own generators, one row per sample
        return _synthetic_batch_d2v1(cfg, g, keys)
    if m.modality == "audio":
        s = int(cfg.data.max_seconds * cfg.data.sample_rate)
        t = m.audio_frames(s)
        src = torch.randn(b, s, generator=g)
        mask = d2v2_masks.span_mask(keys, np.full(b * clones, t), t, mk.ratio, mk.adjust, mk.length)
        mask = d2v2_masks.equalize_kept(mask, keys)
        return {"source": src, "padding_mask": torch.zeros(b, s, dtype=torch.bool),
                "mask": torch.from_numpy(mask)}
    t = cfg.data.max_tokens
    low = max(m.pad_token_id + 1, 4)
    src = torch.randint(low, m.vocab_size, (b, t), generator=g, dtype=torch.int64)
    mask = d2v2_masks.token_mask(keys, np.full(b * clones, t), t, mk.ratio)
    mask = d2v2_masks.equalize_kept(mask, keys)
    return {"source": src, "padding_mask": torch.zeros(b, t, dtype=torch.bool), "mask": torch.from_numpy(mask)}


def _synthetic_batch_d2v1(cfg, g: torch.Generator, keys: np.ndarray) -> dict:

    m, mk, b = cfg.model, cfg.masking, cfg.data.batch_size
    if m.modality == "image":

        mask = beit_masks.beit_block_mask(keys, d2v2_masks.grid_side(m.num_patches),
                                            num_mask=int(round(mk.ratio * m.num_patches)), min_patches=mk.length)
        return {"source": torch.randn(b, m.in_chans, m.image_size, m.image_size, generator=g),
                "mask": torch.from_numpy(mask)}
    if m.modality == "audio":
        s = int(cfg.data.max_seconds * cfg.data.sample_rate)
        t = m.audio_frames(s)
        mask = d2v1_masks.speech_span_mask(keys, np.full(b, t), t, mk.ratio, mk.length)
        out = {"source": torch.randn(b, s, generator=g), "padding_mask": torch.zeros(b, s, dtype=torch.bool),
               "mask": torch.from_numpy(mask)}
        if cfg.data.views == "aqc":  # data2vec-aqc: the augmented view, as the loader adds it
            out["source_aug"] = torch.randn(b, s, generator=g)
        return out
    t = cfg.data.max_tokens
    mask_id = d2v1_masks.text_mask_id(m)
    src = torch.randint(d2v1_masks.N_SPECIAL, mask_id, (b, t), generator=g, dtype=torch.int64)
    student, mask = d2v1_masks.text_inputs(keys, src.numpy(), np.full(b, t), mk, mask_id, mask_id)
    return {"source": src, "padding_mask": torch.zeros(b, t, dtype=torch.bool),
            "student_source": torch.from_numpy(student), "mask": torch.from_numpy(mask)}


def tokens_per_sample(cfg) -> int:
    m = cfg.model
    return get_modality(m).sequence_length(cfg)


# --------------------------------------------------------------------------------------------
# timing instrumentation
# --------------------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Clock:
    """Accumulates synchronized wall time per part for the current step."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.parts: dict[str, float] = {}

    def reset(self) -> None:
        self.parts = {}

    def add(self, name: str, dt: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + dt

    def timed(self, name: str, fn):
        def wrapper(*a, **k):
            if not self.enabled:
                return fn(*a, **k)
            _sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            _sync()
            self.add(name, time.perf_counter() - t0)
            return out
        return wrapper


class _TimedTeacher:
    """Stands in for the trainer's EmaTeacher: times its forward and its EMA update."""

    def __init__(self, teacher, clock: _Clock):
        self._t = teacher
        self._clock = clock
        self.update = clock.timed("ema", teacher.update)

    def __call__(self, *a, **k):
        return self._clock.timed("teacher_fwd", self._t)(*a, **k)

    def __getattr__(self, name):
        return getattr(self._t, name)


def instrument(trainer, clock: _Clock) -> None:
    eng = trainer.engine
    trainer.teacher = _TimedTeacher(trainer.teacher, clock)
    state = {}

    def pre(_mod, _args, _kwargs=None):
        if clock.enabled:
            _sync()
            state["t0"] = time.perf_counter()

    def post(_mod, _args, _out):
        if clock.enabled:
            _sync()
            clock.add("fwd", time.perf_counter() - state.pop("t0"))

    eng.register_forward_pre_hook(pre)
    eng.register_forward_hook(post)
    eng.backward = clock.timed("bwd", eng.backward)
    eng.step = clock.timed("opt_step", eng.step)


def compile_blocks(trainer) -> str:
    """torch.compile each transformer block of the student and of the teacher, in place; returns
    "ok" or the reason it was not done.  Blocks only: the masking, gather and decoder around them
    change shape every step (kept counts, padding), which would recompile a whole-model graph."""
    try:
        teacher = trainer.teacher.module
        for module in (trainer.engine.module, teacher):
            for blk in module.encoder.blocks:
                blk.compile()
        return "ok"
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        return f"failed: {type(e).__name__}: {e}"


def compile_step(module, backend: str = "inductor") -> None:
    """torch.compile the whole student forward as ONE graph (fullgraph=True: a graph break is an
    error, not a silent split): front end, the teacher's call, clone, gather, blocks, decoder and
    loss.  Possible for image data2vec 2.0, whose shapes are all functions of the config once the
    loader ships the index tensors (data/layout.py); the backward is AOTAutograd's of that graph.
    tests/test_layout.py compiles the plain module this way (backend aot_eager on the CPU).

    The forward, not the module call: DeepSpeed's engine puts a forward pre-hook on the module
    whose throughput timer calls time.time(), a graph break that fullgraph=True refuses; the
    hooks stay eager around the one graph."""
    module.forward = torch.compile(module.forward, fullgraph=True, backend=backend)


def check_compile(cfg, compile: str = "blocks") -> None:
    """Refuse --compile where it is known not to work, before any step is spent."""

    m = cfg.model
    if compile == "step" and (m.modality != "image" or objective_of(m) is not DATA2VEC2):
        raise ConfigError(f"--compile-step with {m.modality} {m.variant}: the whole-step graph needs the static "
                          "shapes of image data2vec 2.0 (audio/text lengths change per batch and would recompile); "
                          "use --compile (each block) here")
    if cfg.parallel.zero_stage == 3:
        # measured (docs/BENCHMARKS.md): dynamo traces DeepSpeed's ZeRO-3 gather/release hooks
        # around every block, recompiles on each call until torch._dynamo's recompile limit, then
        # runs those frames eagerly: slower than no compile at all
        raise ConfigError("--compile with parallel.zero_stage=3: torch.compile traces DeepSpeed's ZeRO-3 "
                          "parameter hooks around each block and hits dynamo's recompile limit (slower than "
                          "eager); benchmark --compile with parallel.zero_stage=0, 1 or 2")


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------


def _pct(x, q) -> float:
    return float(np.percentile(np.asarray(x), q)) if len(x) else float("nan")


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_bench(preset: str, overrides: list[str], steps: int = 10, warmup: int = 3, compile: bool | str = False,
              breakdown: bool = True, peak_tflops: float | None = None, output_dir: str | None = None,
              profile: str | None = None) -> dict:

    import deepspeed

    ov = list(overrides)
    if output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="d2v2bench-")
    if not any(o.split("=", 1)[0].lstrip("-") == "output_dir" for o in ov):
        ov.append(f"output_dir={output_dir}")
    if not any(o.split("=", 1)[0].lstrip("-") == "logging.tensorboard" for o in ov):
        ov.append("logging.tensorboard=false")
    cfg = build_config(preset, overrides=ov)
    if compile:
        check_compile(cfg, compile)
    tr = Trainer(cfg, build_data=False)
    info = tr.info
    compile_status = "off"
    if compile == "step":
        compile_step(tr.engine.module)
        compile_status = "ok (whole step)"
        breakdown = False  # the per-part syncs would sit inside the graph
    elif compile:
        compile_status = compile_blocks(tr)
    if info.pp_size > 1:
        # stages overlap micro-batches (1F1B): a per-part split of one rank's time would mislead
        breakdown = False
    clock = _Clock(breakdown)
    instrument(tr, clock)
    batches = [synthetic_batch(cfg, step=i) for i in range(cfg.optim.grad_accum)]

    times, parts, losses = [], [], []
    for i in range(warmup + steps):
        if i == warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        clock.reset()
        _sync()
        t0 = time.perf_counter()
        try:
            scalars = tr.train_step(batches)
        except Exception as e:  # a compile failure shows up at the first step
            if compile and i == 0:
                raise RuntimeError(f"--compile: the first step failed ({type(e).__name__}: {e}); "
                                   f"run without --compile") from e
            raise
        _sync()
        dt = time.perf_counter() - t0
        losses.append(scalars.get("loss/total", float("nan")))
        if i >= warmup:
            times.append(dt)
            parts.append(dict(clock.parts))

    if profile:
        write_profile(tr, batches, profile)

    world = info.world_size
    sf = step_flops(cfg)
    k = cfg.optim.grad_accum * info.dp_size
    flops_step = sf["total"] * k
    samples = cfg.data.batch_size * k
    med = float(np.median(times))
    tflops_dev = flops_step / med / world / 1e12
    if peak_tflops is None and torch.cuda.is_available():
        peak_tflops = cfg.logging.peak_tflops  # a GPU's peak; a CPU's against it would mean nothing
    row = {
        "preset": preset, "overrides": list(overrides), "modality": cfg.model.modality,
        "device": (torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"),
        "world_size": world, "tp": info.tp_size, "pp": info.pp_size, "dp": info.dp_size,
        "zero_stage": cfg.parallel.zero_stage, "engine": cfg.parallel.engine,
        "dtype": str(tr.dtype).replace("torch.", ""),
        "activation_checkpointing": cfg.model.activation_checkpointing,
        "batch_per_rank": cfg.data.batch_size, "clone_batch": cfg.model.clone_batch,
        "grad_accum": cfg.optim.grad_accum, "samples_per_step": samples,
        "tokens_per_sample": tokens_per_sample(cfg),
        "steps": steps, "warmup": warmup, "compile": compile_status, "breakdown_syncs": breakdown,
        "step_s_median": med, "step_s_p10": _pct(times, 10), "step_s_p90": _pct(times, 90),
        "samples_per_s": samples / med, "tokens_per_s": samples * tokens_per_sample(cfg) / med,
        "flops_per_step": flops_step, "flops_split": {k2: v * k for k2, v in sf.items()},
        "tflops_per_device": tflops_dev, "peak_tflops": peak_tflops,
        "mfu": tflops_dev / peak_tflops if peak_tflops else None,
        "peak_memory_gib": peak_memory_gib(), "losses": losses,
        "memory_kind": "cuda max_memory_allocated" if torch.cuda.is_available() else "peak RSS",
        "torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    if breakdown and parts:
        med_part = {}
        for name in ("teacher_fwd", "fwd", "bwd", "opt_step", "ema"):
            med_part[name] = float(np.median([p.get(name, 0.0) for p in parts]))
        row["parts_s"] = {
            "teacher_fwd": med_part["teacher_fwd"],
            "student_fwd_bwd": float(np.median([p.get("fwd", 0.0) - p.get("teacher_fwd", 0.0) + p.get("bwd", 0.0)
                                                for p in parts])),
            "optimizer_step": med_part["opt_step"],
            "ema_update": med_part["ema"],
        }
        row["parts_s"]["other"] = med - sum(row["parts_s"].values())
    return row


def run_count_ops(preset: str, overrides: list[str], warmup: int = 2, output_dir: str | None = None) -> dict:
    """One update of `preset` under the operator counter (d2v2_scale/opcount.py), after `warmup`
    uncounted updates (DeepSpeed and the optimizer allocate their state on the first ones)."""

    ov = list(overrides)
    if output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="d2v2ops-")
    for key, val in (("output_dir", output_dir), ("logging.tensorboard", "false")):
        if not any(o.split("=", 1)[0].lstrip("-") == key for o in ov):
            ov.append(f"{key}={val}")
    cfg = build_config(preset, overrides=ov)
    tr = Trainer(cfg, build_data=False)
    batches = [synthetic_batch(cfg, step=i) for i in range(cfg.optim.grad_accum)]
    for _ in range(warmup):
        tr.train_step(batches)
    counts = count_update(tr, batches)
    return {"preset": preset, "overrides": list(overrides), "warmup": warmup, "world_size": tr.info.world_size,
            "zero_stage": cfg.parallel.zero_stage, "engine": cfg.parallel.engine,
            "batch_per_rank": cfg.data.batch_size,
            "clone_batch": cfg.model.clone_batch, "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "counts": counts}


def write_profile(trainer, batches, path: str, steps: int = 3, top: int = 40) -> None:
    """Run `steps` more training steps under torch.profiler and write the operators that took the
    most device time (host time on CPU) to `path` (rank 0's view), with a Chrome trace beside it."""
    from torch.profiler import ProfilerActivity, profile as _profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync()
    with _profile(activities=acts) as prof:
        for _ in range(steps):
            trainer.train_step(batches)
        _sync()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"# d2v2-bench --profile: {steps} steps, sorted by {key}\n{table}\n")
    os.replace(tmp, path)
    prof.export_chrome_trace(os.path.splitext(path)[0] + ".trace.json")


def format_row(row: dict) -> str:
    engine = "" if row.get("engine", "deepspeed") == "deepspeed" else f" engine={row['engine']}"  # parallel.engine
    lines = [
        f"d2v2-bench  preset={row['preset']}  overrides={' '.join(row['overrides']) or '-'}",
        f"  device={row['device']}  world={row['world_size']} (tp={row['tp']} pp={row['pp']} dp={row['dp']})  "
        f"zero={row['zero_stage']}{engine}  dtype={row['dtype']}  act_ckpt={row['activation_checkpointing']}  "
        f"compile={row['compile']}",
        f"  torch={row['torch']}  deepspeed={row['deepspeed']}  python={row['python']}  date={row['date']}",
        f"  batch/rank={row['batch_per_rank']} x M={row['clone_batch']}  grad_accum={row['grad_accum']}  "
        f"steps={row['steps']} (+{row['warmup']} warmup)",
        "",
        "| step s (median) | p10 | p90 | samples/s | tokens/s | TFLOP/s/dev | MFU | peak mem GiB |",
        "|---|---|---|---|---|---|---|---|",
        f"| {row['step_s_median']:.4f} | {row['step_s_p10']:.4f} | {row['step_s_p90']:.4f} | "
        f"{row['samples_per_s']:,.1f} | {row['tokens_per_s']:,.0f} | {row['tflops_per_device']:.4g} | "
        + (f"{100 * row['mfu']:.3g}% | " if row["mfu"] is not None else "- | ")
        + f"{row['peak_memory_gib']:.2f} ({row['memory_kind']}) |",
    ]
    if "parts_s" in row:
        p = row["parts_s"]
        tot = row["step_s_median"]
        lines += ["", "| part (median s) | teacher fwd | student fwd+bwd | optimizer step | EMA update | other |",
                  "|---|---|---|---|---|---|",
                  "| s | " + " | ".join(f"{p[k]:.4f}" for k in ("teacher_fwd", "student_fwd_bwd", "optimizer_step",
                                                            "ema_update", "other")) + " |",
                  "| share | " + " | ".join(f"{100 * p[k] / tot:.0f}%" for k in ("teacher_fwd", "student_fwd_bwd",
                                                                              "optimizer_step", "ema_update",
                                                                              "other")) + " |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="d2v2-bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each transformer block (student and teacher; not with ZeRO-3)")
    ap.add_argument("--compile-step", action="store_true",
                    help="torch.compile the whole student forward (teacher, decoder, loss) as one graph "
                         "(image data2vec 2.0; not with ZeRO-3; implies --no-breakdown)")
    ap.add_argument("--no-breakdown", action="store_true", help="time only whole steps (no per-part syncs)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak TFLOP/s for MFU (default: logging.peak_tflops on a GPU; none on a CPU)")
    ap.add_argument("--json", default=None, help="write the result row (JSON) here")
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="after the timed steps, profile 3 more and write the top operators by device time "
                         "here (and a Chrome trace beside it)")
    ap.add_argument("--count-ops", action="store_true",
                    help="instead of timing: count, for one update after the warmup, the operators dispatched, "
                         "host synchronisations, collectives and Python time outside operators, per phase")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    a = ap.parse_args(argv)

    try:
        if a.count_ops:
            row = run_count_ops(a.preset, a.overrides, warmup=a.warmup, output_dir=a.output_dir)
        else:
            row = run_bench(a.preset, a.overrides, steps=a.steps, warmup=a.warmup, compile="step" if a.compile_step else a.compile,
                            breakdown=not a.no_breakdown, peak_tflops=a.peak_tflops, output_dir=a.output_dir,
                            profile=a.profile)
    except ConfigError as e:
        print(f"d2v2-bench: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:

        print(format_counts(row) if a.count_ops else format_row(row), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
