"""The tokenizer of imported fairseq text models (dict.txt + GPT-2 BPE) for `--format hf`.

A small real byte-level BPE is trained offline with `tokenizers` on WordNet glosses and written
in GPT-2's encoder.json + vocab.bpe format; fairseq itself (the fairseq-fixed sdist, in a
subprocess as the importer's oracle) builds dict.txt from the corpus with its own
gpt2_bpe_utils.Encoder + Dictionary and encodes test sentences the way RoBERTa's hub interface
does.  AutoTokenizer (fresh process) must give exactly those ids, and the exported model run on
the tokenizer's batch must equal the plain twin on fairseq's ids."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed (pip install -e '.[hf]')", allow_module_level=True)

from tests import data_fixtures, fairseq_oracle  # noqa: E402
from tests.test_import import CACHE, oracle  # noqa: E402,F401  (session fixture: fairseq's own checkpoints)

SENTENCES = [
    "a small domesticated carnivorous mammal with soft fur",
    "Zürich’s café serves crème brûlée — naïvely priced at 12.50€ (東京 too) 🙂",
    "  two  spaces\tand a tab, then a trailing space ",
    "don't re-tokenize it's they'll I'd we've you're",
    "xylophone zygote quokka Qatar JAVASCRIPT snake_case",  # rare words: many short tokens
    "",
    "the <mask> sat on the mat",  # <mask>: as RoBERTa's fill_mask encodes it
]

# fairseq's side, run with PYTHONPATH = the fairseq sdist (+ its pure-Python deps)
FAIRSEQ_SCRIPT = textwrap.dedent("""
    import json, sys
    from fairseq.data import Dictionary
    from fairseq.data.encoders.gpt2_bpe import GPT2BPE, GPT2BPEConfig
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    d, corpus, sentences = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
    bpe = GPT2BPE(GPT2BPEConfig(gpt2_encoder_json=d + "/encoder.json", gpt2_vocab_bpe=d + "/vocab.bpe"))
    enc = get_encoder(d + "/encoder.json", d + "/vocab.bpe")
    lines = [bpe.encode(l) for l in open(corpus, encoding="utf-8").read().splitlines()]
    # as fairseq-preprocess builds a dictionary: counts over the encoded corpus, padded to x8
    small = Dictionary()
    for l in lines:
        small.encode_line(l, add_if_not_exist=True)
    small.finalize(padding_factor=8)
    small.save(d + "/dict-corpus.txt")
    # RoBERTa's dictionary holds every GPT-2 id; this one too, except a few tokens no merge builds
    # on that only the test sentences produce (they must come out as <unk>)
    inputs = {p for m in enc.bpe_ranks for p in m}
    used = {t for s in sentences for t in bpe.encode(s).split()}
    leaves = sorted(t for t in used if enc.decoder[int(t)] not in inputs and small.index(t) == small.unk_index)
    unknown = leaves[:6]
    full = Dictionary()
    for l in lines:
        full.encode_line(l, add_if_not_exist=True)
    for i in range(len(enc.encoder)):
        if str(i) not in unknown:
            full.add_symbol(str(i), n=0)
    full.finalize(padding_factor=8)
    full.save(d + "/dict.txt")
    full = Dictionary.load(d + "/dict.txt")
    mask = full.add_symbol("<mask>")  # what the masked-LM task does after loading dict.txt

    def encode(s):  # RobertaHubInterface.encode; with <mask>: as its fill_mask builds the input
        if "<mask>" in s:
            bpe_s = " <mask> ".join(bpe.encode(p.rstrip()) for p in s.split("<mask>")).strip()
        else:
            bpe_s = bpe.encode(s)
        return full.encode_line("<s> " + bpe_s + " </s>", append_eos=False, add_if_not_exist=False).tolist()

    # how fairseq reads repeated symbols: #fairseq:overwrite adds a new index
    with open(d + "/tricky.txt", "w") as f:
        f.write("10 5\\n11 4\\n10 3 #fairseq:overwrite\\nmadeupword0000 0\\n12 1 #fairseq:overwrite\\n")
    tricky = Dictionary.load(d + "/tricky.txt")
    # a pair, as RobertaHubInterface.encode(a, b) frames it: <s> a </s> </s> b </s>
    pair = "<s> " + bpe.encode(sentences[0]) + " </s> </s> " + bpe.encode(sentences[3]) + " </s>"
    json.dump({"ids": [encode(s) for s in sentences],
               "pair": full.encode_line(pair, append_eos=False, add_if_not_exist=False).tolist(),
               "unknown": [enc.decoder[int(t)] for t in unknown],
               "n": len(full), "mask": mask, "tricky": {"symbols": tricky.symbols, "indices": tricky.indices}},
              open(d + "/fairseq.json", "w"))
