"""Image modality: ViT patch embedding, fixed 2-D sin-cos positions, one CLS token, 2-D conv
decoder on the patch grid.  The teacher covers the whole encoder, patch embedding included, and
is called with the raw (normalized) image [B, C, H, W]."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.layers import XavierConv2d
from ..core.modality import Modality


CLS_INIT_STD = 1.0


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """[P] positions -> [P, dim] (first half sin, second half cos), MAE convention."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos table [grid*grid, dim]; half the channels encode the row, half the column
    (patches in row-major order)."""
    h, w = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    # MAE stacks (w, h) and encodes the first with half the channels
    return torch.cat([sincos_1d(dim // 2, w), sincos_1d(dim // 2, h)], dim=1).float()


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> patches [B, L, D] via Conv2d(k = stride = patch)."""

    def __init__(self, mcfg):
        super().__init__()
        p = mcfg.patch_size
        # initialized like a Linear on the flattened patch (MAE / data2vec 2.0 image encoder)
        self.proj = XavierConv2d(mcfg.in_chans, mcfg.embed_dim, kernel_size=p, stride=p)

    def forward(self, source: Tensor, padding_mask: Tensor | None = None, with_padding: bool = True) -> tuple[Tensor, None]:
        x = self.proj(source.to(self.proj.weight.dtype))  # [B, D, h, w]; fp32 batch into a bf16 model
        return x.flatten(2).transpose(1, 2), None


class FixedPositions2d(nn.Module):
    """Adds the sin-cos table (a non-persistent buffer: fixed, never trained, not in checkpoints)."""

    def __init__(self, mcfg):
        super().__init__()
        grid = mcfg.image_size // mcfg.patch_size
        self.register_buffer("table", sincos_2d(mcfg.embed_dim, grid)[None], persistent=False)

    def forward(self, x: Tensor, zero: Tensor | None = None) -> Tensor:
        return x + self.table.to(x.dtype)


class Image(Modality):
    name = "image"
    num_extra_tokens = 1
    context_norm = True
    teacher_parts = frozenset({"local", "context"})

    decoder_ndim = 2

    def build_local(self) -> nn.Module:
        return PatchEmbed(self.mcfg)

    def sequence_length(self, cfg, audio_samples=None, text_tokens=None) -> int:
        return self.mcfg.num_patches

    def kept_count(self, t: int, ratio: float) -> int:
        return int(t * (1 - ratio))

    def local_flops(self, t: int, n_samples: int | None) -> float:
        m = self.mcfg
        return 2.0 * t * m.in_chans * m.patch_size ** 2 * m.embed_dim

    def front_end_params(self) -> int:
        m, d = self.mcfg, self.mcfg.embed_dim
        return m.in_chans * m.patch_size ** 2 * d + d + d + 2 * d  # patch embed, CLS, context LN

    def build_positions(self) -> nn.Module:
        return FixedPositions2d(self.mcfg)

    def build_extra_tokens(self) -> nn.Parameter:
        # N(0, 1): the reference's nn.init.normal_ on the CLS token (docs/REFERENCE.md §1.10 D9), not BERT's 0.02
        return nn.Parameter(torch.empty(1, 1, self.mcfg.embed_dim).normal_(0.0, CLS_INIT_STD))

    def build_decoder(self, ndim: int = 2, grid: tuple[int, int] | None = None) -> nn.Module:
        g = self.mcfg.image_size // self.mcfg.patch_size
        return super().build_decoder(ndim=2, grid=(g, g))

    def teacher_input(self, batch: dict, features: Tensor) -> Tensor:
        return batch["source"]
