"""Checkpoints: DeepSpeed's own (module, optimizer, scheduler; sharded under ZeRO) plus the
harness's client state, written so that a kill at any moment leaves the previous checkpoint
usable.

Layout under `<output_dir>/checkpoints/`:

    step_00000100/            DeepSpeed's tag folder (mp_rank_*, zero_pp_rank_* files)
        client_rank00003.pt   per rank: RNG states, data-loader state, teacher EMA masters
        COMPLETE              written last, by rank 0, after every rank finished (json; lists
                              every file of the folder with its size)
    latest                    DeepSpeed's pointer (not trusted for resume: see below)

A checkpoint counts only once its COMPLETE marker exists and every file it lists is there with
its size; `resume="auto"` takes the newest intact one, so a save killed halfway (no marker) or a
checkpoint damaged later (a file deleted or truncated) is skipped with a warning naming what is
wrong, and the previous one is used.  Old complete checkpoints beyond `keep_last` are deleted
after the new one is complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..model.core.tp_random import TP_RANDOM
from .safe_load import load as safe_load

MARKER = "COMPLETE"
# Written by the non-finite guard into checkpoints whose weights produced only non-finite steps
# (train/trainer.py `_stop_nonfinite`): skipped like a damaged checkpoint, never resumed/exported.
UNHEALTHY = "UNHEALTHY"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_TAG.match(p.name).group(1)))


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file under a checkpoint folder (relative path -> bytes), the marker excluded."""
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name not in (MARKER, MARKER + ".tmp", UNHEALTHY)}


