"""d2v2-import against fairseq itself: checkpoints written by fairseq's Data2VecMultiModel (built
tiny, random, saved the way fairseq's trainer saves them, tests/fairseq_oracle.py) are imported
and the plain twin's student features and teacher targets are compared with fairseq's own."""

from __future__ import annotations

import hashlib
import json
import os
import types
from pathlib import Path

import pytest
import torch

from d2v2_scale.export.consolidate import load_export
from d2v2_scale.export.fairseq.common import ImportRefused, load_fairseq, parse_feature_spec
from d2v2_scale.export.fairseq.importer import import_checkpoint, import_state, main
from d2v2_scale.model.core.targets import make_targets

from tests import fairseq_oracle

CACHE = Path(os.environ.get("D2V2_FAIRSEQ_CACHE", Path.home() / ".cache" / "d2v2-scale" / "fairseq-oracle"))
# fp16-stored student weights are cast to fp32 on both sides, so both compute in fp32 from the same
# numbers; what remains is summation order (measured: <= 3e-6)
TOL = 2e-5
# except one thing: the file's fp16 *student* stores the fixed image sin-cos table rounded to fp16
# and fairseq adds that rounded table; the twin recomputes it exactly (measured: 2.8e-4)
TOL_IMAGE_STUDENT = 1e-3


@pytest.fixture(scope="session")
def oracle() -> Path:
    """fairseq's checkpoints + outputs, built once and cached by the oracle script's content."""
    key = hashlib.sha256(Path(fairseq_oracle.__file__).read_bytes()).hexdigest()[:12]
    out = CACHE / f"cases-{key}"
    if not (out / "DONE").is_file():
        fairseq_oracle.run_oracle(CACHE / "fairseq", out)
        (out / "DONE").write_text("ok\n")
    return out


def _import(oracle, case, which, tmp_path):
    dict_path = oracle / case / "dict.txt" if (oracle / case / "dict.txt").is_file() else None
    argv = [str(oracle / case / "checkpoint.pt"), "--out", str(tmp_path / f"{case}-{which}"), "--which", which]
    if dict_path:
        argv += ["--dict", str(dict_path)]
    assert main(argv) == 0
    return load_export(tmp_path / f"{case}-{which}")


@pytest.mark.parametrize("case", fairseq_oracle.CASES)
def test_import_matches_fairseq(oracle, case, tmp_path):
    """Student features (unmasked encoder output, CLS dropped) and the EMA teacher's targets
    (captured inside fairseq's pretraining forward) equal fairseq's, fp32, |diff| < TOL."""
    ref = torch.load(oracle / case / "oracle.pt")
    src = ref["source"]
    enc, cfg, _ = _import(oracle, case, "student", tmp_path)
    assert all(v.dtype == torch.float32 for v in enc.state_dict().values())  # the fp16 student, cast
    e = 1 if cfg["modality"] == "image" else 0
    with torch.no_grad():
        x = enc(src)["x"][:, e:]
    assert x.shape == ref["features"].shape
    diff_s = (x - ref["features"]).abs().max().item()
    assert diff_s < (TOL_IMAGE_STUDENT if e else TOL), f"{case} student features differ from fairseq by {diff_s}"

    tenc, tcfg, _ = _import(oracle, case, "teacher", tmp_path)
    with torch.no_grad():
        out = tenc(src)
    ns = types.SimpleNamespace(**tcfg)
    y = make_targets([f[:, e:] for f in out["ffn"][-ns.top_k_layers:]], ns, out["padding"])
    diff_t = (y - ref["targets"]).abs().max().item()
    assert diff_t < TOL, f"{case} teacher targets differ from fairseq by {diff_t}"
    # the teacher is not the student (the fixture perturbs them apart): the import took _ema
    with torch.no_grad():
        ys = make_targets([f[:, e:] for f in enc(src)["ffn"][-ns.top_k_layers:]], ns, None)
    assert (ys - ref["targets"]).abs().max().item() > 100 * TOL
    prov = tcfg["d2v2_export"]
    assert prov["source"] == "fairseq" and prov["fp16_student"] and prov["step"] == 7
    if case == "audio":  # the teacher has no CNN front end: it reads the student's local features
        assert any(k.startswith("local.cnn.") for k in prov["from_student"])
        assert cfg["conv_feature_layers"] == [[16, 10, 5], [16, 3, 2], [16, 3, 2], [16, 2, 2]]
        assert cfg["conv_pos_width"] == 5 and cfg["alibi"]
    if case == "text":  # blocks-only EMA: embeddings from the student, dictionary stored
        assert sorted(prov["from_student"]) == ["local.norm.bias", "local.norm.weight", "local.positions.weight",
                                                "local.tokens.weight"]
        assert (tmp_path / "text-teacher" / "dict.txt").read_text() == (oracle / "text" / "dict.txt").read_text()
        assert cfg["vocab_size"] == 24 and cfg["max_positions"] == 24
    if case == "image_p1":
        assert cfg["prenet_depth"] == 1 and cfg["depth"] == 3
    if case == "image_p0":  # d2v2-probe's random-init baseline builds the training model from config.json
        from d2v2_scale.export.probe import training_init

        assert set(training_init(cfg, 1).state_dict()) == set(enc.state_dict())


