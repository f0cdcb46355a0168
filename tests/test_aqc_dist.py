"""data2vec-aqc at scale, with real torchrun process groups, DeepSpeed, Megatron-core and the
espeak speech corpus (tests/data_fixtures.py): ZeRO-3 (every parameter partitioned) == ZeRO-0 and
a resumed run == the uninterrupted one (one 2-process launch), `d2v2-train` end to end (the AQC
statistics on the log line and in TensorBoard, then `d2v2-export` to the plain twin), and TP=2 ==
that one-process run.  Three launches in all."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from d2v2_scale.testing import console_script, run_distributed
from tests import data_fixtures

# fast teacher (0.9 -> 0.95): the targets move within a few steps
COMMON = ["logging.every_steps=1", "ema.decay=0.9", "ema.end_decay=0.95", "max_steps=4"]
# the TP comparison: 2 micro-batches per update, dropout 0 (each TP rank draws its own attention
# dropout masks, so with dropout the layouts are equal in distribution only)
PAR = [*COMMON, "parallel.zero_stage=1", "optim.grad_accum=2", "model.dropout=0", "checkpoint.every_steps=1000"]
AQC_STATS = ("aqc/code_perplexity", "aqc/prob_perplexity", "aqc/gumbel_temp", "aqc/num_clusters")


@pytest.fixture(scope="module")
def manifest():
    return data_fixtures.prepared("audio") / "manifest.json"


def _losses(seq):
    return np.array([l for _, l in seq])


def test_zero3_equals_zero0_and_resume_is_bitwise(manifest, tmp_path):
    """ZeRO-3 with a persistence threshold of 0 (every student parameter partitioned, the
    quantizer's too, as at base scale) gives ZeRO-0's losses; resuming the ZeRO-3 run from its
    step-2 checkpoint gives the uninterrupted steps 3-4 bitwise (the quantizer temperature and the
    keyed Gumbel/negative/k-means draws follow the restored update count)."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    res = run_distributed("tests.dist_bodies_aqc:zero_resume_body", nproc=2, timeout=400, args=[
        "aqc-tiny", f"data.manifest={manifest}", f"output_dir={tmp_path}", *COMMON,
        f"parallel.ds_config={ds}"])[0]
    z0, z3 = _losses(res["z0"]), _losses(res["z3"])
    assert len(z0) == 4 and np.isfinite(z0).all()
    np.testing.assert_allclose(z3, z0, rtol=1e-5, atol=0)
    full, resumed = dict(map(tuple, res["z3"])), dict(map(tuple, res["resumed"]))
    assert sorted(resumed) == [3, 4] and all(resumed[s] == full[s] for s in resumed), (full, resumed)
    assert res["copied_gap"] == 0.0  # the positional conv is copied into the teacher, as in 1.0 speech
    assert {"loss/regression", "loss/contrastive", *AQC_STATS} <= set(res["last"])


@pytest.fixture(scope="module")
def one_process_run(manifest, tmp_path_factory):
    """`d2v2-train --preset aqc-tiny`, one process, the PAR settings: the run folder."""
    out = tmp_path_factory.mktemp("aqc-run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([console_script("d2v2-train"), "--preset", "aqc-tiny", f"data.manifest={manifest}",
                        "--output-dir", str(out), *PAR], capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (out / "stdout.txt").write_text(r.stdout)
    return out


def test_train_end_to_end_logs_and_export(one_process_run, tmp_path):
    """The log line and TensorBoard carry the regression and contrastive losses, code and prob
    perplexity, Gumbel temperature and cluster count; d2v2-export writes the plain twin (the
    encoder only: no aqc.* tensors) and it runs."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from d2v2_scale.export import export_checkpoint, load_export

    out = one_process_run
    steps = [line for line in (out / "stdout.txt").read_text().splitlines() if line.startswith("step ")]
    assert len(steps) == 4
    for key in ("contrastive", "code_perplexity", "prob_perplexity", "gumbel_temp", "num_clusters"):
        assert all(f" {key} " in line for line in steps), (key, steps[-1])
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/total", "loss/regression", "loss/contrastive", *AQC_STATS} <= tags, tags
    temps = [e.value for e in acc.Scalars("aqc/gumbel_temp")]
    assert temps[0] == 2.0 and temps[-1] == pytest.approx(2 * 0.999995 ** 3)  # updates 0..3
    # max(2, T // 16) with T = 24..49 frames (0.5-1 s crops), averaged over the 2 micro-batches
    assert all(2.0 <= e.value <= 3.0 for e in acc.Scalars("aqc/num_clusters"))
    cfg = export_checkpoint(out, tmp_path / "export")
    assert cfg["variant"] == "data2vec_aqc"
    enc, _, _ = load_export(tmp_path / "export")
    assert not any("aqc" in k or "quantizer" in k for k in enc.state_dict())
    with torch.no_grad():
        assert torch.isfinite(enc(torch.randn(2, 8000))["x"]).all()


def test_tp2_matches_one_process(one_process_run, manifest, tmp_path):
    """TP=2 (the quantizer, negatives and k-means replicated on both TP ranks, drawing alike) ==
    the one-process run: the row-parallel all-reduce adds half-sums in another order, float32
    rounding only."""
    ref = json.loads((one_process_run / "losses.json").read_text())
    res = run_distributed("tests.dist_bodies_scaleout:fit_body", nproc=2, timeout=400, args=[
        "aqc-tiny", f"data.manifest={manifest}", f"output_dir={tmp_path}", *PAR, "parallel.tp=2"])
    np.testing.assert_array_equal(_losses(res[0]["losses"]), _losses(res[1]["losses"]))
    assert res[0]["tp"] == [0, 2]
    np.testing.assert_allclose(_losses(res[0]["losses"]), _losses(ref), rtol=1e-6, atol=0)
