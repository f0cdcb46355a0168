"""d2v2-export --format hf: tiny models trained a few steps -> a transformers folder ->
AutoModel.from_pretrained in a fresh process; every hidden state equals the plain twin's on the
same input (fp32), with padding in the batch for speech and text.  Refusals for the models no
transformers class computes exactly; a fairseq data2vec 2.0 text checkpoint -> RobertaModel."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# transformers is imported only in the fresh HF processes (its import costs seconds): find it, don't load it
if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed (pip install -e '.[hf]')", allow_module_level=True)

from d2v2_scale.testing import run_distributed  # noqa: E402
from tests import data_fixtures  # noqa: E402

ATOL = 2e-5  # fp32; measured max |diff| is reported by each test's assertion message

# the HF side runs in a fresh interpreter: only transformers + torch, nothing of this project
HF_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from transformers import AutoModel, AutoTokenizer
    jobs, res = torch.load(sys.argv[1]), {}
    for name, (folder, batch) in jobs.items():
        model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
        with torch.no_grad():
            o = model.eval()(**batch, output_hidden_states=True)
        res[name] = {"last": o.last_hidden_state, "hidden": list(o.hidden_states), "cls": type(model).__name__,
                     "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"])}
        if os.path.exists(os.path.join(folder, "tokenizer_config.json")):
            t = AutoTokenizer.from_pretrained(folder)
            b = t(["the cat sat on the mat. <mask>", "a"], padding=True)
            res[name]["tok"] = {"ids": b["input_ids"], "mask": b["attention_mask"], "mask_id": t.mask_token_id}
    torch.save(res, sys.argv[2])
""")


def _hf_outputs(jobs: dict, tmp: Path) -> dict:
    """{name: (HF folder, model kwargs)} -> {name: outputs} of AutoModel.from_pretrained, in one
    fresh interpreter (one transformers import for all)."""
    inp, out, script = tmp / "hf_in.pt", tmp / "hf_out.pt", tmp / "hf_run.py"
    torch.save({k: (str(f), b) for k, (f, b) in jobs.items()}, inp)
    script.write_text(HF_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(inp), str(out)], capture_output=True,
                       text=True, timeout=300, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


def _inputs(cfg: dict):
    """(plain twin args, HF kwargs, keep [B, T'] mask of the real positions or None)."""
    g = torch.Generator().manual_seed(7)
    if cfg["modality"] == "text":
        pad = cfg["pad_token_id"]
        ids = torch.randint(4, cfg["vocab_size"] - 1, (3, 24), generator=g)
        ids[ids == pad] = pad + 3
        ids[1, 17:] = pad  # right padding, as the trainer's batches
        ids[2, 9:] = pad
        keep = ids.ne(pad)
        return (ids,), {"input_ids": ids, "attention_mask": keep.long()}, keep
    if cfg["modality"] == "audio":
        wav = torch.randn(3, 8000, generator=g)
        n = torch.tensor([8000, 5200, 3000])
        padm = torch.arange(8000)[None] >= n[:, None]
        wav = wav.masked_fill(padm, 0.0)
        return (wav, padm), {"input_values": wav, "attention_mask": (~padm).long()}, None
    img = torch.randn(2, cfg["in_chans"], cfg["image_size"], cfg["image_size"], generator=g)
    return (img,), {"pixel_values": img}, None


