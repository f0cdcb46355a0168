"""Masks for data2vec 1.0 (docs/REFERENCE.md §2.2, §2.3), vectorized numpy, computed in loader workers.

Unlike the data2vec 2.0 generators (data/masking/data2vec2.py) these are NOT exact-count: the number of
spans is rounded probabilistically, spans overlap and merge, and only the speech mask is then
equalized (to the batch minimum, by dropping random masked frames, so trimmed rows have holes
inside spans).  One mask row per sample (M = 1).  Same conventions as data/masking/data2vec2.py: bool,
True = masked; every draw is keyed on the row's uint64 key (data/rng.py: (seed, epoch, sample
index)), so a mask never depends on the worker, prefetching or a mid-epoch resume.

  * `speech_span_mask`: fairseq `compute_mask_indices` (p 0.65, span 10, min_masks 1,
    `require_same_masks`): n = int(p*T/L + U) >= 1 distinct starts in {0, ..., T-L-1}; expected
    masked fraction 0.4926 (T=250), 0.4909 (T=500) before trimming.
  * `text_span_mask`: fairseq `MaskTokensDataset` with `mask_multiple_length` L: n = int(p*T/L + U)
    distinct starts in {0, ..., T-1}, spans clipped at the end (0.3066 masked at T=512, p=0.35, L=4).
  * `bert_inputs`: BERT masking: n = int(p*T + U) tokens selected; each becomes <mask>, stays, or
    becomes a random token; the loss covers only the <mask> positions (fairseq, issue #4229).
"""

from __future__ import annotations

import numpy as np

from .. import rng
from .data2vec2 import _top_k_rows

# streams of their own (data/rng.py): independent of the 2.0 masks' and the augmentations' draws
STREAM_COUNT = 20  # the U of the probabilistic rounding
STREAM_STARTS = 21  # span starts / selected tokens (without replacement)
STREAM_TRIM = 22  # speech: which masked frames a row drops to reach the batch minimum
STREAM_BERT_KIND = 23  # BERT: <mask> | unchanged | random
STREAM_BERT_TOKEN = 24  # BERT: the random token

N_SPECIAL = 4  # <s> <pad> </s> <unk>: ids 0..3 in every d2v2-prep vocabulary; never drawn as random tokens


def _valid(lengths: np.ndarray, total: int) -> np.ndarray:
    return np.arange(total)[None, :] < lengths[:, None]


def _distinct_starts(keys: np.ndarray, num: np.ndarray, candidates: np.ndarray, total: int) -> np.ndarray:
    """bool [N, total]: num[i] distinct positions uniform in {0, ..., candidates[i]-1} per row."""
    scores = rng.uniform(keys, total, STREAM_STARTS)
    scores[np.arange(total)[None, :] >= candidates[:, None]] = -np.inf
    return _top_k_rows(scores, np.minimum(num, candidates))


def _spread(starts: np.ndarray, span: int) -> np.ndarray:
    """bool [N, T] starts -> the union of [s, s + span) over the starts (clipped at T)."""
    out = starts.copy()
    for o in range(1, span):
        out[:, o:] |= starts[:, :-o]
    return out


def span_counts(keys: np.ndarray, lengths: np.ndarray, prob: float, span: int, min_masks: int = 0) -> np.ndarray:
    """int64 [N]: n = max(int(prob * T_i / span + U), min_masks), U ~ Uniform[0, 1) per row."""
    u = rng.uniform(keys, 1, STREAM_COUNT)[:, 0]
    return np.maximum((prob * lengths / float(span) + u).astype(np.int64), min_masks)


def speech_span_mask(keys: np.ndarray, lengths, total: int, prob: float, span: int,
                     min_masks: int = 1, same_count: bool = True) -> np.ndarray:
    """Speech mask, bool [N, total] (True = masked; padding frames >= lengths[i] are never masked).

    same_count: every row ends with the same masked count (the batch minimum), as fairseq's
    `require_same_masks`: the student encodes all frames, and the per-row loss weights stay equal."""
    n = len(keys)
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64).reshape(n), total)
    num = span_counts(keys, lengths, prob, span, min_masks)
    # fairseq: starts from range(sz - min_len), min_len = span, or sz - num - 1 when that is too few
    cand = np.where(lengths - span <= num, lengths - num - 1, lengths - span)
    cand = np.maximum(cand, 1)
    masked = _spread(_distinct_starts(keys, num, cand, total), span) & _valid(lengths, total)
    counts = masked.sum(1)
    k = int(counts.min()) if n else 0
    if not same_count or (counts == k).all():
        return masked
    scores = rng.uniform(keys, total, STREAM_TRIM)
    scores[~masked] = -np.inf
    return _top_k_rows(scores, k)


def text_span_mask(keys: np.ndarray, lengths, total: int, prob: float, span: int) -> np.ndarray:
    """Text span mask, bool [N, total] (True = masked; positions >= lengths[i] never masked)."""
    n = len(keys)
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64).reshape(n), total)
    num = span_counts(keys, lengths, prob, span)
    return _spread(_distinct_starts(keys, num, lengths, total), span) & _valid(lengths, total)


def text_mask_id(mcfg) -> int:
    """The <mask> id: the last row of the token table (RoBERTa's layout: 50,264 of 50,265)."""
    return int(mcfg.vocab_size) - 1


def text_inputs(keys: np.ndarray, tokens: np.ndarray, lengths, masking, mask_id: int,
                data_vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(student tokens int64 [N, T], loss mask bool [N, T]) from the original tokens [N, T].

    masking.generator "text_spans": every masked token becomes <mask>.  "bert": int(p*T + U)
    tokens selected; a share masking.bert_unchanged stays, masking.bert_random becomes a uniform
    random non-special token (ids N_SPECIAL..data_vocab-1), the rest <mask>.  The loss mask is
    exactly where the student input is <mask> (the reference's `src_tokens == mask_idx`)."""
    n, total = tokens.shape
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64).reshape(n), total)
    if masking.generator == "text_spans":
        selected = text_span_mask(keys, lengths, total, masking.ratio, masking.length)
        kind = np.zeros((n, total))
    elif masking.generator == "bert":
        num = span_counts(keys, lengths, masking.ratio, 1)
        selected = _distinct_starts(keys, num, lengths, total)
        kind = rng.uniform(keys, total, STREAM_BERT_KIND)
    else:
        raise ValueError(f"masking.generator={masking.generator!r} is not a data2vec 1.0 text generator")
    keep_p, rand_p = (masking.bert_unchanged, masking.bert_random) if masking.generator == "bert" else (0.0, 0.0)
    to_mask = selected & (kind < 1.0 - keep_p - rand_p)
    to_random = selected & (kind >= 1.0 - rand_p)
    out = np.where(to_mask, mask_id, tokens)
    if to_random.any():
        rand = N_SPECIAL + np.floor(rng.uniform(keys, total, STREAM_BERT_TOKEN) * (data_vocab - N_SPECIAL))
        out = np.where(to_random, rand.astype(np.int64), out)
    return out.astype(np.int64), out == mask_id
