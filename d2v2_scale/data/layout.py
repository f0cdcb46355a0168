"""The index tensors a student forward derives from the mask alone, computed once on the host.

The kept positions (the student's gather), the loss positions (where the decoder or head is
scored) and whether any token is padded all depend on the mask's values.  Derived on the
device, each read-back is a host synchronisation inside the forward (`.item()` for the kept
count, `nonzero` for the loss positions, `.any()` for the padding), and the data-dependent
shapes break a whole-graph `torch.compile`.  The loader therefore derives them in its worker
processes, where the mask is still a host tensor, and ships them with the batch
(`add_layout`); the forward reads them back with `layout_of`, which derives them on the spot,
with the same function and the syncs, only for batches built by hand (tests, the probe).

Batch keys (N = B*M mask rows, M = model.clone_batch; the loader's docstring lists them too):
    token_padding  bool [B, T]          True = padded token; only present when some token is
                                        padded (absent: none is; every value is a tensor, so
                                        batches stay tensor-only dicts)
    kept           int64 [N, T_keep]    ascending kept positions of each row (data2vec 2.0 only:
                                        the student gathers them; every row keeps T_keep)
    loss_rows      int64 [n]            the loss positions (masked and not padded), row-major:
    loss_cols      int64 [n]            exactly `(mask & ~pad).nonzero(as_tuple=True)`

The masked positions themselves need no index: the decoder input puts the student's outputs
back at `kept` over a tensor of noise, and the masked, non-padded positions are the loss
positions.  For images every row masks the same count, so n = N * (T - T_keep) and every
shape of the step is a function of the config alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..objectives import OBJECTIVES

TOKEN_PADDING, KEPT, LOSS_ROWS, LOSS_COLS = "token_padding", "kept", "loss_rows", "loss_cols"
LAYOUT_KEYS = (TOKEN_PADDING, KEPT, LOSS_ROWS, LOSS_COLS)


def kept_indices(mask: Tensor) -> Tensor:
    """mask [N, T] bool (True = masked) -> ascending kept positions [N, T_keep].

    Every row must keep the same number of positions (the student batch is dense); the mask
    generators of data/masking/data2vec2.py guarantee it (exact counts, then `equalize_kept`)."""
    kept = (~mask).sum(1)
    lo, hi = kept.aminmax()
    lo, hi = int(lo), int(hi)
    if lo != hi:
        raise ValueError(f"mask rows keep between {lo} and {hi} positions; every row must keep exactly the "
                         "same number (contract 1: the student gathers a dense [B*M, T_keep] batch; "
                         "data/masking/data2vec2.py's generators and equalize_kept make the counts equal)")
    # a stable sort puts the kept (False) positions first, in ascending order
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :hi]


def loss_positions(mask: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor]:
    """mask [N, T] (True = masked), pad [N, T] (True = padded) | None -> (rows [n], cols [n]) of
    the masked, non-padded positions, row-major."""
    return (mask if pad is None else mask & ~pad).nonzero(as_tuple=True)


# ---- token padding from the batch alone (the modalities' front ends return the same) ----------


def frame_lengths(n_samples: Tensor, conv_layers) -> Tensor:
    """Real samples per row [B] -> real frames per row [B] (same rule as ModelConfig.audio_frames)."""
    n = n_samples.long()
    for _, k, s in conv_layers:
        n = torch.div(n - k, s, rounding_mode="floor") + 1
    return n.clamp_min(0)


def frame_padding(padding_mask: Tensor | None, n_frames: int, conv_layers) -> Tensor | None:
    """Sample padding [B, S] (True = pad, at the end) -> frame padding [B, T] (True = pad)."""
    if padding_mask is None:
        return None
    real = frame_lengths((~padding_mask).sum(1), conv_layers)
    pad = torch.arange(n_frames, device=padding_mask.device)[None, :] >= real[:, None]
    return pad if bool(pad.any()) else None


def text_token_padding(source: Tensor, padding_mask: Tensor | None, pad_id: int) -> Tensor | None:
    """[B, T] True = padding (given, or where the token is the pad id); None when nothing is padded."""
    if padding_mask is None:
        padding_mask = source.eq(pad_id)
    return padding_mask if bool(padding_mask.any()) else None


# model.modality -> (batch, model config, T) -> [B, T] True = padded token, or None
TOKEN_PADDING_RULES = {
    "image": lambda batch, mcfg, n: None,  # fixed-size inputs: nothing is padded
    "audio": lambda batch, mcfg, n: frame_padding(batch.get("padding_mask"), n,
                                                  [tuple(x) for x in mcfg.conv_feature_layers]),
    "text": lambda batch, mcfg, n: text_token_padding(batch["source"], batch.get("padding_mask"), mcfg.pad_token_id),
}


def shipped(batch: dict) -> bool:
    """Whether the batch carries the layout keys (the loader's, or `add_layout`'s)."""
    return LOSS_ROWS in batch


def token_padding(batch: dict, modality, n_tokens: int) -> Tensor | None:
    """[B, T] True = padded token, or None: the shipped value, else the modality's derivation."""
    if shipped(batch):
        return batch.get(TOKEN_PADDING)
    return modality.token_padding(batch, n_tokens)


def derive_layout(batch: dict, modality, clones: int, gather: bool) -> dict:
    """The layout keys of `batch` (see the module docstring), on the mask's device.

    clones: M (mask rows per sample); gather: the objective gathers kept tokens (adds `kept`)."""
    mask = batch["mask"]
    padding = token_padding(batch, modality, mask.shape[1])
    pad = padding.repeat_interleave(clones, 0) if padding is not None else None
    rows, cols = loss_positions(mask, pad)
    out = {TOKEN_PADDING: padding, LOSS_ROWS: rows, LOSS_COLS: cols}
    if gather:
        out[KEPT] = kept_indices(mask)
    return out


def layout_of(batch: dict, modality, clones: int, gather: bool) -> dict:
    """The shipped layout keys of `batch`, or (a batch built by hand) `derive_layout`'s, which
    reads mask values back to the host."""
    if shipped(batch):
        if gather and KEPT not in batch:
            raise ValueError("the batch carries loss_rows but no `kept`: it was laid out for data2vec 1.0 "
                             "(data/layout.py add_layout with the model config the student was built from)")
        return {k: batch.get(k) for k in LAYOUT_KEYS}
    return derive_layout(batch, modality, clones, gather)


class _BatchPadding:
    """The token padding of a batch from the batch alone, per modality (the duck type `derive_layout`
    takes; the model's `Modality` classes answer with the same functions)."""

    def __init__(self, mcfg):
        self.mcfg = mcfg

    def token_padding(self, batch: dict, n_tokens: int) -> Tensor | None:
        m = self.mcfg
        rule = TOKEN_PADDING_RULES[m.modality]
        return rule(batch, m, n_tokens)


def add_layout(batch: dict, mcfg) -> dict:
    """The loader's call (host tensors, in its workers): `batch` with the layout keys added for
    the objective model.variant builds."""
    lay = derive_layout(batch, _BatchPadding(mcfg), mcfg.clone_batch, OBJECTIVES[mcfg.variant].gathers_kept)
    batch.update({k: v for k, v in lay.items() if v is not None})  # no token_padding: none is padded
    return batch