def _resave(oracle, case, tmp_path, edit) -> Path:
    ck = torch.load(oracle / case / "checkpoint.pt", weights_only=False)
    edit(ck)
    p = tmp_path / f"{case}-edited.pt"
    torch.save(ck, p)
    return p


def _m(ck, mod):
    return ck["cfg"]["model"]["modalities"][mod]


def _per_layer_alibi(ck):
    _m(ck, "audio")["learned_alibi_scale_per_layer"] = True
    ck["model"]["modality_encoders.AUDIO.alibi_scale"] = torch.ones(4, 1, 4, 1, 1).half()


REFUSALS = [
    ("audio", _per_layer_alibi, "learned_alibi_scale_per_layer"),
    ("image_p0", lambda ck: _m(ck, "image").update(embed_dim=48), "model.modalities.image.embed_dim=48"),
    ("image_p0", lambda ck: ck["cfg"]["model"].update(layer_norm_first=True), "model.layer_norm_first"),
    ("image_p0", lambda ck: ck["cfg"]["model"].update(supported_modality="VIDEO"), "model.supported_modality"),
    ("audio", lambda ck: _m(ck, "audio").update(feature_encoder_spec="[(16, 10, 5)] + __import__('os').getcwd()"),
     "feature_encoder_spec"),
    ("image_p0", lambda ck: ck["model"]["modality_encoders.IMAGE.fixed_positional_encoder.positions"].add_(0.1),
     "fixed_positional_encoder.positions"),
    ("image_p0", lambda ck: ck["model"].update({"modality_encoders.IMAGE.head.weight": torch.zeros(2)}),
     "modality_encoders.IMAGE.head.weight"),
]