def _compare(export: Path, got: dict, expect_cls: str) -> float:
    """All hidden states of the HF model (`got`, on _inputs(cfg)) vs the plain twin; returns the max |diff|."""
    from d2v2_scale.export import load_export

    enc, cfg, _ = load_export(export)
    args, _, keep = _inputs(cfg)
    with torch.no_grad():
        ref = enc(*args)
    assert got["cls"] == expect_cls
    # every tensor of the model comes from the export, except RoBERTa's pooler (tanh(dense(CLS)),
    # not part of the pretrained encoder; the classification heads do not use it)
    assert got["unexpected"] == []
    assert got["missing"] == (["pooler.dense.bias", "pooler.dense.weight"] if cfg["modality"] == "text" else [])
    if keep is None and ref["padding"] is not None:
        keep = ~ref["padding"]
    e = 1 if cfg["modality"] == "image" else 0
    if keep is not None:  # padded positions are padding on both sides: compare the real ones
        keep = torch.cat([torch.ones(keep.shape[0], e, dtype=torch.bool), keep], 1)
    # hidden_states: (input of block 0, output of block 0, ..., output of the last block)
    assert len(got["hidden"]) == len(ref["hidden"]) + 1
    # vision (pre-LN): the list's last entry is the last block's output, last_hidden_state is normed
    pairs = list(zip(got["hidden"][1:], ref["hidden"])) + [(got["last"], ref["x"])]
    worst = 0.0
    for a, b in pairs:
        assert a.shape == b.shape
        if keep is not None:
            a, b = a[keep], b[keep]
        worst = max(worst, (a - b).abs().max().item())
    assert worst <= ATOL, f"max |hf - plain| = {worst:.3g}"
    assert ref["x"].abs().max() > 0.5  # not a trivially small output
    return worst


def _check_tokenizer(folder: Path, got: dict):
    """AutoTokenizer's ids (computed in the HF process) vs the run's sentencepiece model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    cfg = json.loads((folder / "config.json").read_text())
    pad, n = cfg["pad_token_id"], len(sp.encode("a")) + 2
    # <s> + the spm ids + </s>, as the loader frames rows; right padding with the model's pad id
    assert got["ids"][1] == [sp.bos_id()] + sp.encode("a") + [sp.eos_id()] + [pad] * (len(got["ids"][0]) - n)
    assert got["mask"][1] == [1] * n + [0] * (len(got["ids"][0]) - n)
    if cfg["vocab_size"] > sp.get_piece_size():  # data2vec 1.0: <mask> is the row after the spm ids
        assert got["mask_id"] == sp.get_piece_size() and got["ids"][0][-2] == got["mask_id"]
    else:
        assert got["ids"][0][1:len(sp.encode("the cat sat on the mat."))+1] == sp.encode("the cat sat on the mat.")


CASES = [("text-tiny", "text", "RobertaModel"), ("d2v1-text-tiny", "text", "Data2VecTextModel"),
         ("d2v1-audio-tiny", "audio", "Data2VecAudioModel"), ("d2v1-image-tiny", "image", "Data2VecVisionModel"),
         # data2vec-aqc: its encoder is a data2vec 1.0 speech encoder (the aqc.* parts are student-only)
         ("aqc-tiny", "audio", "Data2VecAudioModel")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Each tiny model trained 3 updates (weights not at init), all in one process (one start)."""
    tmp = tmp_path_factory.mktemp("hfruns")
    specs = [f"{p}|{tmp / p}|data.manifest={data_fixtures.prepared(m) / 'manifest.json'}|max_steps=3|"
             "checkpoint.every_steps=1000|parallel.zero_stage=0" for p, m, _ in CASES]
    run_distributed("tests.dist_bodies_scaleout:fit_presets_body", nproc=1, timeout=400, args=specs)
    return tmp


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """Every case: plain export + `d2v2-export --format hf`; the HF models run in one fresh process."""
    from d2v2_scale.export import export_checkpoint, load_export
    from d2v2_scale.export.cli import main

    tmp = tmp_path_factory.mktemp("hfexports")
    jobs = {}
    for preset, _, _ in CASES:
        # --format hf of a checkpoint holds the student by default (what the reference fine-tunes)
        export_checkpoint(runs / preset, tmp / preset / "plain", which="student")
        assert main([str(runs / preset), "--out", str(tmp / preset / "hf"), "--format", "hf"]) == 0
        _, cfg, _ = load_export(tmp / preset / "plain")
        jobs[preset] = (tmp / preset / "hf", _inputs(cfg)[1])
        _random_export(cfg, tmp / preset)
        jobs[preset + ":random"] = (tmp / preset / "rand-hf", _inputs(cfg)[1])
    return tmp, _hf_outputs(jobs, tmp)


