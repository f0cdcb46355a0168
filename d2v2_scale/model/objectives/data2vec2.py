"""data2vec 2.0: the student forward (with loss) and the teacher module.

Student forward, top to bottom like the paper (N = B*M student rows):

    1. features = local(source)                    [B, T, D]   once per sample
    2. targets  = teacher(features or source)      [B, T, D]   once per sample, no_grad, eval
    3. clones   = features.repeat_interleave(M)    [N, T, D]   each row has its own mask
    4. student  = blocks(gather(positions(clones), kept) [+ CLS])      [N, E + T_keep, D]
    5. decoder  = conv(restore_order(student + noise at masked))       [N, T, D]
    6. loss     = at masked, non-padded positions, vs targets[row // M]

Loss (docs/REFERENCE.md §1.6), with s = loss_scale or 1/sqrt(D) and n = number of loss positions:
    loss_regression = (1/n) * sum_{masked tokens} s * sum_c l(pred, y)       (l = MSE or smooth-L1)
    loss_cls        = cls_loss_weight * sum_{rows r} s * sum_c l(cls_r, mean_t y[r // M])
    loss            = loss_regression + loss_cls
The CLS term is summed over the N rows, not averaged: data2vec 2.0 weights it by
`cls_loss * sample_size` before the criterion divides the whole sum by `sample_size`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ...data.layout import KEPT, LOSS_COLS, LOSS_ROWS, TOKEN_PADDING, layout_of
from ...objectives import DATA2VEC2
from ..core.encoder import Encoder
from ..core.loss import token_loss
from ..core.stats import compute_var, position_share
from ..core.targets import accumulate_layers, finish_targets
from ..core.tp_random import _default_state as default_rng_state
from ..core.tp_random import _set_default_state as set_default_rng_state
from ..modalities import get_modality

MASK_NOISE_STD = 0.01  # decoder input at masked slots: N(0, 0.01^2)
FRONT_RNG_KEY = "_front_rng"  # batch key: generator state the teacher pass drew the front end's dropout with


@contextlib.contextmanager
def replay_rng(state: Tensor | None):
    """Run the body from generator `state` (None: as is); the generator then continues where it was."""
    if state is None:
        yield
        return
    saved = default_rng_state()
    set_default_rng_state(state)
    try:
        yield
    finally:
        set_default_rng_state(saved)


def fill_masked(x_kept: Tensor, keep: Tensor, t: int, std: float = MASK_NOISE_STD) -> Tensor:
    """Student outputs at kept positions [N, T_keep, D] -> [N, t, D] in the original order, masked
    slots filled with N(0, std^2) noise: the inverse of the gather at keep [N, T_keep].

    A scatter at the kept indices, not a masked_scatter at ~mask: the same values (bitwise, and
    the same gradient, a gather), but its backward is no boolean-mask select (a host sync on a
    GPU) and its shapes do not depend on the mask's values (one graph under torch.compile)."""
    n, d = keep.shape[0], x_kept.shape[-1]
    noise = x_kept.new_empty(n, t, d).normal_(0.0, std)
    return noise.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), x_kept)


class EncoderTeacher(nn.Module):
    """The EMA teacher built from the shared Encoder (data2vec 2.0, and data2vec 1.0 / aqc speech
    and text; 1.0 vision has model/objectives/data2vec1.py's BeitTeacher): forward(x, padding=None) -> targets [B, T, D] fp32 (extra tokens dropped).

    x is the raw image (image), the student's local features (audio) or the student's
    embeddings (text).  Always in eval mode; parameters are frozen.  Under pipeline parallelism
    each stage holds a slice of the blocks and runs `forward_stage` (see train/pipeline.py)."""

    def __init__(self, cfg):
        super().__init__()
        self.mcfg = cfg.model
        modality = get_modality(cfg.model)
        self.encoder = Encoder(cfg.model, modality, parts=modality.teacher_parts)
        self.first_stage = self.last_stage = True  # pipeline.prune_to_stage sets these
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):  # the teacher never trains (dropout off, layerdrop off)
        return super().train(False)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        return self.forward_stage(x, padding)  # the whole model is one stage without pipelining

    @torch.no_grad()
    def forward_stage(self, x: Tensor, padding: Tensor | None, partial: Tensor | None = None):
        """One pipeline stage.  x: the teacher input (first stage) or the hidden state [E + T, B, D]
        received from the previous stage; padding [B, T] token padding; partial [B, T, D] fp32:
        the sum of the normalized top-K layers so far (None before the first tap).

        -> (hidden [E + T, B, D], partial) for the next stage, or targets [B, T, D] fp32 (last)."""
        m = self.mcfg
        if self.first_stage:
            if self.encoder.local is not None:
                x, padding = self.encoder.local_features(x, padding)
            x = self.encoder.contextualize(x, keep=None, zero=padding).transpose(0, 1)
        s, b = x.shape[:2]
        bias = self.encoder.bias(b, s, None, padding, x.dtype, x.device)
        x, taps = self.encoder.run_blocks_tbd(x, bias, m.top_k_layers)
        e = self.encoder.num_extra_tokens
        partial = accumulate_layers([t[:, e:] for t in taps], m, padding, partial)
        if self.last_stage:
            return finish_targets(partial, m, padding)
        return x, partial


