"""The tokenizer of an imported fairseq text model, rebuilt for transformers from dict.txt + GPT-2 BPE.

Meta's data2vec text models (1.0 and 2.0, like RoBERTa) tokenize with fairseq's GPT-2 BPE:

    text -> gpt2_bpe_utils.Encoder.encode (GPT-2 regex split, bytes -> unicode, merges of vocab.bpe,
            encoder.json: token -> GPT-2 id) -> the GPT-2 ids as decimal strings
         -> Dictionary.encode_line: each string -> its dict.txt index (<s>=0 <pad>=1 </s>=2 <unk>=3,
            then the file's symbols in order; a string not in dict.txt -> <unk>); <mask> = the
            index after the file (the masked-LM task appends it); RoBERTa frames "<s> ... </s>".

dict.txt alone holds only GPT-2 ids, so the token strings and merges must come from the GPT-2
files (`GPT2_URLS`).  `gpt2_tokenizer_files` writes a `tokenizers` byte-level BPE
(tokenizer.json) whose vocabulary maps every GPT-2 token straight to its **fairseq index**, with
the RoBERTa post-processor (<s> A </s>, pairs <s> A </s></s> B </s>), so AutoTokenizer gives
fairseq's ids.  GPT-2 tokens missing from dict.txt get <unk>'s index: exact as long as no merge
builds on such a token (the `tokenizers` BPE keys merges by id, so two tokens sharing id 3
cannot both be merge inputs); a dictionary where one does (e.g. made by fairseq-preprocess from
a small corpus without --srcdict) is refused (`TokenizerRefused`), never approximated.  A
dictionary listing every GPT-2 id maps one-to-one.  A dict.txt whose symbols
are not GPT-2 ids (a word or sentencepiece dictionary) is refused too: the text pipeline that
produced it is not recorded anywhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .consolidate import ExportError, stderr_warning

ENCODER, MERGES = "encoder.json", "vocab.bpe"
GPT2_URLS = ("https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/encoder.json",
             "https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/vocab.bpe")
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq Dictionary(): indices 0..3
MASK = "<mask>"
# Dictionary.finalize(padding_factor=8) pads the file with these (RoBERTa's dict.txt ends with three)
_FILLER = re.compile(r"^madeupword\d{4}$")


class TokenizerRefused(ExportError):
    """dict.txt + GPT-2 BPE files that no transformers tokenizer reproduces exactly."""


def missing_files_hint() -> str:
    return (f"pass --gpt2-bpe DIR, a folder with fairseq's GPT-2 BPE {ENCODER} and {MERGES} "
            f"({GPT2_URLS[0]}, {GPT2_URLS[1]})")


def fairseq_symbols(dict_text: str, where: str = "dict.txt") -> list[str]:
    """dict.txt -> fairseq's Dictionary().add_from_file symbols, in index order: the 4 specials,
    then one per line.  A `#fairseq:overwrite` row of a symbol already there adds a new index
    (which the symbol then maps to); any other repeated symbol is refused, as fairseq refuses it."""
    syms, seen = list(SPECIALS), set(SPECIALS)
    for n, line in enumerate(dict_text.splitlines(), 1):
        line = line.rstrip()
        try:
            sym, field = line.rsplit(" ", 1)
            overwrite = field == "#fairseq:overwrite"
            if overwrite:
                sym, field = sym.rsplit(" ", 1)
            int(field)
        except ValueError:
            raise ExportError(f"{where} line {n}: expected '<symbol> <count> [#fairseq:overwrite]', "
                              f"got {line!r}") from None
        if sym in seen and not overwrite:
            raise ExportError(f"{where} line {n}: duplicate symbol {sym!r} without #fairseq:overwrite "
                              f"(fairseq refuses it too)")
        seen.add(sym)
        syms.append(sym)
    return syms


def fairseq_indices(symbols: list[str]) -> dict[str, int]:
    """{symbol: the index Dictionary.index(symbol) returns} (an overwritten symbol: its last index)."""
    return {s: i for i, s in enumerate(symbols)}


def non_gpt2_symbol(symbols: list[str]) -> str | None:
    """The first symbol after the specials that is not a GPT-2 id (a decimal string) or a filler, else None."""
    for s in symbols[len(SPECIALS):]:
        if not (s.isascii() and s.isdigit() or _FILLER.match(s)):
            return s
    return None


def read_gpt2_bpe(folder) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """encoder.json {token: GPT-2 id} and vocab.bpe's merges, read as gpt2_bpe_utils.get_encoder
    does (the first line is the version header, the last is empty)."""
    folder = Path(folder)
    for f in (ENCODER, MERGES):
        if not (folder / f).is_file():
            raise ExportError(f"--gpt2-bpe {folder}: no {f} there ({missing_files_hint()})")
    try:
        enc = json.loads((folder / ENCODER).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ExportError(f"{folder / ENCODER}: not JSON ({e})") from None
    if not isinstance(enc, dict) or not all(isinstance(v, int) for v in enc.values()):
        raise ExportError(f"{folder / ENCODER}: expected a JSON object {{token: GPT-2 id}}")
    merges = []
    for n, line in enumerate((folder / MERGES).read_text(encoding="utf-8").split("\n")[1:-1], 2):
        pair = tuple(line.split())
        if len(pair) != 2 or not all(p in enc for p in pair) or "".join(pair) not in enc:
            raise ExportError(f"{folder / MERGES} line {n}: {line!r} is not a merge of two {ENCODER} tokens "
                              f"into a third: not the BPE files of this encoder.json")
        merges.append(pair)
    return enc, merges


def gpt2_tokenizer_files(dict_text: str, bpe_dir, vocab_size: int, max_positions: int,
                         where: str = "dict.txt") -> dict[str, bytes]:
    """dict.txt + the GPT-2 BPE folder -> {tokenizer.json, tokenizer_config.json} (bytes) that
    AutoTokenizer loads and that give fairseq's ids (module docstring).  `vocab_size`: the
    model's token rows (<mask> is the row after the dictionary when the model has it)."""
    symbols = fairseq_symbols(dict_text, where)
    indices = fairseq_indices(symbols)
    bad = non_gpt2_symbol(symbols)
    if bad is not None:
        raise TokenizerRefused(f"{where}: symbol {bad!r} (index {indices[bad]}) is not a GPT-2 BPE id: the "
                               f"dictionary was not made with fairseq's GPT-2 BPE, and dict.txt does not record "
                               f"the text pipeline that made it, so no tokenizer is rebuilt (drop --gpt2-bpe and "
                               f"tokenize with the pipeline that made the dictionary)")
    enc, merges = read_gpt2_bpe(bpe_dir)
    by_id = {v: k for k, v in enc.items()}
    vocab: dict[str, int] = {}
    for sym, i in indices.items():
        if i < len(SPECIALS) or _FILLER.match(sym):
            vocab[sym] = i
        elif int(sym) not in by_id:
            raise TokenizerRefused(f"{where}: symbol {sym!r} is not an id of {Path(bpe_dir) / ENCODER} "
                                   f"({len(enc)} tokens): not the BPE this dictionary was made with")
        else:
            vocab[by_id[int(sym)]] = i
    n = len(symbols)  # <mask>'s index: the masked-LM task adds it after the file
    if n > vocab_size:
        raise ExportError(f"{where}: {n} indices (4 specials + the file) do not fit the model's {vocab_size} rows")
    unk = SPECIALS.index("<unk>")
    # GPT-2 tokens fairseq maps to <unk>: exact only where no merge takes them as an input
    absent = [t for t in enc if t not in vocab]
    inputs = {p for m in merges for p in m}
    blocked = [t for t in absent if t in inputs]
    if blocked:
        ex = ", ".join(f"{t!r} (GPT-2 id {enc[t]})" for t in blocked[:3])
        raise TokenizerRefused(f"{where} lacks {len(blocked)} GPT-2 tokens that other BPE merges build on, e.g. "
                               f"{ex}: fairseq maps them to <unk>, a transformers BPE tokenizer cannot (its merges "
                               f"are keyed by token id), so no exact tokenizer exists for this dictionary")
    for t in absent:
        vocab[t] = unk
    has_mask = vocab_size > n
    special = [(s, i) for i, s in enumerate(SPECIALS)] + ([(MASK, n)] if has_mask else [])
    if has_mask:
        vocab[MASK] = n
    added = [{"id": i, "content": s, "single_word": False,
              # RoBERTa's <mask> absorbs the space before it, as fairseq's fill_mask rstrips the span before
              "lstrip": s == MASK, "rstrip": False, "normalized": False, "special": True} for s, i in special]
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        # GPT-2's regex split, no prefix space: Encoder.encode(text) exactly
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0],
                           "trim_offsets": True, "add_prefix_space": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        # several absent tokens share <unk>'s id; tokenizers keeps such a vocab when it reads the
        # file (its own serializer would drop the duplicates, hence the JSON is written here)
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(m) for m in merges]},
    }
    cfg = {"tokenizer_class": "RobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
           "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>", "padding_side": "right",
           "add_prefix_space": False, "model_max_length": int(max_positions)}
    if has_mask:
        cfg["mask_token"] = MASK
    return {"tokenizer.json": json.dumps(tok, ensure_ascii=False).encode(),
            "tokenizer_config.json": json.dumps(cfg, indent=1).encode()}


