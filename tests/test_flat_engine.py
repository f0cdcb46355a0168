"""parallel.engine=flat (train/flat_engine.py): DeepSpeed's losses, exact resume, TP=2, and an
operator count per update that does not grow with the parameter count (issue #19)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from d2v2_scale.config import ConfigError, build_config
from d2v2_scale.testing import run_distributed
from tests import data_fixtures
from tests.test_train import _fit, _losses

STEPS = 4


@pytest.fixture(scope="module")
def image_manifest():
    return str(data_fixtures.prepared("image") / "manifest.json")


@pytest.fixture(scope="module")
def flat_run(image_manifest, tmp_path_factory):
    """2 processes, the flat engine, 2 accumulated micro-batches, a checkpoint every 2 updates."""
    out = tmp_path_factory.mktemp("flat")
    res = _fit(2, image_manifest, out, "parallel.zero_stage=0", "parallel.engine=flat", "optim.grad_accum=2",
               f"max_steps={STEPS}", "checkpoint.every_steps=2", "logging.every_steps=1")
    return out, res


def test_flat_engine_equals_deepspeed_zero0(image_manifest, flat_run, tmp_path):
    """The flat engine gives DeepSpeed ZeRO-0's losses (2 processes: the all-reduce; 2 micro-batches:
    the accumulation).  The arithmetic is the same up to the clipping norm, which the flat engine
    takes of one buffer (DeepSpeed: a stack of per-tensor norms): measured bitwise equal here;
    the bound is test_train.test_zero_stages_match's (ZeRO-1/2 vs ZeRO-0: the last bit or one ulp)."""
    _, flat = flat_run
    ds = _fit(2, image_manifest, tmp_path / "ds", "parallel.zero_stage=0", "optim.grad_accum=2",
              f"max_steps={STEPS}", "logging.every_steps=1")
    a, b = _losses(flat), _losses(ds)
    assert len(a) == STEPS
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    # the logged gradient norm is the flat engine's own (DeepSpeed's measured per tensor)
    np.testing.assert_allclose(flat[0]["last"]["opt/grad_norm"], ds[0]["last"]["opt/grad_norm"], rtol=1e-5)