def _random_export(cfg: dict, tmp: Path):
    """The same model with every tensor moved far from its init (a few updates leave BEiT's layer
    scale at ~1e-4, which would hide a wrong mapping inside the blocks): plain + hf exports."""
    import types

    from d2v2_scale.export.consolidate import plain_encoder, write_export
    from d2v2_scale.export.hf import write_hf

    enc = plain_encoder(types.SimpleNamespace(**cfg))
    g = torch.Generator().manual_seed(3)
    sd = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in enc.state_dict().items()}
    write_export(tmp / "rand-plain", sd, cfg)
    write_hf(tmp / "rand-hf", sd, cfg)


@pytest.mark.parametrize("preset,modality,cls", CASES, ids=[c[0] for c in CASES])
def test_hf_export_equals_plain_twin(preset, modality, cls, runs, exported, capsys):
    tmp, outs = exported
    hf = tmp / preset / "hf"
    hcfg = json.loads((hf / "config.json").read_text())
    assert hcfg["architectures"] == [cls] and hcfg["d2v2_export"]["which"] == "student"
    if modality in ("audio", "image"):
        pre = json.loads((hf / "preprocessor_config.json").read_text())
        assert pre["do_normalize"] is True
    if cls == "Data2VecAudioModel":  # base_100h's fine-tuning regularizers, not transformers' 0.1 dropouts
        assert (hcfg["mask_time_prob"], hcfg["mask_feature_prob"], hcfg["layerdrop"], hcfg["hidden_dropout"],
                hcfg["final_dropout"]) == (0.65, 0.5, 0.1, 0.0, 0.0)
    if modality == "text":  # the run's sentencepiece model, as a tokenizer AutoTokenizer loads
        assert (hf / "tokenizer.model").read_bytes() == (data_fixtures.prepared(modality) / "spm.model").read_bytes()
        _check_tokenizer(hf, outs[preset]["tok"])
    if cls == "Data2VecAudioModel":  # the fine-tuning masks' vector = the student's learned mask_emb
        _check_mask_embedding(runs / preset, hf, tmp / preset / "plain", tmp / preset, capsys)
    worst = _compare(tmp / preset / "plain", outs[preset], cls)
    worst_r = _compare(tmp / preset / "rand-plain", outs[preset + ":random"], cls)
    print(f"{preset}: max |hf - plain| = {worst:.3g} (trained), {worst_r:.3g} (random weights)")


def _check_mask_embedding(run: Path, hf: Path, plain: Path, tmp: Path, capsys):
    """masked_spec_embed of a checkpoint's HF export is the student's mask_emb, read straight from
    the checkpoint (the reference fine-tunes with the pretrained one); from a plain folder, which
    keeps no mask_emb, it is zeros and the export says so."""
    from safetensors.torch import load_file

    from d2v2_scale.export.cli import main
    from d2v2_scale.export.consolidate import read_marker, resolve_checkpoint, student_state

    folder = resolve_checkpoint(run)
    want = student_state(folder, read_marker(folder))["mask_emb"].float()
    got = load_file(str(hf / "model.safetensors"))["masked_spec_embed"]
    assert want.abs().sum() > 0 and torch.equal(got, want)
    capsys.readouterr()
    assert main([str(plain), "--out", str(tmp / "hf-from-plain"), "--format", "hf"]) == 0
    err = capsys.readouterr().err
    assert "keeps no mask embedding" in err and "export from the checkpoint" in err
    assert not load_file(str(tmp / "hf-from-plain" / "model.safetensors"))["masked_spec_embed"].any()


# ---- d2v2-finetune on data2vec 1.0 folders: transformers' own task classes ----------------------


