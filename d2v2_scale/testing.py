"""Run a test body in N real processes, the way a cluster would.

    results = run_distributed("tests.dist_bodies:allreduce_body", nproc=4, args=["2"])

starts `torchrun --nproc_per_node 4` (or, with launcher="slurm", N plain processes carrying
SLURM_* variables the way `srun` sets them) as a subprocess, on a free port, with
OMP_NUM_THREADS=1 and a hard timeout that kills the whole process group: a crashed rank leaves
its peers blocked in gloo, and a test must fail, not hang.  Each rank's stdout/stderr goes to
its own log; on failure the tail of every rank's log is in the exception message.  A body hands
back a JSON-able value with `save_result(obj)`; `run_distributed` returns {rank: value}.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from .distributed import free_port, slurm_master_port

_DIR_VAR = "D2V2_TEST_DIR"


class DistributedTestError(AssertionError):
    pass


def console_script(name: str) -> str:
    """The path of this environment's console script `name` (d2v2-train, d2v2-prep, ...): the one
    next to the running Python, else the first on PATH, so tests run the installed commands."""
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else shutil.which(name)


def save_result(obj) -> None:
    """Called inside a body: store this rank's JSON-able result for the parent test."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    out = Path(os.environ[_DIR_VAR]) / f"result{rank}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, out)


def _tail(path: Path, n: int = 60) -> str:
    if not path.exists():
        return "(no log)"
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


# what a launcher (torchrun, srun) sets: a child a test starts must not inherit a rendezvous
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
             "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")


def child_env() -> dict:
    """This process's environment for a child process: no launcher variables (DIST_VARS), one
    thread per process, unbuffered output, no tokenizers thread pool."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_distributed(target: str, nproc: int, args: list[str] | tuple = (), timeout: float = 180,
                    launcher: str = "torchrun", env: dict | None = None, nnodes_emulated: int = 1,
                    cwd: str | None = None) -> dict[int, object]:
    """Run `module:function` in `nproc` processes; return {rank: saved result}.

    launcher: "torchrun" (RANK/LOCAL_RANK/... from torchrun) or "slurm" (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID as srun sets them; the body's
    init_distributed must derive the master address and port from them).
    """
    workdir = Path(tempfile.mkdtemp(prefix="d2v2dist-"))
    penv = child_env()
    penv[_DIR_VAR] = str(workdir)
    # the test's repo root on the path so `tests.*` bodies import in the children
    root = cwd or os.getcwd()
    penv["PYTHONPATH"] = os.pathsep.join(filter(None, [root, penv.get("PYTHONPATH", "")]))
    if env:
        penv.update(env)

    procs: list[subprocess.Popen] = []
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "d2v2_scale.testing", target, *map(str, args)]
        log = open(workdir / "torchrun.log", "w")
        procs.append(subprocess.Popen(cmd, env=penv, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    elif launcher == "slurm":
        job_id = str(free_port())  # the master port derives from the job id: make it a free one
        while True:  # pick a job id whose derived port is free
            port = slurm_master_port(job_id)
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
                break
            except OSError:
                job_id = str(int(job_id) + 1)
        per_node = max(nproc // nnodes_emulated, 1)
        for r in range(nproc):
            e = dict(penv)
            e.update({"SLURM_PROCID": str(r), "SLURM_NTASKS": str(nproc), "SLURM_LOCALID": str(r % per_node),
                      "SLURM_NODEID": str(r // per_node), "SLURM_JOB_NODELIST": "localhost",
                      "SLURM_JOB_ID": job_id})
            log = open(workdir / f"launcher{r}.log", "w")
            procs.append(subprocess.Popen([sys.executable, "-m", "d2v2_scale.testing", target, *map(str, args)],
                                          env=e, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    else:
        raise ValueError(f"launcher must be 'torchrun' or 'slurm', not {launcher!r}")

    failed = None
    try:
        for p in procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                failed = f"timed out after {timeout:.0f}s"
                break
            if p.returncode != 0 and failed is None:
                failed = f"exit code {p.returncode}"
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()

    results = {}
    for r in range(nproc):
        f = workdir / f"result{r}.json"
        if f.exists():
            results[r] = json.loads(f.read_text())
    if failed is None and len(results) != nproc:
        failed = f"only ranks {sorted(results)} saved a result"
    if failed:
        logs = [f"--- {p.name} ---\n{_tail(p)}" for p in sorted(workdir.glob("*.log"))]
        raise DistributedTestError(f"{target} in {nproc} processes ({launcher}): {failed}\n" + "\n".join(logs))
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def _worker_main(argv: list[str]) -> None:
    target, *args = argv
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    # each rank writes its own log (torchrun would interleave them)
    log = open(Path(os.environ[_DIR_VAR]) / f"rank{rank}.log", "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    module, func = target.split(":")
    fn = getattr(importlib.import_module(module), func)
    fn(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: gloo/DeepSpeed atexit hooks can block when a peer already left
    os._exit(0)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
