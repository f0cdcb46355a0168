"""Audio modality: wav2vec 2.0 CNN feature extractor (320x down), LayerNorm + Linear projection,
convolutional positional encoder, ALiBi attention bias (built by the encoder), 1-D conv decoder.

The teacher shares the student's local features (CNN -> LayerNorm -> Linear, detached) and owns
its positional conv, context LayerNorm, prenet, blocks and ALiBi scale.

Frame padding (contract 1): padding is at the END of the waveform (right-padded batches).  A frame
is padding unless its whole receptive field lies in real samples, i.e. frames >=
`cfg.model.audio_frames(n_real_samples)` are padding -- the wav2vec 2.0 / data2vec 2.0 rule
(`_get_feat_extract_output_lengths`).  The data loader's masks must use `frame_padding` below.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ...data.layout import frame_padding
from ..core.layers import KaimingConv1d
from ..core.modality import Modality


class ConvFeatureExtractor(nn.Module):
    """[B, S] waveform -> [B, T, C]: per layer Conv1d(no bias) -> LayerNorm(C) -> GELU."""

    def __init__(self, conv_layers):
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c_in = 1
        for c, k, s in conv_layers:
            self.convs.append(KaimingConv1d(c_in, c, k, stride=s, bias=False))
            self.norms.append(nn.LayerNorm(c, elementwise_affine=True))
            c_in = c

    def forward(self, wav: Tensor) -> Tensor:
        x = wav.unsqueeze(1).to(self.convs[0].weight.dtype)  # [B, 1, S]; fp32 batch into a bf16 model
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            x = F.gelu(norm(x.transpose(1, 2)).transpose(1, 2))
        return x.transpose(1, 2)  # [B, T, C]


class AudioLocal(nn.Module):
    """(wave [B, S], padding [B, S] | None) -> (features [B, T, D], frame padding [B, T] | None)."""

    def __init__(self, mcfg):
        super().__init__()
        self.conv_layers = [tuple(x) for x in mcfg.conv_feature_layers]
        c = self.conv_layers[-1][0]
        self.cnn = ConvFeatureExtractor(self.conv_layers)
        self.norm = nn.LayerNorm(c, eps=mcfg.layer_norm_eps)
        # PyTorch's default Linear init: the reference resets this projection after its BERT init (docs/REFERENCE.md §1.10 D9)
        self.proj = nn.Linear(c, mcfg.embed_dim)

    def forward(self, source: Tensor, padding_mask: Tensor | None = None,
                with_padding: bool = True) -> tuple[Tensor, Tensor | None]:
        feats = self.cnn(source)
        # with_padding=False: the caller has the padding already (frame_padding reads .any() back)
        pad = frame_padding(padding_mask, feats.shape[1], self.conv_layers) if with_padding else None
        return self.proj(self.norm(feats)), pad


class ConvPositions(nn.Module):
    """x + PosConv(x), PosConv = depth x [Conv1d(D, D, k, groups) -> LayerNorm(no affine) -> GELU].

    Runs over the full-length sequence with masked and padded frames zeroed (so the student's
    positional signal does not leak the masked content)."""

    def __init__(self, mcfg):
        super().__init__()
        d, k = mcfg.embed_dim, mcfg.conv_pos_width
        self.kernel = k
        self.convs = nn.ModuleList(nn.Conv1d(d, d, k, padding=k // 2, groups=mcfg.conv_pos_groups)
                                   for _ in range(mcfg.conv_pos_depth))

    def forward(self, x: Tensor, zero: Tensor | None = None) -> Tensor:
        if zero is not None:
            x = x.masked_fill(zero.unsqueeze(-1), 0.0)
        y = x.transpose(1, 2)  # [N, D, T]
        for conv in self.convs:
            y = conv(y)
            if self.kernel % 2 == 0:
                y = y[..., :-1]
            y = F.gelu(F.layer_norm(y.transpose(1, 2), (y.shape[1],)).transpose(1, 2))
        return x + y.transpose(1, 2)


class Audio(Modality):
    name = "audio"
    num_extra_tokens = 0
    context_norm = True
    teacher_parts = frozenset({"context"})

    def build_local(self) -> nn.Module:
        return AudioLocal(self.mcfg)

    def sequence_length(self, cfg, audio_samples=None, text_tokens=None) -> int:
        return self.mcfg.audio_frames(audio_samples or int(cfg.data.max_seconds * cfg.data.sample_rate))

    def local_flops(self, t: int, n_samples: int | None) -> float:
        m = self.mcfg
        total, c_in, n = 0.0, 1, n_samples
        for c, k, s in m.conv_feature_layers:
            n = (n - k) // s + 1
            total += 2 * n * c_in * k * c
            c_in = c
        return total + 2 * t * c_in * m.embed_dim

    def positions_flops(self, t: int) -> float:
        m, d = self.mcfg, self.mcfg.embed_dim
        return float(m.conv_pos_depth * 2 * t * (d // m.conv_pos_groups) * m.conv_pos_width * d)

    def front_end_params(self) -> int:
        m, d, n, c_in = self.mcfg, self.mcfg.embed_dim, 0, 1
        for c, k, _ in m.conv_feature_layers:
            n += c_in * k * c + 2 * c
            c_in = c
        n += 2 * c_in + c_in * d + d  # LN + projection
        n += m.conv_pos_depth * (d * (d // m.conv_pos_groups) * m.conv_pos_width + d) + 2 * d
        return n + (m.num_heads if m.alibi else 0)

    def build_positions(self) -> nn.Module:
        return ConvPositions(self.mcfg)
