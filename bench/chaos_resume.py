"""Chaos run: kill -9 at random moments (mid-save included) and preemption signals through
launchers/pretrain.sh in torchrun and deepspeed mode, against an uninterrupted run.  Not CI.

    OMP_NUM_THREADS=1 python bench/chaos_resume.py [--updates 300] [--kills 12] [--work DIR]

image-tiny, 2 processes (torchrun / the deepspeed launcher), ZeRO-3, a checkpoint every
--every updates.  First the uninterrupted run (launcher script, torchrun mode, to --updates).
Then the chaos run in another folder, restarted with the same command after every interruption
(alternating the launcher mode), until it finishes:
  * kill9-random:  SIGKILL to every process of the run (script, launcher, ranks, loader workers:
                   a node that dies) at a random moment 0-3 s after the ranks logged a step;
  * kill9-midsave: the same, the moment a checkpoint folder exists without its COMPLETE marker;
  * preempt-usr1 / preempt-term: SIGUSR1 / SIGTERM to the launcher script (what SLURM sends);
                   the script must exit 75 with a new complete checkpoint.
After every interruption: `checkpoints/latest`, if there, names a complete checkpoint.  At the end
the chaos run's losses.json must equal the uninterrupted run's, every step bit for bit.  SLURM
mode's preemption is in tests/test_slurm.py (it needs the local cluster).  Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launchers" / "pretrain.sh"
os.environ.setdefault("D2V2_PREP_NO_PROGRESS", "1")
sys.path.insert(0, str(REPO / "tests"))


def launch(mode: str, out: Path, manifest: Path, updates: int, every: int, log: Path) -> subprocess.Popen:
    from d2v2_scale.distributed import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_PORT=str(free_port()))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID"):
        env.pop(k, None)
    return subprocess.Popen(
        ["bash", str(SCRIPT), "--mode", mode, "--nproc", "2", "--python", sys.executable, "--preset", "image-tiny",
         "--manifest", str(manifest), "--output-dir", str(out), "parallel.zero_stage=3", f"max_steps={updates}",
         f"checkpoint.every_steps={every}", "checkpoint.keep_last=2", "logging.every_steps=1", "data.batch_size=4"],
        env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)


def killpg(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def steps_logged(log: Path, since: int) -> int:
    return log.read_text(errors="replace")[since:].count("\nstep ")


def saving(ck: Path) -> bool:
    """A checkpoint folder without its COMPLETE marker: a save in progress."""
    return ck.is_dir() and any(p.is_dir() and p.name.startswith("step_") and not (p / "COMPLETE").exists()
                               for p in ck.iterdir())


def latest_ok(ck: Path) -> bool:
    f = ck / "latest"
    return not f.exists() or (ck / f.read_text().strip() / "COMPLETE").is_file()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=300)
    ap.add_argument("--every", type=int, default=10, help="checkpoint.every_steps")
    ap.add_argument("--kills", type=int, default=12, help="kill -9s (about a third of them mid-save)")
    ap.add_argument("--preempts", type=int, default=4, help="preemption signals through the script")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="d2v2-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    import data_fixtures as fx
    from data_prep.cli import main as prep

    data = work / "data"
    if not (data / "manifest.json").is_file():
        prep(fx.prep_argv("image", data))
    manifest = data / "manifest.json"

    t0 = time.time()
    ref = work / "ref"
    p = launch("torchrun", ref, manifest, args.updates, args.every, work / "ref.log")
    assert p.wait() == 0, (work / "ref.log").read_text()[-3000:]
    t_ref = time.time() - t0

    # the interruptions, shuffled: kill -9 at random moments / mid-save, preemptions in both modes
    plan = (["kill9-midsave"] * (args.kills // 3) + ["kill9-random"] * (args.kills - args.kills // 3)
            + [f"preempt-{s}" for s in ("usr1", "term")] * (args.preempts // 2))
    rnd.shuffle(plan)
    out, ck, log = work / "chaos", work / "chaos" / "checkpoints", work / "chaos.log"
    events, modes, t1 = [], ["torchrun", "deepspeed"], time.time()
    saves = []
    for i, what in enumerate(plan + ["finish"]):
        mode = modes[i % 2]
        since = log.stat().st_size if log.exists() else 0
        p = launch(mode, out, manifest, args.updates, args.every, log)
        try:
            if what == "finish":
                rc = p.wait(timeout=3600)
                assert rc == 0, log.read_text()[-3000:]
                events.append({"mode": mode, "event": what, "rc": rc})
                break
            # wait for training (the first step of this start), then the moment
            deadline = time.time() + 600
            while steps_logged(log, since) < 1:
                if p.poll() is not None:
                    break
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            if p.poll() is not None:  # finished before anything happened
                events.append({"mode": mode, "event": what, "rc": p.returncode, "note": "ended first"})
                if p.returncode == 0:
                    break
                continue
            if what == "kill9-midsave":
                while not saving(ck) and p.poll() is None and time.time() < deadline:
                    time.sleep(0.005)
                mid = saving(ck)
                killpg(p)
                events.append({"mode": mode, "event": what, "mid_save": mid})
            elif what == "kill9-random":
                time.sleep(rnd.uniform(0, 3))
                killpg(p)
                events.append({"mode": mode, "event": what, "mid_save": saving(ck)})
            else:
                time.sleep(rnd.uniform(0, 3))
                sig = signal.SIGUSR1 if what.endswith("usr1") else signal.SIGTERM
                ts = time.time()
                os.kill(p.pid, sig)
                rc = p.wait(timeout=600)
                text = log.read_text(errors="replace")[since:]
                assert rc in (0, 75), (rc, text[-3000:])
                if rc == 75:
                    assert "preempted (SIGUSR1): stopped at step" in text, text[-3000:]
                saves.append(round(time.time() - ts, 2))
                events.append({"mode": mode, "event": what, "rc": rc, "signal_to_exit_s": saves[-1]})
                if rc == 0:
                    break
        finally:
            killpg(p)
        assert latest_ok(ck), f"checkpoints/latest names an incomplete checkpoint after {what}"
        done = sorted(int(x.name[5:]) for x in ck.glob("step_*") if (x / "COMPLETE").exists()) if ck.is_dir() else []
        events[-1]["newest_complete"] = done[-1] if done else None

    got, want = json.loads((out / "losses.json").read_text()), json.loads((ref / "losses.json").read_text())
    equal = got == want
    result = {"bench": "chaos_resume", "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, "
              f"{platform.platform()}", "updates": args.updates, "every": args.every,
              "kill9": sum(e["event"].startswith("kill9") for e in events),
              "kill9_mid_save": sum(bool(e.get("mid_save")) for e in events),
              "preemptions": sum(e["event"].startswith("preempt") for e in events),
              "preempt_rc": [e.get("rc") for e in events if e["event"].startswith("preempt")],
              "signal_to_exit_s": saves, "starts": len(events), "losses_equal": equal,
              "steps": len(got), "ref_wall_s": round(t_ref, 1), "chaos_wall_s": round(time.time() - t1, 1),
              "events": events}
    print(json.dumps(result))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
