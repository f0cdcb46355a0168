"""Text classification (or regression) fine-tuning of an exported text encoder (data2vec 2.0:
RobertaModel, data2vec 1.0: Data2VecTextModel; transformers' own classes, no folder code runs)
with transformers.Trainer and the reference's GLUE recipe (fairseq
examples/data2vec/config/v2/text_finetuning/*.yaml, docs/FINETUNE.md "Text").

Input: a CSV (.csv), TSV (.tsv, GLUE style: no quoting) or JSON-lines (.jsonl / .json) file with
a text column, optionally a second text column (sentence pairs) and a label column.  Output: the
fine-tuned folder (model + the folder's tokenizer; pipeline("text-classification") runs on it)
and metrics.json on the held-out rows."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from ..train.schedules import WarmupPolynomial, fairseq_adam_eps
from .common import load_model, publish, recipe_trainer, training_args
from .recipes import SMALL, TEXT_REFERENCE
from .rows import FinetuneError

# config.json model_type of the folders this recipe takes (d2v2-export --format hf of a text run)
TEXT_MODEL_TYPES = ("roberta", "data2vec-text")
# column names tried when --text-column is not given: GLUE's as Hugging Face datasets name them
# (pairs first: MRPC / STS-B / RTE, QQP, MNLI, QNLI), then single sentences (SST-2, CoLA) and "text"
PAIR_COLUMNS = (("sentence1", "sentence2"), ("question1", "question2"), ("premise", "hypothesis"),
                ("question", "sentence"))
SINGLE_COLUMNS = ("text", "sentence")
SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


def add_arguments(p) -> None:
    """The text task's flags of d2v2-finetune (cli.py)."""
    g = p.add_argument_group("text (d2v2-finetune text: --data is a .csv / .tsv / .jsonl file)")
    g.add_argument("--text-column", default=None,
                   help="default: sentence1+sentence2, question1+question2, premise+hypothesis, question+sentence, "
                        "text or sentence, whichever the file has")
    g.add_argument("--pair-column", default=None, help="the second text of a sentence pair")
    g.add_argument("--label-column", default="label")
    g.add_argument("--no-header", action="store_true",
                   help="the file has no header row: name columns by 0-based position (--text-column 1 --label-column 0)")
    g.add_argument("--eval-data", default=None, metavar="FILE", help="held-out rows (instead of --eval-fraction)")
    g.add_argument("--regression", action="store_true", help="a numeric label, one output, MSE (STS-B)")
    g.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the model's, <= 512)")


def options(a) -> dict:
    """The text flags of a parsed d2v2-finetune command line, as finetune_text's keywords."""
    return {k: getattr(a, k) for k in ("text_column", "pair_column", "label_column", "no_header", "eval_data",
                                       "regression", "max_length")}


