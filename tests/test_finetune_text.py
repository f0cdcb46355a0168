"""d2v2-finetune text (d2v2_scale/finetune/text.py): the reference's schedule and optimizer
against fairseq's own code, and bad input (one line, exit 2, before any model loads).  The
fine-tuning runs themselves are in tests/test_export_hf.py (test_finetune_text_on_exports: they
reuse its text exports)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import data_fixtures


def labelled_glosses(labels, n: int) -> list[tuple[str, str]]:
    """(lexname, WordNet definition): the first n of each label, interleaved (data_prep/demo.py)."""
    from data_prep.demo import wordnet_lexname_docs

    data_fixtures.wordnet_glosses(1)  # installs wordnet-base when missing
    docs = wordnet_lexname_docs(data_fixtures.WORDNET_DIR, ("noun",))
    by = {lab: [d for d in docs if d[0] == lab][:n] for lab in labels}
    return [by[lab][i] for i in range(n) for lab in labels]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """rows -> .jsonl, .csv or .tsv (with a header row) by the suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",",
                           **({"quoting": csv.QUOTE_NONE} if path.suffix == ".tsv" else {}))
        w.writeheader()
        w.writerows(rows)
    return path


# ---- the schedule and the optimizer: fairseq's own classes in a subprocess ----------------------

FAIRSEQ_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from fairseq.optim.adam import Adam, FairseqAdam, FairseqAdamConfig
    from fairseq.optim.lr_scheduler.polynomial_decay_schedule import (PolynomialDecayLRSchedule,
                                                                      PolynomialDecayLRScheduleConfig)
    spec = json.load(open(sys.argv[1]))
    res = {"lr": {}}
    for name, (total, warm, power) in spec["schedules"].items():
        opt = FairseqAdam(FairseqAdamConfig(lr=[spec["peak"]], tpu=False, adam_betas="(0.9, 0.98)"),
                          [torch.nn.Parameter(torch.zeros(1))])
        cfg = PolynomialDecayLRScheduleConfig(warmup_updates=warm, total_num_update=total, power=power,
                                              lr=[spec["peak"]])
        sch = PolynomialDecayLRSchedule(cfg, opt)
        # update k runs at the LR set after update k - 1: the trainer's step_update(k - 1)
        res["lr"][name] = [sch.step_update(k - 1) for k in range(1, total + 3)]
    a = spec["adam"]
    p = torch.nn.Parameter(torch.tensor(a["p0"]))
    opt = Adam([p], lr=a["lrs"][0], betas=tuple(a["betas"]), eps=a["eps"], weight_decay=a["weight_decay"])
    res["params"] = []
    for g, lr in zip(a["grads"], a["lrs"]):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.tensor(g)
        opt.step()
        res["params"].append(p.detach().tolist())
    json.dump(res, open(sys.argv[2], "w"))
