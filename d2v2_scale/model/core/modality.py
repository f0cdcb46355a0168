"""What a modality contributes, as one small class per modality (no `if modality == ...` in the
shared algorithm).

A `Modality` builds:
  * `build_local()`     -> module: (source, padding_mask | None) -> (features [B, T, D],
                            frame padding [B, T] bool | None).  Runs once per sample.
  * `build_positions()` -> module or None: (x [N, T, D], zero [N, T] bool | None) -> [N, T, D],
                            run on the full-length sequence before kept tokens are gathered.
  * `build_extra_tokens()` -> Parameter [1, E, D] or None (image: the CLS token).
  * `build_decoder()`   -> module: [N, T, D] (masked slots filled) -> predictions [N, T, D].
and says:
  * `context_norm`: LayerNorm after positions/extra tokens, before the prenet (post-LN models);
  * `input_dropout`: dropout on the encoder input after the context LayerNorm, per clone (audio
    0.1, docs/REFERENCE.md §1.10 D3; text applies it in its front end instead, once per sample, D7);
  * `teacher_parts`: which encoder parts the teacher owns besides its blocks;
  * `teacher_input(batch, features)`: the tensor the teacher is called with;
  * `token_padding(batch, T)`: the padding `build_local()` returns, from the batch alone (pipeline
    stages after the first have no front end).
"""

from __future__ import annotations

from torch import Tensor, nn

from ...data.layout import TOKEN_PADDING_RULES
from .decoder import ConvDecoder


class Modality:
    name = ""
    num_extra_tokens = 0
    context_norm = True
    teacher_parts: frozenset = frozenset({"context"})  # "local" and/or "context"

    def __init__(self, mcfg):
        self.mcfg = mcfg

    # docs/REFERENCE.md §1.10 D9: image/audio reset the decoder projection to PyTorch's default init; text keeps BERT's
    bert_decoder_proj = False

    @property
    def input_dropout(self) -> float:
        """Encoder input dropout after the context LayerNorm, per clone (docs/REFERENCE.md §1.10 D3)."""
        return self.mcfg.input_dropout

    def build_local(self) -> nn.Module:
        raise NotImplementedError

    def build_positions(self) -> nn.Module | None:
        return None

    def build_extra_tokens(self) -> nn.Parameter | None:
        return None

    def build_decoder(self, ndim: int = 1, grid: tuple[int, int] | None = None) -> nn.Module:
        """1-D convs over the sequence (audio, text); images call it with ndim=2 and the patch grid."""
        m = self.mcfg
        return ConvDecoder(m.embed_dim, m.decoder_dim, m.decoder_kernel, m.decoder_layers, m.decoder_groups,
                           m.decoder_residual, ndim=ndim, grid=grid, input_dropout=m.decoder_dropout,
                           projection_layers=m.decoder_projection_layers,
                           projection_ratio=m.decoder_projection_ratio, bert_proj=self.bert_decoder_proj)

    def token_padding(self, batch: dict, n_tokens: int) -> Tensor | None:
        """[B, T] True = padding, or None: the modality's rule in data/layout.py, which the loader
        applies to the same batch (image: nothing is padded)."""
        return TOKEN_PADDING_RULES[self.name](batch, self.mcfg, n_tokens)

    def teacher_input(self, batch: dict, features: Tensor) -> Tensor:
        """Default: the teacher starts from the student's local features (detached)."""
        return features.detach()

    # ---- analytic cost from the config alone (model/flops.py) -------------------------------
    decoder_ndim = 1  # the conv decoder's kernel is k (1-D) or k x k (image: over the patch grid)

    def sequence_length(self, cfg, audio_samples: int | None = None, text_tokens: int | None = None) -> int:
        """T: the encoder's positions for one sample of the config's data."""
        raise NotImplementedError

    def kept_count(self, t: int, ratio: float) -> int:
        """T_keep of data2vec 2.0's exact-count masks (data/masking/data2vec2.py)."""
        return t - int(t * ratio)

    def local_flops(self, t: int, n_samples: int | None) -> float:
        """Forward FLOPs of the front end on one sample (T positions; audio: n_samples samples)."""
        return 0.0

    def positions_flops(self, t: int) -> float:
        """Forward FLOPs of the positional encoder on one row of T positions."""
        return 0.0

    def front_end_params(self) -> int:
        """Parameter count of the front end, positions, extra tokens and context norm."""
        raise NotImplementedError
