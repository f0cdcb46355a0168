"""Text modality: token embedding + learned absolute positions + LayerNorm + dropout 0.1, 1-D conv
decoder ending in a two-layer projection head (docs/REFERENCE.md §1.10 D1).  The teacher is blocks only
(`ema_encoder_only`), fed with the student's embeddings AFTER dropout, detached (docs/REFERENCE.md §1.10 D7): the
dropout runs once per sample in the front end, before the M clones are made, so every clone and
the teacher see the same dropout mask.

Positions are 0..T-1 for every row (padding included; padded positions are never kept by the
student and are key-masked in the teacher).  The embedding table is replicated over TP ranks.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...data.layout import text_token_padding
from ..core.layers import BertEmbedding
from ..core.modality import Modality


class TextLocal(nn.Module):
    """(tokens [B, T] int64, padding [B, T] | None) -> (embeddings [B, T, D], padding | None)."""

    def __init__(self, mcfg):
        super().__init__()
        self.pad = mcfg.pad_token_id
        self.tokens = BertEmbedding(mcfg.vocab_size, mcfg.embed_dim, padding_idx=mcfg.pad_token_id)
        self.positions = BertEmbedding(mcfg.max_positions, mcfg.embed_dim)
        self.norm = nn.LayerNorm(mcfg.embed_dim, eps=mcfg.layer_norm_eps)
        self.dropout = nn.Dropout(mcfg.input_dropout)  # once per sample (D7), replicated over TP ranks

    def forward(self, source: Tensor, padding_mask: Tensor | None = None,
                with_padding: bool = True) -> tuple[Tensor, Tensor | None]:
        t = source.shape[1]
        if t > self.positions.num_embeddings:
            raise ValueError(f"text of {t} tokens exceeds model.max_positions={self.positions.num_embeddings}")
        x = self.tokens(source) + self.positions.weight[:t][None]
        # with_padding=False: the caller has the padding already (token_padding reads .any() back)
        return self.dropout(self.norm(x)), text_token_padding(source, padding_mask, self.pad) if with_padding else None


class Text(Modality):
    name = "text"
    num_extra_tokens = 0
    context_norm = False  # the embedding LayerNorm already normalizes the input (no prenet)
    teacher_parts = frozenset()
    bert_decoder_proj = True  # the reference re-initializes only image/audio decoder heads (D9)

    @property
    def input_dropout(self) -> float:
        return 0.0  # applied by TextLocal, once per sample, before cloning (D7)

    def build_local(self) -> nn.Module:
        return TextLocal(self.mcfg)

    def sequence_length(self, cfg, audio_samples=None, text_tokens=None) -> int:
        return text_tokens or cfg.data.max_tokens

    def front_end_params(self) -> int:
        m, d = self.mcfg, self.mcfg.embed_dim
        # token + position embeddings, embedding LN; pre-LN text adds a final norm (image/audio:
        # their final norm replaces the context norm, same size)
        return m.vocab_size * d + m.max_positions * d + 2 * d + (2 * d if m.pre_ln else 0)

