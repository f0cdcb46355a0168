"""d2v2-export: real training checkpoints (ZeRO-3 x DP=2, ZeRO-0, TP=2 x DP=2) -> plain twin.

The distributed teacher's outputs on a fixed batch, computed inside the training processes
through the real teacher engine, must equal the exported plain twin's (fp32 tolerance); the
exported student must equal the weights DeepSpeed gathers itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import types
from pathlib import Path

import pytest
import torch

from d2v2_scale.testing import run_distributed
from tests import data_fixtures

BODY = "tests.dist_bodies_export:fit_features_body"
ATOL = 2e-5  # fp32: measured max |diff| ~1e-6 on outputs of magnitude ~3


def _train(tmp: Path, nproc: int, *overrides: str, timeout: int = 240) -> tuple[Path, dict]:
    manifest = data_fixtures.prepared("image") / "manifest.json"
    feats = tmp / "features.pt"
    run_distributed(BODY, nproc=nproc, timeout=timeout, args=[
        str(feats), "image-tiny", f"data.manifest={manifest}", f"output_dir={tmp / 'run'}", "max_steps=4",
        "checkpoint.every_steps=1000", *overrides])
    return tmp / "run", torch.load(feats)


def _plain_outputs(export_dir: Path, source: torch.Tensor):
    from d2v2_scale.export import load_export
    from d2v2_scale.model.targets import make_targets

    enc, cfg, _ = load_export(export_dir)
    with torch.no_grad():
        out = enc(source)
    m = types.SimpleNamespace(**cfg)
    e = 1  # image CLS
    targets = make_targets([f[:, e:] for f in out["ffn"][-m.top_k_layers:]], m, None)
    return out["x"], targets


def _check_teacher(run: Path, feats: dict, out: Path):
    from d2v2_scale.export import export_checkpoint

    cfg = export_checkpoint(run, out)
    assert cfg["d2v2_export"]["which"] == "teacher" and cfg["d2v2_export"]["from_student"] == []
    x, targets = _plain_outputs(out, feats["source"])
    torch.testing.assert_close(x, feats["last"], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(targets, feats["targets"], atol=ATOL, rtol=1e-5)
    return cfg


def _check_student(run: Path, feats: dict, out: Path):
    from safetensors.torch import load_file

    from d2v2_scale.export import export_checkpoint
    from d2v2_scale.model import mapping

    cfg = export_checkpoint(run, out, which="student", with_decoder=True)
    sd = load_file(str(out / "model.safetensors"))
    ref = mapping.megatron_to_plain({k: v for k, v in feats["student"].items() if k.startswith("encoder.")},
                                    cfg["num_heads"])
    ref.update({k: v for k, v in feats["student"].items() if k.startswith("decoder.")})
    assert set(sd) == set(ref)
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k], atol=0, rtol=0, msg=k)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """One ZeRO-3 x DP=2 training run (4 steps) shared by the tests below."""
    tmp = tmp_path_factory.mktemp("z3")
    return _train(tmp, 2, "parallel.zero_stage=3")


def test_roundtrip_zero3_dp2(zero3_run, tmp_path):
    run, feats = zero3_run
    cfg = _check_teacher(run, feats, tmp_path / "teacher")
    assert cfg["d2v2_export"]["zero_stage"] == 3 and cfg["d2v2_export"]["dp"] == 2 and cfg["d2v2_export"]["step"] == 4
    _check_student(run, feats, tmp_path / "student")


def test_roundtrip_zero0(tmp_path):
    run, feats = _train(tmp_path, 1, "parallel.zero_stage=0")
    _check_teacher(run, feats, tmp_path / "teacher")
    _check_student(run, feats, tmp_path / "student")


def test_roundtrip_tp2_dp2(tmp_path):
    """TP=2 x DP=2 ZeRO-3 (4 processes): ZeRO-3 shards -> per-TP tensors -> TP merge."""
    from d2v2_scale.testing import DistributedTestError

    try:
        run, feats = _train(tmp_path, 4, "parallel.zero_stage=3", "parallel.tp=2", "data.batch_size=4",
                            timeout=300)
    except DistributedTestError as e:
        if "train_batch_size is not equal to" in str(e):
            pytest.xfail("TP=2 training does not run yet (DeepSpeed batch-size check counts TP ranks as DP: "
                         "train_batch_size != micro_batch * grad_accum * world_size); export side is ready")
        raise
    cfg = _check_teacher(run, feats, tmp_path / "teacher")
    assert cfg["d2v2_export"]["tp"] == 2 and cfg["d2v2_export"]["dp"] == 2


# ---------------------------------------------------------------------------------------------
# refusals, overwrite protection, newest-complete resolution
# ---------------------------------------------------------------------------------------------


def _copy_ckpt(run: Path, tmp: Path) -> Path:
    src = sorted((run / "checkpoints").glob("step_*"))[-1]
    dst = tmp / "checkpoints" / src.name
    shutil.copytree(src, dst)
    return dst


def test_refuses_what_it_does_not_understand(zero3_run, tmp_path):
    from d2v2_scale.export import ExportError, export_checkpoint

    run, _ = zero3_run
    # no COMPLETE marker
    ck = _copy_ckpt(run, tmp_path / "a")
    (ck / "COMPLETE").unlink()
    with pytest.raises(ExportError, match="no COMPLETE marker"):
        export_checkpoint(ck, tmp_path / "o1")
    with pytest.raises(ExportError, match="no complete checkpoint"):
        export_checkpoint(tmp_path / "a", tmp_path / "o1")
    # a missing client_rank file is named
    ck = _copy_ckpt(run, tmp_path / "b")
    (ck / "client_rank00001.pt").unlink()
    with pytest.raises(ExportError, match="lacks client_rank00001.pt"):
        export_checkpoint(ck, tmp_path / "o2")
    # world size mismatch: the marker says 1 process, 2 client files exist
    ck = _copy_ckpt(run, tmp_path / "c")
    info = json.loads((ck / "COMPLETE").read_text())
    (ck / "COMPLETE").write_text(json.dumps(info | {"world_size": 1, "dp": 1}))
    with pytest.raises(ExportError, match="world size mismatch"):
        export_checkpoint(ck, tmp_path / "o3")
    (ck / "COMPLETE").write_text(json.dumps(info | {"world_size": 3}))
    with pytest.raises(ExportError, match="world size mismatch"):
        export_checkpoint(ck, tmp_path / "o3")
    # an unknown parameter name
    ck = _copy_ckpt(run, tmp_path / "d")
    for r in (0, 1):
        f = ck / f"client_rank{r:05d}.pt"
        c = torch.load(f, weights_only=False)
        t = c["teacher"]
        t["master"]["encoder.blocks.0.mystery.weight"] = t["master"]["encoder.blocks.0.norm1.weight"]
        t["meta"]["encoder.blocks.0.mystery.weight"] = t["meta"]["encoder.blocks.0.norm1.weight"]
        torch.save(c, f)
    with pytest.raises(ExportError, match=r"unknown parameter names \['blocks.0.mystery.weight'\]"):
        export_checkpoint(ck, tmp_path / "o4")
    assert not any(p.name.startswith(("o1", "o2", "o3", "o4", ".o")) for p in tmp_path.iterdir())


def test_no_overwrite_without_force_and_cli(zero3_run, tmp_path, capsys):
    from d2v2_scale.export.cli import main

    run, _ = zero3_run
    out = tmp_path / "exp"
    assert main([str(run), "--out", str(out)]) == 0
    from safetensors.torch import load_file

    before = load_file(str(out / "model.safetensors"))
    (out / "marker.txt").write_text("old")
    assert main([str(run), "--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "marker.txt").exists()  # untouched
    assert main([str(run), "--out", str(out), "--force"]) == 0
    assert not (out / "marker.txt").exists()
    after = load_file(str(out / "model.safetensors"))
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temp leftovers
    assert main([str(run / "nope"), "--out", str(tmp_path / "x")]) == 2


# ---------------------------------------------------------------------------------------------
# the plain twin alone: torch + safetensors + one copied file, no d2v2_scale
# ---------------------------------------------------------------------------------------------

_STANDALONE = textwrap.dedent("""
    import importlib.util, json, sys, types
    plain_dir, site, export_dir, out = sys.argv[1:5]
    sys.path[:0] = [plain_dir]
    sys.path.append(site)                     # torch + safetensors, without the .pth hooks
    assert importlib.util.find_spec("d2v2_scale") is None, "d2v2_scale must not be importable here"
    import torch
    from safetensors.torch import load_file
    import plain
    cfg = types.SimpleNamespace(**json.load(open(export_dir + "/config.json")))
    enc = plain.PlainEncoder(cfg)
    enc.load_state_dict(load_file(export_dir + "/model.safetensors"), strict=True)
    enc.eval()
    src = torch.load(out + ".in.pt")
    with torch.no_grad():
        torch.save(enc(src)["x"], out)
    assert "d2v2_scale" not in sys.modules and "deepspeed" not in sys.modules and "megatron" not in sys.modules
""")


def test_plain_twin_loads_export_standalone(zero3_run, tmp_path):
    import d2v2_scale.model.plain as plain_mod
    from d2v2_scale.export import export_checkpoint

    run, feats = zero3_run
    export_checkpoint(run, tmp_path / "exp")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(plain_mod.__file__, alone / "plain.py")
    (alone / "use.py").write_text(_STANDALONE)
    out = tmp_path / "x.pt"
    torch.save(feats["source"], str(out) + ".in.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-I", "-S", str(alone / "use.py"), str(alone),
                        sysconfig.get_paths()["purelib"], str(tmp_path / "exp"), str(out)],
                       cwd=alone, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(torch.load(out), feats["last"], atol=ATOL, rtol=1e-5)