""")


def test_polynomial_decay_and_adam_are_fairseqs(tmp_path):
    """The text recipe's LR of every update (schedules.WarmupPolynomial through LambdaLR, stepped
    after each update) equals fairseq's polynomial_decay as its trainer applies it (update k at
    step_update(k - 1)): warm-up from 0, the peak at update W + 1, 0 from update U + 1; and
    finetune/text.fairseq_adam's parameters equal fairseq's Adam (decoupled weight decay 0.1 on
    every parameter, eps 1e-6 in fairseq's place) step by step, with gradients near eps."""
    import torch

    from d2v2_scale.finetune.text import fairseq_adam
    from d2v2_scale.train.schedules import WarmupPolynomial
    from tests import fairseq_oracle
    from tests.test_import import CACHE

    g = torch.Generator().manual_seed(0)
    spec = {"peak": 2e-5, "schedules": {"glue": [40, 3, 1.0], "no-warmup": [12, 0, 1.0], "power2": [20, 5, 2.0]},
            "adam": {"p0": torch.randn(30, generator=g).tolist(), "betas": [0.9, 0.98], "eps": 1e-6,
                     "weight_decay": 0.1, "lrs": [1e-3, 5e-4, 2e-3, 1e-3, 1e-4, 3e-3],
                     "grads": [(torch.randn(30, generator=g) * 3e-6 * 0.3 ** (k % 3)).tolist() for k in range(6)]}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    # fairseq's numbers, cached by the script and its input (importing fairseq is most of the time)
    key = hashlib.sha256((FAIRSEQ_SCRIPT + json.dumps(spec)).encode()).hexdigest()[:12]
    cached = CACHE / f"finetune-text-{key}.json"
    if not cached.is_file():
        env = dict(os.environ, **fairseq_oracle.ensure_fairseq(CACHE / "fairseq"), OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore")
        r = subprocess.run([sys.executable, "-c", FAIRSEQ_SCRIPT, str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
                           env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        os.replace(tmp_path / "out.json", cached)
    ref = json.loads(cached.read_text())
    for name, (total, warm, power) in spec["schedules"].items():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=spec["peak"])
        sch = torch.optim.lr_scheduler.LambdaLR(opt, WarmupPolynomial(total, warm, power))
        got = []
        for _ in range(total + 2):
            got.append(opt.param_groups[0]["lr"])  # what this update runs at
            opt.step()
            sch.step()
        assert got == pytest.approx(ref["lr"][name], rel=1e-12, abs=1e-18), name
    assert ref["lr"]["glue"][0] == 0 and ref["lr"]["glue"][3] == spec["peak"] and ref["lr"]["glue"][40] == 0
    a = spec["adam"]
    p = torch.nn.Parameter(torch.tensor(a["p0"]))
    opt = fairseq_adam([p], a["lrs"][0], tuple(a["betas"]), a["eps"], a["weight_decay"])
    for k, (gr, lr) in enumerate(zip(a["grads"], a["lrs"])):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.tensor(gr)
        opt.step()
        want = torch.tensor(ref["params"][k])
        assert torch.allclose(p.detach(), want, rtol=0, atol=1e-6), (k, (p.detach() - want).abs().max())
        assert not torch.allclose(want, torch.tensor(a["p0"]), atol=1e-4)  # the steps moved the parameters
    # the plain torch eps (not fairseq's place) would differ from fairseq's trajectory
    q = torch.nn.Parameter(torch.tensor(a["p0"]))
    plain = torch.optim.AdamW([q], lr=a["lrs"][0], betas=tuple(a["betas"]), eps=a["eps"], weight_decay=a["weight_decay"])
    for gr, lr in zip(a["grads"], a["lrs"]):
        plain.param_groups[0]["lr"] = lr
        q.grad = torch.tensor(gr)
        plain.step()
    assert (q.detach() - torch.tensor(ref["params"][-1])).abs().max() > 1e-4


# ---- bad input: one line naming the thing and the fix, exit 2, nothing written -------------------


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    """A text-tiny RobertaModel folder (random weights, no tokenizer) and an image-like config."""
    import dataclasses
    import types

    from d2v2_scale.config import build_config
    from d2v2_scale.export.consolidate import plain_encoder
    from d2v2_scale.export.hf import write_hf

    tmp = tmp_path_factory.mktemp("ft-text")
    cfg = dataclasses.asdict(build_config("text-tiny").model)
    cfg["d2v2_export"] = {"which": "student", "step": 0, "source": "test"}
    write_hf(tmp / "hf", plain_encoder(types.SimpleNamespace(**cfg)).state_dict(), cfg)
    (tmp / "image").mkdir()
    (tmp / "image" / "config.json").write_text(json.dumps({"model_type": "data2vec2", "modality": "image"}))
    return tmp


def _bad(tmp_path, capsys, folder, data, *extra, task="text") -> str:
    from d2v2_scale.finetune.cli import main

    out = tmp_path / "out"
    assert main([task, str(folder), "--data", str(data), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("d2v2-finetune: error: "), err
    assert not out.exists()  # refused before anything is written
    return err


def test_text_bad_input(text_folder, tmp_path, capsys):
    hf = text_folder / "hf"
    good = write_rows(tmp_path / "good.csv", [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(8)])
    # folder and task that do not fit, both ways
    err = _bad(tmp_path, capsys, text_folder / "image", good)
    assert "holds an image encoder" in err and "needs a text encoder" in err
    err = _bad(tmp_path, capsys, hf, good, task="image")
    assert "holds a text encoder" in err and "needs an image encoder" in err
    # files
    assert "unknown format '.txt'" in _bad(tmp_path, capsys, hf, write_rows(tmp_path / "x.tsv", [{"a": 1}]).rename(
        tmp_path / "x.txt"))
    assert "no such file" in _bad(tmp_path, capsys, hf, tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    assert "is empty" in _bad(tmp_path, capsys, hf, tmp_path / "empty.csv")
    (tmp_path / "header.tsv").write_text("text\tlabel\n")
    assert "no rows below its header" in _bad(tmp_path, capsys, hf, tmp_path / "header.tsv")
    (tmp_path / "ragged.csv").write_text("text,label\na,1\nb\n")
    assert "line 3: 1 fields, the header has 2" in _bad(tmp_path, capsys, hf, tmp_path / "ragged.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", label: 2}\n')
    assert "line 2: not JSON" in _bad(tmp_path, capsys, hf, tmp_path / "bad.jsonl")
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    assert "not UTF-8" in _bad(tmp_path, capsys, hf, tmp_path / "latin1.csv")
    # columns
    err = _bad(tmp_path, capsys, hf, good, "--label-column", "topic")
    assert "has no column 'topic'" in err and "its columns: text, label" in err and "--label-column" in err
    nolab = write_rows(tmp_path / "nolab.jsonl", [{"text": "a", "y": 1}, {"text": "b", "y": 0}])
    assert "has no column 'label'" in _bad(tmp_path, capsys, hf, nolab)
    notext = write_rows(tmp_path / "notext.csv", [{"body": "a", "label": 1}])
    err = _bad(tmp_path, capsys, hf, notext)
    assert "no text column" in err and "--text-column" in err
    assert "--text-column 1 --label-column 0" in _bad(tmp_path, capsys, hf, good, "--no-header")
    assert "has no column 'sentence2'" in _bad(tmp_path, capsys, hf, good, "--pair-column", "sentence2")
    # labels
    one = write_rows(tmp_path / "one.csv", [{"text": f"r{i}", "label": "a"} for i in range(4)])
    assert "holds one label ('a')" in _bad(tmp_path, capsys, hf, one)
    gap = write_rows(tmp_path / "gap.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": None}])
    assert "row 2: no label in column 'label'" in _bad(tmp_path, capsys, hf, gap)
    lonely = write_rows(tmp_path / "lonely.csv", [{"text": f"r{i}", "label": "ab"[i % 2]} for i in range(6)]
                        + [{"text": "z", "label": "c"}])
    assert "label 'c' of column 'label' has 1 row: a stratified held-out split needs >= 2 rows per class" in _bad(tmp_path, capsys, hf, lonely)
    dev = write_rows(tmp_path / "dev.csv", [{"text": "x", "label": "a"}, {"text": "y", "label": "zz"}])
    err = _bad(tmp_path, capsys, hf, good, "--eval-data", str(dev))
    assert "labels 'zz' do not occur in" in err
    assert "is not a number" in _bad(tmp_path, capsys, hf, good, "--regression")
    assert "--eval-paths" in _bad(tmp_path, capsys, hf, good, "--eval-paths", "x")
    # the data is fine, the folder has no tokenizer (checked before any model loads)
    err = _bad(tmp_path, capsys, hf, good)
    assert "has no tokenizer" in err and "--gpt2-bpe" in err
