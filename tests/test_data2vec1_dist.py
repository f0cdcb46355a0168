"""data2vec 1.0 at scale, with the 2.0 harness's bodies (tests/dist_bodies_*.py): ZeRO-1/2/3
(sharded teacher, copied parts shard-local; vision: the whole-model EMA teacher sharded) ==
ZeRO-0, activation checkpointing == none, TP=2 == TP=1, PP=2 == PP=1 (speech),
bitwise resume, and d2v2-train -> d2v2-export -> plain twin == the training teacher (speech, text,
vision; in-process, and through the commands themselves).  Real torchrun process groups,
DeepSpeed, Megatron-core, and the real test corpora (asterisk prompts, WordNet glosses through
d2v2-prep)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from d2v2_scale.testing import console_script, run_distributed
from tests import data_fixtures

SCALE = "tests.dist_bodies_scaleout"
# fast teacher (0.9 -> 0.95): its targets move the loss within a few steps, so equal losses also
# cover the EMA and the copied positional conv
COMMON = ["checkpoint.every_steps=1000", "logging.every_steps=1", "ema.decay=0.9", "ema.end_decay=0.95"]


def _manifest(modality):
    return data_fixtures.prepared(modality) / "manifest.json"


def _losses(seq):
    return np.array([l for _, l in seq])


@pytest.mark.parametrize("modality", ["audio", "text", "image"])
def test_zero_stages_and_checkpointing_match_zero0(modality, tmp_path):
    """One 2-process group: ZeRO-0, ZeRO-1, ZeRO-2, and ZeRO-3 with full activation
    checkpointing, dropout (vision: drop path, attention dropout) as in the preset: the same
    losses over 4 steps (checkpointing must replay the dropout masks, the sharded teacher must
    track the replicated one).  Vision: the teacher is the whole BEiT encoder (patch embedding,
    CLS and mask tokens, shared relative position table, blocks, final norm), every parameter of
    it sharded under ZeRO-3 and averaged shard-locally (ema_check)."""
    stages = ["parallel.zero_stage=0", "parallel.zero_stage=1", "parallel.zero_stage=2",
              "parallel.zero_stage=3+model.activation_checkpointing=full"]
    body = "sweep_ema_body" if modality == "image" else "sweep_body"
    res = run_distributed(f"{SCALE}:{body}", nproc=2, timeout=300, args=[
        ",".join(stages), f"d2v1-{modality}-tiny", f"data.manifest={_manifest(modality)}", f"output_dir={tmp_path}",
        "max_steps=4", *COMMON])[0]
    z0, z1, z2, z3 = (_losses(res[v]) for v in stages)
    assert len(z0) == 4 and np.isfinite(z0).all()
    # ZeRO-1/2 partition the optimizer state and gradients only (the teacher path is ZeRO-0's):
    # as tests/test_train.py, equal to the last bit or one ulp
    np.testing.assert_allclose(z1, z0, rtol=1e-6, atol=0, err_msg="ZeRO-1 vs ZeRO-0")
    np.testing.assert_allclose(z2, z0, rtol=1e-6, atol=0, err_msg="ZeRO-2 vs ZeRO-0")
    # ZeRO-3's float64 clipping norm: last-bit differences (as tests/test_train.py)
    np.testing.assert_allclose(z3, z0, rtol=1e-5, atol=0, err_msg="ZeRO-3 vs ZeRO-0")
    if modality == "audio":  # the positional conv is copied, shard-locally, at every update
        assert all(res[v + ":copied_gap"] == 0.0 for v in stages)
    if modality == "image":
        ema = res[stages[-1] + ":ema"]
        assert ema["sharded"] == ema["n"] and {"encoder.local.proj.weight", "encoder.extra_tokens",
                                               "encoder.rel_pos_bias.table", "encoder.final_norm.weight"} <= set(
            ema["shapes"]), ema["shapes"].keys()
        assert ema["moved"] > 1e-5 and ema["err"] < 1e-3 * ema["moved"], ema


@pytest.mark.parametrize("modality", ["audio", "text", "image"])
def test_resume_is_bitwise(modality, tmp_path):
    """ZeRO-3 x 2, checkpoint at step 2, resume to 4: the uninterrupted losses, bitwise (the EMA
    masters, the copied speech positions, the dropout / drop-path RNG, the loader's mask keys)."""
    res = run_distributed(f"{SCALE}:resume_body", nproc=2, timeout=300, args=[
        "2", f"d2v1-{modality}-tiny", f"data.manifest={_manifest(modality)}", f"output_dir={tmp_path}", "max_steps=4",
        "parallel.zero_stage=3", "logging.every_steps=1", "ema.decay=0.9", "ema.end_decay=0.95"])[0]
    full, resumed = dict(map(tuple, res["full"])), dict(map(tuple, res["resumed"]))
    assert sorted(resumed) == [3, 4]
    assert all(resumed[s] == full[s] for s in resumed), (full, resumed)


# TP and PP: ZeRO-1, 2 micro-batches per update, dropout 0 (each TP rank / stage draws its own
# dropout masks, so with dropout the layouts are equal in distribution only); vision: attention
# dropout 0 for the same reason (TP splits the heads), drop path ON (a per-sample draw: every TP
# rank must drop the same samples, as the single process does)
PAR = [*COMMON, "parallel.zero_stage=1", "optim.grad_accum=2", "model.dropout=0", "max_steps=4"]
PAR_MODALITY = {"image": ["model.attention_dropout=0"]}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process losses of d2v1-<modality>-tiny with PAR, computed once per modality."""
    cache = {}

    def get(modality):
        if modality not in cache:
            out = tmp_path_factory.mktemp(f"ref-{modality}")
            cache[modality] = run_distributed(f"{SCALE}:fit_body", nproc=1, timeout=300, args=[
                f"d2v1-{modality}-tiny", f"data.manifest={_manifest(modality)}", f"output_dir={out}", *PAR,
                *PAR_MODALITY.get(modality, [])])[0]
        return cache[modality]

    return get


@pytest.mark.parametrize("modality,layout,rtol", [("audio", "parallel.pp=2", 0.0), ("audio", "parallel.tp=2", 1e-6),
                                                  ("text", "parallel.tp=2", 1e-6), ("image", "parallel.tp=2", 1e-6)])
def test_tp2_and_pp2_match_one_process(modality, layout, rtol, one_process, tmp_path):
    """PP=2 (speech): one block per stage, the top-2 targets cross the boundary: bitwise.  TP=2
    (speech, text, vision: the BEiT relative position table and q/v biases split over heads, the
    replicated heads, mask embedding and drop path): the row-parallel all-reduce adds half-sums
    in another order: float32 rounding."""
    res = run_distributed(f"{SCALE}:fit_body", nproc=2, timeout=300, args=[
        f"d2v1-{modality}-tiny", f"data.manifest={_manifest(modality)}", f"output_dir={tmp_path}", *PAR,
        *PAR_MODALITY.get(modality, []), layout])
    np.testing.assert_array_equal(_losses(res[0]["losses"]), _losses(res[1]["losses"]))
    np.testing.assert_allclose(_losses(res[0]["losses"]), _losses(one_process(modality)["losses"]), rtol=rtol,
                               atol=0)


@pytest.mark.parametrize("modality", ["audio", "text", "image"])
def test_train_export_plain_twin_equals_teacher(modality, tmp_path):
    """d2v2-train (ZeRO-3 x 2) -> d2v2-export -> the plain twin (torch only): its top-K taps
    (FFN outputs; vision: block ends without CLS), normalized as the preset says, equal the
    training teacher's targets on a fixed input."""
    from d2v2_scale.export import export_checkpoint, load_export
    from d2v2_scale.model.core.targets import make_targets

    feats = tmp_path / "features.pt"
    run_distributed("tests.dist_bodies_export:fit_features_body", nproc=2, timeout=300, args=[
        str(feats), f"d2v1-{modality}-tiny", f"data.manifest={_manifest(modality)}",
        f"output_dir={tmp_path / 'run'}", "max_steps=3", "parallel.zero_stage=3", *COMMON])
    ref = torch.load(feats)
    cfg = export_checkpoint(tmp_path / "run", tmp_path / "export")
    assert cfg["variant"] == "data2vec1"
    # audio/text: the front end comes from the student; vision: the teacher is the whole encoder
    assert bool(cfg["d2v2_export"]["from_student"]) == (modality != "image")
    enc, ecfg, _ = load_export(tmp_path / "export")
    with torch.no_grad():
        out = enc(ref["source"])
    m = types.SimpleNamespace(**ecfg)
    if modality == "image":
        torch.testing.assert_close(out["hidden"][-1], ref["last"], atol=2e-5, rtol=1e-5)
        taps = [h[:, 1:] for h in out["hidden"][-m.top_k_layers:]]
    else:
        torch.testing.assert_close(out["x"], ref["last"], atol=2e-5, rtol=1e-5)
        taps = out["ffn"][-m.top_k_layers:]
    torch.testing.assert_close(make_targets(taps, m, None), ref["targets"], atol=2e-5, rtol=1e-5)
    # d2v2-probe's reading path on the 1.0 export: rows of the training corpus -> pooled features
    from d2v2_scale.data.shards import ShardSet
    from d2v2_scale.export.probe import MODALITY_INPUTS, features

    shards = ShardSet(_manifest(modality))
    samples = [MODALITY_INPUTS[modality][0](shards, i, ecfg) for i in range(3)]
    for layer in ("final", 0):
        f = features(enc, samples, layer=layer)
        assert f.shape == (3, m.embed_dim) and np.isfinite(f).all(), layer


@pytest.mark.parametrize("modality", ["audio", "text", "image"])
def test_commands_train_export_twin_equals_checkpoint_teacher(modality, tmp_path):
    """The commands themselves, as a user runs them: `d2v2-train --preset d2v1-X-tiny` (its own
    process, 2 updates, a fast teacher) -> `d2v2-export` (its entry point, here) -> the plain
    twin's targets on a fixed input equal the Megatron teacher's (audio, text: fed by the
    student's front end, as in training) with the weights of the run's last checkpoint, computed
    by the model code."""
    import os
    import subprocess

    from d2v2_scale.config import build_config
    from d2v2_scale.distributed import init_distributed
    from d2v2_scale.export import load_export
    from d2v2_scale.export.consolidate import read_marker, resolve_checkpoint, student_state, teacher_state
    from d2v2_scale.model import build_student, build_teacher
    from d2v2_scale.model.core.targets import make_targets
    from tests.dist_bodies_export import fixed_source

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    overrides = [f"data.manifest={_manifest(modality)}", "max_steps=2", "logging.every_steps=1",
                 "ema.decay=0.9", "ema.end_decay=0.95", "data.num_workers=0"]
    run, export = tmp_path / "run", tmp_path / "export"
    r = subprocess.run([console_script("d2v2-train"), "--preset", f"d2v1-{modality}-tiny", "--output-dir", str(run),
                        *overrides], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2/2 loss" in r.stdout, r.stdout[-1000:]
    from d2v2_scale.export.cli import main as export_main  # the d2v2-export entry point, in this process

    assert export_main([str(run), "--out", str(export)]) == 0

    # the reference: the training modules, loaded with the checkpoint's teacher masters and student
    init_distributed()
    cfg = build_config(f"d2v1-{modality}-tiny", overrides=overrides)
    folder = resolve_checkpoint(run)
    info = read_marker(folder)
    assert int(info["step"]) == 2
    student, teacher = build_student(cfg), build_teacher(cfg)
    student.load_state_dict(student_state(folder, info), strict=True)
    teacher.load_state_dict(teacher_state(folder, info), strict=True)
    student.eval(), teacher.eval()
    # the teacher is its own EMA (0.9 -> 0.95), not the student: a student export would not pass
    sp = dict(student.named_parameters())
    assert any(not torch.equal(p, sp[n]) for n, p in teacher.named_parameters())
    src = fixed_source(cfg.model)
    with torch.no_grad():
        want = teacher(student.teacher_source({"source": src})).float()
        enc, ecfg, _ = load_export(export)
        out = enc(src)
    m = types.SimpleNamespace(**ecfg)
    taps = ([h[:, 1:] for h in out["hidden"][-m.top_k_layers:]] if modality == "image"
            else out["ffn"][-m.top_k_layers:])
    torch.testing.assert_close(make_targets(taps, m, None), want, atol=2e-5, rtol=1e-5)