""")

HF_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModel, AutoTokenizer
    folder, sentences = sys.argv[1], json.load(open(sys.argv[2]))
    tok = AutoTokenizer.from_pretrained(folder)
    b = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        x = AutoModel.from_pretrained(folder).eval()(**b).last_hidden_state
    torch.save({"single": [tok(s)["input_ids"] for s in sentences], "batch": b["input_ids"],
                "pair": tok(sentences[0], sentences[3])["input_ids"],
                "mask": b["attention_mask"], "hidden": x, "cls": type(tok).__name__,
                "mask_id": tok.mask_token_id, "pad_id": tok.pad_token_id,
                "decoded": tok.decode(tok(sentences[0])["input_ids"], skip_special_tokens=True)}, sys.argv[3])
""")


def _write_gpt2_bpe(folder: Path, corpus: list[str]) -> None:
    """A small byte-level BPE trained on `corpus`, written as GPT-2's encoder.json + vocab.bpe."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=700, min_frequency=2, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    m = json.loads(tok.to_str())["model"]
    enc = dict(sorted(m["vocab"].items(), key=lambda kv: kv[1]))
    enc["<|endoftext|>"] = len(enc)  # as GPT-2's last id
    folder.mkdir(parents=True)
    (folder / "encoder.json").write_text(json.dumps(enc, ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(p) if isinstance(p, list) else p for p in m["merges"]]
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> tuple[Path, dict]:
    """(folder with encoder.json, vocab.bpe, dict.txt (every GPT-2 id but a few), dict-corpus.txt
    (the corpus's tokens only), fairseq's ids of SENTENCES)."""
    d = tmp_path_factory.mktemp("gpt2bpe") / "bpe"
    corpus = data_fixtures.wordnet_glosses(1500)
    _write_gpt2_bpe(d, corpus)
    (d.parent / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    (d.parent / "sentences.json").write_text(json.dumps(SENTENCES))
    env = dict(os.environ, **fairseq_oracle.ensure_fairseq(CACHE / "fairseq"), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", FAIRSEQ_SCRIPT, str(d), str(d.parent / "corpus.txt"),
                        str(d.parent / "sentences.json")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, json.loads((d / "fairseq.json").read_text())


def _plain_import(folder: Path, dict_txt: Path, vocab_size: int) -> dict:
    """A plain export as `d2v2-import --dict` writes it (text-tiny sizes, weights far from init)."""
    import dataclasses
    import types

    from d2v2_scale.config import build_config
    from d2v2_scale.export.consolidate import plain_encoder, write_export

    cfg = dataclasses.asdict(build_config("text-tiny").model) | {"vocab_size": vocab_size, "pad_token_id": 1}
    cfg["d2v2_export"] = {"which": "teacher", "step": 0, "source": "fairseq", "dictionary": "dict.txt"}
    g = torch.Generator().manual_seed(5)
    sd = {k: v + 0.2 * torch.randn(v.shape, generator=g)
          for k, v in plain_encoder(types.SimpleNamespace(**cfg)).state_dict().items()}
    write_export(folder, sd, cfg, extra_files={"dict.txt": dict_txt.read_bytes()})
    return cfg


def _fairseq_text_checkpoint(oracle: Path, out: Path, vocab_size: int, max_positions: int = 128) -> Path:
    """The importer fixture's fairseq text checkpoint with a token table of `vocab_size` rows and
    `max_positions` positions (new random rows), so that it goes with this test's dictionary."""
    ck = torch.load(oracle / "text" / "checkpoint.pt", weights_only=False)
    g = torch.Generator().manual_seed(11)
    M = "modality_encoders.TEXT.local_encoder."
    for name, rows in (("embed_tokens", vocab_size), ("embed_positions", max_positions + 2)):  # + pad + 1
        w = ck["model"][M + name + ".weight"]
        ck["model"][M + name + ".weight"] = (0.5 * torch.randn(rows, w.shape[1], generator=g)).to(w.dtype)
    ck["cfg"]["model"]["modalities"]["text"]["max_source_positions"] = max_positions
    torch.save(ck, out)
    return out


def test_gpt2_tokenizer_gives_fairseq_ids(bpe, oracle, tmp_path, capsys):  # noqa: F811
    """fairseq text checkpoint -> d2v2-import --dict --gpt2-bpe (the BPE files stored with dict.txt)
    -> d2v2-export --format hf: AutoTokenizer in a fresh process gives fairseq's ids (unicode,
    whitespace, rare and unknown tokens, <mask>, batch padding with pad id 1 + attention mask), and
    the transformers model on that batch equals the plain twin on fairseq's ids."""
    from d2v2_scale.export import load_export
    from d2v2_scale.export.cli import main
    from d2v2_scale.export.fairseq.importer import main as import_main

    d, ref = bpe
    want = ref["ids"]
    assert ref["unknown"] and any(3 in ids for ids in want)  # the test sentences do hit <unk>
    assert any(ref["mask"] in ids for ids in want)
    ck = _fairseq_text_checkpoint(oracle, tmp_path / "checkpoint.pt", ref["n"])
    imp = [str(ck), "--dict", str(d / "dict.txt"), "--gpt2-bpe", str(d), "--which", "student"]
    assert import_main(imp + ["--out", str(tmp_path / "plain")]) == 0
    assert (tmp_path / "plain" / "vocab.bpe").read_bytes() == (d / "vocab.bpe").read_bytes()
    assert main([str(tmp_path / "plain"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    # the same in one command
    assert import_main(imp + ["--out", str(tmp_path / "hf2"), "--format", "hf"]) == 0
    assert capsys.readouterr().err == ""
    for f in ("tokenizer.json", "tokenizer_config.json", "dict.txt"):
        assert (tmp_path / "hf" / f).read_bytes() == (tmp_path / "hf2" / f).read_bytes()
    (tmp_path / "sentences.json").write_text(json.dumps(SENTENCES))
    r = subprocess.run([sys.executable, "-c", HF_SCRIPT, str(tmp_path / "hf"), str(tmp_path / "sentences.json"),
                        str(tmp_path / "hf.pt")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "hf.pt")
    assert got["single"] == want and got["pair"] == ref["pair"] and got["cls"] == "RobertaTokenizer"
    assert got["mask_id"] == ref["mask"] and got["pad_id"] == 1
    assert got["decoded"] == SENTENCES[0]
    T = max(map(len, want))
    assert got["batch"].tolist() == [ids + [1] * (T - len(ids)) for ids in want]
    assert got["mask"].tolist() == [[1] * len(ids) + [0] * (T - len(ids)) for ids in want]
    # the model and the tokenizer together: the plain twin on fairseq's own (padded) ids
    enc, _, _ = load_export(tmp_path / "plain")
    with torch.no_grad():
        x = enc(torch.tensor(got["batch"].tolist()))["x"]
    keep = got["mask"].bool()
    diff = (got["hidden"][keep] - x[keep]).abs().max().item()
    assert diff < 2e-5, f"max |hf - plain| = {diff:.3g}"


def test_gpt2_tokenizer_missing_files_and_refusals(bpe, oracle, tmp_path, capsys):  # noqa: F811
    """Missing BPE files: the model is written, one warning line names --gpt2-bpe and the URLs;
    dictionaries no tokenizer reproduces exactly are refused (exit 2, nothing written)."""
    from d2v2_scale.export.cli import main
    from d2v2_scale.export.gpt2_tokenizer import GPT2_URLS, fairseq_indices, fairseq_symbols
    from d2v2_scale.export.fairseq.importer import main as import_main

    d, ref = bpe
    # dict.txt is read as fairseq reads it
    syms = fairseq_symbols((d / "tricky.txt").read_text())
    assert syms == ref["tricky"]["symbols"] and fairseq_indices(syms) == ref["tricky"]["indices"]
    # no BPE files: the model is exported, the tokenizer skipped with one warning line
    _plain_import(tmp_path / "without", d / "dict.txt", ref["n"])
    assert main([str(tmp_path / "without"), "--out", str(tmp_path / "hf2"), "--format", "hf"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpt2-bpe" in err and all(u in err for u in GPT2_URLS)
    assert (tmp_path / "hf2" / "model.safetensors").is_file() and not (tmp_path / "hf2" / "tokenizer.json").exists()
    assert (tmp_path / "hf2" / "dict.txt").is_file()
    # the files given at export time
    hf = ["--format", "hf", "--gpt2-bpe", str(d)]
    assert main([str(tmp_path / "without"), "--out", str(tmp_path / "hf1")] + hf) == 0
    assert (tmp_path / "hf1" / "tokenizer.json").is_file() and capsys.readouterr().err == ""
    # a dictionary fairseq-preprocess makes from the corpus alone lacks tokens merges build on
    n_small = 4 + len((d / "dict-corpus.txt").read_text().splitlines())
    _plain_import(tmp_path / "small", d / "dict-corpus.txt", n_small + 1)
    assert main([str(tmp_path / "small"), "--out", str(tmp_path / "hf3")] + hf) == 2
    err = capsys.readouterr().err
    assert "merges build on" in err and err.count("\n") == 1 and not (tmp_path / "hf3").exists()
    # a word dictionary (not GPT-2 ids) with --gpt2-bpe: refused; without it: a warning, no tokenizer
    (tmp_path / "words.txt").write_text("".join(f"w{i} {100 - i}\n" for i in range(20)))
    _plain_import(tmp_path / "words", tmp_path / "words.txt", 25)
    assert main([str(tmp_path / "words"), "--out", str(tmp_path / "hf4")] + hf) == 2
    err = capsys.readouterr().err
    assert "'w0'" in err and "not a GPT-2 BPE id" in err and not (tmp_path / "hf4").exists()
    assert main([str(tmp_path / "words"), "--out", str(tmp_path / "hf5"), "--format", "hf"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a GPT-2 BPE id" in err and not (tmp_path / "hf5" / "tokenizer.json").exists()
    # --gpt2-bpe is only for an import's dict.txt, and only with --format hf
    (tmp_path / "without" / "dict.txt").unlink()
    assert main([str(tmp_path / "without"), "--out", str(tmp_path / "hf6")] + hf) == 2
    assert "has no dict.txt" in capsys.readouterr().err and not (tmp_path / "hf6").exists()
    assert main([str(tmp_path / "without"), "--out", str(tmp_path / "p"), "--gpt2-bpe", str(d)]) == 2
    assert "goes with --format hf" in capsys.readouterr().err
    # d2v2-import --gpt2-bpe checks the dictionary first (the fixture's fairseq dictionary is words)
    imp = [str(oracle / "text" / "checkpoint.pt"), "--dict", str(oracle / "text" / "dict.txt"), "--gpt2-bpe", str(d)]
    assert import_main(imp + ["--out", str(tmp_path / "imp")]) == 2
    err = capsys.readouterr().err
    assert "not a GPT-2 BPE id" in err and err.count("\n") == 1 and not (tmp_path / "imp").exists()
