"""d2v2-export --format hf of data2vec 2.0 image and speech encoders: a transformers folder with
its own model code (trust_remote_code).  In a fresh interpreter where d2v2_scale cannot be
imported (tests/hf_remote_child.py): AutoModel gives every hidden state of the plain twin (fp32,
the tolerance of tests/test_export_hf.py); the image-classification, CTC and audio-classification
heads train a few Trainer steps, save, reload equal, and pipeline("image-classification") /
pipeline("automatic-speech-recognition") run on the saved folders; a head that does not fit the
encoder is refused in one line."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None:
    pytest.skip("transformers / accelerate are not installed (pip install -e '.[hf]')", allow_module_level=True)

from tests.test_export_hf import ATOL, _inputs  # noqa: E402

CHILD = Path(__file__).with_name("hf_remote_child.py")


def _plain_export(preset: str, out: Path) -> dict:
    """A plain export of `preset` with every tensor moved far from its init (so a wrong mapping shows)."""
    from d2v2_scale.config import build_config
    from d2v2_scale.export.consolidate import plain_encoder, write_export

    cfg = dataclasses.asdict(build_config(preset).model) | {
        "d2v2_export": {"which": "student", "step": 3, "checkpoint": str(out.resolve() / "runs/x/checkpoints/step_3")}}
    enc = plain_encoder(types.SimpleNamespace(**cfg))
    g = torch.Generator().manual_seed(3)
    sd = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in enc.state_dict().items()}
    write_export(out, sd, cfg)
    return cfg


def _digits(n=24):
    """sklearn's bundled digits, 8x8 -> 32x32 RGB uint8 (the probe's image corpus, docs/BENCHMARKS.md)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n] * (255 / 16)).round().to(torch.uint8)
    x = x.repeat_interleave(4, 1).repeat_interleave(4, 2)[..., None].expand(-1, -1, -1, 3).contiguous()
    return x, torch.tensor(d.target[:n])


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    from d2v2_scale.export.cli import main

    tmp = tmp_path_factory.mktemp("hfremote")
    cfgs, jobs = {}, {"batches": {}}
    for name, preset in (("image", "image-tiny"), ("audio", "audio-tiny")):
        cfgs[name] = _plain_export(preset, tmp / name / "plain")
        assert main([str(tmp / name / "plain"), "--out", str(tmp / name / "hf"), "--format", "hf"]) == 0
        jobs[name] = str(tmp / name / "hf")
        jobs["batches"][name] = _inputs(cfgs[name])[1]
    jobs["digits"] = _digits()
    g = torch.Generator().manual_seed(0)
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    jobs["speech"] = (torch.randn(8, 12000, generator=g) * 0.1, words)
    torch.save(jobs, tmp / "jobs.pt")
    return tmp, cfgs, _fresh(tmp)