def damage(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (one phrase naming the file), or None."""
    marker = folder / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (the save was interrupted)"
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{marker} is unreadable ({e})"
    if (folder / UNHEALTHY).is_file():
        return f"marked unhealthy ({(folder / UNHEALTHY).read_text().strip()})"
    for name, size in info.get("files", {}).items():  # markers before the file list: not checked
        f = folder / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} is {f.stat().st_size} bytes, the marker says {size} (truncated or overwritten)"
    return None


def newest_intact(done: list[Path], warn=None) -> Path | None:
    """The newest of `done` (complete checkpoints, oldest first) that `damage` finds intact, or
    None; each newer damaged one is reported through `warn(message)`.  Shared by `--resume auto`
    and `d2v2-export RUN_DIR`, so both skip the same checkpoints."""
    for folder in reversed(done):
        why = damage(folder)
        if why is None:
            return folder
        if warn is not None:
            warn(f"skipping checkpoint {folder}: {why}; trying an older one")
    return None


def resolve_resume(resume: str | None, ckpt_dir: Path, warn=None) -> Path | None:
    """None -> no resume; "auto" -> newest intact checkpoint, or None when there is no complete
    one (damaged newer ones skipped, each reported through `warn(message)`; all of them damaged:
    FileNotFoundError, rather than a silent restart from step 0 that would later delete them);
    else that checkpoint dir, which must be intact."""
    if not resume:
        return None
    if resume == "auto":
        done = complete_checkpoints(ckpt_dir)
        folder = newest_intact(done, (lambda m: warn(f"warning: {m}")) if warn is not None else None)
        if folder is not None:
            return folder
        if done:
            raise FileNotFoundError(f"--resume auto: all {len(done)} checkpoints under {ckpt_dir} are damaged (the "
                                    f"newest: {damage(done[-1])}): restore the file, or move them away to start "
                                    f"over from step 0, or give another --output-dir")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint folder (use --resume auto to take the "
                                f"newest complete one under {ckpt_dir})")
    why = damage(path)
    if why is not None:
        raise FileNotFoundError(f"--resume {path}: the checkpoint is damaged: {why}; resume from an older one "
                                f"or use --resume auto (it skips damaged checkpoints)")
    return path


# DeepSpeed reads a checkpoint back only under a compatible ZeRO stage: stages 1 and 2 write the
# same files; 0 (no optimizer shards) and 3 (partitioned parameters) only their own.  Measured:
# 1 -> 2 resumes; 1 -> 0 fails in an AttributeError, 1 -> 3 in a bare AssertionError.
_ZERO_FILES = {0: 0, 1: 1, 2: 1, 3: 3}


def layout_problem(info: dict, world_size: int, layout: dict) -> str | None:
    """Why a checkpoint (its COMPLETE marker `info`) cannot be resumed by a run of `world_size`
    processes with `layout` (any of zero_stage, tp, pp, engine: this run's parallel.*), or None.
    Exact resume needs the same world size (RNG and loader state are per rank) and the layout
    DeepSpeed wrote its files under (their names and shapes follow the TP x PP ranks)."""
    if info["world_size"] != world_size:
        return (f"it was written by {info['world_size']} processes; this run has {world_size}. Exact resume needs "
                f"the same layout (RNG and data-loader state are per rank)")
    written = {"zero_stage": info.get("zero_stage"), "tp": info.get("tp"), "pp": info.get("pp"),
               "engine": (info.get("config") or {}).get("parallel", {}).get("engine", "deepspeed")}
    for key, running in layout.items():
        was = written.get(key)
        if was is None or (key == "zero_stage" and _ZERO_FILES.get(was) == _ZERO_FILES.get(running)):
            continue  # an older marker without it, or ZeRO-1 <-> 2 (the same files)
        if was != running:
            return (f"it was written with parallel.{key}={was}; this run has parallel.{key}={running}: resume "
                    f"with parallel.{key}={was}")
    return None


def rng_state() -> dict:

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "tp_random": TP_RANDOM.state_dict()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    if "tp_random" in s:

        TP_RANDOM.load_state_dict(s["tp_random"])


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); raised on every rank."""


# files this process failed to write during the current save: (path, exception, bytes free then)
_WRITE_FAILURES: list = []


def _guarded_write(write, path) -> None:
    """Run `write()`; a failure (torch's writer says only `basic_ios::clear: iostream error` when
    the disk is full) is recorded with the space then left, and the partial file removed, so that
    this rank goes on through DeepSpeed's collectives and every rank can agree on the failure
    (one rank raising inside save_checkpoint leaves the others in its barrier)."""
    try:
        write()
    except Exception as e:  # noqa: BLE001 - classified in _raise_write_failure
        try:
            free = shutil.disk_usage(Path(path).parent).free
        except OSError:
            free = -1
        _WRITE_FAILURES.append((Path(path), e, free))
        try:
            Path(path).unlink(missing_ok=True)
        except OSError:
            pass


def install_write_guard(engine) -> None:
    """Both engines write their files through a checkpoint engine's `save` (DeepSpeed's, or the flat
    engine's FileWriter), and DeepSpeed copies its recovery scripts with shutil: all through
    `_guarded_write`."""
    ce = engine.checkpoint_engine
    save_file = ce.save
    ce.save = lambda state_dict, path: _guarded_write(lambda: save_file(state_dict, path), path)
    copy_scripts = getattr(engine, "_copy_recovery_script", None)  # DeepSpeed only
    if copy_scripts is not None:
        engine._copy_recovery_script = lambda save_path: _guarded_write(lambda: copy_scripts(save_path),
                                                                        Path(save_path) / "zero_to_fp32.py")


def _no_space(e: BaseException, free: int) -> bool:
    import errno

    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e) \
        or 0 <= free < 1 << 20


def _raise_write_failure(ckpt_dir: Path, folder: Path, step: int, rank: int) -> None:
    """Collective: if any rank failed to write, every rank raises one CheckpointWriteError (rank 0
    first removes the incomplete folder, freeing what it took; the previous checkpoints and
    `latest` are untouched)."""
    mine = _WRITE_FAILURES[0] if _WRITE_FAILURES else None
    _WRITE_FAILURES.clear()
    views: list = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    line = None
    if mine is not None:
        path, e, free = mine
        if _no_space(e, free):
            line = (f"no space left on device in {path.parent} while writing checkpoint step {step} ({path.name}; "
                    f"{max(free, 0) / 2**20:.1f} MiB free): free space there or give another --output-dir, then "
                    f"rerun with --resume auto")
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            line = f"could not write {path} (checkpoint step {step}): {type(e).__name__}: {first}"
    if dist.is_initialized():
        dist.all_gather_object(views, line)
    else:
        views = [line]
    failed = [v for v in views if v]
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    prev = newest_intact(complete_checkpoints(ckpt_dir))
    keep = f"; the newest complete checkpoint {prev} is intact" if prev is not None else ""
    raise CheckpointWriteError(failed[0] + keep)


def _write_latest(ckpt_dir: Path, tag: str) -> None:
    """DeepSpeed's `latest` pointer (read by its zero_to_fp32 script), written only once the step's
    COMPLETE marker exists, so it never names an incomplete checkpoint."""
    tmp = ckpt_dir / "latest.tmp"
    tmp.write_text(tag)
    os.replace(tmp, ckpt_dir / "latest")


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _guarded_write(lambda: torch.save(obj, tmp), tmp)
    if tmp.exists():
        os.replace(tmp, path)


def newest_healthy(ckpt_dir: Path, last_ok_step: int) -> Path | None:
    """The newest intact checkpoint known to be healthy: written before the last finite update
    (`last_ok_step`), so its weights went on to give a finite step.  Rotation never deletes it."""
    return newest_intact([p for p in complete_checkpoints(ckpt_dir) if int(_TAG.match(p.name).group(1)) < last_ok_step])


def mark_unhealthy(ckpt_dir: Path, from_step: int, reason: str) -> list[Path]:
    """Rank 0: mark every complete checkpoint of step >= from_step unhealthy (-> those marked)."""
    marked = []
    for p in complete_checkpoints(ckpt_dir):
        if int(_TAG.match(p.name).group(1)) >= from_step and not (p / UNHEALTHY).exists():
            tmp = p / (UNHEALTHY + ".tmp")
            tmp.write_text(reason + "\n")
            os.replace(tmp, p / UNHEALTHY)
            marked.append(p)
    return marked


def save(engine, ckpt_dir: Path, step: int, client: dict, meta: dict, keep_last: int,
         rank: int, world_size: int, last_ok_step: int | None = None) -> Path:
    """Collective: every rank calls it.  Returns the checkpoint folder.  Rotation keeps the newest
    `keep_last` and, always, the newest healthy one (`newest_healthy(last_ok_step)`)."""
    tag = tag_for(step)
    folder = ckpt_dir / tag
    if rank == 0 and folder.exists():  # a leftover from a killed save of the same step
        shutil.rmtree(folder)
    dist.barrier()
    _WRITE_FAILURES.clear()
    # `latest` is ours, written after the marker (DeepSpeed writes it before any marker exists)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    _atomic_torch_save(client, folder / f"client_rank{rank:05d}.pt")
    _raise_write_failure(ckpt_dir, folder, step, rank)
    _kill_point("after_client", step)
    dist.barrier()
    # One listing per node, merged by taking each file's largest size: a node sees its own
    # writes at once, while another node's view of them may lag (NFS attribute caching), and a
    # too-small size in the marker would later pass for damage.
    views: list = [None] * world_size
    local = int(os.environ.get("LOCAL_RANK", "0")) == 0
    dist.all_gather_object(views, file_sizes(folder) if local else {})
    files: dict[str, int] = {}
    for v in views:
        for name, size in v.items():
            files[name] = max(size, files.get(name, 0))
    if rank == 0:
        marker = folder / MARKER
        tmp = folder / (MARKER + ".tmp")
        # the file list lets a resume tell a damaged checkpoint (a file lost or cut later) from a
        # good one before DeepSpeed trips over it with a bare assertion
        try:
            tmp.write_text(json.dumps({"step": step, "world_size": world_size, "time": time.time(), **meta,
                                       "files": files}))
            os.replace(tmp, marker)
            _write_latest(ckpt_dir, tag)
        except OSError as e:
            _WRITE_FAILURES.append((tmp, e, shutil.disk_usage(ckpt_dir).free))
    _raise_write_failure(ckpt_dir, folder, step, rank)
    if rank == 0:
        keep = newest_healthy(ckpt_dir, step if last_ok_step is None else last_ok_step)
        for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder


def load(engine, folder: Path, rank: int, world_size: int) -> dict:
    """Collective: restore DeepSpeed state and return this rank's client dict."""
    info = json.loads((folder / MARKER).read_text())
    # the two engines write different files; say which one a run needs before either trips over them
    # (d2v2-train checks the whole layout before any process group: train/__init__.py preflight)
    running = "flat" if getattr(engine, "flat_grads", None) is not None else "deepspeed"
    why = layout_problem(info, world_size, {"engine": running})
    if why is not None:
        raise ValueError(f"checkpoint {folder}: {why}")
    client_path = folder / f"client_rank{rank:05d}.pt"
    if not client_path.is_file():
        raise FileNotFoundError(f"checkpoint {folder} lacks {client_path.name}; it is damaged: resume from an "
                                f"older checkpoint")
    load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {folder}")
    return safe_load(client_path, map_location="cpu")


def _kill_point(name: str, step: int) -> None:
    """Test hook: D2V2_KILL_AT=after_client:STEP kills this process in the middle of the save of
    STEP (DeepSpeed's files and the client file written, marker not yet)."""
    if os.environ.get("D2V2_KILL_AT") == f"{name}:{step}":
        os._exit(17)