def read_table(path, no_header: bool = False) -> tuple[list[str], list[dict]]:
    """-> (column names, rows as {column: str | None}) of a .csv / .tsv / .jsonl file; with
    no_header the columns are "0", "1", ... (CSV / TSV)."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"{path}: no such file")
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise FinetuneError(f"{path}: unknown format {path.suffix!r}: give a .csv, .tsv or .jsonl file")
    with open(path, encoding="utf-8", newline="") as f:
        try:
            if fmt == "jsonl":
                rows = []
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            r = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise FinetuneError(f"{path} line {i}: not JSON ({e.msg}): one JSON object per line") from None
                        if not isinstance(r, dict):
                            raise FinetuneError(f"{path} line {i}: a {type(r).__name__}, not an object: one JSON "
                                                "object per line ({\"text\": ..., \"label\": ...})")
                        rows.append({k: (None if v is None else str(v)) for k, v in r.items()})
                cols = list(dict.fromkeys(k for r in rows for k in r))
            else:
                # GLUE's TSVs are unquoted (a lone '"' is text); CSV follows RFC 4180 quoting
                rd = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(f))
                lines = [r for r in rd if r]
                if not lines:
                    raise FinetuneError(f"{path} is empty: it needs a header row and labelled rows")
                cols = [str(i) for i in range(len(lines[0]))] if no_header else lines[0]
                body = lines if no_header else lines[1:]
                rows = []
                for i, r in enumerate(body):
                    if len(r) != len(cols):
                        n = i + 1 if no_header else i + 2
                        raise FinetuneError(f"{path} line {n}: {len(r)} fields, the header has {len(cols)}"
                                            + (" (a TSV field with a tab?)" if fmt == "tsv" else ""))
                    rows.append(dict(zip(cols, r)))
        except UnicodeDecodeError as e:
            raise FinetuneError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
        except csv.Error as e:
            raise FinetuneError(f"{path}: not readable as {fmt.upper()} ({e})") from None
    if not rows:
        raise FinetuneError(f"{path} has no rows" + (" below its header" if fmt != "jsonl" else "")
                            + ": it needs labelled rows")
    return cols, rows


def pick_columns(cols: list[str], path, text_column, pair_column, label_column, no_header: bool):
    """-> (text column, pair column or None, label column), each one the file has."""
    hint = " (--no-header: columns are 0-based positions)" if no_header else ""
    have = ", ".join(cols[:12]) + (", ..." if len(cols) > 12 else "")
    if text_column is None:
        if no_header:
            raise FinetuneError(f"{path}: --no-header needs the columns by position, e.g. --text-column 1 "
                                "--label-column 0")
        pair = next((p for p in PAIR_COLUMNS if p[0] in cols and p[1] in cols), None)
        if pair is not None:
            text_column, pair_column = pair[0], pair_column or pair[1]
        else:
            text_column = next((c for c in SINGLE_COLUMNS if c in cols), None)
            if text_column is None:
                raise FinetuneError(f"{path} has no text column ({'/'.join(SINGLE_COLUMNS)}, or a GLUE pair) among "
                                    f"its columns ({have}): name it with --text-column NAME")
    for flag, c in (("--text-column", text_column), ("--pair-column", pair_column), ("--label-column", label_column)):
        if c is not None and c not in cols:
            raise FinetuneError(f"{path} has no column {c!r}{hint} (its columns: {have}): pass {flag} NAME")
    return text_column, pair_column, label_column


def _labels(rows, path, col, regression: bool):
    """-> the label column as float (regression) or str values; one line on an empty or bad label."""
    out = []
    for i, r in enumerate(rows):
        v = r.get(col)
        if v is None or not str(v).strip():
            raise FinetuneError(f"{path} row {i + 1}: no label in column {col!r}: every row needs one "
                                "(drop unlabelled rows, or pass --label-column NAME)")
        v = str(v).strip()
        if regression:
            try:
                out.append(float(v))
            except ValueError:
                raise FinetuneError(f"{path} row {i + 1}: label {v!r} is not a number (--regression needs numeric "
                                    "labels; leave it out for classes)") from None
        else:
            out.append(v)
    return out


def _texts(rows, path, col):
    out = []
    for i, r in enumerate(rows):
        v = r.get(col)
        if v is None:
            raise FinetuneError(f"{path} row {i + 1}: no text in column {col!r}: every row needs one")
        out.append(v)
    return out


def _class_order(values) -> list[str]:
    """Class names in label-id order: numeric order when every label is an integer (GLUE's 0/1/2)."""
    uniq = set(values)
    try:
        return sorted(uniq, key=int)
    except ValueError:
        return sorted(uniq)


def load_examples(data, eval_data, eval_fraction, text_column, pair_column, label_column, no_header, regression):
    """-> (train, held-out, info): train / held-out = (texts, pair texts or None, labels: int class
    ids or float targets); info: the columns and class names.  Every check runs here, before any
    model or tokenizer loads."""
    cols, rows = read_table(data, no_header)
    tc, pc, lc = pick_columns(cols, data, text_column, pair_column, label_column, no_header)
    x, x2, y = _texts(rows, data, tc), (_texts(rows, data, pc) if pc else None), _labels(rows, data, lc, regression)
    if eval_data:
        ecols, erows = read_table(eval_data, no_header)
        for c in (tc, pc, lc):
            if c is not None and c not in ecols:
                raise FinetuneError(f"--eval-data {eval_data} has no column {c!r} (its columns: {', '.join(ecols[:12])}): "
                                    f"it needs the columns of {data}")
        ex, ex2 = _texts(erows, eval_data, tc), (_texts(erows, eval_data, pc) if pc else None)
        ey = _labels(erows, eval_data, lc, regression)
    classes = None
    if not regression:
        classes = _class_order(y)
        if len(classes) < 2:
            raise FinetuneError(f"{data}: column {lc!r} holds one label ({classes[0]!r}): classification needs "
                                "two or more (--regression for numeric targets, --label-column for another column)")
        if len(classes) > 1000 and len(classes) > len(y) // 2:
            raise FinetuneError(f"{data}: column {lc!r} has {len(classes)} distinct labels in {len(y)} rows: not a "
                                "label column (pass --label-column NAME; --regression for numeric targets)")
        ids = {c: i for i, c in enumerate(classes)}
        y = [ids[v] for v in y]
        if eval_data:
            unknown = sorted(set(ey) - set(ids))
            if unknown:
                raise FinetuneError(f"--eval-data {eval_data}: labels {', '.join(map(repr, unknown[:5]))} do not occur "
                                    f"in {data} (labels there: {', '.join(map(repr, classes[:10]))}): the model "
                                    "cannot predict them; train on rows that have them")
            ey = [ids[v] for v in ey]
    y = np.asarray(y, dtype=np.float32 if regression else np.int64)
    if eval_data:
        tr = (x, x2, y)
        te = (ex, ex2, np.asarray(ey, dtype=y.dtype))
    else:
        tri, tei = _split(y, eval_fraction, regression, data, lc, classes)
        pick = (lambda v, ix: None if v is None else [v[i] for i in ix])
        tr = (pick(x, tri), pick(x2, tri), y[tri])
        te = (pick(x, tei), pick(x2, tei), y[tei])
    info = {"text_column": tc, "pair_column": pc, "label_column": lc, "classes": classes}
    return tr, te, info


def _split(y, fraction, regression, data, col, classes):
    """Seeded held-out split (split seed 0, as rows.split): stratified by class for classification."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise FinetuneError(f"--eval-fraction {fraction}: must be between 0 and 1 (or pass --eval-data FILE)")
    idx = np.arange(len(y))
    if not regression:
        vals, counts = np.unique(y, return_counts=True)
        if counts.min() < 2:
            name = classes[int(vals[counts.argmin()])]
            raise FinetuneError(f"{data}: label {name!r} of column {col!r} has 1 row: a stratified held-out split "
                                "needs >= 2 rows per class; pass --eval-data FILE or drop that class")
    try:
        tr, te = train_test_split(idx, test_size=fraction, random_state=0, stratify=None if regression else y)
    except ValueError as e:
        raise FinetuneError(f"{data}: no held-out split of {len(y)} rows at --eval-fraction {fraction} ({e}); "
                            "pass --eval-data FILE or another --eval-fraction") from None
    return np.sort(tr), np.sort(te)


def fairseq_adam(params, lr: float, betas, eps: float, weight_decay: float):
    """torch AdamW that steps as fairseq's `adam` (fairseq/optim/adam.py): decoupled weight decay
    on every parameter, eps added to sqrt(v) before the bias correction (the eps of step t is
    train/schedules.fairseq_adam_eps(eps, beta2, t), set before each step)."""
    import torch

    opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    steps = [0]

    def pre(o, args, kwargs):
        steps[0] += 1
        for g in o.param_groups:
            g["eps"] = fairseq_adam_eps(eps, betas[1], steps[0])

    opt.register_step_pre_hook(pre)
    return opt


def _scores(pred, gold, regression: bool, n_cls: int) -> dict:
    if regression:
        from scipy.stats import pearsonr, spearmanr

        return {"pearson": float(pearsonr(pred, gold)[0]), "spearman": float(spearmanr(pred, gold)[0]),
                "mse": float(np.mean((pred - gold) ** 2))}
    from sklearn.metrics import f1_score, matthews_corrcoef

    res = {"accuracy": float((pred == gold).mean())}
    if n_cls == 2:  # the reference reports F1 (MRPC, QQP: of class 1) and MCC (CoLA)
        res |= {"f1": float(f1_score(gold, pred, pos_label=1, zero_division=0)),
                "mcc": float(matthews_corrcoef(gold, pred))}
    else:
        res["macro_f1"] = float(f1_score(gold, pred, average="macro", zero_division=0))
    return res


def finetune_text(folder, data, out, recipe="reference", seed=0, scratch=False, eval_paths=None,
                  eval_fraction=0.5, text_column=None, pair_column=None, label_column="label", no_header=False,
                  eval_data=None, regression=False, max_length=None, **over) -> dict:
    import torch

    if eval_paths:
        raise FinetuneError("--eval-paths selects rows of a d2v2-prep corpus by source path; a text file has none: "
                            "pass --eval-data FILE or --eval-fraction")
    folder, out = Path(folder), Path(out)
    r = dict(TEXT_REFERENCE) | (SMALL["text"] if recipe == "small" else {}) | over
    tr, te, info = load_examples(data, eval_data, eval_fraction, text_column, pair_column, label_column, no_header,
                                 regression)
    if not (folder / "tokenizer_config.json").is_file():
        raise FinetuneError(f"{folder} has no tokenizer (tokenizer_config.json): export it from a run whose data "
                            "manifest names its sentencepiece model, or an imported fairseq model with "
                            "d2v2-export ... --format hf --gpt2-bpe DIR (docs/EXPORT.md)")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    cfg = json.loads((folder / "config.json").read_text())
    # the model's positions (RoBERTa numbers them from pad + 1) and the reference's max_positions 512
    n_pos = int(cfg.get("max_position_embeddings", 514)) - int(cfg.get("pad_token_id", 1)) - 1
    limit = min(n_pos, int(r["max_positions"]))
    max_len = min(int(max_length or limit), limit)

    def encode(part):
        x, x2, y = part
        enc = tok(x, x2, truncation=True, max_length=max_len) if x2 is not None else tok(x, truncation=True,
                                                                                       max_length=max_len)
        return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                 "labels": float(y[i]) if regression else int(y[i])} for i in range(len(x))]

    train, held = encode(tr), encode(te)
    classes = info["classes"]
    head = ({"num_labels": 1, "problem_type": "regression"} if regression else
            {"num_labels": len(classes), "problem_type": "single_label_classification",
             "id2label": dict(enumerate(classes)), "label2id": {c: i for i, c in enumerate(classes)}})
    # RobertaClassificationHead (the reference's head: <s> token, dense, tanh, out_proj) with the
    # reference's pooler_dropout 0; the encoder keeps the folder's dropouts (0.1, its pretraining's)
    model = load_model(AutoModelForSequenceClassification, str(folder), scratch, seed=seed,
                       classifier_dropout=r["pooler_dropout"], **head)
    total = int(r["max_steps"] or r["epochs"] * math.ceil(len(train) / r["batch_size"]))
    warm = int(r["warmup_steps"] if r.get("warmup_steps") is not None else r["warmup_ratio"] * total)
    r |= {"max_steps": total, "warmup_steps": warm, "max_length": max_len}
    opt = fairseq_adam([p for p in model.parameters() if p.requires_grad], r["lr"], tuple(r["betas"]), r["eps"],
                       r["weight_decay"])
    # update k runs at WarmupPolynomial(k - 1) x lr, fairseq's trainer convention (train/schedules.py)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupPolynomial(total, warm, r["power"], 0.0))
    collate = DataCollatorWithPadding(tok)
    trainer = recipe_trainer(model=model, args=training_args(out, r, seed), train_dataset=train,
                             data_collator=collate, optimizers=(opt, sched))  # the recipe's, DeepSpeed too
    trainer.train()
    model.eval()
    dev = next(model.parameters()).device
    preds = []
    with torch.no_grad():
        for i in range(0, len(held), 64):
            b = {k: v.to(dev) for k, v in collate([{k: q[k] for k in ("input_ids", "attention_mask")}
                                                    for q in held[i:i + 64]]).items()}
            logits = model(**b).logits.float().cpu()
            preds.append(logits[:, 0] if regression else logits.argmax(-1))
    pred = torch.cat(preds).numpy()
    gold = te[2]
    scores = _scores(pred, gold, regression, 0 if regression else len(classes))
    res = {"task": "text", **scores, "n_train": len(train), "n_eval": len(held), "scratch": scratch, "seed": seed,
           "recipe": recipe, "steps": total, "warmup_steps": warm, "lr": r["lr"], "batch_size": r["batch_size"],
           "max_length": max_len, "regression": regression, **info}
    # rank 0 writes model/ (model + the folder's tokenizer; temp name, then rename) and metrics.json
    return publish(trainer, out, res, tok.save_pretrained)