def _fresh(tmp: Path) -> dict:
    """Run tests/hf_remote_child.py on tmp/jobs.pt in a fresh interpreter: no PYTHONPATH, cwd outside
    the repository, d2v2_scale blocked (the editable install would find it otherwise), its own HF
    module cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HOME": str(tmp / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}
    (tmp / "work").mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, str(CHILD), str(tmp / "jobs.pt"), str(tmp / "out.pt"), str(tmp / "work")],
                       capture_output=True, text=True, timeout=400, cwd=tmp / "work", env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return torch.load(tmp / "out.pt", weights_only=False)


@pytest.mark.parametrize("name", ["image", "audio"])
def test_remote_code_equals_plain_twin(remote, name):
    from d2v2_scale.export import load_export

    tmp, cfgs, res = remote
    assert res["d2v2_importable"] is False
    got = res[name]
    assert got["cls"] == "Data2Vec2Model" and got["missing"] == [] and got["unexpected"] == []
    assert got["code"].startswith("transformers_modules.")  # the folder's own code, not a package's
    hf = tmp / name / "hf"
    # the shipped code is the package's: the two hf_remote files and the twin itself, verbatim
    from d2v2_scale.export.hf_remote import code_files

    for f, data in code_files().items():
        assert (hf / f).read_bytes() == data
    assert (hf / "data2vec2_encoder.py").read_bytes() == Path(sys.modules["d2v2_scale.twins.encoder"].__file__).read_bytes()
    hcfg = json.loads((hf / "config.json").read_text())
    assert hcfg["auto_map"]["AutoModel"] == "modeling_data2vec2.Data2Vec2Model"
    # no local path in a folder meant for sharing
    assert str(tmp) not in (hf / "config.json").read_text()
    assert hcfg["d2v2_export"]["checkpoint"] == "x/checkpoints/step_3"
    card = (hf / "README.md").read_text()  # the model card: system, weights, how to load, no local path
    assert f"data2vec 2.0 {'speech' if name == 'audio' else 'image'} encoder" in card
    assert "trust_remote_code=True" in card and "the student" in card and str(tmp) not in card

    enc, cfg, _ = load_export(tmp / name / "plain")
    args, _, _ = _inputs(cfg)
    with torch.no_grad():
        ref = enc(*args)
    keep = None if ref["padding"] is None else ~ref["padding"]
    assert len(got["hidden"]) == len(ref["hidden"]) + 1
    pairs = list(zip(got["hidden"], [ref["input"], *ref["hidden"]])) + [(got["last"], ref["x"])]
    worst = 0.0
    for a, b in pairs:
        assert a.shape == b.shape
        if keep is not None:
            a, b = a[keep], b[keep]
        worst = max(worst, (a - b).abs().max().item())
    assert worst <= ATOL, f"max |hf - plain| = {worst:.3g}"
    assert ref["x"].abs().max() > 0.5
    if name == "audio":
        assert keep is not None and not bool(keep.all())  # the batch has padded frames
        r = keep.float()[..., None]
        pooled = (ref["x"] * r).sum(1) / r.sum(1)
    else:
        pooled = ref["x"][:, 1:].mean(1)  # patch tokens, CLS dropped: the reference's mean pooling
    assert (got["pooled"] - pooled).abs().max() <= ATOL
    print(f"{name}: max |hf - plain| = {worst:.3g}")


def test_remote_heads_train_save_and_pipeline(remote):
    _, _, res = remote
    assert res["refused-image"].startswith("Data2Vec2ForCTC needs a data2vec 2.0 speech encoder")
    assert "AutoModelForImageClassification" in res["refused-image"] and "\n" not in res["refused-image"]
    assert res["refused-audio"].startswith("Data2Vec2ForImageClassification needs a data2vec 2.0 image encoder")
    assert res["img_trained"] and res["img_roundtrip"] <= ATOL
    top = res["img_pipeline"]
    assert len(top) == 3 and all(t["label"].startswith("digit") for t in top)
    assert "AutoModelForImageClassification" in res["img_ft_files"]
    assert res["ctc_frozen"] and res["ctc_trained"]  # CNN frozen, blocks updated
    assert isinstance(res["asr_pipeline"]["text"], str)
    assert res["cls_loss"] > 0


# ---- fairseq data2vec 2.0 speech / image checkpoints (the importer's fixture) -> transformers ----

from tests.test_import import TOL_IMAGE_STUDENT, oracle  # noqa: E402,F401


def test_fairseq_speech_and_image_round_trip(oracle, tmp_path, capsys):  # noqa: F811
    """fairseq Data2VecMultiModel (speech; image without prenet) -> d2v2-import --format hf ->
    AutoModel(trust_remote_code) in a fresh process: equal to fairseq's own features on the
    oracle's input (image: patch tokens; the file's fp16 student rounds the sin-cos table, as in
    tests/test_import.py)."""
    from d2v2_scale.export.fairseq.importer import main

    jobs, refs = {}, {}
    for case in ("audio", "image_p0"):
        out = tmp_path / case
        assert main([str(oracle / case / "checkpoint.pt"), "--out", str(out), "--which", "student",
                     "--format", "hf"]) == 0
        assert "Data2Vec2Model" in capsys.readouterr().out
        refs[case] = torch.load(oracle / case / "oracle.pt")
        key = "input_values" if case == "audio" else "pixel_values"
        jobs[case] = (str(out), {key: refs[case]["source"]})
    torch.save({"load_only": jobs}, tmp_path / "jobs.pt")
    got = _fresh(tmp_path)
    for case, tol in (("audio", ATOL), ("image_p0", TOL_IMAGE_STUDENT)):
        g = got[case]
        assert g["cls"] == "Data2Vec2Model" and g["unexpected"] == [] and g["missing"] == []
        last = g["last"][:, 1:] if case == "image_p0" else g["last"]
        diff = (last - refs[case]["features"]).abs().max().item()
        assert diff < tol, f"{case}: Data2Vec2Model differs from fairseq by {diff:.3g}"
        print(f"fairseq {case} -> Data2Vec2Model: max |hf - fairseq| = {diff:.3g}")


# ---- d2v2-finetune: the recipes' pieces and the command on tiny runs -----------------------------


def test_recipe_schedule_and_layer_decay(remote):
    from transformers import AutoModelForImageClassification

    from d2v2_scale.finetune.recipes import cer, layer_decay_groups, tri_stage

    # fairseq's tri_stage: 1% -> 100% over the first 10%, hold 40%, exponential decay to 5%
    assert tri_stage(0, 1000) == pytest.approx(0.01) and tri_stage(100, 1000) == 1.0 and tri_stage(499, 1000) == 1.0
    assert tri_stage(750, 1000) == pytest.approx(0.05 ** 0.5) and tri_stage(5000, 1000) == pytest.approx(0.05)
    tmp, _, _ = remote
    m = AutoModelForImageClassification.from_pretrained(tmp / "image" / "hf", trust_remote_code=True, num_labels=3)
    groups = layer_decay_groups(m, 1e-3, 0.65, 0.05)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    blocks = m.data2vec2.encoder.blocks  # 2 blocks: 0.65^2, 0.65^1; the rest (head, patch embedding) 1
    assert lr_of[id(blocks[0].attn.qkv.weight)] == (pytest.approx(1e-3 * 0.65 ** 2), 0.05)
    assert lr_of[id(blocks[1].mlp.fc1.weight)] == (pytest.approx(1e-3 * 0.65), 0.05)
    assert lr_of[id(blocks[1].mlp.fc1.bias)][1] == 0.0 and lr_of[id(m.classifier.weight)] == (1e-3, 0.05)
    assert len(lr_of) == sum(1 for _ in m.parameters())
    assert cer(["one", "tw"], ["one", "two"]) == pytest.approx(1 / 6)


def test_finetune_command(remote, tmp_path, capsys):
    """d2v2-finetune image on the shared prepared digits (200 rows), a few steps: metrics, a saved
    folder the image-classification pipeline runs on; a speech recipe on an image folder: one line."""
    from transformers import pipeline

    from d2v2_scale.finetune.cli import main
    from tests import data_fixtures

    tmp, _, _ = remote
    man = data_fixtures.prepared("image") / "manifest.json"
    assert main(["image", str(tmp / "image" / "hf"), "--data", str(man), "--out", str(tmp_path / "ft"),
                 "--recipe", "small", "--steps", "4", "--batch-size", "8"]) == 0
    res = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert res["n_train"] + res["n_eval"] == 200 and 0.0 <= res["accuracy"] <= 1.0 and res["steps"] == 4
    from PIL import Image

    top = pipeline("image-classification", model=str(tmp_path / "ft" / "model"), trust_remote_code=True,
                   device="cpu")(Image.new("RGB", (32, 32)), top_k=2)
    assert len(top) == 2
    capsys.readouterr()
    assert main(["ctc", str(tmp / "image" / "hf"), "--data", str(man), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "holds an image encoder; the ctc recipe needs a speech encoder" in err
    assert err.count("\n") == 1 and not (tmp_path / "bad").exists()


def test_finetune_never_runs_the_folders_code(remote, tmp_path):
    """Trust boundary: d2v2-finetune builds the model from the installed package's classes, so a
    payload planted in a folder's modeling file (a folder from elsewhere) does not run; the weights
    still load (equal to the folder's), from scratch too, and the saved model ships our code."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification

    from d2v2_scale.export import hf_remote
    from d2v2_scale.finetune.common import load_model, save_model

    tmp, _, _ = remote
    folder, marker = tmp_path / "elsewhere", tmp_path / "payload-ran"
    shutil.copytree(tmp / "image" / "hf", folder)
    with open(folder / "modeling_data2vec2.py", "a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    model = load_model(AutoModelForImageClassification, str(folder), False, num_labels=3)
    scratch = load_model(AutoModelForImageClassification, str(folder), True, num_labels=3)
    assert not marker.exists()
    assert type(model).__module__ == "d2v2_scale.export.hf_remote.modeling_data2vec2"
    weights = load_file(str(folder / "model.safetensors"))
    name = "encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(model.state_dict()["data2vec2." + name], weights[name])
    assert not torch.equal(scratch.state_dict()["data2vec2." + name], weights[name])
    save_model(model, tmp_path / "saved")
    assert (tmp_path / "saved" / "modeling_data2vec2.py").read_bytes() == \
        (Path(hf_remote.__file__).parent / "modeling_data2vec2.py").read_bytes()
    assert not marker.exists()


def test_d2v1_vision_pooled_output(tmp_path):
    """A data2vec 1.0 vision folder gives a pooled output (the CLS token, use_mean_pooling false)
    for pipeline("image-feature-extraction", pool=True) with add_pooling_layer (docs/EXPORT.md);
    its model card names the system and how to load it."""
    from PIL import Image
    from transformers import pipeline

    from d2v2_scale.export.hf import write_hf

    from d2v2_scale.config import build_config
    from d2v2_scale.export.consolidate import plain_encoder

    cfg = dataclasses.asdict(build_config("d2v1-image-tiny").model) | {"d2v2_export": {"which": "student", "step": 1}}
    enc = plain_encoder(types.SimpleNamespace(**cfg))
    write_hf(tmp_path / "hf", enc.state_dict(), cfg)
    assert "data2vec 1.0 image encoder" in (tmp_path / "hf" / "README.md").read_text()
    p = pipeline("image-feature-extraction", model=str(tmp_path / "hf"), device="cpu",
                 model_kwargs={"add_pooling_layer": True})
    img = Image.new("RGB", (40, 40), (120, 30, 200))
    pooled = torch.tensor(p(img, pool=True, return_tensors=True))
    full = torch.tensor(p(img, return_tensors=True))
    assert pooled.shape == (1, cfg["embed_dim"]) and torch.allclose(pooled[0], full[0, 0])


@pytest.mark.parametrize("name", ["configuration_data2vec2.py", "modeling_data2vec2.py"])
def test_remote_code_names_the_transformers_range(name, monkeypatch):
    """transformers outside the declared range: one line naming it and the fix (not an ImportError
    from inside transformers)."""
    import transformers

    from d2v2_scale.export.hf_remote import HERE

    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(ImportError, match=r"needs transformers>=5,<6, found 4\.57\.1: pip install"):
        exec(compile((HERE / name).read_text(), name, "exec"), {"__name__": "shipped"})


def test_finetune_image_seed_fixes_the_init(remote, tmp_path):
    """--seed fixes the classification head's init (and with --scratch the whole network's), which
    happens before Trainer seeds: two runs of one seed save equal weights, another seed differs
    (docs/BENCHMARKS.md "Fine-tuning exported data2vec 2.0 encoders": reruns of a seed must agree)."""
    from safetensors.torch import load_file

    from d2v2_scale.finetune.cli import main
    from tests import data_fixtures

    tmp, _, _ = remote
    man = data_fixtures.prepared("image") / "manifest.json"
    w = {}
    for name, seed, scratch in (("a", 0, True), ("b", 0, True), ("c", 1, True), ("d", 0, False), ("e", 0, False)):
        assert main(["image", str(tmp / "image" / "hf"), "--data", str(man), "--out", str(tmp_path / name),
                     "--recipe", "small", "--steps", "1", "--batch-size", "4", "--seed", str(seed)]
                    + (["--scratch"] if scratch else [])) == 0
        w[name] = load_file(tmp_path / name / "model" / "model.safetensors")
    assert all(torch.equal(w["a"][k], w["b"][k]) for k in w["a"])
    assert not all(torch.equal(w["a"][k], w["c"][k]) for k in w["a"])
    assert all(torch.equal(w["d"][k], w["e"][k]) for k in w["d"])