def imported_tokenizer_files(folder, cfg: dict, bpe_dir=None, warn=None) -> dict[str, bytes]:
    """A plain export's dict.txt (d2v2-import --dict) -> the tokenizer files, with the GPT-2 BPE
    files from `bpe_dir` (--gpt2-bpe) or stored next to dict.txt (d2v2-import --gpt2-bpe).
    Without them, or for a dictionary whose symbols are not GPT-2 ids: {} and one warning line
    (the model is still exported; dict.txt is copied by the caller)."""
    folder, warn = Path(folder), warn or stderr_warning
    where = str(folder / "dict.txt")
    text = (folder / "dict.txt").read_text(encoding="utf-8")
    if bpe_dir is None:
        if all((folder / f).is_file() for f in (ENCODER, MERGES)):
            bpe_dir = folder
        else:
            bad = non_gpt2_symbol(fairseq_symbols(text, where))
            if bad is not None:
                warn(f"{where}: symbol {bad!r} is not a GPT-2 BPE id, so no transformers tokenizer is rebuilt "
                     f"(dict.txt is copied; tokenize with the pipeline that made the dictionary)")
            else:
                warn(f"no tokenizer written: {where} maps GPT-2 BPE ids, and the BPE itself is not in the "
                     f"checkpoint; {missing_files_hint()}")
            return {}
    return gpt2_tokenizer_files(text, bpe_dir, int(cfg["vocab_size"]), int(cfg["max_positions"]), where)
