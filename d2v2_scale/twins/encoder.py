"""Plain-PyTorch twin of the data2vec 2.0 encoder (image, audio, text).

Self-contained on purpose: it imports only `torch` and `math`, so this file can be copied next to
an exported `model.safetensors` and used for fine-tuning / feature extraction without Megatron,
DeepSpeed or this project.  Same math as the training model (d2v2_scale/model/), fp32 parity is
tested.

    cfg = types.SimpleNamespace(**exported_config)   # the ModelConfig fields listed below
    enc = PlainEncoder(cfg)
    enc.load_state_dict(safetensors.torch.load_file("model.safetensors"))
    out = enc(source, padding_mask)   # {"x": [B, E+T, D], "padding": [B, T] | None, "ffn": [...],
                                      #  "hidden": [...]}

Config fields read: modality, depth, prenet_depth, embed_dim, num_heads, mlp_ratio,
layer_norm_eps, pre_ln, alibi, image_size, patch_size, in_chans, conv_feature_layers,
conv_pos_width, conv_pos_groups, conv_pos_depth, vocab_size, max_positions, pad_token_id.

State-dict layout (D = embed_dim, H = heads, F = mlp_ratio * D, C = CNN channels):
    image:  local.proj.{weight [D, C_in, p, p], bias [D]}     patch embedding
            extra_tokens [1, 1, D]                             CLS token
            context_norm.{weight, bias} [D]
    audio:  local.cnn.convs.{i}.weight [C_i, C_{i-1}, k_i]    (no bias)
            local.cnn.norms.{i}.{weight, bias} [C_i]
            local.norm.{weight, bias} [C];  local.proj.{weight [D, C], bias [D]}
            positions.convs.{j}.{weight [D, D/groups, k], bias [D]}
            context_norm.{weight, bias} [D]
            alibi_scale [H]
    text:   local.tokens.weight [V, D];  local.positions.weight [max_positions, D]
            local.norm.{weight, bias} [D]
    all:    blocks.{i}.attn.qkv.{weight [3D, D], bias [3D]}   rows: q (heads 0..H-1), then k, then v
            blocks.{i}.attn.proj.{weight [D, D], bias [D]}
            blocks.{i}.norm1.{weight, bias}, blocks.{i}.norm2.{weight, bias} [D]
            blocks.{i}.mlp.fc1.{weight [F, D], bias [F]};  blocks.{i}.mlp.fc2.{weight [D, F], bias [D]}
            final_norm.{weight, bias} [D]   (pre-LN models only)
Blocks 0..prenet_depth-1 are the context encoder's prenet; the rest are the shared blocks.

Fine-tuning regularizers (all 0 = off, as exported; set by the transformers folder's model code,
d2v2_scale/export/hf_remote/, docs/FINETUNE.md): Attention.attn_drop (attention probabilities),
Mlp.act_drop (after the GELU), Block.dropout (each branch before its residual add),
Block.drop_path (stochastic depth of each branch), PlainEncoder.layerdrop (skip whole blocks)
and PlainEncoder.feature_mask (a callable (x [B, T, D], padding [B, T] | None) -> x applied to
the local features before the positions: the fine-tuning time / channel masks).  None of them
acts in eval mode.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------
# attention bias
# ----------------------------------------------------------------------------------------------


def drop_path(x, p, training):
    """Stochastic depth: zero a sample's whole branch with probability p (kept ones scaled 1/(1-p))."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


def alibi_slopes(num_heads):
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(num_heads).is_integer():
        s = pow2(num_heads)
    else:
        c = 2 ** math.floor(math.log2(num_heads))
        s = pow2(c) + pow2(2 * c)[0::2][: num_heads - c]
    return torch.tensor(s, dtype=torch.float32)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.attn_drop = 0.0
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)  # [B, H, T, T]
        if bias is not None:
            a = a + bias
        out = F.dropout(a.softmax(-1), self.attn_drop, self.training) @ v  # [B, H, T, hd]
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.act_drop = 0.0
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.dropout(F.gelu(self.fc1(x)), self.act_drop, self.training))


class Block(nn.Module):
    """post-LN: x = LN1(x + attn(x)); t = mlp(x); x = LN2(x + t).  Returns (x, t)."""

    def __init__(self, dim, heads, mlp_ratio, eps, pre_ln=False):
        super().__init__()
        self.pre_ln = pre_ln
        self.dropout, self.drop_path = 0.0, 0.0
        self.attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def _branch(self, y):
        return drop_path(F.dropout(y, self.dropout, self.training), self.drop_path, self.training)

    def forward(self, x, bias=None):
        if self.pre_ln:
            x = x + self._branch(self.attn(self.norm1(x), bias))
            t = self.mlp(self.norm2(x))
            return x + self._branch(t), t
        x = self.norm1(x + self._branch(self.attn(x, bias)))
        t = self.mlp(x)
        return self.norm2(x + self._branch(t)), t


# ----------------------------------------------------------------------------------------------
# front ends
# ----------------------------------------------------------------------------------------------