@dataclass
class StudentLayout:
    """What every pipeline stage derives from the batch alone (no activations needed).

    mask [N, T] (True = masked), padding [B, T] | None (token padding), pad [N, T] | None (per
    clone), zero [N, T] (masked or padded: zeroed before the positional conv), keep [N, T_keep]
    (ascending kept positions), loss_rows / loss_cols [n] (the masked, non-padded positions).
    The index tensors come with the batch from the loader (data/layout.py)."""

    mask: Tensor
    padding: Tensor | None
    pad: Tensor | None
    zero: Tensor
    keep: Tensor
    loss_rows: Tensor
    loss_cols: Tensor


class Data2Vec2(nn.Module):
    """The student: forward(batch, teacher) -> (loss, stats)."""

    def __init__(self, cfg):
        super().__init__()
        self.mcfg = m = cfg.model
        if m.variant != "data2vec2":
            raise NotImplementedError(f"model.variant={m.variant!r} is not implemented (only data2vec2)")
        self.modality = get_modality(m)
        self.encoder = Encoder(m, self.modality, parts=frozenset({"local", "context"}))
        self.decoder = self.modality.build_decoder()
        self.clone_batch = m.clone_batch
        self.loss_scale = m.loss_scale if m.loss_scale is not None else 1.0 / math.sqrt(m.embed_dim)
        self.first_stage = self.last_stage = True  # pipeline.prune_to_stage sets these

    # ---------------------------------------------------------------------------------------
    def token_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """[..., D] x [..., D] -> [...]: scaled loss summed over channels, in fp32."""
        return token_loss(pred, target, self.mcfg.loss_beta, self.loss_scale)

    def stat_names(self) -> list[str]:
        """The keys of the stats dict forward returns, in a fixed order (pipeline stages that
        compute no loss still take part in the collective that spreads them)."""
        names = ["loss", "loss_regression", "masked_tokens", "pred_var", "target_var", "target_position_share"]
        if self.mcfg.cls_loss_weight > 0 and self.encoder.num_extra_tokens > 0:
            names.append("loss_cls")
        return names

    gathers_kept = DATA2VEC2.gathers_kept  # the student encodes only the kept tokens: the batch carries `kept` (data/layout.py)

    def layout(self, batch: dict) -> StudentLayout:
        mask = batch["mask"]  # [N, T] True = masked (or padding)
        m = self.clone_batch
        idx = layout_of(batch, self.modality, m, self.gathers_kept)  # shipped by the loader: no host sync
        padding = idx[TOKEN_PADDING]  # [B, T] | None
        pad = padding.repeat_interleave(m, 0) if padding is not None else None
        return StudentLayout(mask=mask, padding=padding, pad=pad, zero=mask if pad is None else mask | pad,
                             keep=idx[KEPT], loss_rows=idx[LOSS_ROWS], loss_cols=idx[LOSS_COLS])

    @torch.no_grad()
    def teacher_source(self, batch: dict) -> Tensor:
        """The tensor the teacher starts from: the raw input, or (teacher without its own front end)
        the student's local features, detached.  Pipeline only: the teacher pass runs before the
        student's, so the generator state is kept in the batch for the student's front end to
        draw the same dropout mask (text, docs/REFERENCE.md §1.10 D7: the teacher sees the post-dropout input)."""
        if "local" in self.modality.teacher_parts:
            return self.modality.teacher_input(batch, None)
        batch[FRONT_RNG_KEY] = default_rng_state()
        features, _ = self.encoder.local_features(batch["source"], batch.get("padding_mask"), with_padding=False)
        return self.modality.teacher_input(batch, features)

    def front_end(self, batch: dict) -> Tensor:
        """Local features [B, T, D] of the batch, once per sample (with the front end's dropout
        replayed from the teacher pass under pipelining, see teacher_source)."""
        with replay_rng(batch.get(FRONT_RNG_KEY)):
            features, _ = self.encoder.local_features(batch["source"], batch.get("padding_mask"), with_padding=False)
        return features

    @torch.no_grad()
    def teacher_targets(self, batch: dict, features: Tensor, padding: Tensor | None,
                        teacher: Callable | None) -> Tensor:
        """Targets [B, T, D] fp32 from one unmasked teacher pass per sample."""
        if teacher is None:  # parameter-count / FLOP / memory dry runs only, never training
            return features.new_zeros(features.shape, dtype=torch.float32)
        x = self.modality.teacher_input(batch, features)
        y = teacher(x) if padding is None else teacher(x, padding)
        return y.float()

    def forward(self, batch: dict, teacher: Callable | None = None, *, hidden: Tensor | None = None,
                targets: Tensor | None = None):
        """Whole model (no pipeline): forward(batch, teacher) -> (loss, stats).

        Pipeline stage: forward(batch, hidden=the previous stage's output [E + T_keep, N, D] (not on
        the first stage), targets=teacher targets [B, T, D] (last stage)) -> the hidden state for
        the next stage, or (loss, stats) on the last stage."""
        lay = self.layout(batch)
        m = self.clone_batch
        if self.first_stage:
            # 1. local features, once per sample: [B, T, D]
            features = self.front_end(batch)
            b, t, d = features.shape
            if lay.mask.shape != (b * m, t):
                raise ValueError(f"batch['mask'] is {tuple(lay.mask.shape)}, expected [B*M, T] = [{b * m}, {t}] "
                                 f"(B={b}, M=model.clone_batch={m})")
            # 2. teacher: once per sample, full input
            if targets is None and self.last_stage:
                targets = self.teacher_targets(batch, features, lay.padding, teacher)  # [B, T, D]
            # 3. clone batch: M copies of each sample, each with its own mask
            x = features.repeat_interleave(m, 0)  # [N, T, D]
            # 4a. positions on the full sequence, then only kept tokens (+ extra tokens)
            x = self.encoder.contextualize(x, keep=lay.keep, zero=lay.zero).transpose(0, 1)  # [S, N, D]
        else:
            x = hidden  # [S, N, D], S = E + T_keep
        # 4b. the blocks (this stage's)
        s, n = x.shape[:2]
        bias = self.encoder.bias(n, s, lay.keep, None, x.dtype, x.device)
        x, _ = self.encoder.run_blocks_tbd(x, bias)
        if not self.last_stage:
            return x
        return self.loss(x.transpose(0, 1), targets, lay)

    def loss(self, x: Tensor, targets: Tensor, lay: StudentLayout) -> tuple[Tensor, dict]:
        """Student output x [N, E + T_keep, D], targets [B, T, D] -> (loss, stats)."""
        m, mask = self.clone_batch, lay.mask
        e = self.encoder.num_extra_tokens

        # 5. decoder: noise at masked slots, original order, one prediction per position
        # (dropout on the student output first, before the noise: docs/REFERENCE.md §1.10 D2)
        x_dec = self.decoder.input_dropout(x[:, e:])
        pred = self.decoder(fill_masked(x_dec, lay.keep, mask.shape[1], self.mcfg.decoder_noise_std))  # [N, T, D]

        # 6. loss at masked, non-padded positions against the (repeated) teacher targets
        rows, cols = lay.loss_rows, lay.loss_cols  # row-major, as (mask & ~pad).nonzero() lists them
        p, y = pred[rows, cols], targets[torch.div(rows, m, rounding_mode="floor"), cols]  # [n, D]
        n = p.shape[0]
        loss_reg = self.token_loss(p, y).sum() / max(n, 1)
        loss = loss_reg
        stats = {"loss_regression": loss_reg.detach(), "masked_tokens": p.new_tensor(float(n), dtype=torch.float32),
                 "target_var": compute_var(y).detach(), "pred_var": compute_var(p.detach()).detach(),
                 "target_position_share": position_share(targets, lay.padding).detach()}

        if self.mcfg.cls_loss_weight > 0 and e > 0:
            # the final CLS output regresses the mean target over the sample's (real) positions
            padding = lay.padding
            if padding is None:
                cls_target = targets.mean(1)
            else:
                w = (~padding).unsqueeze(-1).float()
                cls_target = (targets * w).sum(1) / w.sum(1).clamp_min(1)
            cls_target = cls_target.repeat_interleave(m, 0)  # [N, D]
            loss_cls = self.mcfg.cls_loss_weight * self.token_loss(x[:, 0], cls_target).sum()
            loss = loss + loss_cls
            stats["loss_cls"] = loss_cls.detach()

        stats["loss"] = loss.detach()
        return loss, stats
