"""What keeps a user's restart safe: damaged checkpoints are skipped, data errors come first and
in one line, a second run on a live run's output directory is refused, and ranks end with their
launcher.  Every run here is the real `d2v2-train` command (DeepSpeed, gloo on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d2v2_scale.testing import console_script
from tests import data_fixtures


def _train(*args, timeout=300, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_PROCID"):
        e.pop(k, None)
    return subprocess.run([console_script("d2v2-train"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.fixture(scope="module")
def image_manifest():
    return data_fixtures.prepared("image") / "manifest.json"


# ---- item: a damaged newest checkpoint -------------------------------------------------------
def test_resume_auto_skips_damaged_checkpoints(image_manifest, tmp_path, capsys):
    """4 checkpoints; the newest three damaged three ways (model states deleted, an optimizer
    shard deleted, a client file truncated): --resume auto warns about each, naming the file, and
    resumes from the intact one with the uninterrupted run's losses; an explicit --resume to a
    damaged one is a one-line error naming the file; d2v2-export of the run dir skips the damaged
    ones alike; losses.json keeps every step, across two resumes."""
    out = tmp_path / "run"
    common = ["--preset", "image-tiny", f"data.manifest={image_manifest}", "--output-dir", out,
              "parallel.zero_stage=1", "checkpoint.every_steps=2", "checkpoint.keep_last=4",
              "logging.every_steps=2", "data.batch_size=4"]
    r = _train(*common, "max_steps=8")
    assert r.returncode == 0, r.stderr[-3000:]
    # the papercuts: nothing a user cannot act on; the short schedule said up front; no GPU MFU
    # on a CPU; the time each step waited for data
    assert "Setting accelerator to CPU" not in r.stdout + r.stderr
    assert "get learning rate from scheduler" not in r.stdout + r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("run: 1 processes") and "max_steps=8 stops at 8 of the 300-update LR schedule" in first
    steps = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    # steps 1 (the first is always logged), 2, 4, 6, 8, each with its progress and ETA
    assert len(steps) == 5 and all(" data " in line and "mfu" not in line for line in steps), steps
    assert steps[0].startswith("step 1/8 loss ") and " | 12.5% elapsed " in steps[0] and " eta " in steps[0]
    assert " | 100.0% elapsed " in steps[-1] and steps[-1].endswith(" eta 00:00:00")
    ref = dict(map(tuple, json.loads((out / "losses.json").read_text())))
    assert sorted(ref) == list(range(1, 9))
    ck = out / "checkpoints"
    marker = json.loads((ck / "step_00000008" / "COMPLETE").read_text())
    assert "mp_rank_00_model_states.pt" in marker["files"] and "client_rank00000.pt" in marker["files"]
    assert all(size > 0 for size in marker["files"].values())

    (ck / "step_00000008" / "mp_rank_00_model_states.pt").unlink()
    optim = sorted((ck / "step_00000006").glob("*optim_states.pt"))
    assert optim
    optim[0].unlink()
    client = ck / "step_00000004" / "client_rank00000.pt"
    client.write_bytes(client.read_bytes()[:100])

    # d2v2-export of the run dir falls back like --resume auto; a damaged folder named explicitly
    # is exported with a warning (the teacher needs only the client files)
    from d2v2_scale.export.cli import main as export_main

    capsys.readouterr()
    assert export_main([str(out), "--out", str(tmp_path / "exp")]) == 0
    cap = capsys.readouterr()
    skipped = [line for line in cap.err.splitlines() if line.startswith("d2v2-export: warning: skipping checkpoint")]
    assert len(skipped) == 3 and "mp_rank_00_model_states.pt is missing" in skipped[0], cap.err
    assert f"exported the teacher of {ck / 'step_00000002'} (step 2," in cap.out
    from d2v2_scale.export.probe import main as probe_main  # its data errors: one line too

    assert probe_main([str(tmp_path / "exp"), "--data", str(tmp_path / "nowhere" / "manifest.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("d2v2-probe: error: no manifest at") and err.count("\n") == 1, err
    assert export_main([str(ck / "step_00000008"), "--out", str(tmp_path / "exp8")]) == 0
    cap = capsys.readouterr()
    assert "is damaged: " in cap.err and "mp_rank_00_model_states.pt is missing" in cap.err and "(step 8," in cap.out
    # the student through DeepSpeed's zero_to_fp32 (ZeRO-1): its progress bars are not shown
    assert export_main([str(ck / "step_00000002"), "--out", str(tmp_path / "exp-s"), "--which", "student"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and "exported the student" in cap.out, cap.err

    # --resume auto with every checkpoint damaged: a one-line error before any work, not a silent
    # restart from step 0 (whose saves would delete them)
    from d2v2_scale.train import main

    shutil.copytree(ck / "step_00000008", tmp_path / "all-damaged" / "checkpoints" / "step_00000008")
    assert main([*map(str, common[:3]), "--output-dir", str(tmp_path / "all-damaged"), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("d2v2-train: --resume auto: all 1 checkpoints under") and err.count("\n") == 1, err
    assert "mp_rank_00_model_states.pt is missing" in err and not (tmp_path / "all-damaged" / "RUN.lock").exists()

    # explicit --resume to a damaged checkpoint: one line naming the file, before any work
    r = _train(*common, "max_steps=8", "--resume", ck / "step_00000008", timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "mp_rank_00_model_states.pt is missing" in r.stderr

    r = _train(*common, "max_steps=8", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert len(warnings) == 3, r.stderr[-3000:]
    assert "mp_rank_00_model_states.pt is missing" in warnings[0]
    assert optim[0].name in warnings[1] and "is missing" in warnings[1]
    assert "client_rank00000.pt is 100 bytes" in warnings[2]
    assert f"resumed from {ck / 'step_00000002'} at step 2" in r.stdout
    history = dict(map(tuple, json.loads((out / "losses.json").read_text())))
    assert sorted(history) == list(range(1, 9)), "losses.json keeps the steps before the resume"
    for s in range(1, 9):  # the resumed steps reproduce the uninterrupted run
        assert history[s] == ref[s], (s, history[s], ref[s])
    # a second resume (from step 6 of the resumed run): losses.json still holds the whole history
    shutil.rmtree(ck / "step_00000008")
    r = _train(*common, "max_steps=8", "--resume", "auto")
    assert r.returncode == 0 and f"resumed from {ck / 'step_00000006'} at step 6" in r.stdout, r.stderr[-3000:]
    assert json.loads((out / "losses.json").read_text()) == [[s, ref[s]] for s in range(1, 9)]
    # resuming under a ZeRO stage DeepSpeed cannot read these files with (it died in a bare
    # AssertionError), or with another world size: one line naming the field, before any process
    # group; ZeRO-1 <-> 2 write the same files and pass
    capsys.readouterr()
    assert main([*map(str, common), "parallel.zero_stage=3", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"checkpoint {ck / 'step_00000008'}: it was written with parallel.zero_stage=1; " \
        "this run has parallel.zero_stage=3: resume with parallel.zero_stage=1" in err, err
    from d2v2_scale.config import build_config
    from d2v2_scale.train import preflight

    cfg = build_config("image-tiny", overrides=[f"data.manifest={image_manifest}", f"output_dir={out}",
                                                "parallel.zero_stage=2", "checkpoint.resume=auto"])
    assert preflight(cfg) is None
    assert "written by 1 processes; this run has 2" in preflight(cfg, world_size=2)


# ---- item: data errors before any process group, one line, exit 2 ------------------------------
def _manifest_like(src: Path, dst: Path, **fields) -> Path:
    m = json.loads(src.read_text()) | fields
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst / "manifest.json"


def test_data_errors_are_one_line_before_any_process_group(image_manifest, tmp_path, capsys):
    cases = {
        "missing": ("image-tiny", tmp_path / "nowhere" / "manifest.json", [], "no manifest at"),
        "modality": ("text-tiny", image_manifest, [], "holds image data but the config's model.modality is 'text'"),
        "vocab": ("text-tiny", _manifest_like(image_manifest, tmp_path / "t", modality="text", vocab_size=5000),
                  [], "set model.vocab_size=5000"),
        "sample_rate": ("audio-tiny", _manifest_like(image_manifest, tmp_path / "a", modality="audio",
                                                     sample_rate=8000), [], "set data.sample_rate=8000"),
        "lr": ("image-tiny", image_manifest, ["optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
        "batch": ("image-tiny", image_manifest, ["optim.reference_global_batch=20", "optim.match_reference_batch=true"],
                  "the reference global batch 20 is not a multiple of 1 data-parallel ranks x data.batch_size=8"),
    }
    from d2v2_scale.train import main

    for name, (preset, manifest, extra, expect) in cases.items():
        out = tmp_path / f"out-{name}"
        argv = ["--preset", preset, f"data.manifest={manifest}", "--output-dir", str(out), *extra]
        if name == "missing":  # the installed command, in its own process
            r = _train(*argv, timeout=60)
            rc, err = r.returncode, r.stderr
        else:  # the same main(), in this process (seconds less each)
            capsys.readouterr()
            rc = main(argv)
            err = capsys.readouterr().err
        assert rc == 2, (name, err[-2000:])
        assert expect in err, (name, err)
        assert err.startswith("d2v2-train: "), (name, err)
        lines = err.strip().splitlines()
        # config errors list their fields under one heading line; data errors are one line
        assert len(lines) == (2 if name == "lr" else 1), (name, r.stderr)
        assert "Traceback" not in err and "[rank0]" not in err
        assert not out.exists(), f"{name}: the run started (output dir created) before the check"


# ---- item: ranks end with their launcher; one live run per output directory -------------------
def _descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.add(k)
            todo.append(k)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_launcher(p: subprocess.Popen, procs: set[int], reap: bool) -> list[int]:
    """SIGKILL the launcher; -> the processes of `procs` still alive 12 s later (the loader
    workers notice a dead parent within torch's 5 s check)."""
    os.kill(p.pid, signal.SIGKILL)
    if reap:
        p.wait()
    deadline = time.time() + 12
    while [q for q in procs if _alive(q)] and time.time() < deadline:
        time.sleep(0.2)
    return [q for q in procs if _alive(q)]


def _kill_group(p: subprocess.Popen) -> None:
    """Cleanup: whatever the test started, gone (its own session)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def test_killed_launcher_takes_its_ranks_and_the_lock_refuses_a_second_run(image_manifest, tmp_path):
    """torchrun x 2 ranks (each with a loader worker) training; a second d2v2-train on the same
    output dir is refused naming the owner; `kill -9` of torchrun: every rank and worker is gone
    within a few seconds; then the dead owner's lock is taken over."""
    from d2v2_scale.distributed import free_port
    from d2v2_scale.runlock import RunLock

    out = tmp_path / "run"
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(tmp_path / "torchrun.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          "-m", "d2v2_scale.train", "--preset", "image-tiny", f"data.manifest={image_manifest}",
                          "--output-dir", str(out), "max_steps=100000", "logging.every_steps=1",
                          "checkpoint.every_steps=100000", "parallel.zero_stage=0", "data.batch_size=4",
                          "optim.reference_global_batch=16", "optim.match_reference_batch=true"],
                         env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while "step 2/" not in (tmp_path / "torchrun.log").read_text():
            assert p.poll() is None and time.time() < deadline, (tmp_path / "torchrun.log").read_text()[-3000:]
            time.sleep(1)
        procs = _descendants(p.pid)
        assert len(procs) >= 4, procs  # 2 ranks + their loader workers
        # optim.match_reference_batch: 2 ranks x 4 x grad_accum 2 = the reference's 16
        assert ("global batch 2 x 4 x 2 (dp x data.batch_size x optim.grad_accum) = 16 samples per update; "
                "the image-tiny reference: 16\n") in (tmp_path / "torchrun.log").read_text()

        r = _train("--preset", "image-tiny", f"data.manifest={image_manifest}", "--output-dir", out, timeout=60)
        assert r.returncode == 2 and "is in use by another run" in r.stderr, r.stderr
        owner = json.loads((out / "RUN.lock").read_text())
        assert owner["pid"] in procs and f"host {socket.gethostname()}, pid {owner['pid']}" in r.stderr

        assert not _kill_launcher(p, procs, reap=True), "ranks or workers outlived their launcher"
    finally:
        _kill_group(p)
        log.close()
    lock = RunLock.acquire(out)  # the dead owner's lock is taken over
    assert json.loads((out / "RUN.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / "RUN.lock").exists()


def test_run_lock_owners(tmp_path, monkeypatch):
    """A live owner refuses; a reused pid (other start time) and the same SLURM job (requeue)
    are taken over; a live owner of another SLURM job is refused."""
    from d2v2_scale.runlock import RunLock, RunLockedError, _start_time

    lock = tmp_path / "RUN.lock"
    me = RunLock.acquire(tmp_path)
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunLock.acquire(tmp_path)  # a live owner (this very process)
    rec = json.loads(lock.read_text())
    lock.write_text(json.dumps(rec | {"start_time": "1"}))  # its pid, since reused by another process
    RunLock.acquire(tmp_path)
    live_parent = rec | {"pid": os.getppid(), "start_time": _start_time(os.getppid()), "slurm_job_id": "4242"}
    lock.write_text(json.dumps(live_parent))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert RunLock.acquire(tmp_path).record["slurm_job_id"] == "4242"  # a requeued job takes its lock over
    lock.write_text(json.dumps(live_parent))
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(RunLockedError, match="SLURM job 4242"):
        RunLock.acquire(tmp_path)
    me.release()  # not the owner any more: leaves the lock alone
    assert lock.exists()


def test_killed_deepspeed_runner_takes_its_ranks(image_manifest, tmp_path):
    """The deepspeed launcher: runner -> launch.py -> ranks (started with --local_rank=N).  Once
    every rank watches its launchers, `kill -9` of the runner (launch.py lives on) ends them."""
    from d2v2_scale.distributed import free_port

    e = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                          "--master_port", str(free_port()), "--module", "d2v2_scale.train", "--preset",
                          "image-tiny", f"data.manifest={image_manifest}", "--output-dir", str(tmp_path / "run"),
                          "max_steps=100000"], env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)

    def ranks():
        return [q for q in _descendants(p.pid) if "--local_rank" in Path(f"/proc/{q}/cmdline").read_text()]

    def watching(q):
        try:
            return any((t / "comm").read_text().startswith("d2v2-launcher") for t in Path(f"/proc/{q}/task").iterdir())
        except OSError:
            return False

    try:
        deadline = time.time() + 120
        while not (len(ranks()) == 2 and all(map(watching, ranks()))):
            assert p.poll() is None and time.time() < deadline, "the ranks did not start"
            time.sleep(0.5)
        # not reaped: a launcher that is dead but still a zombie counts as dead too
        assert not _kill_launcher(p, _descendants(p.pid), reap=False), "ranks outlived the deepspeed runner"
    finally:
        _kill_group(p)


def test_reference_global_batch_per_preset_and_matching():
    """docs/REFERENCE.md §1.9 (batch/GPU x GPUs; audio's per-GPU seconds stand as the preset's clips per
    GPU) and optim.match_reference_batch on fewer GPUs than the reference."""
    from d2v2_scale.config import ConfigError, build_config, match_reference_batch

    want = {"image-base": 16 * 16, "image-large": 8 * 16, "image-huge": 8 * 32, "audio-base": 8 * 8,
            "audio-large": 2 * 48, "text-base": 4 * 16, "text-large": 2 * 32, "image-tiny": None}
    for preset, ref in want.items():
        assert build_config(preset).optim.reference_global_batch == ref, preset
    cfg = match_reference_batch(build_config("image-base", overrides=["optim.match_reference_batch=true"]), 4)
    assert cfg.optim.grad_accum == 4  # 4 GPUs x 16 x 4 = 256, the reference's 16 GPUs x 16
    cfg = match_reference_batch(build_config("image-base", overrides=["optim.match_reference_batch=true",
                                                                      "parallel.tp=2"]), 8)
    assert cfg.optim.grad_accum == 4  # 8 GPUs at TP 2 are 4 data-parallel ranks
    assert match_reference_batch(build_config("image-base"), 4).optim.grad_accum == 1  # off by default
    with pytest.raises(ConfigError, match="not a multiple of 3 data-parallel ranks"):
        match_reference_batch(build_config("image-base", overrides=["optim.match_reference_batch=true"]), 3)
    with pytest.raises(ConfigError, match="needs optim.reference_global_batch"):
        build_config("image-tiny", overrides=["optim.match_reference_batch=true"]).validate()
    # the first log line on 4 GPUs without matching: this run's global batch next to the reference's
    from types import SimpleNamespace

    from d2v2_scale.train.trainer import Trainer

    run = SimpleNamespace(cfg=build_config("image-base"), samples_per_step=4 * 16,
                          info=SimpleNamespace(world_size=4, dp_size=4, tp_size=1, pp_size=1))
    assert Trainer.run_summary(run) == (
        "run: 4 processes (dp 4 x tp 1 x pp 1), global batch 4 x 16 x 1 (dp x data.batch_size x optim.grad_accum) = "
        "64 samples per update; the image-base reference: 256 (optim.match_reference_batch=true matches it; "
        "docs/SCALING.md)")


def test_total_steps_auto(capsys):
    """optim.total_steps=auto: the LR schedule ends at max_steps (no "stops at ... of the
    schedule" in the first log line); without max_steps it is a config error naming both fields."""
    from types import SimpleNamespace

    from d2v2_scale.config import ConfigError, build_config
    from d2v2_scale.train import main
    from d2v2_scale.train.trainer import Trainer

    cfg = build_config("image-tiny", overrides=["max_steps=40", "optim.total_steps=auto"]).validate()
    assert cfg.optim.total_steps == 40 and cfg.steps == 40
    run = SimpleNamespace(cfg=cfg, samples_per_step=8, info=SimpleNamespace(world_size=1, dp_size=1, tp_size=1,
                                                                            pp_size=1))
    assert "stops at" not in Trainer.run_summary(run)
    run.cfg = build_config("image-tiny", overrides=["max_steps=40"])
    assert "set optim.total_steps=40 (or auto)" in Trainer.run_summary(run)
    with pytest.raises(ConfigError, match="optim.total_steps=auto takes its value from max_steps: set max_steps"):
        build_config("image-tiny", overrides=["optim.total_steps=auto"])
    with pytest.raises(ConfigError, match="model.depth='auto' is not a valid int"):
        build_config("image-tiny", overrides=["model.depth=auto"])  # only total_steps takes auto
    assert main(["--preset", "image-tiny", "optim.total_steps=auto", "--print-config"]) == 2
    assert capsys.readouterr().err.startswith("d2v2-train: optim.total_steps=auto takes its value from max_steps")
    assert main(["--preset", "image-tiny", "max_steps=25", "optim.total_steps=auto", "--print-config"]) == 0
    assert "total_steps: 25\n" in capsys.readouterr().out