def test_flat_engine_resume_is_exact(image_manifest, flat_run, tmp_path):
    """Resumed from the step-2 checkpoint == uninterrupted, bitwise (fp32 on CPU)."""
    out, full = flat_run
    split = tmp_path / "split"
    shutil.copytree(out, split)
    shutil.rmtree(split / "checkpoints" / "step_00000004")
    second = _fit(2, image_manifest, split, "parallel.zero_stage=0", "parallel.engine=flat",
                  "optim.grad_accum=2", f"max_steps={STEPS}", "checkpoint.every_steps=2",
                  "checkpoint.resume=auto")
    resumed = dict(map(tuple, second[0]["losses"]))
    ref = dict(map(tuple, full[0]["losses"]))
    assert sorted(resumed) == list(range(STEPS // 2 + 1, STEPS + 1))
    for s in resumed:
        assert resumed[s] == ref[s], (s, resumed[s], ref[s])
    # d2v2-export reads the student from the flat engine's files (DeepSpeed's ZeRO-0 module file)
    from d2v2_scale.export.consolidate import student_state

    folder = split / "checkpoints" / "step_00000004"
    sd = student_state(folder, json.loads((folder / "COMPLETE").read_text()))
    assert any(k.startswith("encoder.") for k in sd) and all(v.dtype == torch.float32 for v in sd.values())
    # a DeepSpeed run pointed at it is told which engine wrote it, before DeepSpeed reads a file
    from types import SimpleNamespace

    from d2v2_scale.train import checkpoint as ckpt

    with pytest.raises(ValueError, match="resume with parallel.engine=flat"):
        ckpt.load(SimpleNamespace(), folder, rank=0, world_size=2)


def test_flat_engine_tp2_clipped_equals_deepspeed(image_manifest, tmp_path):
    """TP=2 (2 processes, TP2 x DP1) with a clipping threshold every update exceeds: the flat
    engine's norm must count the tensors replicated across TP ranks (norms, biases, the decoder)
    once, as DeepSpeed's clipping does; counting both ranks' copies logged 21.98 for a norm of
    15.54 (the TP=1 one).  Adam is nearly blind to the gradient's scale, so the losses hardly show
    a wrong clipping factor; the logged norm does.  The norm of one buffer rounds differently
    from DeepSpeed's stack of per-tensor norms, hence 1e-5."""
    common = ["parallel.tp=2", "parallel.zero_stage=0", "optim.clip_grad=0.01", "max_steps=1",
              "logging.every_steps=1"]
    flat = _fit(2, image_manifest, tmp_path / "flat", *common, "parallel.engine=flat")
    ds = _fit(2, image_manifest, tmp_path / "ds", *common)
    assert flat[0]["last"]["opt/grad_norm"] > 0.01  # clipping was active
    np.testing.assert_allclose(_losses(flat), _losses(ds), rtol=1e-5, atol=0)
    np.testing.assert_allclose(flat[0]["last"]["opt/grad_norm"], ds[0]["last"]["opt/grad_norm"], rtol=1e-5)


def test_flat_engine_operator_count_does_not_scale_with_parameters():
    """One update of image-tiny with 6 blocks (enough parameter tensors for a per-tensor
    regression to show), 2 processes.  The backward phase may add at most one operator per
    parameter tensor to autograd's own work (the in-place accumulation into the buffer) plus the
    reduction; the optimizer step, guard and statistics a constant.  DeepSpeed spends >= 3 per
    tensor in each (ZeRO-1's bucket copies; ZeRO-0's per-tensor AdamW and clipping)."""
    res = run_distributed("tests.dist_bodies_flat:count_body", nproc=2, timeout=180,
                          args=["parallel.zero_stage=0", "parallel.engine=flat", "model.depth=6"])
    r = res[0]
    c, n = r["counts"], r["n_params"]
    ph = c["ops_per_phase"]
    assert n > 60, n  # enough tensors for a per-tensor regression to show
    assert ph["backward"] <= r["plain_backward"] + n + 8, (ph, r)
    assert ph["optimizer"] <= 40, ph  # AdamW over 2 flat masters + norm + clip
    assert ph["ema"] <= 8, ph  # multi-tensor (train/teacher.py)
    assert ph["other"] < n, ph  # guard + statistics: a per-tensor guard alone would be >= n
    # one all-reduce of the gradient buffer, one of the flags + statistics
    assert c["collective_calls"] == {"backward:all_reduce": 1, "other:all_reduce": 1}, c["collective_calls"]
    assert c["syncs_per_phase"]["backward"] == 0


def test_flat_engine_skips_a_nonfinite_update(image_manifest, tmp_path):
    """A non-finite gradient (both micro-batches of update 2) is found in the flat buffer: the
    update is skipped on both ranks, the buffers are cleared, training goes on with finite weights."""
    res = run_distributed("tests.dist_bodies_train:nan_body", nproc=2, timeout=180, args=[
        "2", "1", "grad", f"data.manifest={image_manifest}", f"output_dir={tmp_path}", "parallel.zero_stage=0",
        "parallel.engine=flat", "optim.grad_accum=2", "checkpoint.every_steps=1000", "max_steps=4"])
    for r in res.values():
        assert r["stopped"] is None and r["step"] == 4 and r["updates"] == 3 and r["skipped"] == 1, r
        assert r["params_finite"]


@pytest.mark.parametrize("bad,words", [
    (["parallel.engine=flat", "parallel.zero_stage=1"], "parallel.zero_stage=0"),
    (["parallel.engine=flat", "parallel.zero_stage=0", "parallel.pp=2"], "parallel.pp=1"),
    (["parallel.engine=fast"], "use 'deepspeed' or 'flat'"),
])
def test_flat_engine_config_is_validated(bad, words):
    with pytest.raises(ConfigError, match=words):
        build_config("image-tiny", overrides=bad).validate(world_size=2)