@pytest.mark.parametrize("case,edit,field", REFUSALS, ids=[r[2].split(".")[-1].split("=")[0] for r in REFUSALS])
def test_import_refuses(oracle, tmp_path, case, edit, field):
    """What the plain twin cannot express is refused, naming the field; nothing is written."""
    p = _resave(oracle, case, tmp_path, edit)
    with pytest.raises(ImportRefused, match=field.replace(".", r"\.").replace("(", r"\(")):
        import_checkpoint(p, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_disallowed_pickle_and_missing_dict(oracle, tmp_path, capsys):
    """weights_only loading: a global outside the allow-list is refused by name (never called)."""
    p = _resave(oracle, "image_p0", tmp_path, lambda ck: ck["extra_state"].update(hook=os.getcwd))
    with pytest.raises(ImportRefused, match=r"refusing to unpickle posix\.getcwd: "):
        load_fairseq(p)
    assert main([str(p), "--out", str(tmp_path / "o")]) == 2
    assert "refusing to unpickle" in capsys.readouterr().err
    # text needs its dictionary; a wrong one is refused
    ck = oracle / "text" / "checkpoint.pt"
    with pytest.raises(Exception, match="--dict"):
        import_checkpoint(ck, tmp_path / "t")
    bad = tmp_path / "dict.txt"
    bad.write_text("".join(f"x{i} 1\n" for i in range(40)))
    with pytest.raises(Exception, match="not this model's dictionary"):
        import_checkpoint(ck, tmp_path / "t", dict_path=bad)
    assert not (tmp_path / "t").exists()


def test_import_reads_numpy1_era_pickles(oracle, tmp_path):
    """Released files were pickled under numpy 1.x: their numpy scalars name
    numpy.core.multiarray.scalar (numpy 2 writes numpy._core): the allow-list takes both."""
    import io

    ck = torch.load(oracle / "image_p0" / "checkpoint.pt", weights_only=False)
    buf = io.BytesIO()
    torch.save(ck, buf, _use_new_zipfile_serialization=False)  # one pickle stream: GLOBAL lines editable
    raw = buf.getvalue()
    assert b"numpy._core.multiarray\nscalar" in raw
    p = tmp_path / "old.pt"
    p.write_bytes(raw.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    assert float(load_fairseq(p)["extra_state"]["previous_training_time"]) == 12.5
    import_checkpoint(p, tmp_path / "out", which="student")
    _, cfg, _ = load_export(tmp_path / "out")
    assert cfg["d2v2_export"]["which"] == "student"


def test_parse_feature_spec():
    assert parse_feature_spec("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]") == \
        [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
    for bad in ["[(512, 10, 5)] * (10**10)", "[(1, 2, 3)] + open('x')", "[(1.5, 2, 3)]", "[(1, 2)]", "x"]:
        with pytest.raises(ImportRefused, match="feature_encoder_spec"):
            parse_feature_spec(bad)


@pytest.fixture(scope="module")
def dist():
    from d2v2_scale.distributed import init_distributed

    return init_distributed()


def _has_text_head() -> bool:
    from d2v2_scale.config import ModelConfig

    return "decoder_projection_layers" in {f.name for f in __import__("dataclasses").fields(ModelConfig)}


def _imported_training_model(path, preset_prefix: str):
    """A fairseq file's student (+ decoder / 1.0 head and mask_emb) and EMA teacher loaded into the
    project's training model built from the `<preset_prefix><modality>-tiny` preset with the file's
    model config (masked-slot noise 0).  -> (student, teacher, the file's model config, run config)."""
    from d2v2_scale.config import load_preset
    from d2v2_scale.export.fairseq.importer import decoder_state
    from d2v2_scale.twins import mapping
    from d2v2_scale.model import build_student, build_teacher

    ck = load_fairseq(path)
    student, mcfg, _ = import_state(ck, "student")
    teacher, _, _ = import_state(ck, "teacher")
    cfg = load_preset(f"{preset_prefix}{mcfg['modality']}-tiny")
    for k, v in mcfg.items():
        setattr(cfg.model, k, v)
    cfg.model.decoder_noise_std = 0.0
    torch.manual_seed(0)
    s, t = build_student(cfg), build_teacher(cfg)
    full = mapping.plain_to_megatron(student, cfg.model.num_heads)
    full.update(decoder_state(ck, mcfg))
    mapping.load_full_state_dict(s, full, strict=True)
    tfull = mapping.plain_to_megatron(teacher, cfg.model.num_heads)
    own = set(mapping.clean_state_dict(t.state_dict()))
    mapping.load_full_state_dict(t, {k: v for k, v in tfull.items() if k in own}, strict=True)
    return s, t, mcfg, cfg


@pytest.mark.parametrize("case", ["image_p0", "image_p1", "audio", "text"])
def test_imported_training_model_loss_matches_fairseq(oracle, dist, case):
    """Student, EMA teacher and decoder imported into the project's *training* model (Megatron
    student, teacher, conv decoder): on fairseq's batch and masks (dropout off, masked-slot noise
    std 0 on both sides) its loss equals fairseq's pretraining loss."""
    if case == "text" and not _has_text_head():
        pytest.skip("the training decoder has no 2-layer text head (docs/REFERENCE.md §1.10 D1) in this version")
    ref = torch.load(oracle / case / "oracle.pt")
    s, t, mcfg, _ = _imported_training_model(oracle / case / "checkpoint.pt", "")
    batch = {"source": ref["source"], "mask": ref["mask"].bool()}
    with torch.no_grad():
        loss, stats = s.eval()(batch, teacher=t)
    mod = mcfg["modality"].upper()
    want_reg = ref["losses"][f"{mod}_regression"]
    assert abs(stats["loss_regression"].item() - want_reg) < 1e-5 * max(1.0, abs(want_reg)), \
        (stats["loss_regression"].item(), want_reg)
    if "cls" in ref["losses"]:
        assert abs(stats["loss_cls"].item() - ref["losses"]["cls"]) < 1e-5
    assert abs(loss.item() - sum(ref["losses"].values())) < 1e-5 * max(1.0, abs(loss.item()))
    assert int(stats["masked_tokens"].item()) == ref["sample_size"]


def test_text_decoder_head(oracle):
    """The text recipe's 2-layer decoder head (docs/REFERENCE.md §1.10 D1) maps to decoder.proj.{0,2} where the
    training decoder has it, and is refused, naming the field, where it does not."""
    from d2v2_scale.export.fairseq.importer import decoder_state, import_state

    ck = load_fairseq(oracle / "text" / "checkpoint.pt")
    _, mcfg, _ = import_state(ck, "student")
    if _has_text_head():
        assert mcfg["decoder_projection_layers"] == 2
        assert {"decoder.proj.0.weight", "decoder.proj.2.weight"} <= set(decoder_state(ck, mcfg))
    else:
        with pytest.raises(ImportRefused, match="projection_layers=2"):
            decoder_state(ck, mcfg)


@pytest.mark.parametrize("case,layout", [("image_p1", ["parallel.tp=2", "parallel.zero_stage=1", "data.batch_size=2"]),
                                         ("audio", ["parallel.zero_stage=3", "data.batch_size=1"])],
                         ids=["image-prenet-tp2", "audio-zero3-dp2"])
def test_to_run_resumes_with_fairseq_loss(oracle, tmp_path, case, layout):
    """`d2v2-import --to-run RUN --preset P` -> the trainer (--resume auto) starts from the file's
    student, EMA teacher and decoder (fresh optimizer, step 0) and its first loss on fairseq's batch
    and masks is fairseq's loss, under TP=2 and under ZeRO-3 with the batch split over 2 ranks."""
    from d2v2_scale.testing import run_distributed
    from d2v2_scale.export.fairseq.importer import load_fairseq, import_state

    run = tmp_path / "run"
    preset = f"{case.split('_')[0]}-tiny"
    assert main([str(oracle / case / "checkpoint.pt"), "--to-run", str(run), "--preset", preset]) == 0
    assert (run / "checkpoints" / "imported" / "weights.safetensors").is_file()
    res = run_distributed("tests.dist_bodies_import:resume_import_body", nproc=2, timeout=240, args=[
        str(run), str(oracle / case), "model.decoder_noise_std=0", "optim.warmup_steps=1", *layout])
    ref = torch.load(oracle / case / "oracle.pt")
    mod = case.split("_")[0].upper()
    for r in res.values():
        assert r["fresh"] and r["step"] == 1 and r["updates"] == 1
        assert abs(r["reg"] - ref["losses"][f"{mod}_regression"]) < 1e-4, (r, ref["losses"])
        if r["dp"] == 1:
            assert abs(r["loss"] - sum(ref["losses"].values())) < 1e-4, (r, ref["losses"])
    assert "fresh optimizer and LR schedule from step 0" in res[0]["log"]
    # the trainer's teacher started as the file's EMA teacher, not as a copy of the student
    teacher, _, _ = import_state(load_fairseq(oracle / case / "checkpoint.pt"), "teacher")
    sums = res[0]["teacher_sums"]
    names = [k for k in sums if k.endswith("self_attention.linear_proj.bias")]  # replicated under TP
    assert names
    for k in names:
        plain = k.replace("encoder.", "").replace(".self_attention.linear_proj.", ".attn.proj.")
        assert abs(sums[k] - teacher[plain].sum().item()) < 1e-4, k
    # a second import into a run that has one is refused without --force
    assert main([str(oracle / case / "checkpoint.pt"), "--to-run", str(run), "--preset", preset]) == 2


# ---- data2vec 1.0: fairseq's data2vec_audio / data2vec_text ------------------------------------

# fp16-stored student weights, cast to fp32 on both sides; the rest is summation order (measured:
# <= 1e-6 on every layer)
TOL1 = 2e-5


def _keep(ref) -> torch.Tensor:
    """[B, T] True at real (non-padded) positions of the oracle's batch."""
    return ~(ref["frame_padding"] if "frame_padding" in ref else ref["padding_mask"])


@pytest.mark.parametrize("case", fairseq_oracle.CASES1)
def test_import_d2v1_matches_fairseq(oracle, case, tmp_path):
    """data2vec 1.0 speech / text files written by fairseq's own Data2VecAudioModel /
    Data2VecTextModel: `d2v2-import` (student and EMA teacher) -> the plain twin's output of every
    block and every FFN tap equal fairseq's on a right-padded batch (fp32, |diff| < TOL1, real
    positions), and the twin finds the same padded frames."""
    ref = torch.load(oracle / case / "oracle.pt")
    keep = _keep(ref)
    args = (ref["source"], ref["padding_mask"]) if case == "d2v1_audio" else (ref["source"],)
    outs, worst = {}, 0.0
    for which in ("student", "teacher"):
        enc, cfg, _ = _import(oracle, case, which, tmp_path)
        with torch.no_grad():
            out = outs[which] = enc(*args)
        want = ref[which]
        assert len(out["hidden"]) == len(want["hidden"]) == cfg["depth"] == 3
        assert (out["padding"] if out["padding"] is not None else torch.zeros_like(keep)).equal(~keep)
        for name in ("hidden", "ffn"):
            for i, (a, b) in enumerate(zip(out[name], want[name])):
                diff = (a[keep] - b[keep]).abs().max().item()
                assert diff < TOL1, f"{case} {which} {name}[{i}] differs from fairseq by {diff}"
                worst = max(worst, diff)
        assert out["x"][keep].abs().max() > 0.5
        prov = cfg["d2v2_export"]
        assert cfg["variant"] == "data2vec1" and not cfg["alibi"] and prov["source"] == "fairseq"
        assert prov["fp16_student"] and prov["step"] == 9
    print(f"fairseq {case} -> plain twin: max |diff| over every layer, student and teacher = {worst:.3g}")
    # the teacher is the file's EMA, not the student (the fixture perturbs them apart)
    assert (outs["teacher"]["ffn"][-1] - outs["student"]["ffn"][-1]).abs().max() > 100 * TOL1
    # d2v2-probe's random-init baseline builds the training model from config.json
    from d2v2_scale.export.probe import training_init

    assert set(training_init(cfg, 1).state_dict()) == set(enc.state_dict())
    if case == "d2v1_audio":  # the EMA covers the transformer only: the CNN front end is the student's
        assert cfg["conv_feature_layers"] == [[16, 10, 5], [16, 3, 2], [16, 3, 2], [16, 2, 2]]
        assert cfg["conv_pos_width"] == 5 and cfg["conv_pos_depth"] == 2 and cfg["conv_pos_groups"] == 4
        assert sorted(prov["from_student"]) == sorted(
            [f"local.cnn.convs.{i}.weight" for i in range(4)] + [f"local.cnn.norms.{i}.{t}" for i in range(4)
                                                                  for t in ("weight", "bias")]
            + ["local.norm.weight", "local.norm.bias", "local.proj.weight", "local.proj.bias"])
    else:  # encoder._ema holds the sentence encoder with its (copied) embeddings
        assert prov["from_student"] == [] and cfg["vocab_size"] == 24 and cfg["max_positions"] == 24
        assert cfg["head_layers"] == 2 and cfg["pad_token_id"] == 1
        assert (tmp_path / "d2v1_text-teacher" / "dict.txt").read_text() == (oracle / case / "dict.txt").read_text()


def _drop_q(ck):
    del ck["model"]["encoder.layers.1.self_attn.q_proj.weight"]


def _no_ema(ck):
    del ck["model"]["_ema"]


REFUSALS1 = [
    ("d2v1_audio", lambda ck: ck["cfg"]["model"].update(pos_conv_depth=1), "model.pos_conv_depth=1"),
    ("d2v1_audio", lambda ck: ck["cfg"]["model"].update(extractor_mode="default"), "model.extractor_mode='default'"),
    ("d2v1_audio", lambda ck: ck["cfg"]["model"].update(conv_feature_layers="[(16, 10, 5)] * 2 + x"),
     "model.conv_feature_layers"),
    ("d2v1_audio", lambda ck: ck["cfg"]["model"].update(_name="wav2vec2"), "model._name='wav2vec2'"),
    ("d2v1_audio", _drop_q, "layer 1 lacks self_attn.{q,k,v}_proj.weight"),
    ("d2v1_audio", lambda ck: ck["cfg"]["model"].update(encoder_ffn_embed_dim=128), "shape mismatch"),
    ("d2v1_audio", _no_ema, "no EMA teacher (model['_ema']"),
    ("d2v1_text", lambda ck: ck["cfg"]["model"]["transformer"]["encoder"].update(normalize_before=True),
     "model.transformer.encoder.normalize_before=True"),
    ("d2v1_text", lambda ck: ck["model"].update({"encoder.sentence_encoder.layer_norm.weight": torch.ones(32)}),
     "'encoder.sentence_encoder.layer_norm.weight' has no place"),
    ("d2v1_text", lambda ck: ck["model"].pop("encoder._ema"), "no EMA teacher (model['encoder._ema']"),
]


@pytest.mark.parametrize("case,edit,msg", REFUSALS1, ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSALS1)])
def test_import_d2v1_refuses(oracle, tmp_path, case, edit, msg):
    """An unknown model, a missing tensor, a config the tensors do not fit, what the twin cannot
    express, or a teacher asked of a file without EMA: one message naming the field; nothing written."""
    p = _resave(oracle, case, tmp_path, edit)
    dict_path = oracle / case / "dict.txt" if case == "d2v1_text" else None
    with pytest.raises(ImportRefused) as e:
        import_checkpoint(p, tmp_path / "out", dict_path=dict_path)
    assert msg in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()
    if "EMA" in msg:  # the student still imports, and the message says how
        assert "--which student" in str(e.value)
        import_checkpoint(p, tmp_path / "out", which="student", dict_path=dict_path)


def test_import_d2v1_text_needs_dict(oracle, tmp_path, capsys):
    ck = str(oracle / "d2v1_text" / "checkpoint.pt")
    assert main([ck, "--out", str(tmp_path / "o")]) == 2
    assert "--dict dict.txt" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_to_run_d2v1_speech_resumes_with_fairseq_loss(oracle, tmp_path, capsys):
    """`d2v2-import --to-run RUN --preset d2v1-audio-tiny` on a fairseq data2vec_audio file ->
    the trainer (--resume auto, one process) starts from the file's student (mask_emb and final_proj
    included) and EMA teacher, fresh optimizer at step 0; its first loss on fairseq's batch and mask
    is fairseq's pretraining loss (dropout off), and one update runs.  A 2.0 preset is refused."""
    from d2v2_scale.testing import run_distributed

    ck, run = oracle / "d2v1_audio" / "checkpoint.pt", tmp_path / "run"
    assert main([str(ck), "--to-run", str(run), "--preset", "audio-tiny"]) == 2
    assert "is a data2vec2 preset; the file holds a data2vec1 model" in capsys.readouterr().err
    assert main([str(ck), "--to-run", str(run), "--preset", "d2v1-audio-tiny"]) == 0
    res = run_distributed("tests.dist_bodies_import:resume_import_body", nproc=1, timeout=240, args=[
        str(run), str(oracle / "d2v1_audio"), "optim.warmup_steps=1"])[0]
    want = torch.load(oracle / "d2v1_audio" / "oracle.pt")["loss"]
    assert res["fresh"] and res["step"] == 1 and res["updates"] == 1
    assert abs(res["loss"] - want["loss"]) < 1e-5 * max(1.0, want["loss"]), (res["loss"], want["loss"])
    print(f"d2v1 speech --to-run: first loss {res['loss']:.6f}, fairseq {want['loss']:.6f}")
    assert "fresh optimizer and LR schedule from step 0" in res["log"]
    teacher, _, _ = import_state(load_fairseq(ck), "teacher")
    for k, v in res["teacher_sums"].items():
        if k.endswith("self_attention.linear_proj.bias"):
            plain = k.replace("encoder.", "").replace(".self_attention.linear_proj.", ".attn.proj.")
            assert abs(v - teacher[plain].sum().item()) < 1e-4, k


def test_d2v1_heads_to_training_names(oracle, tmp_path):
    """--to-run's head mapping: speech final_proj -> decoder.{weight,bias} + mask_emb; text
    regression_head.{0,2} -> decoder.{0,2} (head_layers 2), regression_head.0 -> decoder.* (1)."""
    from d2v2_scale.export.fairseq.importer import decoder_state

    ck = load_fairseq(oracle / "d2v1_audio" / "checkpoint.pt")
    assert sorted(decoder_state(ck, import_state(ck, "student")[1])) == ["decoder.bias", "decoder.weight", "mask_emb"]
    ck = load_fairseq(oracle / "d2v1_text" / "checkpoint.pt")
    assert sorted(decoder_state(ck, import_state(ck, "student")[1])) == \
        ["decoder.0.bias", "decoder.0.weight", "decoder.2.bias", "decoder.2.weight"]
    ck["cfg"]["model"]["head_layers"] = 1
    for k in [k for k in ck["model"] if "regression_head" in k]:
        del ck["model"][k]
    ck["model"].update({"encoder.regression_head.0.weight": torch.ones(32, 32), "encoder.regression_head.0.bias":
                        torch.ones(32)})
    mcfg = import_state(ck, "student")[1]
    assert mcfg["head_layers"] == 1 and sorted(decoder_state(ck, mcfg)) == ["decoder.bias", "decoder.weight"]
    del ck["model"]["encoder.regression_head.0.weight"], ck["model"]["encoder.regression_head.0.bias"]
    with pytest.raises(ImportRefused, match="no regression head"):
        decoder_state(ck, mcfg)


@pytest.mark.parametrize("case", fairseq_oracle.CASES1)
def test_imported_d2v1_training_model_loss_matches_fairseq(oracle, dist, case):
    """Student (with mask_emb and the regression head) and EMA teacher of a fairseq data2vec 1.0
    file loaded into the project's data2vec 1.0 *training* model: on fairseq's batch and mask
    (dropout off; text: the teacher reads the whole original sequence on both sides) its loss
    equals fairseq's pretraining loss."""
    ref = torch.load(oracle / case / "oracle.pt")["loss"]
    s, t, _, cfg = _imported_training_model(oracle / case / "checkpoint.pt", "d2v1-")
    cfg.validate()  # the file's config is a valid data2vec 1.0 run config
    batch = {k: v for k, v in ref.items() if k in ("source", "student_source", "mask")}
    with torch.no_grad():
        loss, stats = s.eval()(batch, teacher=t)
    assert int(stats["masked_tokens"].item()) == ref["sample_size"]
    assert abs(loss.item() - ref["loss"]) < 1e-5 * max(1.0, ref["loss"]), (loss.item(), ref["loss"])


@pytest.mark.parametrize("case", ["image_p1", "audio", "text", "d2v1_audio", "d2v1_text"])
def test_to_run_imports_fp32_checkpoints(oracle, tmp_path, case):
    """`d2v2-import --to-run` on an fp32 (fairseq --amp) file: the teacher's entries that the EMA
    does not hold are the student's values in tensors of their own (the file's fp32 student used
    to be shared between them and safetensors refused to write it), and every weight is the file's
    fp32 value, unrounded."""
    from safetensors.torch import load_file

    from d2v2_scale.twins import mapping

    ck_path, run = oracle / case / "checkpoint_fp32.pt", tmp_path / "run"
    preset = case.replace("d2v1_", "d2v1-").split("_")[0] + "-tiny"
    assert main([str(ck_path), "--to-run", str(run), "--preset", preset]) == 0
    got = load_file(run / "checkpoints" / "imported" / "weights.safetensors")
    meta = json.loads((run / "checkpoints" / "imported" / "import.json").read_text())
    ck = load_fairseq(ck_path)
    student, mcfg, _ = import_state(ck, "student")
    teacher, _, from_student = import_state(ck, "teacher")
    assert from_student == meta["teacher_from_student"]
    assert from_student or case in ("image_p1", "d2v1_text")  # the others' EMAs lack entries
    heads = mcfg["num_heads"]
    for k, v in mapping.plain_to_megatron(student, heads).items():
        assert torch.equal(got[f"student.{k}"], v), k
    for k, v in mapping.plain_to_megatron(teacher, heads).items():
        assert torch.equal(got[f"teacher.{k}"], v), k
    if not case.startswith("d2v1"):  # (the 1.0 oracle's student is fp16-rounded on purpose)
        # the file's student is fp32 and not fp16-representable: nothing was rounded on the way
        w = next(v for k, v in student.items() if k.endswith("weight") and v.dim() == 2)
        assert not torch.equal(w, w.half().float())