def _labelled_speech(root: Path) -> Path:
    """Five spoken digit words, two recordings each (asterisk's prompts n.wav and h-n.wav) ->
    d2v2-prep audio --label-from parent: transcripts one .. five."""
    import shutil

    from data_prep.cli import main

    data_fixtures.asterisk_wavs(1)  # apt-installs the sounds when missing
    for n, word in enumerate(["one", "two", "three", "four", "five"], 1):
        (root / "raw" / word).mkdir(parents=True)
        for stem in (f"{n}", f"h-{n}"):
            shutil.copy(data_fixtures.ASTERISK_DIR / "digits" / f"{stem}.wav", root / "raw" / word / f"{stem}.wav")
    assert main(["audio", str(root / "raw"), "--out", str(root / "prep"), "--label-from", "parent", "--workers", "1",
                 "--min-seconds", "0.2", "--max-seconds", "3"]) == 0
    return root / "prep" / "manifest.json"


def test_layer_decay_over_transformers_blocks(exported):
    """Layer-wise LR decay on transformers' own classes: block i of N (Data2VecVision
    encoder.layer, Data2VecAudio encoder.layers) gets lr * decay ** (N - i), the rest lr."""
    from transformers import AutoModelForCTC, AutoModelForImageClassification

    from d2v2_scale.finetune.common import load_model
    from d2v2_scale.finetune.recipes import layer_decay_groups

    tmp, _ = exported
    vis = load_model(AutoModelForImageClassification, str(tmp / "d2v1-image-tiny" / "hf"), False, num_labels=3)
    aud = load_model(AutoModelForCTC, str(tmp / "d2v1-audio-tiny" / "hf"), False, vocab_size=8)
    for m, blocks, head in ((vis, vis.data2vec_vision.encoder.layer, vis.classifier),
                            (aud, aud.data2vec_audio.encoder.layers, aud.lm_head)):
        lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in layer_decay_groups(m, 1e-3, 0.65, 0.05)
                 for p in g["params"]}
        assert len(blocks) == 2 and len(lr_of) == sum(1 for p in m.parameters() if p.requires_grad)
        w0, w1 = (next(p for n, p in b.named_parameters() if n.endswith("dense.weight")) for b in blocks)
        assert lr_of[id(w0)] == (pytest.approx(1e-3 * 0.65 ** 2), 0.05)
        assert lr_of[id(w1)] == (pytest.approx(1e-3 * 0.65), 0.05)
        assert lr_of[id(head.weight)] == (1e-3, 0.05) and lr_of[id(head.bias)] == (1e-3, 0.0)


@pytest.mark.parametrize("preset,task,cls,pipe", [
    ("d2v1-audio-tiny", "ctc", "Data2VecAudioForCTC", "automatic-speech-recognition"),
    ("d2v1-image-tiny", "image", "Data2VecVisionForImageClassification", "image-classification")],
    ids=["speech-ctc", "vision-image"])