def sincos_2d(dim, grid):
    def one(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.double().reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)

    h, w = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one(dim // 2, w), one(dim // 2, h)], 1).float()


class PatchLocal(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.proj = nn.Conv2d(c.in_chans, c.embed_dim, c.patch_size, stride=c.patch_size)

    def forward(self, src, padding_mask=None):
        return self.proj(src).flatten(2).transpose(1, 2), None


class Cnn(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.convs, self.norms, cin = nn.ModuleList(), nn.ModuleList(), 1
        for ch, k, s in layers:
            self.convs.append(nn.Conv1d(cin, ch, k, stride=s, bias=False))
            self.norms.append(nn.LayerNorm(ch))
            cin = ch

    def forward(self, wav):
        x = wav.unsqueeze(1)
        for conv, norm in zip(self.convs, self.norms):
            x = F.gelu(norm(conv(x).transpose(1, 2)).transpose(1, 2))
        return x.transpose(1, 2)


class AudioLocal(nn.Module):
    """Frame padding: right-padded waveforms; frame t is padding when t >= frames(real samples)."""

    def __init__(self, c):
        super().__init__()
        self.layers = [tuple(x) for x in c.conv_feature_layers]
        self.cnn = Cnn(self.layers)
        self.norm = nn.LayerNorm(self.layers[-1][0], eps=c.layer_norm_eps)
        self.proj = nn.Linear(self.layers[-1][0], c.embed_dim)

    def forward(self, src, padding_mask=None):
        f = self.cnn(src)
        pad = None
        if padding_mask is not None:
            n = (~padding_mask).sum(1)
            for _, k, s in self.layers:
                n = torch.div(n - k, s, rounding_mode="floor") + 1
            pad = torch.arange(f.shape[1], device=f.device)[None] >= n.clamp_min(0)[:, None]
            pad = pad if bool(pad.any()) else None
        return self.proj(self.norm(f)), pad


class ConvPositions(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.k = c.conv_pos_width
        self.convs = nn.ModuleList(nn.Conv1d(c.embed_dim, c.embed_dim, self.k, padding=self.k // 2,
                                             groups=c.conv_pos_groups) for _ in range(c.conv_pos_depth))

    def forward(self, x, zero=None):
        if zero is not None:
            x = x.masked_fill(zero.unsqueeze(-1), 0.0)
        y = x.transpose(1, 2)
        for conv in self.convs:
            y = conv(y)
            if self.k % 2 == 0:
                y = y[..., :-1]
            y = F.gelu(F.layer_norm(y.transpose(1, 2), (y.shape[1],)).transpose(1, 2))
        return x + y.transpose(1, 2)


class TextLocal(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pad = c.pad_token_id
        self.tokens = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=c.pad_token_id)
        self.positions = nn.Embedding(c.max_positions, c.embed_dim)
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.layer_norm_eps)

    def forward(self, src, padding_mask=None):
        if padding_mask is None:
            padding_mask = src.eq(self.pad)
        x = self.tokens(src) + self.positions.weight[: src.shape[1]][None]
        return self.norm(x), (padding_mask if bool(padding_mask.any()) else None)


# ----------------------------------------------------------------------------------------------
# encoder
# ----------------------------------------------------------------------------------------------


class PlainEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        d, mod = c.embed_dim, c.modality
        self.register_buffer("pos_table", None, persistent=False)
        self.positions = None
        self.extra_tokens = None
        self.context_norm = None
        self.alibi_scale = None
        self.layerdrop, self.feature_mask = 0.0, None
        if mod == "image":
            self.local = PatchLocal(c)
            self.pos_table = sincos_2d(d, c.image_size // c.patch_size)[None]
            self.extra_tokens = nn.Parameter(torch.zeros(1, 1, d))
        elif mod == "audio":
            self.local = AudioLocal(c)
            self.positions = ConvPositions(c)
        elif mod == "text":
            self.local = TextLocal(c)
        else:
            raise ValueError(mod)
        if mod in ("image", "audio") and not c.pre_ln:
            self.context_norm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.final_norm = nn.LayerNorm(d, eps=c.layer_norm_eps) if c.pre_ln else None
        if c.alibi:
            self.alibi_scale = nn.Parameter(torch.ones(c.num_heads))
            self.register_buffer("slopes", alibi_slopes(c.num_heads), persistent=False)
        self.blocks = nn.ModuleList(Block(d, c.num_heads, c.mlp_ratio, c.layer_norm_eps, c.pre_ln)
                                    for _ in range(c.depth + c.prenet_depth))

    def forward(self, source, padding_mask=None):
        """-> {"x": [B, E + T, D], "padding": [B, T] | None, "ffn": [FFN output of every block],
        "hidden": [output of every block, [B, E + T, D]], "input": block 0's input [B, E + T, D]}.
        x is the last block's output (after final_norm for pre-LN models); ffn[k] is block k's MLP
        output before its residual add (a block skipped by layerdrop: its input again, ffn zeros)."""
        x, pad = self.local(source, padding_mask)
        if self.feature_mask is not None and self.training:
            x = self.feature_mask(x, pad)
        if self.pos_table is not None:
            x = x + self.pos_table
        if self.positions is not None:
            x = self.positions(x, pad)
        b, t, _ = x.shape
        e = 0
        if self.extra_tokens is not None:
            e = self.extra_tokens.shape[1]
            x = torch.cat([self.extra_tokens.expand(b, -1, -1), x], 1)
        if self.context_norm is not None:
            x = self.context_norm(x)
        bias = None
        if self.alibi_scale is not None:
            pos = torch.arange(t, device=x.device)
            dist = (pos[:, None] - pos[None, :]).abs().float()
            bias = -dist[None, None] * (self.slopes * self.alibi_scale.clamp_min(0))[None, :, None, None]
        if pad is not None:
            kp = torch.zeros(b, e + t, device=x.device)
            kp[:, e:] = kp[:, e:].masked_fill(pad, float("-inf"))
            kp = kp[:, None, None, :]
            bias = kp if bias is None else bias + kp
        ffn, hidden, inp = [], [], x
        for blk in self.blocks:
            if self.training and self.layerdrop > 0 and float(torch.rand(())) < self.layerdrop:
                f = torch.zeros_like(x)
            else:
                x, f = blk(x, bias)
            ffn.append(f)
            hidden.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return {"x": x, "padding": pad, "ffn": ffn, "hidden": hidden, "input": inp}
