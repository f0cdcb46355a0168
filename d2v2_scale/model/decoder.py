"""The light convolutional decoder (spec section 5), 1-D (audio, text) or 2-D (image grid).

    x [N, T, D] -> per layer: Conv(k, padding k//2, groups g) -> LayerNorm(no affine) -> GELU
                   (+ residual when in/out shapes match and residual is on)
                -> Linear(decoder_dim, D) -> [N, T, D]

No position information is added: the input already has masked slots filled with noise and the
original order restored (see data2vec.py).  Init: xavier-uniform weights, zero biases.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import XavierConv1d, XavierConv2d, XavierLinear


class ConvDecoder(nn.Module):
    def __init__(self, in_dim: int, dim: int, kernel: int, layers: int, groups: int, residual: bool,
                 ndim: int = 1, grid: tuple[int, int] | None = None):
        super().__init__()
        assert ndim in (1, 2)
        conv = XavierConv1d if ndim == 1 else XavierConv2d
        self.ndim, self.grid, self.kernel, self.residual = ndim, grid, kernel, residual
        self.convs = nn.ModuleList(
            conv(in_dim if i == 0 else dim, dim, kernel, padding=kernel // 2, groups=groups)
            for i in range(layers))
        self.proj = XavierLinear(dim, in_dim)

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
