"""data2vec 1.0: the student forward (with loss), composed from the parts data2vec 2.0 uses.

Student forward (docs/REFERENCE.md §2.1, §2.5), B samples, T positions, M = 1:

    1. features = local(student input)                 [B, T, D]   text: tokens with <mask> ids
    2. targets  = teacher(unmasked input)              [B, T, D]   no_grad, eval, one pass
    3. x        = features with mask_emb at masked     [B, T, D]   speech: BEFORE the conv positions
    4. student  = blocks(context(x))                   [B, T, D]   every position, no gather
    5. pred     = head(student at masked, non-padded)  [n, D]      no decoder
    6. loss     = (1/n) * sum_{masked} s * sum_c l(pred, y)

Shared with data2vec 2.0 (model/objectives/data2vec2.py): the Encoder (front ends, conv positions, blocks,
layerdrop), the teacher module `EncoderTeacher` (an EMA encoder that returns the averaged,
normalized top-K taps; model.target_tap picks FFN output or block end), the target norms
(targets.py), the loss (loss.py), the collapse statistics.  What the teacher copies from the
student instead of averaging is the record's `teacher_copied` (d2v2_scale/objectives.py; train/teacher.py, model/core/ema.py).

Vision uses the BEiT encoder (model/modalities/beit.py) in the Encoder's place, and its own teacher
(`BeitTeacher`, an EMA of the whole encoder fed with the image, block-end taps); the two
encoder kinds are bound once at construction (`_embed`, `_blocks`), not branched on per step.

Parameters: encoder.* (the 2.0 names, or model/modalities/beit.py's), decoder.* (the regression head, in
the decoder's place: pipeline stages, export and the probe treat it as the decoder), mask_emb [D]
(speech only; text masks with the <mask> row of the token table, vision with the BEiT encoder's
mask_token).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ...data.layout import LOSS_COLS, LOSS_ROWS, TOKEN_PADDING, layout_of, loss_positions
from ...objectives import DATA2VEC1, uses_beit
from ..core.encoder import Encoder
from ..core.layers import BertLinear, TruncNormalLinear
from ..core.loss import loss_scale, token_loss
from ..core.stats import compute_var, position_share
from ..core.targets import accumulate_layers, finish_targets
from ..modalities import get_modality
from ..modalities.beit import BeitEncoder

def build_head(mcfg) -> nn.Module:
    """The regression head: [n, D] -> [n, D].  1 layer: Linear(D, D) with torch's default init
    (fairseq `final_proj`; BEiT vision: trunc-normal 0.02, its `lm_head`); 2 layers:
    BERT-initialized Linear(D, 2D) -> GELU -> Linear(2D, D)."""
    d = mcfg.embed_dim
    if mcfg.head_layers == 1:
        return TruncNormalLinear(d, d) if uses_beit(mcfg) else nn.Linear(d, d)
    return nn.Sequential(BertLinear(d, 2 * d), nn.GELU(), BertLinear(2 * d, d))


class BeitTeacher(nn.Module):
    """The vision teacher: an EMA of the whole BEiT encoder (patch embedding, CLS, mask token,
    relative position bias, blocks, final norm), run on the unmasked image.  Same interface as
    EncoderTeacher: forward(images) -> targets [B, P, D] fp32 (CLS dropped); forward_stage for
    pipeline stages.  Targets: the block-end taps of the top K blocks, LN per layer, averaged, LN
    (model.layer_norm_target_layer, model.layer_norm_targets)."""

    def __init__(self, cfg):
        super().__init__()

        self.mcfg = cfg.model
        self.encoder = BeitEncoder(cfg.model)
        self.first_stage = self.last_stage = True  # pipeline.prune_to_stage sets these
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):  # the teacher never trains (drop path, dropout off)
        return super().train(False)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        return self.forward_stage(x, padding)

    @torch.no_grad()
    def forward_stage(self, x: Tensor, padding: Tensor | None, partial: Tensor | None = None):
        """x: images [B, C, H, W] (first stage) or the hidden state [1 + P, B, D]; -> (hidden,
        partial) for the next stage, or targets [B, P, D] fp32 (last)."""
        m = self.mcfg
        if self.first_stage:
            x = self.encoder.embed(x, None).transpose(0, 1)
        x, taps = self.encoder.run_blocks_tbd(x, m.top_k_layers)
        partial = accumulate_layers([t[:, 1:] for t in taps], m, None, partial)
        if self.last_stage:
            return finish_targets(partial, m, None)
        return x, partial


class Data2Vec1(nn.Module):
    """The data2vec 1.0 student: forward(batch, teacher) -> (loss, stats).  Same calling
    convention as Data2Vec2 (pipeline stages: hidden=, targets=), so the trainer, the pipeline
    runner, checkpoints and export drive both objectives alike."""

    def __init__(self, cfg):
        super().__init__()
        self.mcfg = m = cfg.model
        self.modality = get_modality(m)
        self.mask_emb = None
        if uses_beit(m):

            # vision: the BEiT encoder puts its mask_token in place of masked patch embeddings
            self.encoder = BeitEncoder(m)
            self._embed, self._blocks = self._embed_beit, self._blocks_beit
        else:
            self.encoder = Encoder(m, self.modality, parts=frozenset({"local", "context"}))
            self._embed, self._blocks = self._embed_sequence, self._blocks_sequence
            # speech: dropout after the encoder LayerNorm (wav2vec 2.0 TransformerEncoder); text
            # applies its 0.1 to the embeddings already (the modality's input dropout)
            self.context_dropout = nn.Dropout(m.dropout) if self.encoder.context_norm is not None else nn.Identity()
            # speech: a learned vector replaces the projected features at masked frames, Uniform[0, 1)
            if m.modality == "audio":
                self.mask_emb = nn.Parameter(torch.rand(m.embed_dim))
        self.decoder = build_head(m)
        self.loss_scale = loss_scale(m)
        self.first_stage = self.last_stage = True  # pipeline.prune_to_stage sets these

    gathers_kept = DATA2VEC1.gathers_kept  # every position is encoded: the batch needs no `kept` (data/layout.py)

    def stat_names(self) -> list[str]:
        return ["loss", "loss_regression", "masked_tokens", "pred_var", "target_var", "target_position_share"]

    def _layout(self, batch: dict) -> dict:
        """The loader's index tensors (data/layout.py; derived here for batches built by hand)."""
        return layout_of(batch, self.modality, 1, self.gathers_kept)

    @torch.no_grad()
    def teacher_source(self, batch: dict) -> Tensor:
        """The teacher's input: the student's front end on the UNMASKED input, detached (speech:
        projected CNN features before the mask embedding; text: embeddings of the original
        tokens, i.e. the full sequence as in the paper, not fairseq's masked-only input; vision:
        the image itself, the teacher has its own patch embedding)."""
        if uses_beit(self.mcfg):
            return batch["source"]
        # the teacher runs in eval mode (docs/REFERENCE.md §2.1): the front end it borrows drops nothing (the
        # text embedding dropout lives in the front end; data2vec 2.0 feeds it post-dropout, D7)
        local, was_training = self.encoder.local, self.encoder.local.training
        local.train(False)
        try:
            features, _ = self.encoder.local_features(batch["source"], batch.get("padding_mask"), with_padding=False)
        finally:
            local.train(was_training)
        return self.modality.teacher_input(batch, features)

    def forward(self, batch: dict, teacher: Callable | None = None, *, hidden: Tensor | None = None,
                targets: Tensor | None = None):
        """Whole model: forward(batch, teacher) -> (loss, stats).  Pipeline stage: hidden = the
        previous stage's output [T, B, D]; targets [B, T, D] on the last stage."""
        mask = batch["mask"]  # [B, T] True = masked
        lay = self._layout(batch)
        padding = lay[TOKEN_PADDING]
        if self.first_stage:
            x, targets = self._embed(batch, mask, padding, teacher, targets)  # [E + T, B, D]
        else:
            x = hidden
        x = self._blocks(x, padding)
        if not self.last_stage:
            return x
        return self.loss(x.transpose(0, 1), targets, mask, padding, (lay[LOSS_ROWS], lay[LOSS_COLS]))

    # ---- speech and text: the shared Encoder ------------------------------------------------
    def _embed_sequence(self, batch, mask, padding, teacher, targets):
        student_src = batch.get("student_source", batch["source"])
        x, _ = self.encoder.local_features(student_src, batch.get("padding_mask"), with_padding=False)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"batch['mask'] is {tuple(mask.shape)}, expected [B, T] = {tuple(x.shape[:2])} "
                             "(data2vec 1.0: one mask row per sample)")
        if targets is None and self.last_stage:
            targets = self.teacher_targets(batch, x if "student_source" not in batch else None, padding, teacher)
        return self.mask_and_contextualize(x, mask, padding), targets

    def mask_and_contextualize(self, x: Tensor, mask: Tensor, padding: Tensor | None) -> Tensor:
        """Front-end features x [B, T, D] -> the blocks' input [T, B, D]: the mask embedding at
        masked frames (speech), positions, context LayerNorm, dropout."""
        if self.mask_emb is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        x = self.encoder.contextualize(x, keep=None, zero=padding)  # padded frames zeroed
        return self.context_dropout(x).transpose(0, 1)

    def _blocks_sequence(self, x, padding):
        s, b = x.shape[:2]
        bias = self.encoder.bias(b, s, None, padding, x.dtype, x.device)
        return self.encoder.run_blocks_tbd(x, bias)[0]

    # ---- vision: the BEiT encoder -----------------------------------------------------------
    def _embed_beit(self, batch, mask, padding, teacher, targets):
        if targets is None and self.last_stage:
            targets = self.teacher_targets(batch, None, None, teacher)
        return self.encoder.embed(batch["source"], mask).transpose(0, 1), targets

    def _blocks_beit(self, x, padding):
        return self.encoder.run_blocks_tbd(x)[0]  # + the final LayerNorm on the last stage

    @torch.no_grad()
    def teacher_targets(self, batch: dict, features: Tensor | None, padding: Tensor | None,
                        teacher: Callable | None) -> Tensor:
        """Targets [B, T, D] fp32.  features: the student's unmasked front-end output when it
        already has it (speech), else None (recomputed from batch['source'])."""
        x = self.teacher_source(batch) if features is None else self.modality.teacher_input(batch, features)
        if teacher is None:  # parameter-count / FLOP dry runs only, never training
            return x.new_zeros(x.shape, dtype=torch.float32)
        y = teacher(x) if padding is None else teacher(x, padding)
        return y.float()

    def loss(self, x: Tensor, targets: Tensor, mask: Tensor, padding: Tensor | None,
             positions: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, dict]:
        """Student output x [B, E + T, D], targets [B, T, D], mask [B, T] -> (loss, stats).
        positions: (rows [n], cols [n]) of the masked, non-padded positions when the batch carries
        them (data/layout.py), else derived from mask and padding here."""
        x = x[:, self.encoder.num_extra_tokens:]
        rows, cols = positions if positions is not None else loss_positions(mask, padding)
        p, y = self.decoder(x[rows, cols]), targets[rows, cols]  # [n, D]
        n = p.shape[0]
        loss = token_loss(p, y, self.mcfg.loss_beta, self.loss_scale).sum() / max(n, 1)
        stats = {"loss": loss.detach(), "loss_regression": loss.detach(),
                 "masked_tokens": p.new_tensor(float(n), dtype=torch.float32),
                 "target_var": compute_var(y).detach(), "pred_var": compute_var(p.detach()).detach(),
                 "target_position_share": position_share(targets, padding).detach()}
        return loss, stats
