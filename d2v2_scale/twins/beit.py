"""Plain-PyTorch twin of the BEiT-style encoder of data2vec 1.0 vision (model/modalities/beit.py).

Self-contained on purpose: it imports only `torch` and `math`, so this file can be copied next to
an exported `model.safetensors` and used without Megatron, DeepSpeed or this project.  Same math
as the training model (fp32 parity is tested).

    cfg = types.SimpleNamespace(**exported_config)   # the ModelConfig fields listed below
    enc = PlainBeitEncoder(cfg)
    enc.load_state_dict(safetensors.torch.load_file("model.safetensors"))
    out = enc(images, mask=None)   # {"x": [B, 1 + P, D] after the final LayerNorm, "padding": None,
                                   #  "hidden": [each block's output, [B, 1 + P, D]]}

Config fields read: depth, embed_dim, num_heads, mlp_ratio, layer_norm_eps, image_size,
patch_size, in_chans, layer_scale_init, shared_rel_pos_bias.

State-dict layout (D = embed_dim, H = heads, F = mlp_ratio * D, R = (2g - 1)^2 + 3 for a g x g grid):
    local.proj.{weight [D, C, p, p], bias [D]}      patch embedding
    extra_tokens [1, 1, D]                          CLS token (BEiT: cls_token)
    mask_token [1, 1, D]
    rel_pos_bias.table [R, H]                       shared relative position bias (BEiT:
                                                    rel_pos_bias.relative_position_bias_table)
    blocks.{i}.norm1, norm2 .{weight, bias} [D]
    blocks.{i}.attn.qkv.weight [3D, D]              rows: q (heads 0..H-1), then k, then v; no bias
    blocks.{i}.attn.q_bias, attn.v_bias [D]         k has no bias
    blocks.{i}.attn.proj.{weight [D, D], bias [D]}
    blocks.{i}.mlp.fc1.{weight [F, D], bias [F]};  blocks.{i}.mlp.fc2.{weight [D, F], bias [D]}
    blocks.{i}.gamma_1, gamma_2 [D]                 layer scale (only when layer_scale_init > 0)
    blocks.{i}.rel_pos_bias.table [R, H]            per-block tables (shared_rel_pos_bias false)
    final_norm.{weight, bias} [D]                   (BEiT: norm)
Apart from local/extra_tokens/final_norm and the table's name these are BEiT's own names.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def relative_position_index(h, w):
    """[1 + h*w, 1 + h*w] table rows; token 0 is CLS (rows R-3: cls->token, R-2: token->cls,
    R-1: cls->cls), patches row-major."""
    n = (2 * h - 1) * (2 * w - 1) + 3
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    c = torch.stack([ys.reshape(-1), xs.reshape(-1)])
    rel = c[:, :, None] - c[:, None, :]
    idx = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    idx[1:, 1:] = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
    idx[0, :] = n - 3
    idx[:, 0] = n - 2
    idx[0, 0] = n - 1
    return idx


class RelPosBias(nn.Module):
    def __init__(self, grid, heads):
        super().__init__()
        self.table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, heads))
        self.register_buffer("index", relative_position_index(grid, grid), persistent=False)

    def forward(self):
        t = self.index.shape[0]
        return self.table[self.index.reshape(-1)].view(t, t, -1).permute(2, 0, 1)  # [H, T, T]


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        b, t, d = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, qkv_bias).view(b, t, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)  # [B, H, T, T]
        if bias is not None:
            a = a + bias
        out = a.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """x = x + gamma_1 * attn(norm1(x)); x = x + gamma_2 * mlp(norm2(x))."""

    def __init__(self, c, rel_pos_bias=None):
        super().__init__()
        d = c.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.attn = Attention(d, c.num_heads)
        self.norm2 = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.mlp = Mlp(d, int(d * c.mlp_ratio))
        self.gamma_1 = self.gamma_2 = None
        if c.layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(torch.full((d,), float(c.layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((d,), float(c.layer_scale_init)))
        self.rel_pos_bias = rel_pos_bias

    def forward(self, x, bias=None):
        if self.rel_pos_bias is not None:
            bias = self.rel_pos_bias()
        a = self.attn(self.norm1(x), bias)
        x = x + (a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.mlp(self.norm2(x))
        return x + (m if self.gamma_2 is None else self.gamma_2 * m)


class PatchLocal(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.proj = nn.Conv2d(c.in_chans, c.embed_dim, c.patch_size, stride=c.patch_size)

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)


class PlainBeitEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, g = c.embed_dim, c.image_size // c.patch_size
        self.c = c  # the config (d2v2-probe reads modality and width from it, as from PlainEncoder)
        self.local = PatchLocal(c)
        self.extra_tokens = nn.Parameter(torch.zeros(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        shared = bool(getattr(c, "shared_rel_pos_bias", True))
        self.rel_pos_bias = RelPosBias(g, c.num_heads) if shared else None
        self.blocks = nn.ModuleList(Block(c, None if shared else RelPosBias(g, c.num_heads))
                                    for _ in range(c.depth + getattr(c, "prenet_depth", 0)))
        self.final_norm = nn.LayerNorm(d, eps=c.layer_norm_eps)

    def forward(self, source, padding_mask=None, mask=None):
        """source: images [B, C, H, W]; padding_mask: unused (fixed-size images; the argument keeps
        PlainEncoder's call); mask [B, P] bool (True = masked patch -> mask_token) | None ->
        {"x": [B, 1 + P, D] final-normed, "padding": None, "hidden": [each block's output
        [B, 1 + P, D]]}; CLS at 0."""
        x = self.local(source)
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token * w
        x = torch.cat([self.extra_tokens.expand(x.shape[0], -1, -1), x], 1)
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        hidden = []
        for blk in self.blocks:
            x = blk(x, bias)
            hidden.append(x)
        return {"x": self.final_norm(x), "padding": None, "hidden": hidden}