def test_finetune_d2v1_folders(preset, task, cls, pipe, exported, tmp_path, capsys):
    """d2v2-finetune on a data2vec 1.0 export (the same folders as above): transformers' own task
    class (no code in the saved folder), a few Trainer steps with the recipe's fine-tuning config,
    the weights move, pipeline(...) runs on the saved folder without trust_remote_code; the other
    task's head on this encoder: one line naming the folder's kind and the task to use."""
    import numpy as np
    from safetensors.torch import load_file
    from transformers import pipeline

    from d2v2_scale.finetune.cli import main

    tmp, _ = exported
    hf = tmp / preset / "hf"
    if task == "ctc":  # held out: the h-n recordings
        man, extra = _labelled_speech(tmp_path / "speech"), ["--eval-paths", "/h-"]
    else:  # a labelled budget of 30 training rows (the low-resource setting)
        man, extra = data_fixtures.prepared("image") / "manifest.json", ["--train-rows", "30"]
    assert main([task, str(hf), "--data", str(man), "--out", str(tmp_path / "ft"), "--recipe", "small",
                 "--steps", "4", "--batch-size", "4", "--lr", "1e-2", *extra]) == 0
    res = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert res["steps"] == 4 and res["n_eval"] == (5 if task == "ctc" else res["n_eval"])
    assert res["n_train"] == (5 if task == "ctc" else 30)
    saved = tmp_path / "ft" / "model"
    scfg = json.loads((saved / "config.json").read_text())
    assert scfg["architectures"] == [cls] and "auto_map" not in scfg and not list(saved.glob("*.py"))
    if task == "ctc":  # the small recipe's masks, base_100h's zero dropouts, frozen CNN
        assert (scfg["mask_time_prob"], scfg["mask_feature_length"], scfg["hidden_dropout"], scfg["final_dropout"],
                scfg["ctc_zero_infinity"]) == (0.1, 8, 0.0, 0.0, True)
        name, prefix = "encoder.layers.0.feed_forward.intermediate_dense.weight", "data2vec_audio."
    else:  # the reference's head: mean pooling + a new LayerNorm, drop path
        assert scfg["use_mean_pooling"] is True and scfg["drop_path_rate"] == 0.1
        name, prefix = "encoder.layer.0.intermediate.dense.weight", "data2vec_vision."
    before, after = load_file(str(hf / "model.safetensors")), load_file(str(saved / "model.safetensors"))
    assert not torch.equal(before[name], after[prefix + name])  # trained
    if task == "ctc":  # the same seed, the same run: the new head's init is seeded too (before Trainer seeds)
        assert main([task, str(hf), "--data", str(man), "--out", str(tmp_path / "again"), "--recipe", "small",
                     "--steps", "4", "--batch-size", "4", "--lr", "1e-2", *extra]) == 0
        again = load_file(str(tmp_path / "again" / "model" / "model.safetensors"))
        assert all(torch.equal(after[k], again[k]) for k in after)
        # --freeze-steps (fairseq's freeze_finetune_updates): only the CTC head trains for the first N updates
        for steps in (2, 3):
            out = tmp_path / f"frozen-{steps}"
            assert main([task, str(hf), "--data", str(man), "--out", str(out), "--recipe", "small", "--steps",
                         str(steps), "--freeze-steps", "2", "--batch-size", "4", "--lr", "1e-2", *extra]) == 0
            w = load_file(str(out / "model" / "model.safetensors"))
            enc = [k for k in before if k in {x[len(prefix):] for x in w}]
            assert len(enc) == len(before) and not torch.equal(w["lm_head.weight"], after["lm_head.weight"])
            moved = [k for k in enc if not torch.equal(before[k], w[prefix + k])]
            assert moved == [] if steps == 2 else name in moved
    if task == "ctc":
        conv = "feature_extractor.conv_layers.0.conv.weight"
        assert torch.equal(before[conv], after[prefix + conv])  # the frozen feature encoder
        got = pipeline(pipe, model=str(saved), device="cpu")(np.zeros(16000, dtype=np.float32))
        assert isinstance(got["text"], str)
    else:
        from PIL import Image

        assert len(pipeline(pipe, model=str(saved), device="cpu")(Image.new("RGB", (32, 32)), top_k=2)) == 2
    capsys.readouterr()
    other, fits = ("image", "ctc") if task == "ctc" else ("ctc", "image")
    assert main([other, str(hf), "--data", str(man), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    kind = ("a speech encoder (data2vec 1.0 / data2vec-aqc, Data2VecAudioModel)" if task == "ctc" else
            "an image encoder (data2vec 1.0, Data2VecVisionModel)")
    needs = "an image" if other == "image" else "a speech"
    assert f"holds {kind}; the {other} recipe needs {needs} encoder: use d2v2-finetune {fits}" in err
    assert err.count("\n") == 1 and not (tmp_path / "bad").exists()


# ---- refusals: no transformers class computes these exactly -----------------------------------


def _model_cfg(preset: str) -> dict:
    import dataclasses

    from d2v2_scale.config import build_config

    return dataclasses.asdict(build_config(preset).model)


@pytest.mark.parametrize("preset,over,why", [("text-tiny", {"pre_ln": True}, "pre_ln=true"),
                                             ("text-tiny", {"prenet_depth": 1}, "prenet_depth=1")])
def test_hf_refuses_models_without_an_exact_class(preset, over, why, tmp_path, capsys):
    import types

    from d2v2_scale.export.cli import main
    from d2v2_scale.export.consolidate import plain_encoder, write_export
    from d2v2_scale.export.hf import HFRefused, hf_target

    with pytest.raises(HFRefused, match=why) as e:
        hf_target(_model_cfg(preset) | over)
    assert "without --format hf" in str(e.value) and "twins/encoder.py" in str(e.value)
    # the CLI on a plain export of that model: exit 2, one line, nothing written
    cfg = _model_cfg(preset) | over | {"d2v2_export": {"which": "teacher", "step": 0}}
    write_export(tmp_path / "plain", plain_encoder(types.SimpleNamespace(**cfg)).state_dict(), cfg)
    assert main([str(tmp_path / "plain"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert why in err and err.count("\n") == 1 and not (tmp_path / "hf").exists()
    assert hf_target(_model_cfg("text-tiny")) == "RobertaModel"
    assert hf_target(_model_cfg("d2v1-image-tiny")) == "Data2VecVisionModel"
    # data2vec 2.0 image and speech: the folder's own model code (tests/test_export_hf_remote.py)
    assert hf_target(_model_cfg("image-tiny")) == hf_target(_model_cfg("audio-tiny")) == "Data2Vec2Model"


# ---- fairseq data2vec 2.0 checkpoints (the importer's fixture) -> transformers -----------------

from tests.test_import import oracle  # noqa: E402,F401  (session fixture: fairseq's own tiny checkpoints)


def test_fairseq_text_to_roberta_round_trip(oracle, tmp_path, capsys):  # noqa: F811
    """fairseq Data2VecMultiModel (text) -> d2v2-import --format hf -> RobertaModel in a fresh
    process: its output equals fairseq's own features on the oracle's input; the fairseq
    dictionary travels with it."""
    from d2v2_scale.export.fairseq.importer import main

    out = tmp_path / "hf"
    assert main([str(oracle / "text" / "checkpoint.pt"), "--out", str(out), "--which", "student",
                 "--dict", str(oracle / "text" / "dict.txt"), "--format", "hf"]) == 0
    assert "RobertaModel" in capsys.readouterr().out
    assert (out / "dict.txt").read_text() == (oracle / "text" / "dict.txt").read_text()
    ref = torch.load(oracle / "text" / "oracle.pt")
    got = _hf_outputs({"text": (out, {"input_ids": ref["source"]})}, tmp_path)["text"]
    assert got["cls"] == "RobertaModel" and got["unexpected"] == []
    diff = (got["last"] - ref["features"]).abs().max().item()
    assert diff < ATOL, f"RobertaModel differs from fairseq by {diff:.3g}"
    print(f"fairseq text -> RobertaModel: max |hf - fairseq| = {diff:.3g}")


def test_hf_student_export(runs, tmp_path):
    """--which student (the default of --format hf): the student's weights (not the teacher's), the
    same conversion as the teacher's; --which teacher gives the EMA teacher."""
    from safetensors.torch import load_file

    from d2v2_scale.export import export_checkpoint
    from d2v2_scale.export.cli import main
    from d2v2_scale.export.hf import to_hf

    run = runs / "d2v1-text-tiny"
    assert main([str(run), "--out", str(tmp_path / "hf-s"), "--format", "hf", "--which", "student"]) == 0
    assert json.loads((tmp_path / "hf-s" / "config.json").read_text())["d2v2_export"]["which"] == "student"
    cfg = export_checkpoint(run, tmp_path / "plain-s", which="student")
    want, _, _ = to_hf(load_file(str(tmp_path / "plain-s" / "model.safetensors")), cfg)
    got = load_file(str(tmp_path / "hf-s" / "model.safetensors"))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    # from the plain student folder, --which defaults to what the folder holds
    assert main([str(tmp_path / "plain-s"), "--out", str(tmp_path / "hf-s2"), "--format", "hf"]) == 0
    got2 = load_file(str(tmp_path / "hf-s2" / "model.safetensors"))
    assert all(torch.equal(got2[k], got[k]) for k in got)
    assert main([str(run), "--out", str(tmp_path / "hf-d"), "--format", "hf"]) == 0  # default: the student
    got_d = load_file(str(tmp_path / "hf-d" / "model.safetensors"))
    assert all(torch.equal(got_d[k], got[k]) for k in got)
    assert main([str(run), "--out", str(tmp_path / "hf-t"), "--format", "hf", "--which", "teacher"]) == 0
    k = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(load_file(str(tmp_path / "hf-t" / "model.safetensors"))[k], got[k])


def test_fairseq_d2v1_round_trips(oracle, tmp_path, capsys):  # noqa: F811
    """fairseq data2vec 1.0 files (fairseq's own Data2VecAudioModel / Data2VecTextModel, the
    importer's fixture) -> d2v2-import -> d2v2-export --format hf -> AutoModel.from_pretrained in a
    fresh process: Data2VecAudioModel / Data2VecTextModel, every block's output equals fairseq's
    on a right-padded batch (real positions, fp32, ATOL)."""
    from d2v2_scale.export.cli import main as export_main
    from d2v2_scale.export.fairseq.importer import main as import_main

    jobs, refs = {}, {}
    for case, cls in (("d2v1_audio", "Data2VecAudioModel"), ("d2v1_text", "Data2VecTextModel")):
        plain, hf = tmp_path / f"{case}-plain", tmp_path / f"{case}-hf"
        extra = ["--dict", str(oracle / case / "dict.txt")] if case == "d2v1_text" else []
        assert import_main([str(oracle / case / "checkpoint.pt"), "--out", str(plain), "--which", "student",
                            *extra]) == 0
        assert export_main([str(plain), "--out", str(hf), "--format", "hf"]) == 0
        assert json.loads((hf / "config.json").read_text())["architectures"] == [cls]
        ref = refs[case] = torch.load(oracle / case / "oracle.pt")
        if case == "d2v1_audio":
            batch = {"input_values": ref["source"], "attention_mask": (~ref["padding_mask"]).long()}
        else:
            batch = {"input_ids": ref["source"], "attention_mask": (~ref["padding_mask"]).long()}
        jobs[case] = (hf, batch)
    got = _hf_outputs(jobs, tmp_path)
    for case, cls in (("d2v1_audio", "Data2VecAudioModel"), ("d2v1_text", "Data2VecTextModel")):
        ref, g = refs[case], got[case]
        assert g["cls"] == cls and g["unexpected"] == []
        keep = ~(ref["frame_padding"] if case == "d2v1_audio" else ref["padding_mask"])
        want = ref["student"]["hidden"]
        assert len(g["hidden"]) == len(want) + 1  # (block 0's input, then every block's output)
        pairs = list(zip(g["hidden"][1:], want)) + [(g["last"], ref["student"]["x"])]
        diff = max((a[keep] - b[keep]).abs().max().item() for a, b in pairs)
        assert diff < ATOL, f"{cls} differs from fairseq by {diff:.3g}"
        print(f"fairseq {case} -> {cls}: max |hf - fairseq| = {diff:.3g}")


# ---- d2v2-finetune text on the exported text folders (the exports above; no extra pretraining) ---


def test_finetune_text_on_exports(exported, tmp_path, capsys):
    """d2v2-finetune text on the data2vec 2.0 (RobertaModel) and 1.0 (Data2VecTextModel) exports,
    a few steps each: WordNet definitions, noun.animal vs noun.plant (JSON lines, a stratified
    held-out half) on 2.0; the same as sentence pairs in a CSV with --eval-data on 1.0; a numeric
    target (--regression) in a TSV on 2.0.  metrics.json, the encoder starts from the export (not
    random), and pipeline("text-classification") runs on every saved folder."""
    from safetensors.torch import load_file
    from transformers import pipeline

    from d2v2_scale.finetune.cli import main
    from tests.test_finetune_text import labelled_glosses, write_rows

    tmp, _ = exported
    docs = labelled_glosses(("noun.animal", "noun.plant"), 24)
    hf2, hf1 = tmp / "text-tiny" / "hf", tmp / "d2v1-text-tiny" / "hf"
    write_rows(tmp_path / "wn.jsonl", [{"text": t, "label": lab} for lab, t in docs])
    pairs = [{"sentence1": t, "sentence2": docs[(i + 7) % len(docs)][1], "label": int(lab == "noun.plant")}
             for i, (lab, t) in enumerate(docs)]
    write_rows(tmp_path / "pairs.csv", [q for i, q in enumerate(pairs) if i % 4 < 2])  # both labels in each
    write_rows(tmp_path / "pairs-dev.csv", [q for i, q in enumerate(pairs) if i % 4 >= 2])
    write_rows(tmp_path / "score.tsv", [{"sentence": t, "score": f"{len(t.split()) / 10:.2f}"} for _, t in docs])
    small = ["--recipe", "small", "--steps", "4", "--batch-size", "8"]
    runs = {"2.0": [hf2, "--data", str(tmp_path / "wn.jsonl")],
            "1.0-pairs": [hf1, "--data", str(tmp_path / "pairs.csv"), "--eval-data", str(tmp_path / "pairs-dev.csv")],
            # the reference recipe: 10 epochs (24 rows at batch 32: 10 updates), lr 2e-5, 6% warm-up (0)
            "2.0-regression": [hf2, "--data", str(tmp_path / "score.tsv"), "--label-column", "score", "--regression",
                               "--recipe", "reference"]}
    for name, (folder, *args) in runs.items():
        out = tmp_path / name
        assert main(["text", str(folder), *(small if "reference" not in args else []), *args, "--out", str(out)]) == 0
        m = json.loads((out / "metrics.json").read_text())
        assert m["n_eval"] == 24 and m["n_train"] == 24, (name, m)
        assert (m["steps"], m["lr"]) == ((10, 2e-5) if "reference" in args else (4, 2e-3)), (name, m)
        saved = out / "model"
        cfg = json.loads((saved / "config.json").read_text())
        want_cls = "RobertaForSequenceClassification" if folder == hf2 else "Data2VecTextForSequenceClassification"
        assert cfg["architectures"] == [want_cls] and not list(saved.glob("*.py"))
        # the encoder was fine-tuned from the export: moved a little by 4 steps, not re-initialized
        base = load_file(str(folder / "model.safetensors"))
        new = load_file(str(saved / "model.safetensors"))
        key = "embeddings.word_embeddings.weight"
        pre = next(k for k in new if k.endswith(key))
        d = (new[pre] - base[key]).abs().max().item()
        assert 0 < d < 0.05, (name, d)
        clf = pipeline("text-classification", model=str(saved))
        got = clf(["a small carnivorous mammal", "a tall tree with needles"])
        if name == "2.0-regression":
            assert set(m) >= {"pearson", "spearman", "mse"} and len(got) == 2
        else:
            assert set(m) >= {"accuracy", "f1", "mcc"} and 0 <= m["accuracy"] <= 1
            labels = {"noun.animal", "noun.plant"} if name == "2.0" else {"0", "1"}
            assert {g["label"] for g in got} <= labels and m["classes"] == sorted(labels)
    assert m["text_column"] == "sentence" and m["label_column"] == "score"
    assert json.loads((tmp_path / "1.0-pairs" / "metrics.json").read_text())["pair_column"] == "sentence2"
