"""Who may train in an output directory, and ranks that end with their launcher.

Two ways a restart could race the run it replaces, both closed here:

* `RunLock`: `<output_dir>/RUN.lock` (json: host, pid, process start time, boot id, SLURM job id)
  is taken by the run's rank 0 before any process group exists and released on exit.  A second
  run on the same directory is refused, naming the owner, while that owner lives; a dead owner's
  lock (its pid gone, or reused by another process: the start time differs) is taken over, and
  so is the lock of the same SLURM job id (a requeued job restarts on any node).
* `die_with_launcher()`: a rank whose launcher (torchrun, the deepspeed launcher, slurmstepd) is
  killed with SIGKILL gets no signal and would train on, writing checkpoints.  Linux's
  PR_SET_PDEATHSIG kills the rank when its parent dies; a watchdog thread covers the launcher one
  level up (the `deepspeed` runner above its per-node `launch.py`).  DataLoader workers need
  nothing: torch's worker loop exits when its parent pid changes (checked every 5 s).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = "RUN.lock"
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


class RunLockedError(RuntimeError):
    """Another live run owns the output directory."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None when
    it is gone or a zombie (dead, not yet reaped by its parent)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # after the command name: state, ..., field 22


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start_time": _start_time(pid), "boot_id": _boot_id(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def owner_alive(owner: dict) -> bool | None:
    """True / False for an owner on this host; None when it runs on another host (unknowable)."""
    if owner.get("host") != socket.gethostname():
        return None
    if owner.get("boot_id") and owner["boot_id"] != _boot_id():
        return False  # the machine rebooted since
    pid = int(owner.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return _start_time(pid) == owner.get("start_time")  # a reused pid has another start time


def describe(owner: dict) -> str:
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return f"host {owner.get('host')}, pid {owner.get('pid')}{job}, started {owner.get('started')}"


class RunLock:
    """`RunLock.acquire(output_dir)` or RunLockedError; `release()` on a clean exit."""

    def __init__(self, path: Path, record: dict):
        self.path, self.record = path, record

    @classmethod
    def acquire(cls, output_dir: str | os.PathLike) -> "RunLock":
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / LOCK_NAME
        me = _me()
        tmp = out / f".{LOCK_NAME}.{me['pid']}.tmp"
        tmp.write_text(json.dumps(me))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, path)  # atomic create-if-absent, with the content already in place
                    return cls(path, me)
                except FileExistsError:
                    pass
                except OSError:  # a filesystem without hard links: exclusive create, then write
                    try:
                        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    except FileExistsError:
                        pass
                    else:
                        with os.fdopen(fd, "w") as f:
                            f.write(json.dumps(me))
                        return cls(path, me)
                try:
                    owner = json.loads(path.read_text())
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                except (OSError, json.JSONDecodeError):
                    owner = {}  # unreadable: not a live owner's (they are written whole)
                same_job = bool(me["slurm_job_id"]) and owner.get("slurm_job_id") == me["slurm_job_id"]
                alive = owner_alive(owner) if owner else False
                if alive is False or same_job:
                    os.replace(tmp, path)  # take over a dead owner's lock, or our own job's (requeue)
                    return cls(path, me)
                where = "" if alive else (" (on another host: if that run is gone, delete the lock file)")
                raise RunLockedError(f"{out} is in use by another run ({describe(owner)}){where}: stop it first, "
                                     f"or give this run another --output-dir. Lock file: {path}")
            raise RunLockedError(f"could not take the run lock {path}: it keeps changing")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == self.record["pid"]:
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass


# ---- ranks end with their launcher ------------------------------------------------------------
_LAUNCHERS = ("torch.distributed.run", "torchrun", "deepspeed", "slurmstepd", "pretrain.sh")
_watching = False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def die_with_launcher(poll_s: float = 1.0) -> None:
    """Make this process end (SIGKILL) when its launcher dies.  Idempotent; no-op off Linux or
    when started by hand (no launcher among the ancestors)."""
    global _watching
    if _watching or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ancestors = []  # (pid, start time) of every launcher process above this one
    pid = parent
    while pid > 1 and len(ancestors) < 8:
        if any(name in _cmdline(pid) for name in _LAUNCHERS):
            ancestors.append((pid, _start_time(pid)))
        pid = _ppid(pid)
    if not ancestors:
        return
    _watching = True
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the watchdog below still works, within poll_s
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)

    def watch():
        try:  # the OS-level thread name, so `ps -L` (and a test) can see the watchdog
            ctypes.CDLL(None).prctl(_PR_SET_NAME, b"d2v2-launcher-w", 0, 0, 0)
        except (OSError, AttributeError):
            pass
        while True:
            for a, start in ancestors:
                if _start_time(a) != start:
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(poll_s)

    threading.Thread(target=watch, name="d2v2-launcher-watch", daemon=True).start()
