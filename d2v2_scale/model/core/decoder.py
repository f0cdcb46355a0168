"""The light convolutional decoder (docs/REFERENCE.md §1.5), 1-D (audio, text) or 2-D (image grid).

    x [N, T, D] (input_dropout applied by the caller, see below)
                -> per layer: Conv(k, padding k//2, groups g) -> LayerNorm(no affine) -> GELU
                   (+ residual when in/out shapes match and residual is on)
                -> proj -> [N, T, D]
    proj: Linear(decoder_dim, D)                                 (projection_layers = 1)
          Sequential(Linear(decoder_dim, r * decoder_dim), GELU, Linear(r * decoder_dim, D))
                                                                 (projection_layers = 2: text, D1)
The two-layer head's modules are `proj.0` and `proj.2`, the reference's names.

`input_dropout` is a module without parameters that data2vec.py applies to the student output
before the masked slots get their noise; no position information is added.

Init (docs/REFERENCE.md §1.10 D9): the convs keep PyTorch's default init (the reference's BERT init touches
Linear/Embedding only); image/audio reset `proj` to PyTorch's default, the text head keeps the
BERT N(0, 0.02) init (`bert_proj=True`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import BertLinear


def projection_head(dim: int, out_dim: int, layers: int, ratio: float, bert_init: bool) -> nn.Module:
    """Linear(dim, out_dim), or (layers=2) Linear(dim, ratio*dim) -> GELU -> Linear(ratio*dim, out_dim)."""
    linear = BertLinear if bert_init else nn.Linear
    if layers == 1:
        return linear(dim, out_dim)
    hidden = int(dim * ratio)
    return nn.Sequential(linear(dim, hidden), nn.GELU(), linear(hidden, out_dim))


class ConvDecoder(nn.Module):
    def __init__(self, in_dim: int, dim: int, kernel: int, layers: int, groups: int, residual: bool,
                 ndim: int = 1, grid: tuple[int, int] | None = None, input_dropout: float = 0.0,
                 projection_layers: int = 1, projection_ratio: float = 2.0, bert_proj: bool = False):
        super().__init__()
        assert ndim in (1, 2)
        conv = nn.Conv1d if ndim == 1 else nn.Conv2d
        self.ndim, self.grid, self.kernel, self.residual = ndim, grid, kernel, residual
        self.input_dropout = nn.Dropout(input_dropout)
        self.convs = nn.ModuleList(
            conv(in_dim if i == 0 else dim, dim, kernel, padding=kernel // 2, groups=groups)
            for i in range(layers))
        self.proj = projection_head(dim, in_dim, projection_layers, projection_ratio, bert_proj)

    def _trim(self, x: Tensor) -> Tensor:
        # an even kernel with padding k//2 yields one extra position per spatial dim: drop it
        if self.kernel % 2 == 0:
            x = x[..., :-1] if self.ndim == 1 else x[..., :-1, :-1]
        return x

    def forward(self, x: Tensor) -> Tensor:
        """x [N, T, D] (T = h*w for 2-D) -> [N, T, D]."""
        n, t, d = x.shape
        x = x.transpose(1, 2)  # [N, D, T]
        if self.ndim == 2:
            x = x.reshape(n, d, *self.grid)
        for conv in self.convs:
            y = self._trim(conv(x))
            y = F.layer_norm(y.movedim(1, -1), (y.shape[1],)).movedim(-1, 1)
            y = F.gelu(y)
            x = x + y if self.residual and y.shape == x.shape else y
        x = x.reshape(n, x.shape[1], t).transpose(1, 2)  # [N, T, dim]
        return self.proj(x)
